"""The shipped model's evaluation with float32 and with bfloat16 matmul operands, side by side.

    python -m experiments.bf16_inference --manual_dir=/path/to/fer2013 --rounds 0 --out=DIR
    /var/tmp/fer_jax-runs/quiet.sh python -m experiments.bf16_inference \
        --manual_dir=/path/to/fer2013 --probabilities=DIR/probabilities.npz \
        [--speed_faces=128] [--rounds=5] [--out=experiments/results/bf16_inference_<cpu>]

Four `Recognizer`s of `--checkpoint` (`Recognizer.from_checkpoint(adjust=False)`): matmul_dtype
'float32' and 'bfloat16' (float32 accumulation; `fer_jax.model.conv`'s CPU forms), each with ten
crops and the centre crop, at the recognizer's default batch size, compiled and warmed up first.

1. Accuracy: the probabilities of every face of `--split` (FER2013 PrivateTest: 3,589), or
   those of an earlier run (`--probabilities`: no model pass, so the slow part can run at any
   time, e.g. niced beside other work). Scored without and with the class-prior adjustment the
   manifest records (`prior_adjustment.from_manifest`; numpy on the probabilities): accuracy,
   mean per-class recall, and bfloat16's argmax agreement with float32.
2. Speed: `--rounds` alternating rounds on the first `--speed_faces` faces, one `predict_faces`
   call per contestant per round, the order flipped every round: faces/s per round and the
   best (the adjustment is a numpy step on 7 numbers per face: the same faces/s either way).
   Run it with the machine quiet (`/var/tmp/fer_jax-runs/quiet.sh`); faces/s compare only
   within one run.

Writes table.md, raw.json and probabilities.npz (the unadjusted probabilities and labels).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from experiments import common, provenance

PRECISIONS = ("float32", "bfloat16")
CROPS = (10, 1)


def contestants(checkpoint: str) -> dict[tuple[int, str], Any]:
    """`{(crops, matmul_dtype): Recognizer}`, unadjusted (the adjustment is applied later)."""
    from fer_jax.inference.recognizer import Recognizer

    return {
        (crops, precision): Recognizer.from_checkpoint(
            checkpoint, adjust=False, crops=crops, matmul_dtype=precision
        )
        for crops in CROPS
        for precision in PRECISIONS
    }


def timed(recognizer: Any, faces: np.ndarray) -> tuple[np.ndarray, float]:
    """`(probabilities, seconds)` of one `predict_faces` call."""
    start = time.perf_counter()
    out = recognizer.predict_faces(faces)
    return out, time.perf_counter() - start


def measure(
    recognizers: dict[tuple[int, str], Any],
    faces: np.ndarray,
    full: bool,
    speed_faces: int,
    rounds: int,
) -> dict[str, Any]:
    """Warm-up (compile) seconds, with `full` the probabilities of all `faces` (and the seconds
    of that pass), and the seconds of each timing round, per contestant (keys
    `'<crops>/<matmul_dtype>'`)."""
    names = {key: f"{key[0]}/{key[1]}" for key in recognizers}
    out: dict[str, Any] = {"warmup_s": {}, "full_s": {}, "probabilities": {}, "rounds_s": {}}
    batch = next(iter(recognizers.values())).batch_size
    warm = faces[: batch + len(faces) % batch if full else speed_faces]  # the buckets used
    for key, recognizer in recognizers.items():
        out["warmup_s"][names[key]] = timed(recognizer, warm)[1]
    for key in recognizers if full else ():
        probs, seconds = timed(recognizers[key], faces)
        out["probabilities"][names[key]], out["full_s"][names[key]] = probs, seconds
        print(f"full pass {names[key]}: {len(faces) / seconds:.1f} faces/s", flush=True)
    keys = list(recognizers)
    for r in range(rounds):
        for key in keys[:: 1 - 2 * (r % 2)]:
            seconds = timed(recognizers[key], faces[:speed_faces])[1]
            out["rounds_s"].setdefault(names[key], []).append(seconds)
        print(f"round {r + 1}: {out['rounds_s']}", flush=True)
    return out


def scores(
    probabilities: np.ndarray, labels: np.ndarray, offsets: np.ndarray | None
) -> dict[str, Any]:
    """Accuracy and recalls without (`'own'`) and with (`'adjusted'`) the logit offsets."""
    from experiments.ema_effect import score
    from fer_jax.inference.prior_adjustment import adjust

    out = {"own": score(probabilities, labels)}
    if offsets is not None:
        out["adjusted"] = score(adjust(probabilities, offsets), labels)
    return out


def agreement(probs: dict[str, np.ndarray], offsets: np.ndarray | None) -> dict[str, Any]:
    """bfloat16 against float32 per crop count: the fraction of faces with the same argmax
    (own and adjusted) and the largest absolute probability difference."""
    from fer_jax.inference.prior_adjustment import adjust

    out = {}
    for crops in CROPS:
        a, b = probs[f"{crops}/float32"], probs[f"{crops}/bfloat16"]
        same = adjust(a, offsets).argmax(-1) == adjust(b, offsets).argmax(-1)
        out[str(crops)] = {
            "same_argmax_own": float(np.mean(a.argmax(-1) == b.argmax(-1))),
            "same_argmax_adjusted": float(np.mean(same)),
            "max_abs_probability_difference": float(np.abs(a - b).max()),
        }
    return out


def rows(results: dict[str, Any], speed_faces: int) -> list[list[str]]:
    """One table row per crop count, adjustment and precision."""
    out = []
    for crops in CROPS:
        for kind in ("own", "adjusted"):
            base = results["scores"].get(f"{crops}/float32", {}).get(kind)
            for precision in PRECISIONS:
                name = f"{crops}/{precision}"
                if kind not in results["scores"][name]:
                    continue
                s = results["scores"][name][kind]
                per_round = [speed_faces / t for t in results["rounds_s"].get(name, [])]
                out.append(
                    [
                        str(crops),
                        "yes" if kind == "adjusted" else "no",
                        precision,
                        f"{100 * s['accuracy']:.2f}",
                        f"{100 * (s['accuracy'] - base['accuracy']):+.2f}",
                        f"{100 * s['mean_class_accuracy']:.2f}",
                        " / ".join(f"{r:.1f}" for r in per_round) or "-",
                        f"**{max(per_round):.1f}**" if per_round else "-",
                    ]
                )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__)
    common.add_manual_dir(ap)
    common.add_checkpoint(ap)
    ap.add_argument("--split", default="private_test", choices=["public_test", "private_test"])
    common.add_limit(ap, help="first N faces of the split")
    ap.add_argument("--speed_faces", type=int, default=128, help="faces per timing round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    ap.add_argument("--probabilities", help="probabilities.npz of an earlier run: no full pass")
    common.add_out(ap)
    args = ap.parse_args(argv)

    from data_pipelines.files import load_split_from_files
    from fer_jax import host_memory
    from fer_jax.model import resnet

    host_memory.reuse_scratch_memory()
    data = load_split_from_files("fer2013", args.split, args.manual_dir)
    faces, labels = data["image"][: args.limit, ..., 0], data["label"][: args.limit]
    recognizers = contestants(args.checkpoint)
    results = measure(recognizers, faces, not args.probabilities, args.speed_faces, args.rounds)
    probs = results.pop("probabilities")
    if args.probabilities:
        with np.load(args.probabilities) as saved:
            probs = {k.replace("_", "/"): saved[k] for k in saved.files if k != "labels"}
            np.testing.assert_array_equal(saved["labels"], labels)
    offsets = _offsets(args.checkpoint)
    results["scores"] = {name: scores(p, labels, offsets) for name, p in probs.items()}
    results["agreement"] = agreement(probs, offsets)
    auto = "bfloat16" if resnet.matmul_bf16("auto") else "float32"
    heading = (
        f"{args.checkpoint} on FER2013 {args.split} ({len(faces)} faces): float32 vs bfloat16 "
        f"matmul operands ('auto' is {auto} here); {provenance.cpu_model()}; "
        f"{args.rounds} alternating rounds of {args.speed_faces} faces. Agreement with float32 "
        "(argmax, own / adjusted): "
        + "; ".join(
            f"{c} crops {100 * a['same_argmax_own']:.2f} / {100 * a['same_argmax_adjusted']:.2f}%"
            for c, a in results["agreement"].items()
        )
    )
    header = ["crops", "adjusted", "matmul", "accuracy %", "vs float32", "mean class recall %"]
    header += ["faces/s per round", "best round"]
    table_rows = rows(results, args.speed_faces)
    raw = {"args": vars(args), "matmul_dtype_auto": auto, **results}
    out = common.write_table("bf16_inference", heading, header, table_rows, raw, args.out)
    np.savez_compressed(
        f"{out}/probabilities.npz",
        labels=labels,
        **{k.replace("/", "_"): p for k, p in probs.items()},
    )
    return raw


def _offsets(checkpoint: str) -> np.ndarray | None:
    """The logit offsets the manifest of a pretrained `checkpoint` records (else None)."""
    from fer_jax.inference import prior_adjustment
    from fer_jax.model import pretrained

    if not pretrained.is_reference(checkpoint):
        return None
    manifest = pretrained.read_manifest(pretrained.parse_reference(checkpoint)[1])
    return prior_adjustment.from_manifest(manifest)


if __name__ == "__main__":
    main()
