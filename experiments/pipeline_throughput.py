"""Throughput of the data pipelines on this machine, from a built dataset.

    python3 experiments/pipeline_throughput.py --data_dir=/tmp/tfds_data [--batch_size=128]

Prints images/s of the training pipeline (random 44x44 crop + flip, float32 batches, as numpy,
the way a training loop consumes them) and crops/s of the ten-crop evaluation pipeline (the
`--eval_split` over and over). The training pipeline should deliver >= 20,000 images/s.
"""

from __future__ import annotations

import time

import data_pipelines
from experiments import common

TARGET_IMAGES_PER_S = 20_000


def _rate(iterator, seconds: float, warmup: int, count) -> tuple[float, int]:
    """(items per second over >= `seconds` after `warmup` batches, batches timed)."""
    for _ in range(warmup):
        next(iterator)
    items, batches, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        items += count(next(iterator))
        batches += 1
    return items / (time.perf_counter() - start), batches


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common.parser(__doc__)
    parser.add_argument("--data_dir", required=True, help="TFDS data dir holding the built set")
    parser.add_argument("--dataset", default="fer2013")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="public_test")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--eval_batch_size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0, help="timing window per pipeline")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    images, labels = data_pipelines.load_arrays(args.dataset, args.train_split, args.data_dir)
    print(
        f"loaded {args.dataset}/{args.train_split} {images.shape} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    train = data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=args.batch_size, seed=0
    ).as_numpy_iterator()
    train_rate, n = _rate(train, args.seconds, 20, lambda b: len(b["label"]))
    verdict = "meets" if train_rate >= TARGET_IMAGES_PER_S else "BELOW"
    print(
        f"train: {train_rate:,.0f} images/s (batch {args.batch_size}, {n} batches; "
        f"{verdict} the {TARGET_IMAGES_PER_S:,} images/s target)"
    )

    images, labels = data_pipelines.load_arrays(args.dataset, args.eval_split, args.data_dir)
    ds = data_pipelines.eval_dataset_from_arrays(
        images, labels, batch_size=args.eval_batch_size
    ).repeat()
    eval_rate, n = _rate(ds.as_numpy_iterator(), args.seconds, 5, lambda b: 10 * b["mask"].sum())
    print(
        f"eval ten-crop: {eval_rate:,.0f} crops/s = {eval_rate / 10:,.0f} images/s "
        f"(batch {args.eval_batch_size}, {n} batches of {args.eval_split})"
    )
    return {"train_images_per_s": train_rate, "eval_crops_per_s": eval_rate}


if __name__ == "__main__":
    main()
