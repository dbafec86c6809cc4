"""What the `experiments/` scripts share: results JSON in and out (`read_json`, `save_json`),
markdown tables (`table`, `write_table`) and the command-line flags several scripts take."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from typing import Any

from experiments import provenance
from fer_jax.training.evaluate import read_json, write_json

__all__ = [
    "add_checkpoint",
    "add_limit",
    "add_manual_dir",
    "add_out",
    "parser",
    "read_json",
    "save_json",
    "table",
    "write_table",
]


def save_json(path: str, data: Any, indent: int = 1, default: Any = None) -> None:
    """`data` as JSON in `path`, atomically (`fer_jax.training.evaluate.write_json`; the results
    files' indent 1 unless `indent`; `default` as `json.dump`'s)."""
    write_json(path, data, indent=indent, default=default)


def table(
    header: Sequence[str], rows: Iterable[Sequence[Any]] = (), rule: str = "---"
) -> list[str]:
    """The lines of a markdown table: `header`, a `rule` cell per column (`---:` aligns right),
    then a line per row (cells through `str`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + f"{rule}|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def write_table(
    name: str, heading: str, header: list[str], rows: list[list[Any]], raw: dict, out: str | None
) -> str:
    """Prints a markdown table (`heading` line, then `header` and `rows`) and writes it as
    `table.md`, with `raw` and this run's provenance as `raw.json`, to `out` (default
    experiments/results/<name>_<platform>/); returns the folder."""
    import jax

    platform = jax.devices()[0].platform
    text = "\n".join([heading, "", *table(header, rows)])
    print(text)
    out = out or os.path.join(provenance.REPO, "experiments", "results", f"{name}_{platform}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    save_json(os.path.join(out, "raw.json"), {**raw, **provenance.provenance()})
    return out


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first line of `doc` (a script's `__doc__`)."""
    return argparse.ArgumentParser(description=doc.split("\n")[0])


def add_manual_dir(ap: argparse.ArgumentParser, help: str = "folder holding fer2013.csv") -> None:
    """`--manual_dir` (required): the folder with fer2013.csv."""
    ap.add_argument("--manual_dir", required=True, help=help)


def add_checkpoint(ap: argparse.ArgumentParser) -> None:
    """`--checkpoint`: 'pretrained' (the shipped weights) or a run directory."""
    ap.add_argument("--checkpoint", default="pretrained", help="'pretrained' or a run directory")


def add_limit(ap: argparse.ArgumentParser, help: str = "first N faces of each split") -> None:
    """`--limit N`: only the first N faces (a quick check)."""
    ap.add_argument("--limit", type=int, help=f"{help} (a quick check)")


def add_out(ap: argparse.ArgumentParser, help: str = "results folder", **kw: Any) -> None:
    """`--out`: where the script writes its results."""
    ap.add_argument("--out", help=help, **kw)
