"""A run's workdir as a one-page summary: device, speed, MFU, memory and the honest accuracy.

    python -m experiments.run_summary WORKDIR [--out DIR]

Reads what `python -m fer_jax.main` leaves in WORKDIR: `results.json` (its "performance" block
and the report split's metrics for the model chosen on the select split), `config.json`,
the per-epoch select-split metrics `eval/<split>_epochNNN.json` and the TensorBoard events.
Writes, under `--out` (default: WORKDIR):

- `summary.md`: one table (device, model, input pipeline, epochs, compile seconds, training
  images/s, images/s including the evaluations, ten-crop crops/s, MFU, peak memory, the select
  split's accuracy of the selected epoch, **the report split's accuracy of that model**, the
  projected time of the whole recipe), the evaluations epoch by epoch, and provenance;
- `summary.json`: the same figures (the performance block copied as is);
- `curves.png`: `experiments.tb_curves` panels from the events (skipped, with the reason in
  summary.md, when there are none or TensorBoard is not installed).

Without `results.json` the run was interrupted (or is still running): the summary says so and
takes the select split's accuracy from the evaluation JSONs; the report split was not evaluated.
Reads files only (no JAX): it can run anywhere the workdir is.
"""

from __future__ import annotations

import os
import re
from typing import Any

from experiments import common, provenance, tb_curves
from experiments.common import read_json

SPLIT_NAMES = {"train": "Training", "public_test": "PublicTest", "private_test": "PrivateTest"}
FINAL_TRAIN_TAGS = ("train_loss", "train_accuracy", "train_feature_norm", "train_lambda")
_EPOCH_FILE = re.compile(r"^(?P<split>.+)_epoch(?P<epoch>\d+)\.json$")


def _split_name(split: str | None) -> str:
    return SPLIT_NAMES.get(split or "", split or "?")


def eval_history(workdir: str, split: str | None = None) -> tuple[str | None, list[dict]]:
    """`(split, [{'epoch', 'accuracy', 'loss'}, ...] by epoch)` from `workdir/eval/*_epochNNN.json`.

    `split`: the select split's name; None = the split with the most per-epoch files.
    """
    directory = os.path.join(workdir, "eval")
    found: dict[str, list[tuple[int, str]]] = {}
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            m = _EPOCH_FILE.match(name)
            if m:
                found.setdefault(m["split"], []).append((int(m["epoch"]), name))
    if split is None:
        split = max(found, key=lambda s: len(found[s]), default=None)
    rows = []
    for epoch, name in sorted(found.get(split, [])):
        metrics = read_json(os.path.join(directory, name))
        rows.append({"epoch": epoch, "accuracy": metrics["accuracy"], "loss": metrics.get("loss")})
    return split, rows


def summarize(workdir: str) -> dict[str, Any]:
    """The figures of a run's workdir (what `summary.json` holds); see the module docstring."""
    results = read_json(os.path.join(workdir, "results.json"))
    config = read_json(os.path.join(workdir, "config.json")) or {}
    complete = results is not None
    results = results or {}
    select = results.get("selected_on") or config.get("select_split")
    select, history = eval_history(workdir, select)
    out: dict[str, Any] = {
        "workdir": os.path.abspath(workdir),
        "complete": complete,
        "select_split": select,
        "report_split": results.get("report_split") or config.get("report_split"),
        "model": config.get("model"),
        "half_precision": (results.get("performance") or {}).get(
            "half_precision", config.get("half_precision")
        ),
        "performance": results.get("performance"),
        "evaluations": history,
    }
    if complete:
        report = results.get(out["report_split"]) or {}
        out.update(
            selected_epoch=results.get("selected_epoch"),
            selected_step=results.get("selected_step"),
            select_accuracy=results.get("select_accuracy"),
            report_accuracy=report.get("accuracy"),
            report_examples=report.get("num_examples"),
        )
    else:  # interrupted: the best evaluated epoch (the first, on ties), report split unknown
        best = max(history, key=lambda r: r["accuracy"], default=None)
        out.update(
            selected_epoch=None if best is None else best["epoch"],
            selected_step=None,
            select_accuracy=None if best is None else best["accuracy"],
            report_accuracy=None,
            report_examples=None,
        )
    out["run_provenance"] = results.get("provenance")
    return out


def _fmt(x: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if x is None else f"{x * scale:{spec}}{unit}"


def _model_text(model: dict | None, half_precision: bool | None) -> str:
    precision = {True: "bf16", False: "f32", None: "precision n/a"}[half_precision]
    if not model:
        return f"n/a (no config.json), {precision}"
    return (
        f"width {model.get('width')}, cbam {model.get('cbam')}, head {model.get('head')}, "
        f"{precision}"
    )


def _seconds_text(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:,.0f} s ({s / 60:.1f} min)" if s >= 120 else f"{s:.1f} s"


def _selected_text(s: dict[str, Any]) -> str:
    """The selected epoch's accuracy and where it was, e.g. '71.20% (epoch 3, step 1,200)'."""
    if s["selected_epoch"] is None:
        return "n/a"
    where = f"epoch {s['selected_epoch']}"
    if s["selected_step"] is not None:
        where += f", step {s['selected_step']:,}"
    return f"{_fmt(s['select_accuracy'], '.2f', 100, '%')} ({where})"


def _speed_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary table's rows on compile time, speed, FLOPs, MFU and memory."""
    compile_s = p.get("compile_seconds") or {}
    flops = p.get("flops_per_image") or {}
    peak = p.get("peak_tflops")
    return [
        (
            "compile (train, eval)",
            f"{_fmt(compile_s.get('train'), '.1f', 1, ' s')}, "
            f"{_fmt(compile_s.get('eval'), '.1f', 1, ' s')}",
        ),
        ("training images/s", _fmt(p.get("train_images_per_s"), ",.0f")),
        ("images/s including evaluation", _fmt(p.get("images_per_s_including_eval"), ",.0f")),
        (
            f"selection evaluation crops/s ({p.get('select_crops', 10)} per image)",
            _fmt(p.get("eval_crops_per_s", p.get("tencrop_crops_per_s")), ",.0f"),
        ),
        (
            "FLOPs / image (forward, training)",
            f"{_fmt(flops.get('forward'), '.3g', 1e-9, ' G')}, "
            f"{_fmt(flops.get('train'), '.3g', 1e-9, ' G')}",
        ),
        (
            f"MFU vs {_fmt(peak, '.0f', 1, ' TFLOP/s')} peak (train, incl. eval)",
            f"{_fmt(p.get('mfu_train'), '.1f', 100, '%')}, "
            f"{_fmt(p.get('mfu_including_eval'), '.1f', 100, '%')}",
        ),
        (
            "peak device memory / host RSS",
            f"{_fmt(p.get('peak_device_memory_gib'), '.2f', 1, ' GiB')} / "
            f"{_fmt(p.get('host_peak_rss_gib'), '.2f', 1, ' GiB')}",
        ),
    ]


def _rows(s: dict[str, Any], select: str, report: str) -> list[tuple[str, str]]:
    """The summary table's (what, value) rows."""
    p = s["performance"] or {}
    rows = [
        (
            "device",
            f"{p['num_devices']} x {p['device_kind']} ({p['platform']})" if p else "n/a",
        ),
        ("model", _model_text(s["model"], s["half_precision"])),
        (
            "input pipeline / steps per dispatch",
            f"{p['input_pipeline']} / {p['steps_per_dispatch']}" if p else "n/a",
        ),
        ("batch / steps per epoch", f"{p['batch_size']} / {p['steps_per_epoch']}" if p else "n/a"),
        (
            "epochs (requested; trained by this process)",
            f"{p['num_epochs']}; {p['epochs_timed']:.2f} ({p['steps_timed']:,} steps)"
            if p
            else "n/a",
        ),
        (
            f"{select} ten-crop evaluations during training",
            f"{p['evaluations']} (every {p['eval_every_epochs']} epochs), "
            f"{p['eval_seconds']:.1f} s in all"
            if p
            else f"{len(s['evaluations'])} (eval/)",
        ),
        *_speed_rows(p),
        (f"{select} acc. of selected epoch", _selected_text(s)),
        (
            f"**{report} acc. (chosen on {select})**",
            "n/a" if s["report_accuracy"] is None else f"**{100 * s['report_accuracy']:.2f}%**",
        ),
        (
            "projected full recipe (train + evals + compile)",
            _seconds_text(p.get("projected_full_recipe_s")),
        ),
        (
            "train / eval / wall seconds of this process",
            f"{p['train_seconds']:.1f} / {p['eval_seconds']:.1f} / {p['wall_seconds']:.1f}"
            if p
            else "n/a",
        ),
    ]
    if s.get("final_train"):
        rows.append(
            (
                "last logged training values",
                ", ".join(
                    f"{k.removeprefix('train_')} {v:.4g}" for k, v in s["final_train"].items()
                ),
            )
        )
    return rows


def _evaluations_table(s: dict[str, Any]) -> list[str]:
    """The evaluations during training, the selected epoch's accuracy in bold."""
    rows = []
    for r in s["evaluations"]:
        mark = "**" if r["epoch"] == s["selected_epoch"] else ""
        rows.append([r["epoch"], f"{mark}{100 * r['accuracy']:.2f}%{mark}", _fmt(r["loss"], ".4f")])
    return common.table(["epoch", "accuracy", "loss"], rows)


def markdown(summary: dict[str, Any], summary_provenance: dict[str, Any] | None = None) -> str:
    """`summary.md`'s text for `summarize()`'s dict (+ the summarising process's provenance)."""
    s = summary
    select, report = _split_name(s["select_split"]), _split_name(s["report_split"])
    lines = [f"# Run summary: `{s['workdir']}`", ""]
    if not s["complete"]:
        lines += [
            "**Interrupted run (or still running): no results.json.** The accuracy below is the "
            f"best {select} evaluation in `eval/`; {report} was not evaluated and no performance "
            "figures were written.",
            "",
        ]
    lines += ["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in _rows(s, select, report)]
    if s["evaluations"]:
        lines += ["", f"## {select} evaluations", "", *_evaluations_table(s)]
    lines += ["", "## Curves", "", s.get("curves") or "none"]
    lines += ["", "## Provenance", ""]
    if s.get("run_provenance"):
        lines += ["The run:", "", provenance.markdown(s["run_provenance"]), ""]
    if summary_provenance is not None:
        lines += ["This summary:", "", provenance.markdown(summary_provenance)]
    return "\n".join(lines) + "\n"


def write_summary(workdir: str, out: str | None = None) -> dict[str, Any]:
    """Writes `summary.md`, `summary.json` and (if it can) `curves.png` under `out` (default:
    `workdir`); returns the summary dict."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no run directory {workdir}")
    out = out or workdir
    os.makedirs(out, exist_ok=True)
    summary = summarize(workdir)
    try:
        scalars = tb_curves.read_scalars(workdir)
    except ImportError as e:
        scalars, why = {}, f"not drawn: TensorBoard is not installed ({e})"
    else:
        why = "not drawn: no TensorBoard scalars in the workdir"
    summary["final_train"] = {t: scalars[t][1][-1] for t in FINAL_TRAIN_TAGS if t in scalars}
    if scalars:
        try:
            tb_curves.plot_curves(
                workdir, os.path.join(out, "curves.png"), os.path.basename(workdir), scalars
            )
            why = "![training curves](curves.png)"
        except ImportError as e:
            why = f"not drawn: matplotlib is not installed ({e})"
    summary["curves"] = why
    prov = provenance.provenance(with_jax=False)
    summary["summary_provenance"] = prov
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(summary, prov))
    common.save_json(os.path.join(out, "summary.json"), summary)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: summarises WORKDIR and prints the table."""
    ap = common.parser(__doc__)
    ap.add_argument("workdir", help="a fer_jax.main workdir (finished or interrupted)")
    common.add_out(ap, help="where summary.md/.json and curves.png go (default: WORKDIR)")
    args = ap.parse_args(argv)
    summary = write_summary(args.workdir, args.out)
    with open(os.path.join(args.out or args.workdir, "summary.md")) as f:
        print(f.read(), end="")
    return summary


if __name__ == "__main__":
    main()
