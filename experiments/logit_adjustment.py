"""Choose the class-prior logit adjustment of a model on PublicTest; report it on PrivateTest.

    python -m experiments.logit_adjustment --manual_dir=/path/to/fer2013 \
        [--checkpoint=pretrained] [--write_manifest] [--out=experiments/results/NAME]

The model's probabilities (`Recognizer`, ten crops and the centre crop, unadjusted) of every
PublicTest and PrivateTest face; the training prior from FER2013 Training's labels; then for
each tau of `prior_adjustment.TAU_GRID` the accuracy and per-class recall on both splits. tau is
chosen on PublicTest ten crops (the output users get by default): the smallest whose mean
per-class recall is within `prior_adjustment.TOLERANCE` of the best; PrivateTest is only
reported. `--probabilities` takes the probabilities.npz of an earlier run instead of the model.
`--write_manifest` records the choice in the weights manifest of `--checkpoint` (a pretrained
model), which the recognizer then applies by default. Writes table.md, raw.json (curves, chosen
tau, provenance) and probabilities.npz (the unadjusted probabilities, so the table can be
recomputed without the model).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from experiments import common, provenance

SPLITS = ("public_test", "private_test")
CROPS = (10, 1)


def _percent(x: float) -> str:
    return f"{100 * x:.2f}"


def probabilities(checkpoint: str, manual_dir: str, limit: int | None) -> dict[str, Any]:
    """Unadjusted probabilities `{'<split>_<crops>': (N, K)}`, labels per split, the training
    prior and the seconds each took."""
    from data_pipelines.files import load_split_from_files
    from fer_jax.inference import prior_adjustment
    from fer_jax.inference.recognizer import Recognizer

    train = load_split_from_files("fer2013", "train", manual_dir)["label"]
    out: dict[str, Any] = {"prior": prior_adjustment.class_prior(train, 7), "seconds": {}}
    for crops in CROPS:
        recognizer = Recognizer.from_checkpoint(  # float32: the model's own evaluation
            checkpoint, adjust=False, crops=crops, matmul_dtype="float32"
        )
        for split in SPLITS:
            data = load_split_from_files("fer2013", split, manual_dir)
            faces, labels = data["image"][..., 0], data["label"]
            if limit:
                faces, labels = faces[:limit], labels[:limit]
            start = time.perf_counter()
            out[f"{split}_{crops}"] = recognizer.predict_faces(faces)
            out["seconds"][f"{split}_{crops}"] = time.perf_counter() - start
            out[f"{split}_labels"] = labels
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__)
    common.add_manual_dir(ap)
    common.add_checkpoint(ap)
    ap.add_argument("--write_manifest", action="store_true", help="record tau in the manifest")
    common.add_limit(ap)
    ap.add_argument("--probabilities", help="a probabilities.npz of an earlier run: no model")
    common.add_out(ap)
    args = ap.parse_args(argv)

    from data_pipelines.labels import CLASS_NAMES
    from fer_jax.inference import prior_adjustment
    from fer_jax.model import pretrained

    if args.write_manifest and not pretrained.is_reference(args.checkpoint):
        ap.error("--write_manifest needs a pretrained model as --checkpoint (e.g. 'pretrained')")
    if args.probabilities:
        with np.load(args.probabilities) as saved:
            probs = {k: saved[k] for k in saved.files} | {"seconds": {}}
    else:
        probs = probabilities(args.checkpoint, args.manual_dir, args.limit)
    prior = probs["prior"]
    curves = {
        f"{split}_{crops}": prior_adjustment.curve(
            probs[f"{split}_{crops}"], probs[f"{split}_labels"], prior
        )
        for split in SPLITS
        for crops in CROPS
    }
    tau = prior_adjustment.choose_tau(curves["public_test_10"])
    heading = (
        f"Class-prior logit adjustment of {args.checkpoint}: tau = {tau:g} chosen on PublicTest "
        f"ten crops (the smallest tau in 0..2 whose mean per-class recall is within "
        f"{100 * prior_adjustment.TOLERANCE:g} points of the best); prior = FER2013 Training "
        f"({' / '.join(f'{p:.4f}' for p in prior)}); {provenance.cpu_model()}. Per class: "
        f"{' / '.join(CLASS_NAMES)}."
    )
    out = args.out or os.path.join(
        provenance.REPO, "experiments", "results", "logit_adjustment_cpu"
    )
    os.makedirs(out, exist_ok=True)
    np.savez_compressed(
        os.path.join(out, "probabilities.npz"),
        **{k: v for k, v in probs.items() if isinstance(v, np.ndarray)},
    )
    adjustment = _adjustment(curves, tau, prior, out)
    common.write_table(
        "logit_adjustment",
        heading,
        ["split", "crops", "tau", "accuracy %", "mean class acc. %", "min class %", "per class %"],
        _rows(curves, tau),
        {
            "args": vars(args),
            "tau": tau,
            "adjustment": adjustment,
            "curves": curves,
            "seconds": probs["seconds"],
        },
        out,
    )
    if args.write_manifest:
        _, name = pretrained.parse_reference(args.checkpoint)
        print("wrote", pretrained.set_logit_adjustment(name, adjustment))
    return {"tau": tau, "curves": curves}


def _rows(curves: dict[str, list[dict[str, Any]]], tau: float) -> list[list[str]]:
    """The table's rows: each split and crop count without (tau 0) and with the adjustment."""
    rows = []
    for key, rows_of_key in curves.items():
        for t in (0.0, tau):
            r = next(r for r in rows_of_key if r["tau"] == t)
            split, crops = key.rsplit("_", 1)
            per_class = " / ".join(_percent(a) for a in r["per_class_accuracy"])
            rows.append(
                [
                    split,
                    crops,
                    f"{t:g}",
                    _percent(r["accuracy"]),
                    _percent(r["mean_class_accuracy"]),
                    _percent(min(r["per_class_accuracy"])),
                    per_class,
                ]
            )
    return rows


def _adjustment(
    curves: dict[str, list[dict[str, Any]]], tau: float, prior: np.ndarray, out: str
) -> dict[str, Any]:
    """The manifest's record of the chosen adjustment (`tau`, `prior`, its accuracies)."""
    from fer_jax.inference import prior_adjustment

    return {
        "tau": tau,
        "prior": prior.tolist(),
        "prior_from": "FER2013 Training labels",
        "results": os.path.relpath(os.path.abspath(out), provenance.REPO),
        "chosen_on": (
            "public_test, ten crops: the smallest tau whose mean per-class recall is within "
            f"{prior_adjustment.TOLERANCE} of the best"
        ),
        "public_test": {k: _at(curves[f"public_test_{k}"], tau) for k in ("10", "1")},
        "private_test": {k: _at(curves[f"private_test_{k}"], tau) for k in ("10", "1")},
    }


def _at(rows: list[dict[str, Any]], tau: float) -> dict[str, float]:
    r = next(r for r in rows if r["tau"] == tau)
    return {"accuracy": r["accuracy"], "mean_class_accuracy": r["mean_class_accuracy"]}


if __name__ == "__main__":
    main()
