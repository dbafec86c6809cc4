"""`experiments.bit_identity`'s comparison: two hand-made output folders (an Orbax checkpoint like
the runs', an `.npz`, JSON, a PNG, TensorBoard scalars) that are the same up to their own paths
and timings compare identical; one value changed anywhere, or a file on one side only, is found.
No training runs here."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments import bit_identity
from fer_jax.training.run_writers import SummaryWriter


def _write_side(root, *, kernel_delta=0.0, accuracy=0.5, pixel=7, loss=1.25, seconds=3.0):
    import orbax.checkpoint as ocp

    kernel = np.arange(6, dtype=np.float32).reshape(2, 3) + np.float32(kernel_delta)
    state = {"params": {"kernel": kernel}, "step": np.int32(4)}
    with ocp.CheckpointManager(
        os.path.join(root, "checkpoints"), item_names=("state", "meta")
    ) as manager:
        manager.save(
            4,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 4})
            ),
        )
    np.savez(os.path.join(root, "weights.npz"), kernel=kernel)
    results = {"accuracy": accuracy, "init_from": root, "performance": {"train_seconds": seconds}}
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f)
    image = np.full((4, 4, 3), 200, np.uint8)
    image[0, 0, 0] = pixel
    Image.fromarray(image).save(os.path.join(root, "confusion.png"))
    writer = SummaryWriter(root)
    writer.write_scalars(4, {"train_loss": loss, "perf_train_images_per_s": 1 / seconds})
    writer.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("run_a"))
    _write_side(root)
    return root


def _compare(base, tmp_path, **change):
    new = str(tmp_path / "run_b")  # another path: normalised
    os.makedirs(new)
    _write_side(new, **change)
    return bit_identity.compare(base, new)


def test_the_same_outputs_compare_identical_whatever_their_paths_and_timings(base, tmp_path):
    categories = _compare(base, tmp_path, seconds=9.0)  # timings alone differ
    assert bit_identity.verdict(categories) == "identical"
    counts = {name: (c["compared"], c["identical"]) for name, c in categories.items()}
    assert counts == {
        "checkpoint": (2, 2),
        "json": (1, 1),
        "png": (1, 1),
        "tensorboard": (1, 1),
        "other": (0, 0),
    }


@pytest.mark.parametrize(
    "change, category, name",
    [
        ({"kernel_delta": 1e-6}, "checkpoint", "checkpoints/4"),
        ({"accuracy": 0.5000001}, "json", "results.json"),
        ({"pixel": 8}, "png", "confusion.png"),
        ({"loss": 1.2500001}, "tensorboard", "events"),
    ],
)
def test_one_value_changed_is_found(base, tmp_path, change, category, name):
    categories = _compare(base, tmp_path, **change)
    assert bit_identity.verdict(categories) == "differing"
    assert name in categories[category]["differing"]
    if category == "checkpoint":  # the .npz holds the same kernel
        assert categories[category]["differing"] == ["checkpoints/4", "weights.npz"]
    else:
        assert sum(len(c["differing"]) for c in categories.values()) == 1


def test_a_file_on_one_side_only_is_a_difference(base, tmp_path):
    new = tmp_path / "run_b"
    os.makedirs(new)
    _write_side(str(new))
    (new / "notes.txt").write_text("extra")
    categories = bit_identity.compare(base, str(new))
    assert categories["other"]["only_new"] == ["notes.txt"]
    assert bit_identity.verdict(categories) == "differing"
