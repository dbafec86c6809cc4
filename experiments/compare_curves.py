"""Two runs' logged curves side by side, at the steps both logged: a table, the largest gap, a PNG.

    python -m experiments.compare_curves RUN_A RUN_B --labels float32 bfloat16 \
        [--tags train_loss train_accuracy] [--max_step 175] --out experiments/results/NAME

For a change that should not change training (bfloat16 matmul operands, a new convolution
form): run both from the same state and seed, then compare what `fer_jax.training.train.fit` logged
(means over `log_every_steps`). Reads the scalars with `experiments.tb_curves.read_scalars`; writes
`OUT/curves.md`, `OUT/curves.json` and `OUT/curves.png`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from experiments import common, tb_curves


def common_points(
    a: dict[str, tuple[list[int], list[float]]],
    b: dict[str, tuple[list[int], list[float]]],
    tags: list[str],
    max_step: int | None = None,
) -> dict[str, list[tuple[int, float, float]]]:
    """`{tag: [(step, a's value, b's value)]}` at the steps both runs logged (<= max_step).

    Raises KeyError naming a tag that one of the runs did not log.
    """
    out = {}
    for tag in tags:
        for name, run in (("first", a), ("second", b)):
            if tag not in run:
                raise KeyError(f"the {name} run logged no {tag!r} (it has {sorted(run)})")
        values_b = dict(zip(*b[tag], strict=True))
        out[tag] = [
            (step, value, values_b[step])
            for step, value in zip(*a[tag], strict=True)
            if step in values_b and (max_step is None or step <= max_step)
        ]
    return out


def summarize(points: dict[str, list[tuple[int, float, float]]]) -> dict[str, Any]:
    """Per tag: the steps compared, the largest |a - b| and its step, the mean |a - b|."""
    out = {}
    for tag, rows in points.items():
        gaps = [abs(x - y) for _, x, y in rows]
        worst = max(range(len(rows)), key=gaps.__getitem__) if rows else None
        out[tag] = {
            "steps": len(rows),
            "max_abs_gap": gaps[worst] if rows else None,
            "max_gap_step": rows[worst][0] if rows else None,
            "mean_abs_gap": sum(gaps) / len(gaps) if rows else None,
        }
    return out


def markdown(points: dict[str, list[tuple[int, float, float]]], labels: tuple[str, str]) -> str:
    lines = []
    for tag, rows in points.items():
        header = ["step", labels[0], labels[1], f"{labels[1]} - {labels[0]}"]
        cells = [[s, f"{x:.5f}", f"{y:.5f}", f"{y - x:+.5f}"] for s, x, y in rows]
        lines += [f"### {tag}", "", *common.table(header, cells, rule="---:")]
        lines.append("")
    return "\n".join(lines)


def plot(points: dict, labels: tuple[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(points), figsize=(4.5 * len(points), 3.3), dpi=80, squeeze=False
    )
    for ax, (tag, rows) in zip(axes[0], points.items(), strict=True):
        steps = [r[0] for r in rows]
        for i, label in enumerate(labels):
            ax.plot(steps, [r[1 + i] for r in rows], marker=".", label=label)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__)
    ap.add_argument("run_a", help="a run's workdir (holds events.out.tfevents.*)")
    ap.add_argument("run_b")
    ap.add_argument("--labels", nargs=2, default=None, help="names of the two runs")
    ap.add_argument("--tags", nargs="+", default=["train_loss", "train_accuracy"])
    ap.add_argument("--max_step", type=int, default=None)
    common.add_out(ap, help="folder for curves.md/.json/.png", required=True)
    args = ap.parse_args(argv)
    labels = tuple(args.labels or (args.run_a, args.run_b))
    try:
        points = common_points(
            tb_curves.read_scalars(args.run_a),
            tb_curves.read_scalars(args.run_b),
            args.tags,
            args.max_step,
        )
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    os.makedirs(args.out, exist_ok=True)
    summary = summarize(points)
    md = markdown(points, labels)
    with open(os.path.join(args.out, "curves.md"), "w") as f:
        f.write(md)
    common.save_json(
        os.path.join(args.out, "curves.json"),
        {"labels": labels, "summary": summary, "points": points},
    )
    plot(points, labels, os.path.join(args.out, "curves.png"))
    print(md)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
