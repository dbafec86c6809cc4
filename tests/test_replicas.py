"""Replicas (`config.replicas = K`): K runs in one program, each exactly its own run.

Replica k is compared with a K = 1 run of its seed and overrides (`cbam='none'`). Unrolled
(`replica_map='unroll'`, the CPU default: K copies of the plain step in one program) the two
agree to float32 rounding over two epochs of A-Softmax training (3.6e-7 after 8 steps
measured). Vmapped ('vmap', the accelerator default) they are compared after one step only:
vmapped convolutions are grouped ones that round differently (1e-7 after a step), and this
small width-8 network amplifies such differences step by step through the discontinuous
choices in its gradient (ReLU kinks; CBAM's max pooling routes its gradient to one arg-max,
see tests/test_parallel.py): measured 4e-5 apart in the loss at step 4 with A-Softmax, 2e-4
without clipping, and varying from one process to the next over two steps.
"""

import glob
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from fer_jax.training import checkpoint, config_schema, metrics, replicas, synthetic_data
from fer_jax.training.step import create_model, create_train_state
from fer_jax.training.train import create_job, fit
from fer_jax.user_errors import UserError
from tests import test_train
from tests.test_parallel import as_arrays, run_on_cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEEDS = (3, 7)
OVERRIDES = (  # every overridable field, on one replica or the other
    {
        "optimizer.learning_rate": 0.02,
        "optimizer.weight_decay": 1e-3,
        "optimizer.momentum": 0.5,
        "loss.margin": 2,
        "loss.lambda_base": 100.0,
        "loss.lambda_power": 2.0,
    },
    {
        "model.dropout_rate": 0.3,
        "optimizer.grad_clip": 0.05,
        "optimizer.decay_rate": 0.5,
        "loss.lambda_min": 2.0,
        "loss.lambda_gamma": 1.0,
    },
)
# name: (training images, epochs): batch 16, so 1 step, and 2 epochs of 2 steps.
LENGTHS = {"one_step": (16, 1), "two_epochs": (32, 2)}


def _config(input_pipeline="device", length="one_step"):
    config = synthetic.get_config()
    config.model.cbam = "none"
    # XLA's own convolutions: under "auto" on CPU (Winograd at 22x22 in this net) the
    # replicas' program and a plain run round differently in float32, and A-Softmax's
    # k = floor(m * theta / pi) grows that to ~1e-4 in two epochs (measured: 2.9e-4 on a
    # BatchNorm scale). The replica wiring is under test here, not the convolution.
    config.model.conv_impl = "xla"
    config.batch_size = 16
    config.num_epochs = LENGTHS[length][1]
    config.optimizer.schedule = "step"  # decay_rate in play: x decay_rate after epoch 0
    config.optimizer.decay_start_epoch = 0
    config.optimizer.decay_every_epochs = 1
    config.input_pipeline = input_pipeline
    return config


def _fit(config, workdir, num_images):
    data = synthetic_data.make_split(num_images, seed=0)
    job = create_job(config)
    return fit(job, str(workdir), data["image"], data["label"])["state"]


def _distance(a, b) -> float:
    """The L2 distance between two pytrees of arrays (all leaves as one vector)."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return float(np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2) for x, y in pairs)))


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """Per length, one K = 1 run per replica: its seed and overrides set by hand."""
    runs = {}
    for length, (num_images, _) in LENGTHS.items():
        runs[length] = []
        for seed, fields in zip(SEEDS, OVERRIDES, strict=True):
            config = _config(length=length)
            config.seed = seed
            for field, value in fields.items():
                section, key = field.split(".")
                config[section][key] = value
            runs[length].append(_fit(config, tmp_path_factory.mktemp("plain"), num_images))
    return runs


@pytest.mark.parametrize(
    "replica_map, input_pipeline, length, steps_per_dispatch",
    [
        ("unroll", "device", "two_epochs", 2),  # an epoch per call: lax.scan over replicas
        ("vmap", "device", "one_step", 1),
        # (tf_data replicas: the two-device test below compares them with device input.)
    ],
)
def test_each_replica_equals_the_plain_run_of_its_seed_and_overrides(
    plain_runs, tmp_path, replica_map, input_pipeline, length, steps_per_dispatch
):
    num_images, epochs = LENGTHS[length]
    config = _config(input_pipeline, length)
    config.steps_per_dispatch = steps_per_dispatch
    config.replicas = 2
    config.replica_seeds = SEEDS
    config.replica_overrides = OVERRIDES
    config.replica_map = replica_map
    state = _fit(config, tmp_path, num_images)
    steps = epochs * num_images // 16
    assert np.shape(state.step) == (2,) and list(state.step) == [steps, steps]
    plains = [(p.params, p.batch_stats, p.opt_state) for p in plain_runs[length]]
    for k in range(2):
        got = replicas.take((state.params, state.batch_stats, state.opt_state), k)
        # Equal to float32 rounding, judged against the other replica's plain run (what a
        # replica given the wrong seed or overrides would be near). The unrolled program's dots
        # split their sums differently from the plain run's, and A-Softmax's floor(m theta / pi)
        # and CBAM's max pooling amplify that over steps, by how much depending on the CPU: on
        # AVX-512 machines 1.5e-6 at most; on an AVX2 AMD EPYC (Zen 3), after two epochs, L2
        # distances of 0.05% (params), 0.02% (BatchNorm statistics) and 7.7% (the momentum
        # traces: the last steps' gradients) of the other replica's.
        for part, (name, bound) in enumerate((("params", 0.01), ("stats", 0.01), ("opt", 0.2))):
            own = _distance(got[part], plains[k][part])
            other = _distance(got[part], plains[1 - k][part])
            assert own < bound * other, (k, name, own, other)
        if length == "one_step":  # nothing to amplify yet: equal to rounding, on every CPU
            tight = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
            jax.tree.map(tight, got, plains[k])
    # The overrides reached their replica only: each equals its own plain run (above), and
    # the two trained differently.
    p0, p1 = (jax.tree.leaves(replicas.take(state.params, k)) for k in range(2))
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(p0, p1, strict=True)) > 1e-2


@pytest.mark.parametrize(
    "overrides, field",
    [
        ([{"model.width": 16}, {}], "model.width"),
        ([{"model.cbam": "none"}, {}], "model.cbam"),
        ([{"batch_size": 32}, {}], "batch_size"),
        ([{}, {"model.head": "softmax"}], "model.head"),
        ([{"seed": 4}, {}], "replica_seeds"),
        ([{"optimizer.learning_rat": 0.1}, {}], "optimizer.learning_rate"),
        ([{"loss.margin": 2.5}, {}], "loss.margin"),
        ([{}], "replicas=2"),
    ],
)
def test_a_field_that_changes_the_program_is_refused_by_name(overrides, field):
    config = _config()
    config.replicas = 2
    config.replica_overrides = tuple(overrides)
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        config_schema.validate(config)


@pytest.mark.parametrize("seeds", [(1,), (1, 2, 3), (1, -2)])
def test_bad_replica_seeds_are_refused(seeds):
    config = _config()
    config.replicas = 2
    config.replica_seeds = seeds
    with pytest.raises(UserError, match="replica_seeds"):
        config_schema.validate(config)


def test_one_replica_keeps_the_plain_state_and_checkpoint_layout():
    config = _config()
    state = create_train_state(config, create_model(config), 4)
    assert np.shape(state.step) == () and np.shape(state.dropout_key) == (2,)
    assert np.shape(state.params["conv1"]["kernel"]) == (3, 3, 1, 8)
    assert set(checkpoint._to_tree(state)) == set(checkpoint.STATE_FIELDS)  # no hparams saved
    config.replicas = 3
    stacked = replicas.create_train_state(config, create_model(config), 4)
    assert np.shape(stacked.params["conv1"]["kernel"]) == (3, 3, 3, 1, 8)
    np.testing.assert_array_equal(
        stacked.hparams["optimizer.learning_rate"], np.float32([0.05] * 3)
    )


def test_replica_reports_one_per_replica_and_the_ensemble():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 10, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 10).astype(np.int32)
    mask = np.ones(10, bool)
    each = jax.vmap(metrics.eval_metrics, in_axes=(0, None, None))(logits, labels, mask)
    ensemble = metrics.eval_metrics(jnp.asarray(logits[0]), labels, mask)
    report = replicas.Replicas.report({"replicas": each, "ensemble": ensemble}, num_examples=10)
    assert len(report["replicas"]) == 2
    for k in range(2):
        want = metrics.report(metrics.eval_metrics(logits[k], labels, mask), num_examples=10)
        assert report["replicas"][k]["accuracy"] == want["accuracy"]
    assert replicas.per_replica(report) == report["replicas"]


# --- The command line: results.json, per-replica curves, kill -9 and resume. ---------------

# After tests/test_train.py's flags (synthetic config, 3 steps per call), which these override.
REPLICA_FLAGS = [
    "--config.replicas=3",
    "--config.replica_overrides=({'optimizer.learning_rate': 0.1}, {}, {'loss.margin': 2})",
    "--config.synthetic.train=128",  # 4 steps per epoch
    "--config.num_epochs=2",
    "--config.checkpoint_every_steps=3",
    "--config.cross_validate=False",
    "--config.steps_per_dispatch=1",  # (3 per call, lax.scan: the equality test below)
]


def _cli(workdir, wait=True):
    return test_train._cli(workdir, *REPLICA_FLAGS, wait=wait)


_latest = test_train._final_state


@pytest.fixture(scope="module")
def replica_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("replicas"))
    proc = _cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_results_report_each_replica_their_spread_and_the_ensemble(replica_run):
    with open(os.path.join(replica_run, "results.json")) as f:
        results = json.load(f)
    entries = results["replicas"]
    assert [e["seed"] for e in entries] == [0, 1, 2]
    assert entries[0]["overrides"] == {"optimizer.learning_rate": 0.1}
    assert entries[2]["overrides"] == {"loss.margin": 2}
    accuracies = [e["private_test"]["accuracy"] for e in entries]
    assert results["mean_accuracy"] == pytest.approx(np.mean(accuracies))
    assert results["std_accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    chosen = results["selected_replica"]
    selects = [e["select_accuracy"] for e in entries]
    assert chosen == int(np.argmax(selects)) and results["select_accuracy"] == max(selects)
    assert results["private_test"] == entries[chosen]["private_test"]
    assert results["ensemble"]["num_examples"] == 70
    assert results["ensemble_accuracy"] == results["ensemble"]["accuracy"]
    perf = results["performance"]
    assert perf["steps_timed"] == 8 and perf["replicas"] == 3 and perf["replica_map"] == "unroll"
    for k in range(3):  # TensorBoard runs replica_<k>, eval reports per replica
        assert glob.glob(os.path.join(replica_run, f"replica_{k}", "events.out.tfevents.*"))
        assert os.path.exists(
            os.path.join(replica_run, "eval", f"replica_{k}", "public_test_epoch002.json")
        )
    # The best checkpoint holds each replica at its own best epoch.
    _, meta, source = checkpoint.load_variables(replica_run)
    assert os.sep + "best" + os.sep in source
    assert meta["replicas"] == 3 and meta["select_accuracy"] == selects
    assert [e["selected_epoch"] for e in entries] == meta["replica_epochs"]


def test_a_replica_run_loads_for_inference_and_as_an_init(replica_run):
    with open(os.path.join(replica_run, "results.json")) as f:
        chosen = json.load(f)["selected_replica"]
    _, stacked = checkpoint.load_for_inference(replica_run, replica="all")
    assert np.shape(stacked["params"]["conv1"]["kernel"]) == (3, 3, 3, 1, 8)
    _, default = checkpoint.load_for_inference(replica_run)
    _, one = checkpoint.load_for_inference(replica_run, replica=2)
    jax.tree.map(np.testing.assert_array_equal, default, replicas.take(stacked, chosen))
    jax.tree.map(np.testing.assert_array_equal, one, replicas.take(stacked, 2))
    with pytest.raises(checkpoint.CheckpointError, match="0..2"):
        checkpoint.load_for_inference(replica_run, replica=3)
    # A plain run initialised from it starts from the chosen replica.
    config = synthetic.get_config()
    template = create_train_state(config, create_model(config), 4)
    state = checkpoint.init_from(replica_run, template, config)
    jax.tree.map(np.testing.assert_array_equal, state.params, default["params"])


def test_kill_9_and_resume_with_three_replicas_ends_bit_identical(replica_run, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = _cli(workdir, wait=False)
    test_train._wait_for_checkpoint(proc, workdir, 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _latest(workdir)[0] < 8

    resumed = _cli(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step" in resumed.stderr
    step, tree, meta = _latest(workdir)
    ref_step, ref_tree, _ = _latest(replica_run)
    assert step == ref_step == 8 and meta["replicas"] == 3
    jax.tree.map(np.testing.assert_array_equal, tree, ref_tree)
    for name in ("results.json",):
        with open(os.path.join(workdir, name)) as f, open(os.path.join(replica_run, name)) as g:
            got, want = json.load(f), json.load(g)
        for key in ("replicas", "mean_accuracy", "ensemble_accuracy", "selected_replica"):
            assert got[key] == want[key], key


def test_the_recognizer_takes_one_replica_or_the_ensemble(replica_run):
    from fer_jax.inference.recognizer import Recognizer

    faces = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 1), np.uint8)
    per_replica = [
        Recognizer.from_checkpoint(replica_run, replica=k).predict_faces(faces) for k in range(3)
    ]
    ensemble = Recognizer.from_checkpoint(replica_run, replica="ensemble")
    np.testing.assert_allclose(
        ensemble.predict_faces(faces), np.mean(per_replica, axis=0), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="one replica"):
        ensemble.attention_maps(faces)


def test_predict_takes_a_replica_or_the_ensemble_on_the_command_line(replica_run, tmp_path):
    import cv2

    photo = str(tmp_path / "face.png")
    cv2.imwrite(photo, np.random.default_rng(1).integers(0, 256, (60, 60), np.uint8))

    def predict(*flags):
        cmd = [sys.executable, "-m", "fer_jax.predict", f"--checkpoint={replica_run}", *flags]
        cmd += ["--json", "--box=0,0,60,60", photo]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)

    ensemble, one = predict("--replica=ensemble"), predict("--replica=1")
    assert ensemble.returncode == 0 and one.returncode == 0, ensemble.stderr[-2000:]
    faces = [json.loads(p.stdout)[0]["faces"][0] for p in (ensemble, one)]
    assert faces[0]["probabilities"] != faces[1]["probabilities"]
    bad = predict("--replica=3")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "0..2" in bad.stderr


MULTI_DEVICE_SCRIPT = """
import json, sys, tempfile
import jax, numpy as np
from configs import synthetic
from fer_jax.training import synthetic_data
from fer_jax.training.parallel import DataParallel
from fer_jax.training.step import create_model
from fer_jax.training.train import create_job, fit

data = synthetic_data.make_split(16, seed=0)
# Random pixels, as tests/test_parallel.py: the synthetic bands make near-ties (ReLU kinks)
# that one and two devices' rounding resolve differently.
data["image"] = np.random.default_rng(0).integers(0, 256, data["image"].shape, np.uint8)
out = {}
cases = [  # each mode, input and map at least once on two devices
    ("shard_map", 1, "device", "unroll"),
    ("shard_map", 2, "tf_data", "vmap"),
    ("pmap", 2, "device", "unroll"),
]
for mode, n, pipeline, replica_map in cases:
    config = synthetic.get_config()
    config.parallelism, config.input_pipeline = mode, pipeline
    config.model.cbam, config.model.dropout_rate = "none", 0.0
    config.batch_size, config.num_epochs = 16, 1
    config.replicas, config.replica_map = 2, replica_map
    config.replica_overrides = (
        {"optimizer.learning_rate": 0.02}, {"loss.margin": 2, "optimizer.weight_decay": 1e-3}
    )
    job = create_job(config)
    job.devices = DataParallel(mode, jax.devices()[:n])
    job.model = create_model(config, axis_name=job.devices.axis_name)
    state = fit(job, tempfile.mkdtemp(), data["image"], data["label"])["state"]
    leaves = jax.tree.leaves((state.params, state.batch_stats))
    out[f"{mode}{n}_{pipeline}_{replica_map}"] = [np.asarray(x).tolist() for x in leaves]
init = job.models.create_state(job.model, 1)  # every case's (same seeds)
out["init"] = [np.asarray(x).tolist() for x in jax.tree.leaves((init.params, init.batch_stats))]
json.dump(out, sys.stdout)
"""


def test_replicas_train_alike_on_one_and_two_devices_in_every_mode():
    runs = as_arrays(run_on_cpu_devices(MULTI_DEVICE_SCRIPT, 2))
    init = runs.pop("init")
    reference = runs.pop("shard_map1_device_unroll")
    assert len(runs) == 2
    # Replica axis x data axis, one step (dropout off: its masks depend on the device count).
    # The steps are compared, each leaf within 1% of its largest update: a reduction over the
    # wrong axis changes updates by tens of percent, while rounding that flips one ReLU of one
    # image (1 vs 2 devices) moved one replica's updates by up to 0.34% (Intel Xeon, AMX).
    for name, leaves in runs.items():
        for got, want, start in zip(leaves, reference, init, strict=True):
            step = want - start
            atol = 1e-2 * np.abs(step).max() + 1e-9
            np.testing.assert_allclose(got - start, step, rtol=1e-4, atol=atol, err_msg=name)
