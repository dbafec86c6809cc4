"""A finished run -> the shipped weights and the model card's figures, all measured.

    python -m experiments.model_card --run=/var/tmp/fer_jax-runs/fer2013_cpu \
        --manual_dir=~/data/fer2013 --out=experiments/results/fer2013_cpu_<cpu> \
        --train_command="python -m fer_jax.main ..." \
        [--weights=fer_jax/weights/cbam_resnet18_fer2013.npz] [--skip float32:public_test:10] \
        [--peers=experiments/results/peers_<cpu>]

1. Converts the run's selected checkpoint (chosen on its select split) to the package's weights
   file (`fer_jax.model.pretrained`: bfloat16 parameters, float32 BatchNorm statistics).
2. Evaluates both, the float32 checkpoint and the bfloat16 file, on the select and report splits
   (PublicTest and PrivateTest), with ten crops and with the centre crop (`EVALUATIONS`: the
   float32 PrivateTest figures are the run's own, the bfloat16 ten-crop PublicTest is skipped),
   with the run's own config (its `config.json`) and the data source given here; the shipped
   file with its own `model.matmul_dtype` (float32 where the run trained with bfloat16 matmul
   operands: as its users run it).
3. Writes under `--out`: `model_card.json` (every accuracy, per-class accuracies, confusion
   matrices, what bfloat16 storage cost in points), `model_card.md` (the README's model card:
   recipe, the training command (`--train_command`, as it was run) and this one, CPU and wall
   time, the table), each evaluation's JSON and PNG (`eval/`),
   and the run's `summary.md` / `curves.png` (`experiments.run_summary`), `results.json` and
   `config.json`.
4. The peer line: the `fer` package's model next to this one, read from a full
   `experiments.peers` run on the report split (`--peers`, its folder: `raw.json`); without
   it the card says the peer was not compared. A smoke or `--limit` run is refused.
About 15-20 minutes on a 2-core CPU (a ten-crop split is ~36k crops); `--skip` leaves out
evaluations (the card then says 'not evaluated').
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections

from experiments import common, provenance, run_summary
from fer_jax.training import evaluate
from fer_jax.training.step import create_train_state
from fer_jax.training.train import create_job

SPLITS = ("public_test", "private_test")
CROPS = (10, 1)
# (precision, split, crops) evaluated here, ~7 min per ten-crop split at ~90 crops/s (2-core
# Zen 4). The float32 PrivateTest figures are the run's own (`results.json`: the same
# evaluation of the same selected checkpoint, made when it finished); the bfloat16 file's
# ten-crop PublicTest is left out (its storage cost is measured on PrivateTest, both crops).
EVALUATIONS = (
    ("float32", "public_test", 10),
    ("float32", "public_test", 1),
    ("bfloat16", "public_test", 1),
    ("bfloat16", "private_test", 10),
    ("bfloat16", "private_test", 1),
)
PEER_FER = "fer, FER() (TFLite, its default)"  # experiments.peers' name of fer's default model
PEER_OURS = "fer_jax, ten crops, no_adjust"  # this card's figures: the model's own output


def peer(folder: str | None, report_split: str = "private_test") -> dict[str, Any] | None:
    """The `fer` package's figures next to this model's from an `experiments.peers` results
    folder (None: not compared): accuracy, mean class recall and faces/s of both.

    Raises SystemExit when the run is a smoke run, a `--limit` run or of another split."""
    if folder is None:
        return None
    path = os.path.join(folder, "raw.json")
    raw = common.read_json(path)
    if raw is None:
        raise SystemExit(f"error: {path} is missing: not an experiments.peers results folder")
    if raw.get("smoke") or raw.get("limit") or raw.get("split") != report_split:
        raise SystemExit(
            f"error: {path} is not a full {report_split} comparison (smoke "
            f"{raw.get('smoke')}, limit {raw.get('limit')}, split {raw.get('split')})"
        )
    faces = raw["results"]["faces"]
    fields = ("accuracy", "mean_class_recall", "faces_per_s")
    return {
        "folder": folder,
        "fer_version": raw["fer"]["version"],
        "cpu_model": raw["hardware"]["cpu_model"],
        "fer": {k: faces[PEER_FER][k] for k in fields},
        "fer_jax": {k: faces[PEER_OURS][k] for k in fields},
        "fer_jax_weights_sha256": (raw.get("fer_jax") or {}).get("weights_sha256"),
    }


def peer_line(compared: dict[str, Any] | None, weights_sha256: str | None = None) -> str:
    """The card's peer bullet (without its leading '- '). `weights_sha256`: the card's weights;
    where the peers run scored other weights, their figures are not called this model's (the
    faces/s are still the network's)."""
    if compared is None:
        return (
            "Peer: the `fer` package's model not compared for this card (`python -m "
            "experiments.peers`, then `--peers`)"
        )
    fer, ours = compared["fer"], compared["fer_jax"]
    measured = compared.get("fer_jax_weights_sha256")
    this = (
        "this model there"
        if weights_sha256 is None or measured == weights_sha256
        else f"this network there with other weights (sha256 {str(measured)[:12]})"
    )
    return (
        f"Peer: the `fer` package's model (fer {compared['fer_version']}, `FER()`, one 64x64 "
        f"crop) on the same faces, measured side by side (`{compared['folder']}`): "
        f"{100 * fer['accuracy']:.2f}% (mean class recall {100 * fer['mean_class_recall']:.2f}%)"
        f", {fer['faces_per_s']:.0f} faces/s; {this}, ten crops: "
        f"{100 * ours['accuracy']:.2f}% ({100 * ours['mean_class_recall']:.2f}%), "
        f"{ours['faces_per_s']:.1f} faces/s; CPU: {compared['cpu_model']}"
    )


def _name(precision: str, split: str, crops: int) -> str:
    return f"{split}_{precision}_{'ten_crop' if crops == 10 else 'centre_crop'}"


def _config(run: str, data_source: str | None, manual_dir: str | None, data_dir: str | None):
    path = os.path.join(run, "config.json")
    saved = common.read_json(path)
    if saved is None:
        raise SystemExit(f"error: {path} is missing")
    config = ml_collections.ConfigDict(saved)
    for field, value in (
        ("data_source", data_source),
        ("manual_dir", manual_dir),
        ("data_dir", data_dir),
    ):
        if value is not None:
            config[field] = value
    config.cross_validate = False
    return config


def _record(found: dict, out: str, key: tuple[str, str, int], metrics: dict) -> None:
    precision, split, crops = key
    evaluate.write_report(os.path.join(out, "eval"), _name(*key), metrics)
    found.setdefault(precision, {}).setdefault(split, {})[crops] = metrics
    print(f"{_name(*key)}: {100 * metrics['accuracy']:.2f}%", flush=True)


def _from_results(results: dict[str, Any], out: str) -> dict[str, Any]:
    """The float32 PrivateTest metrics the run reported for its selected model, ten crops and
    centre crop, as `{"float32": {"private_test": {crops: metrics}}}`."""
    if results.get("report_split") != "private_test" or "centre_crop" not in results:
        raise SystemExit("error: the run's results.json does not report private_test (both crops)")
    found: dict[str, Any] = {}
    _record(found, out, ("float32", "private_test", 10), results["private_test"])
    _record(found, out, ("float32", "private_test", 1), results["centre_crop"])
    return found


def _evaluate_all(
    configs: dict[str, ml_collections.ConfigDict],
    sources: dict[str, str],
    out: str,
    found: dict[str, Any],
    evaluations: tuple = EVALUATIONS,
) -> None:
    """Adds `evaluations` to `found` (`{precision: {split: {crops: metrics}}}`); `sources` maps
    each precision to a checkpoint argument, `configs` to the config it is evaluated with."""
    from fer_jax.training import checkpoint, input_data

    splits = input_data.load_splits(next(iter(configs.values())), list(SPLITS))
    jobs = {}  # one per model config: the same compiled steps serve both where they agree
    for precision, source in sources.items():
        config = configs[precision]
        key = json.dumps(config.model.to_dict(), sort_keys=True)
        if key not in jobs:
            jobs[key] = create_job(config)
        job = jobs[key]
        template = create_train_state(config, job.model, steps_per_epoch=1)
        state = job.devices.replicate(checkpoint.init_from(source, template, config))
        for key in (e for e in evaluations if e[0] == precision):
            metrics = job.evaluate(state, *splits[key[1]], crops=key[2])
            _record(found, out, key, metrics)


def resolved_matmul_dtype(matmul_dtype: str) -> str:
    """`matmul_dtype` as the card records it: 'auto' with what it resolves to on this machine
    (where the evaluations ran), e.g. 'auto (bfloat16 here)'."""
    from fer_jax.model.resnet import matmul_bf16

    if matmul_dtype != "auto":
        return matmul_dtype
    return f"auto ({'bfloat16' if matmul_bf16(matmul_dtype) else 'float32'} here)"


MAX_LOG_GAP_S = 1800  # longer between two training logs: the run was stopped there


def training_wall_seconds(run: str, tag: str = "train_loss") -> float | None:
    """Wall time of the training, summed over the sessions it resumed in: the gaps between
    consecutive `tag` events (every `log_every_steps`) shorter than MAX_LOG_GAP_S."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(run, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    events = acc.Tensors(tag) if tag in tags.get("tensors", []) else []
    events = events or (acc.Scalars(tag) if tag in tags.get("scalars", []) else [])
    times = sorted(e.wall_time for e in events)
    if len(times) < 2:
        return None
    gaps = (b - a for a, b in zip(times, times[1:], strict=False))
    return float(sum(gap for gap in gaps if gap < MAX_LOG_GAP_S))


def _accuracy_table(acc: dict[str, dict[str, dict[int, float]]]) -> list[str]:
    """The card's table: both splits, both precisions, ten crops and the centre crop."""

    def cell(precision: str, split: str, crops: int) -> str:
        a = acc[precision].get(split, {}).get(crops)
        return "not evaluated" if a is None else f"{100 * a:.2f}%"

    rows = []
    for split, label in (("public_test", "PublicTest"), ("private_test", "PrivateTest")):
        for precision in ("bfloat16", "float32"):
            what = "shipped (bfloat16 weights)" if precision == "bfloat16" else "float32 checkpoint"
            rows.append([f"{label}, {what}", cell(precision, split, 10), cell(precision, split, 1)])
    return common.table(["FER2013, model chosen on PublicTest", "ten crops", "centre crop"], rows)


def _card(
    found: dict[str, Any],
    summary: dict[str, Any],
    results: dict[str, Any],
    cmd: str,
    wall_s: float | None,
    train_cmd: str,
    matmul: dict[str, str],
    compared: dict[str, Any] | None = None,
    weights_sha256: str | None = None,
):
    """The markdown model card and its figures (`model_card.json`); `matmul` maps each
    precision to the `model.matmul_dtype` it was evaluated with ('auto' with what it resolved
    to), `compared` is `peer`'s, `weights_sha256` the shipped file's."""
    acc = {
        p: {s: {c: m["accuracy"] for c, m in by.items()} for s, by in found[p].items()}
        for p in found
    }
    shipped = found["bfloat16"]["private_test"][10]

    def cost(split: str, crops: int) -> str:
        a = [acc[p].get(split, {}).get(crops) for p in ("float32", "bfloat16")]
        return "not measured" if None in a else f"{100 * (a[0] - a[1]):+.2f}"

    perf = results.get("performance") or {}
    hardware = provenance.hardware(with_jax=False)
    per_class = ", ".join(
        f"{name} {100 * v:.1f}%" for name, v in shipped["per_class_accuracy"].items()
    )
    md = [
        "# The shipped model: CBAM-ResNet18 + A-Softmax, FER2013",
        "",
        *_accuracy_table(acc),
        "",
        f"- Per class (PrivateTest, ten crops, shipped): {per_class}.",
        f"- bfloat16 storage cost, in points (float32 - bfloat16), PrivateTest ten-crop: "
        f"{cost('private_test', 10)}; centre crop {cost('private_test', 1)}; "
        f"PublicTest centre crop {cost('public_test', 1)}.",
        "- The float32 PrivateTest figures are the run's own report of its selected model.",
        *(
            []
            if matmul["float32"] == matmul["bfloat16"]
            else [
                f"- Matmul operands: the float32 checkpoint's figures are computed as the run "
                f"trained (`model.matmul_dtype={matmul['float32']}`), the shipped model's as "
                f"its users run it (`{matmul['bfloat16']}`); the cost above includes both."
            ]
        ),
        f"- Selected on PublicTest: step {results.get('selected_step')}, epoch "
        f"{results.get('selected_epoch')} of {perf.get('num_epochs')}.",
        f"- Training: {wall_s / 3600 if wall_s else float('nan'):.1f} h of wall time (summed "
        f"over the sessions it resumed in); {perf.get('train_images_per_s') or 0:.1f} training "
        f"images/s in its last session; CPU: {hardware['cpu_model']}, "
        f"{hardware['cpu_count']} cores.",
        f"- {peer_line(compared, weights_sha256)}.",
        "- Confusion matrix: `eval/private_test_bfloat16_ten_crop_confusion.png`.",
        "",
        f"Trained with: `{train_cmd}`",
        "",
        f"Card and weights made with: `{cmd}`",
        "",
    ]
    data = {
        "accuracy": acc,
        "bfloat16_cost_points": {s: {c: cost(s, c) for c in CROPS} for s in SPLITS},
        "shipped_private_test_ten_crop": shipped,
        "training_wall_seconds": wall_s,
        "train_command": train_cmd,
        "matmul_dtype": matmul,
        "peer": compared,
        "run_results": results,
        "provenance": provenance.provenance(with_jax=False),
    }
    return "\n".join(md), data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.parser(__doc__)
    parser.add_argument("--run", required=True, help="the finished run's workdir")
    common.add_out(parser, required=True)
    parser.add_argument(
        "--train_command", required=True, help="the command that trained the run, for the card"
    )
    parser.add_argument("--weights", default="fer_jax/weights/cbam_resnet18_fer2013.npz")
    parser.add_argument("--data_source", default="files")
    parser.add_argument("--manual_dir", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument(
        "--peers", default=None, help="an experiments.peers results folder (a full run)"
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="evaluations to leave out (the card says 'not evaluated'), each "
        "PRECISION:SPLIT:CROPS, e.g. float32:public_test:10 (~7 min on 2 cores)",
    )
    args = parser.parse_args(argv)
    known = {f"{p}:{s}:{c}": (p, s, c) for p, s, c in EVALUATIONS}
    unknown = sorted(set(args.skip) - set(known))
    if unknown:
        parser.error(f"--skip: {unknown} are not among the evaluations {sorted(known)}")
    evaluations = tuple(e for name, e in known.items() if name not in args.skip)
    from fer_jax import host_memory
    from fer_jax.inference.save_pretrained import convert

    results_path = os.path.join(args.run, "results.json")
    if not os.path.isfile(results_path):
        raise SystemExit(f"error: {results_path} is missing: the run has not finished")
    compared = peer(args.peers)  # before the evaluations: a wrong folder fails in seconds
    host_memory.reuse_scratch_memory()
    os.makedirs(args.out, exist_ok=True)
    _, manifest = convert(args.run, args.weights)
    config = _config(args.run, args.data_source, args.manual_dir, args.data_dir)
    shipped_config = config.copy_and_resolve_references()
    shipped_config.model.matmul_dtype = manifest["meta"]["model"]["matmul_dtype"]
    results = common.read_json(results_path)
    found = _from_results(results, args.out)
    sources = {"float32": args.run, "bfloat16": f"pretrained:{args.weights}"}
    configs = {"float32": config, "bfloat16": shipped_config}
    _evaluate_all(configs, sources, args.out, found, evaluations)
    summary = run_summary.write_summary(args.run, args.out)
    wall_s = training_wall_seconds(args.run)
    matmul = {
        p: resolved_matmul_dtype(c.model.get("matmul_dtype", "float32")) for p, c in configs.items()
    }
    md, data = _card(
        found,
        summary,
        results,
        provenance.command_line(argv),
        wall_s,
        args.train_command,
        matmul,
        compared,
        manifest["sha256"],
    )
    with open(os.path.join(args.out, "model_card.md"), "w") as f:
        f.write(md)
    evaluate.write_json(os.path.join(args.out, "model_card.json"), data)
    for name in ("results.json", "config.json"):
        shutil.copy(os.path.join(args.run, name), os.path.join(args.out, name))
    print(md)
    return data


if __name__ == "__main__":
    main()
