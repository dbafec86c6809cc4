"""The paper's numbers, and the runs, collection and markdown/PNG writers behind its tables.

Used by `experiments/table1.py`, `table2.py` and `confusion_tables.py`; see their docstrings for
the commands. Each table row is one ordinary `python -m fer_jax.main` training job in its own
workdir (resumable: the same command again continues it), launched as a subprocess; its
`results.json` (PrivateTest accuracy of the checkpoint chosen on PublicTest) and
`cross_validation/summary.json` (JAFFE 5-fold CV, fine-tuned from that model) are collected
into a markdown table side by side with the paper's numbers.

Paper: Wen et al., "Facial expression recognition based on CBAM and A-Softmax" (ICAIS 2020).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments import common, provenance

REPO = provenance.REPO
CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a paper table: a configuration and the paper's accuracies (%)."""

    key: str
    label: str
    config_arg: str  # the argument of configs/fer2013.py, e.g. 'cbam=none,head=softmax'
    paper_fer2013: float
    paper_jaffe: float


TABLE1 = (
    Row("resnet18_softmax", "ResNet18 + softmax", "cbam=none,head=softmax", 72.4, 97.6),
    Row("cbam_softmax", "CBAM + ResNet18 + softmax", "cbam=channel_first,head=softmax", 73.1, 98.4),
    Row(
        "cbam_asoftmax",
        "CBAM + ResNet18 + A-Softmax",
        "cbam=channel_first,head=a_softmax",
        73.5,
        98.9,
    ),
)
TABLE2 = (
    Row("channel_first", "channel-first (CBAM)", "cbam=channel_first,head=a_softmax", 73.5, 98.9),
    Row("spatial_first", "spatial-first", "cbam=spatial_first,head=a_softmax", 73.4, 98.7),
    Row("parallel", "parallel", "cbam=parallel,head=a_softmax", 73.2, 98.6),
)
# Tables 3 and 4 are the confusion matrices of the paper's best model (CBAM channel-first +
# A-Softmax) on FER2013 PrivateTest and on JAFFE (5-fold CV).
BEST = TABLE1[2]
TABLES = {  # script name -> (title, rows)
    "table1": ("Table 1: CBAM and A-Softmax ablation", TABLE1),
    "table2": ("Table 2: CBAM ordering (A-Softmax head)", TABLE2),
}

CONFIG_FILES = {"fer2013": "configs/fer2013.py", "synthetic": "configs/synthetic.py"}


# --- command-line flags shared by the table scripts ----------------------------------------------


def add_run_flags(ap: argparse.ArgumentParser) -> None:
    """Flags of every table script: dataset, settings, where runs and results go."""
    ap.add_argument(
        "--dataset",
        default="fer2013",
        choices=sorted(CONFIG_FILES),
        help="fer2013 (the paper; needs the built dataset, and JAFFE for the CV) or synthetic "
        "(configs/synthetic.py: generated data for a CPU smoke run; NOT the paper's data)",
    )
    ap.add_argument("--epochs", type=int, help="FER2013 epochs (default: the config's, 300)")
    ap.add_argument("--cv_epochs", type=int, help="epochs per CV fold (default: config's, 30)")
    ap.add_argument("--width", type=int, help="model width (default: the config's, 64)")
    ap.add_argument("--batch_size", type=int, help="(default: the config's, 64)")
    ap.add_argument("--no_cv", action="store_true", help="skip the JAFFE cross-validation")
    ap.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="seeds per row, trained as replicas in one program (config.replicas): each row "
        "then reads mean ± std over them (default 1, as on CPU)",
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="--config.FIELD=VALUE",
        help="any other fer_jax.main flag, passed through (repeatable), e.g. "
        "--override=--config.data_dir=/data/tfds --override=--config.jaffe.manual_dir=/jaffe",
    )
    ap.add_argument("--runs_dir", default=os.path.join(REPO, "runs", "paper_tables"))
    ap.add_argument("--results_dir", help="default: experiments/results/<table>_<dataset>")
    ap.add_argument("--collect_only", action="store_true", help="do not train; tabulate only")
    ap.add_argument("--rerun", action="store_true", help="launch even if a run has results")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The `--config.X=Y` flags that the table script's options stand for."""
    out = []
    if args.epochs is not None:
        out.append(f"--config.num_epochs={args.epochs}")
    if args.cv_epochs is not None:
        out.append(f"--config.jaffe.num_epochs={args.cv_epochs}")
    if args.width is not None:
        out.append(f"--config.model.width={args.width}")
    if args.batch_size is not None:
        out.append(f"--config.batch_size={args.batch_size}")
    if args.no_cv:
        out.append("--config.cross_validate=False")
    if getattr(args, "replicas", 1) != 1:
        out.append(f"--config.replicas={args.replicas}")
    return out + list(args.override)


# --- configs -------------------------------------------------------------------------------------


def set_config_field(config, assignment: str) -> None:
    """`config.a.b = value` from `'a.b=value'`, the value parsed as the field's current type.

    KeyError for a field the config does not have (as `--config.a.b=...` of fer_jax.main).
    """
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ValueError(f"{assignment!r}: expected FIELD=VALUE")
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    if last not in node:
        raise KeyError(f"{assignment!r}: no config field {key}")
    old = node[last]
    if isinstance(old, bool):
        value: Any = raw.lower() in ("1", "true", "yes")
    elif isinstance(old, int):
        value = int(raw)
    elif isinstance(old, float):
        value = float(raw)
    else:
        value = raw
    node[last] = value


def resolved_config(dataset: str, config_arg: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The config a run trains with: the config file's `get_config(arg)` plus the `--config.*`
    overrides (other flags are not config fields)."""
    import importlib

    module = importlib.import_module(CONFIG_FILES[dataset].removesuffix(".py").replace("/", "."))
    config = module.get_config(config_arg)
    for flag in overrides:
        if flag.startswith("--config."):
            set_config_field(config, flag[len("--config.") :])
    return config.to_dict()


# --- runs ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One training job of a row: the command that runs it and its workdir."""

    row: Row
    dataset: str
    overrides: list[str]
    runs_dir: str

    @property
    def workdir(self) -> str:
        """`runs_dir/<dataset>/<row config>-<hash of the overrides>`: equal settings share it."""
        digest = hashlib.sha1("\n".join(self.overrides).encode()).hexdigest()[:8]
        name = self.row.config_arg.replace("=", "-").replace(",", "_")
        return os.path.join(self.runs_dir, self.dataset, f"{name}-{digest}")

    def command(self) -> list[str]:
        """The job's command line; run from the repository root (workdir relative to it when
        inside it)."""
        config = f"{CONFIG_FILES[self.dataset]}:{self.row.config_arg}"
        workdir = os.path.abspath(self.workdir)
        if workdir.startswith(REPO + os.sep):
            workdir = os.path.relpath(workdir, REPO)
        return [
            sys.executable,
            "-m",
            "fer_jax.main",
            f"--config={config}",
            f"--workdir={workdir}",
            *self.overrides,
        ]

    def cv_expected(self) -> bool:
        return "--config.cross_validate=False" not in self.overrides

    def finished(self) -> bool:
        done = os.path.exists(os.path.join(self.workdir, "results.json"))
        if self.cv_expected():
            done = done and os.path.exists(
                os.path.join(self.workdir, "cross_validation", "summary.json")
            )
        return done


def launch(run: Run, *, rerun: bool = False) -> dict[str, Any]:
    """Runs (or resumes) `run` as a subprocess, output to `workdir/log.txt`; returns its record.

    Raises RuntimeError (with the log's tail) if the job fails.
    """
    cmd = run.command()
    record: dict[str, Any] = {"command": " ".join(cmd[1:]), "workdir": run.workdir}
    if run.finished() and not rerun:
        record["launched"] = False
        return record
    os.makedirs(run.workdir, exist_ok=True)
    log_path = os.path.join(run.workdir, "log.txt")
    print(f"[{run.row.key}] {' '.join(cmd[1:])}\n  log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    record.update(launched=True, seconds=time.perf_counter() - start, returncode=proc.returncode)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{run.row.key} failed (exit {proc.returncode}); log tail:\n{tail}")
    print(f"[{run.row.key}] done in {record['seconds']:.0f} s", flush=True)
    return record


def collect(workdir: str) -> dict[str, Any]:
    """A run's figures: `{'fer2013': results.json or None, 'cv': summary.json or None}`."""
    return {
        "fer2013": common.read_json(os.path.join(workdir, "results.json")),
        "cv": common.read_json(os.path.join(workdir, "cross_validation", "summary.json")),
    }


# --- markdown ------------------------------------------------------------------------------------


def column_labels(dataset: str) -> tuple[str, str]:
    """Headers of the two result columns; a synthetic run says clearly that it is not the paper's
    data."""
    if dataset == "synthetic":
        return (
            "synthetic private_test, chosen on public_test (NOT FER2013)",
            "synthetic 5-fold CV (NOT JAFFE)",
        )
    return ("FER2013 PrivateTest, chosen on PublicTest", "JAFFE 5-fold CV")


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def fer_cell(results: dict[str, Any] | None) -> tuple[float | None, str]:
    """`(accuracy compared with the paper, cell text)` of a run's `results.json`: the selected
    model's, or with replicas their mean ± std (ddof=1) over the K seeds and the ensemble's."""
    if results is None:
        return None, "-"
    entries = results.get("replicas") or []
    if len(entries) > 1:
        mean = results["mean_accuracy"]
        text = (
            f"{_pct(mean, 2)} ± {_pct(results['std_accuracy'], 2)} (n={len(entries)}; "
            f"ensemble {_pct(results['ensemble_accuracy'], 2)})"
        )
        return mean, text
    accuracy = results[results["report_split"]]["accuracy"]
    return accuracy, _pct(accuracy)


def accuracy_table(rows: Sequence[Row], figures: dict[str, dict[str, Any]], dataset: str) -> str:
    """Markdown: per row, ours (FER2013 / CV mean ± std) next to the paper's, and the gaps.

    With replicas the FER2013 cell is the mean ± std over the seeds (`fer_cell`), the gap that
    of the mean; the selected epoch is that of the replica chosen on PublicTest."""
    fer_label, cv_label = column_labels(dataset)
    head = [
        "model",
        f"ours: {fer_label}",
        "paper FER2013",
        "Δ",
        f"ours: {cv_label}",
        "paper JAFFE",
        "Δ",
        "selected epoch",
    ]
    lines = common.table(head)
    for row in rows:
        fig = figures.get(row.key, {})
        res, cv = fig.get("fer2013"), fig.get("cv")
        fer, fer_text = fer_cell(res)
        cv_mean = None if cv is None else cv["mean_accuracy"]
        cv_cell = "-" if cv is None else f"{_pct(cv_mean)} ± {_pct(cv['std_accuracy'])}"
        d_fer = "-" if fer is None else f"{100 * fer - row.paper_fer2013:+.1f}"
        d_cv = "-" if cv_mean is None else f"{100 * cv_mean - row.paper_jaffe:+.1f}"
        epoch = "-" if res is None else str(res.get("selected_epoch"))
        lines.append(
            f"| {row.label} | {fer_text} | {row.paper_fer2013:.1f} | {d_fer} | {cv_cell} | "
            f"{row.paper_jaffe:.1f} | {d_cv} | {epoch} |"
        )
    return "\n".join(lines)


def confusion_table(metrics: dict[str, Any], title: str) -> str:
    """Markdown of a row-normalised confusion matrix (rows true, columns predicted, %)."""
    names = metrics["class_names"]
    norm = metrics["confusion_normalized"]
    counts = metrics["confusion_counts"]
    lines = [
        f"**{title}** (row-normalised %, rows = true class, columns = predicted; "
        f"accuracy {_pct(metrics['accuracy'], 2)}%, {metrics['num_examples']} images)",
        "",
    ]
    rows = []
    for i, (name, row, count_row) in enumerate(zip(names, norm, counts, strict=True)):
        cells = [f"**{100 * v:.1f}**" if j == i else f"{100 * v:.1f}" for j, v in enumerate(row)]
        rows.append([name, *cells, sum(count_row)])
    lines += common.table(["true \\ predicted", *names, "images"], rows)
    return "\n".join(lines)


def runs_section(records: dict[str, dict[str, Any]]) -> str:
    """Markdown list of the exact command and workdir of every run."""
    lines = ["Runs (`python -m fer_jax.main ...`, each a resumable workdir):", ""]
    for key, rec in records.items():
        lines.append(f"- {key}: `python {rec['command']}`")
    return "\n".join(lines)


def write_results(
    results_dir: str,
    name: str,
    markdown_body: str,
    data: dict[str, Any],
    prov: dict[str, Any],
) -> str:
    """`results_dir/name.md` (body + provenance) and `name.json`; returns the markdown path."""
    os.makedirs(results_dir, exist_ok=True)
    md_path = os.path.join(results_dir, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(markdown_body.rstrip() + "\n\n## Provenance\n\n" + provenance.markdown(prov))
        f.write("\n")
    common.save_json(
        os.path.join(results_dir, f"{name}.json"), {**data, "provenance": prov}, default=str
    )
    return md_path


# --- PNGs ----------------------------------------------------------------------------------------


def plot_accuracy_bars(
    rows: Sequence[Row], figures: dict[str, dict[str, Any]], dataset: str, path: str, title: str
) -> None:
    """Grouped bars: ours vs the paper, FER2013 and JAFFE columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fer_label, cv_label = column_labels(dataset)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    x = np.arange(len(rows))
    for ax, col, label in ((axes[0], "fer2013", fer_label), (axes[1], "cv", cv_label)):
        ours = []
        for row in rows:
            res = figures.get(row.key, {}).get(col)
            if res is None:
                ours.append(np.nan)
            elif col == "fer2013":
                ours.append(100 * res[res["report_split"]]["accuracy"])
            else:
                ours.append(100 * res["mean_accuracy"])
        paper = [row.paper_fer2013 if col == "fer2013" else row.paper_jaffe for row in rows]
        ax.bar(x - 0.2, ours, 0.4, label="ours")
        ax.bar(x + 0.2, paper, 0.4, label="paper")
        ax.set_xticks(x, [r.label.replace(" + ", "+\n") for r in rows], fontsize=7)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(label, fontsize=8)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(metrics: dict[str, Any], path: str, title: str) -> None:
    """Row-normalised confusion heat map (`fer_jax.training.evaluate.plot_confusion`)."""
    from fer_jax.training import evaluate

    evaluate.plot_confusion(metrics["confusion_normalized"], metrics["class_names"], path, title)


# --- a whole table -------------------------------------------------------------------------------


def run_rows(
    rows: Sequence[Row], args: argparse.Namespace
) -> tuple[dict[str, Run], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Launches (unless `--collect_only`) and collects every row, one job at a time.

    Returns `(runs, records, figures)` keyed by row key.
    """
    overrides = overrides_from_args(args)
    runs = {row.key: Run(row, args.dataset, overrides, args.runs_dir) for row in rows}
    records: dict[str, dict[str, Any]] = {}
    for key, run in runs.items():
        if args.collect_only:
            records[key] = {
                "command": " ".join(run.command()[1:]),
                "workdir": run.workdir,
                "launched": False,
            }
        else:
            records[key] = launch(run, rerun=args.rerun)
    figures = {key: collect(run.workdir) for key, run in runs.items()}
    return runs, records, figures


def banner(dataset: str) -> str:
    """A warning block for smoke runs on generated data."""
    if dataset != "synthetic":
        return ""
    return (
        "> **Smoke run on generated data (`configs/synthetic.py`), not the paper's datasets.** "
        "The 'FER2013' column is the synthetic private_test split (model chosen on the synthetic "
        "public_test) and the 'JAFFE' column is a 5-fold CV on synthetic images: the numbers "
        "only show that the whole path runs. They are not comparable with the paper's."
    )


def curves_section(runs: dict[str, Run], results_dir: str, prefix: str = "curves") -> str:
    """PNG training curves of every run (`experiments.tb_curves`); markdown links to them."""
    from experiments import tb_curves

    lines = []
    for key, run in runs.items():
        path = os.path.join(results_dir, f"{prefix}_{key}.png")
        try:
            tb_curves.plot_curves(run.workdir, path, f"{run.row.label} ({run.dataset})")
        except FileNotFoundError as e:
            lines.append(f"- {run.row.label}: no curves ({e})")
            continue
        lines.append(f"- {run.row.label}: ![{key}]({os.path.basename(path)})")
    return "\n".join(lines)


def table_main(name: str, doc: str, argv: list[str] | None = None) -> str:
    """Command line of an accuracy table script (`TABLES[name]`); returns the .md path."""
    title, rows = TABLES[name]
    ap = common.parser(doc)
    add_run_flags(ap)
    return accuracy_report(name, title, rows, ap.parse_args(argv))


def accuracy_report(name: str, title: str, rows: Sequence[Row], args: argparse.Namespace) -> str:
    """Runs a whole accuracy table (Table 1 or 2) and writes its results; returns the .md path."""
    prov = provenance.provenance()
    runs, records, figures = run_rows(rows, args)
    results_dir = args.results_dir or os.path.join(
        REPO, "experiments", "results", f"{name}_{args.dataset}"
    )
    os.makedirs(results_dir, exist_ok=True)
    bars = os.path.join(results_dir, f"{name}_accuracy.png")
    plot_accuracy_bars(rows, figures, args.dataset, bars, f"{title}: ours vs the paper")
    settings = overrides_from_args(args)
    body = "\n\n".join(
        part
        for part in (
            f"# {title}",
            banner(args.dataset),
            "Accuracy (%). FER2013: PrivateTest accuracy of the checkpoint with the best "
            "PublicTest accuracy (`results.json`). JAFFE: mean ± std over the 5 folds of the "
            "model fine-tuned from that FER2013 model (`cross_validation/summary.json`). "
            f"Settings: {'`' + ' '.join(settings) + '`' if settings else 'the full defaults'} "
            f"(each run's whole config: `{name}.json`, runs.<row>.config).",
            accuracy_table(rows, figures, args.dataset),
            f"![accuracy]({os.path.basename(bars)})",
            "## Training curves (FER2013 run; from TensorBoard)\n\n"
            + curves_section(runs, results_dir),
            runs_section(records),
        )
        if part
    )
    for key, run in runs.items():
        records[key]["config"] = resolved_config(args.dataset, run.row.config_arg, settings)
    data = {
        "table": name,
        "dataset": args.dataset,
        "settings": settings,
        "runs": records,
        "figures": figures,
        "paper": {r.key: {"fer2013": r.paper_fer2013, "jaffe": r.paper_jaffe} for r in rows},
    }
    path = write_results(results_dir, name, body, data, prov)
    print(f"wrote {path}")
    return path
