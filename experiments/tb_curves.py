"""Training curves (loss, accuracy, learning rate, A-Softmax lambda) from a run's TensorBoard logs.

    python -m experiments.tb_curves runs/fer2013 [--out curves.png] [--title "..."]

Reads the scalars that `fer_jax.training.train.fit` writes (`fer_jax.training.run_writers`; TF2
summaries stored as tensors and plain `simple_value` scalars are both read) with TensorBoard's
`EventAccumulator`, and draws five panels: train loss (and PublicTest loss), train and PublicTest
accuracy, learning rate, A-Softmax lambda (logged for every run; only an a_softmax head uses
it), feature norm |x|.
"""

from __future__ import annotations

import os

from experiments import common

PANELS = (
    ("loss", ("train_loss", "public_test_loss")),
    ("accuracy", ("train_accuracy", "public_test_accuracy")),
    ("learning rate", ("train_learning_rate",)),
    ("A-Softmax lambda (a_softmax head only)", ("train_lambda",)),
    ("feature norm |x| (classifier input)", ("train_feature_norm",)),
)


def read_scalars(logdir: str) -> dict[str, tuple[list[int], list[float]]]:
    """`{tag: (steps, values)}` of every scalar in the event files directly in `logdir`."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    if not os.path.isdir(logdir):
        raise FileNotFoundError(f"no run directory {logdir}")
    acc = ea.EventAccumulator(logdir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    out: dict[str, tuple[list[int], list[float]]] = {}
    for tag in tags.get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [float(e.value) for e in events])
    for tag in tags.get("tensors", []):
        if tag.startswith("_hparams_"):
            continue
        steps, values = [], []
        for e in acc.Tensors(tag):
            value = tensor_util.make_ndarray(e.tensor_proto)
            if value.size != 1 or value.dtype.kind not in "fiu":
                break
            steps.append(e.step)
            values.append(float(value.reshape(())))
        else:
            if steps:
                out.setdefault(tag, (steps, values))
    return out


def plot_curves(
    logdir: str,
    path: str,
    title: str | None = None,
    scalars: dict[str, tuple[list[int], list[float]]] | None = None,
) -> dict[str, int]:
    """Writes the panels' PNG; returns `{tag: points}` of what was drawn.

    `scalars`: `read_scalars(logdir)` if the caller already has it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if scalars is None:
        scalars = read_scalars(logdir)
    if not scalars:
        raise FileNotFoundError(f"no TensorBoard scalars in {logdir}")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.3), dpi=80)
    drawn: dict[str, int] = {}
    for ax, (name, tags) in zip(axes, PANELS, strict=True):
        for tag in tags:
            if tag in scalars:
                steps, values = scalars[tag]
                ax.plot(steps, values, label=tag, marker="." if len(steps) < 30 else None)
                drawn[tag] = len(steps)
        if any(t in scalars for t in tags):
            ax.legend(fontsize=7)
        else:
            ax.text(
                0.5,
                0.5,
                "not logged\n(softmax head)" if "lambda" in name else "not logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set_title(name)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return drawn


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("logdir", help="a run's workdir (holds events.out.tfevents.*)")
    common.add_out(ap, help="PNG path (default: <logdir>/curves.png)")
    ap.add_argument("--title")
    args = ap.parse_args()
    out = args.out or os.path.join(args.logdir, "curves.png")
    drawn = plot_curves(args.logdir, out, args.title)
    print(f"wrote {out}: {drawn}")


if __name__ == "__main__":
    main()
