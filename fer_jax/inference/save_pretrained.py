r"""`python -m fer_jax.inference.save_pretrained`: a run's selected checkpoint as the weights file
shipped in the package (format: `fer_jax.model.pretrained`; when: fer_jax/weights/README.md).

    python -m fer_jax.inference.save_pretrained --from=runs/fer2013 --out=fer_jax/weights/NAME.npz \
        [--results=runs/fer2013/results.json] [--replica=k] [--param_dtype=bfloat16] \
        [--matmul_dtype=float32]

Not in `pretrained`: it reads Orbax checkpoints, whose loader reads `pretrained` weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from fer_jax.model.pretrained import PARAM_DTYPES, manifest_path, read_manifest, save
from fer_jax.model.resnet import MATMUL_DTYPES
from fer_jax.training import checkpoint
from fer_jax.user_errors import UserError, run_cli


def _accuracies(results: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures of a run's `results.json`."""
    report = results.get("report_split", "private_test")
    out: dict[str, Any] = {
        "selected_on": results.get("selected_on"),
        "select_accuracy": results.get("select_accuracy"),
        f"{report}_accuracy": (results.get(report) or {}).get("accuracy"),
        f"{report}_centre_crop_accuracy": (results.get("centre_crop") or {}).get("accuracy"),
    }
    cv = results.get("cross_validation")
    if isinstance(cv, Mapping):
        out["jaffe_cv_mean_accuracy"] = cv.get("mean_accuracy")
        out["jaffe_cv_std_accuracy"] = cv.get("std_accuracy")
        out["jaffe_cv_protocol"] = cv.get("protocol")
        for protocol, figures in (cv.get("protocols") or {}).items():
            if protocol != cv.get("protocol") and isinstance(figures, Mapping):
                out[f"jaffe_cv_{protocol}_mean_accuracy"] = figures.get("mean_accuracy")
                out[f"jaffe_cv_{protocol}_std_accuracy"] = figures.get("std_accuracy")
    return {k: v for k, v in out.items() if v is not None}


def convert(
    source: str,
    out: str,
    *,
    results: str | None = None,
    replica: int | None = None,
    param_dtype: str = "bfloat16",
    matmul_dtype: str = "float32",
) -> tuple[str, dict[str, Any]]:
    """Writes a run's selected checkpoint (or one checkpoint) as shipped weights `out`; returns
    `(out, manifest)`. `results` (default: `source/results.json` if there) must be of the same
    checkpoint; its accuracies go into the provenance. `matmul_dtype`: the shipped model's
    (float32: exact on every CPU); what the run trained with stays in the provenance."""
    variables, ckpt_meta, where = checkpoint.load_variables(source)
    variables, index = checkpoint.take_replica(variables, ckpt_meta, replica, where)
    if "model" not in ckpt_meta:
        raise UserError(f"{where} has no model description in its meta")
    step = ckpt_meta.get("step")
    if step is None and os.path.basename(where).isdigit():
        step = int(os.path.basename(where))
    replicated = checkpoint.replica_count(ckpt_meta) > 1
    if replicated:  # the step at which this replica was selected
        step = ckpt_meta.get("replica_steps", {index: step})[index]
    if results is None and os.path.isfile(os.path.join(source, "results.json")):
        results = os.path.join(source, "results.json")
    # Paths as the caller gave them (e.g. runs/fer2013/best/4485), not this machine's layout.
    relative = os.path.relpath(where, os.path.abspath(source))
    provenance: dict[str, Any] = {
        "source": os.path.normpath(source),
        "checkpoint": os.path.normpath(os.path.join(source, relative)),
        "step": step,
        "epoch": ckpt_meta.get("epoch"),
    }
    if replicated:
        provenance["replica"] = index
    model = dict(ckpt_meta["model"])
    trained = model.get("matmul_dtype", "float32")
    if matmul_dtype != trained:
        model["matmul_dtype"] = matmul_dtype
        provenance["trained_matmul_dtype"] = trained
    if results is not None:
        try:
            with open(results) as f:
                run_results = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{results}: cannot read the run's results: {e}") from e
        selected = run_results.get("selected_step")
        if selected is not None and selected != step:
            raise UserError(
                f"{results} reports the checkpoint of step {selected}, not {where} (step {step}): "
                "give the run's selected checkpoint, or no --results"
            )
        provenance["results_file"] = os.path.normpath(results)
        provenance["accuracies"] = _accuracies(run_results)
        resolved = run_results.get("matmul_dtype_resolved")
        if resolved and provenance.get("trained_matmul_dtype") == "auto":
            provenance["trained_matmul_dtype"] = resolved  # what 'auto' was where it trained
    # A-Softmax's margin and the lambda its training ended at, from the run's config.json: what
    # fine-tuning it holds (`fer_jax.training.cross_validate.read_source`).
    from fer_jax.training.cross_validate import SHIPPED_RECIPE, read_source

    trained = read_source(source, "--from")
    if not trained.origin.get("loss", SHIPPED_RECIPE).startswith(SHIPPED_RECIPE):
        provenance["loss"] = {"margin": trained.margin, "lambda": trained.lam}
    save(variables, model, out, meta=provenance, param_dtype=param_dtype)
    return out, read_manifest(out)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring); returns the exit status (2: an error in the input)."""
    parser = argparse.ArgumentParser(
        prog="python -m fer_jax.inference.save_pretrained",
        description="Write a run's selected checkpoint as the weights file shipped in fer_jax.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        help="run directory (its best checkpoint, else its latest) or one checkpoint directory",
    )
    parser.add_argument("--out", required=True, help="the .npz to write (and its .json manifest)")
    parser.add_argument(
        "--results",
        help="the run's results.json, for the accuracies (default: RUN/results.json if there)",
    )
    parser.add_argument("--replica", type=int, help="of a replica run (default: the chosen one)")
    parser.add_argument("--param_dtype", choices=PARAM_DTYPES, default="bfloat16")
    parser.add_argument(
        "--matmul_dtype",
        choices=MATMUL_DTYPES,
        default="float32",
        help="model.matmul_dtype of the shipped model (what its users' CPU forms compute with)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show the traceback of an error in the input"
    )
    args = parser.parse_args(argv)

    def run() -> int:
        if not args.out.endswith(".npz"):
            raise UserError(f"--out={args.out}: the weights file name must end in .npz")
        path, manifest = convert(
            args.source,
            args.out,
            results=args.results,
            replica=args.replica,
            param_dtype=args.param_dtype,
            matmul_dtype=args.matmul_dtype,
        )
        provenance = manifest["meta"]["provenance"]
        print(f"wrote {path} ({manifest['bytes'] / 1e6:.1f} MB, sha256 {manifest['sha256']})")
        print(f"  and {manifest_path(path)}")
        print(f"  from {provenance['checkpoint']} (step {provenance['step']})")
        for key, value in provenance.get("accuracies", {}).items():
            print(f"  {key}: {value}")
        return 0

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
