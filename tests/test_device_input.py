"""Device input mode: the same batches as the tf.data pipeline, call boundaries, scan = steps.

Batches are compared under 1, 2 and 4 simulated CPU devices (shard_map and pmap) in a
subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=4` must be set before JAX
starts); training with both input modes is compared in tests/test_parallel.py.
"""

import functools
import textwrap

import jax
import numpy as np
import pytest

from configs import synthetic
from data_pipelines.plan import epoch_plan
from fer_jax.training import config_schema, device_input, replicas, synthetic_data
from fer_jax.training.device_input import dispatches, plan_chunk
from fer_jax.training.parallel import DataParallel
from fer_jax.training.step import create_model, create_train_state, train_step
from fer_jax.training.train import create_job
from fer_jax.user_errors import UserError
from tests.test_parallel import run_on_cpu_devices

BATCHES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    import data_pipelines
    from data_pipelines.plan import epoch_plan
    from fer_jax.training import device_input, synthetic_data
    from fer_jax.training.parallel import AXIS, DataParallel

    N, B, SEED = 150, 32, 3  # 150 is not a multiple of 4: the last device's shard is padded
    ZOOM_ROTATE = {"zoom": 0.2, "rotate": 10.0}
    ERASE = {"erase": 0.6}
    data = synthetic_data.make_split(N, seed=0)
    data["image"] = np.random.default_rng(0).integers(0, 256, data["image"].shape, np.uint8)
    labels = data["label"].astype(np.int32)
    failures = []
    for mode, n in [("shard_map", 1), ("shard_map", 2), ("shard_map", 4), ("pmap", 2),
                    ("pmap", 4)]:
        parallel = DataParallel(mode, jax.devices()[:n])
        # 'unit' (x / 255): both pipelines compute the same float32 product, so the pixels
        # must be equal bit for bit (with an offset, XLA may fuse a multiply-add: 1 ulp).
        arrays = device_input.put_train_arrays(parallel, data["image"], labels,
                                               normalize="unit")

        def gather(images, labels, row, axis_name=None):
            return device_input.gather_train_batch(images, labels, row, arrays.layout, axis_name)

        if n == 1:
            fn = jax.jit(gather)
        elif mode == "pmap":
            fn = jax.pmap(functools.partial(gather, axis_name=AXIS), axis_name=AXIS,
                          devices=parallel.devices)
        else:
            fn = jax.jit(jax.shard_map(functools.partial(gather, axis_name=AXIS),
                                       mesh=parallel.mesh, in_specs=(P(AXIS), P(), P()),
                                       out_specs=P(AXIS), check_vma=False))
        # Plain crops (the fast path), then zoomed and rotated ones (integer affine maps), then
        # either with random erasing (each device erases its own rows of the batch).
        for epoch, augment in [(0, {}), (5, {}), (0, ZOOM_ROTATE), (5, ZOOM_ROTATE),
                               (1, ERASE), (2, {**ZOOM_ROTATE, **ERASE})]:
            plan = epoch_plan(N, B, seed=SEED, epoch=epoch, **augment)
            ds = data_pipelines.train_dataset_from_arrays(
                data["image"], labels, batch_size=B, seed=SEED, start_epoch=epoch,
                num_epochs=1, normalize="unit", **augment)
            for step, want in enumerate(ds.as_numpy_iterator()):
                row = parallel.place(device_input.plan_chunk(plan, step, 1), None)
                row = jax.tree.map(lambda x: x[:, 0] if mode == "pmap" and n > 1 else x[0],
                                   row)
                got = jax.device_get(fn(arrays.images, arrays.labels, row))
                got = {k: np.asarray(v).reshape(want[k].shape) for k, v in got.items()}
                for key in ("image", "label"):
                    if not np.array_equal(got[key], want[key]):
                        failures.append(f"{mode}{n} {augment} epoch {epoch} step {step} {key}")
    json.dump(failures, sys.stdout)
    """
).replace("import json, sys", "import functools, json, sys")


def test_device_batches_equal_the_tf_data_batches_on_1_2_and_4_devices_zoomed_erased_or_not():
    assert run_on_cpu_devices(BATCHES_SCRIPT, 4) == []


def test_replica_plans_with_zoom_and_rotation_gather_each_replicas_own_crops():
    """Replicas' plans `(L, K, B)` with maps `(L, K, B, 6)`, gathered as `train_chunk_fn` does
    (vmapped over K), give each replica the crops of its own plan."""
    parallel = DataParallel("shard_map", jax.devices()[:1])
    data = synthetic_data.make_split(40, seed=2)
    arrays = device_input.put_train_arrays(parallel, data["image"], data["label"].astype(np.int32))
    plans = [epoch_plan(40, 8, seed=s, epoch=1, zoom=0.3, rotate=20) for s in (0, 1)]
    rows = device_input.plan_chunk(replicas.stack_plans(plans), 2, 1)
    assert rows.keys() == {"index", "affine"} and rows["affine"].shape == (1, 2, 8, 6)

    def gather(row):
        return device_input.gather_train_batch(
            arrays.images, arrays.labels, row, arrays.layout, None
        )

    both = jax.vmap(gather)(jax.tree.map(lambda x: x[0], rows))
    for k, plan in enumerate(plans):
        one = gather(jax.tree.map(lambda x: x[0], device_input.plan_chunk(plan, 2, 1)))
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(both[key][k]), np.asarray(one[key]))
    assert not np.array_equal(np.asarray(both["image"][0]), np.asarray(both["image"][1]))


@pytest.mark.parametrize("pipeline", ["device", "tf_data"])
def test_config_augment_reaches_the_plans_of_both_input_pipelines(pipeline, monkeypatch):
    import data_pipelines

    config = synthetic.get_config()
    config.model.width = 4
    config.batch_size = 8
    config.replicas = 2
    config.input_pipeline = pipeline
    config.augment.zoom, config.augment.rotate, config.augment.erase = 0.25, 12.0, 0.5
    job = create_job(config)
    data = synthetic_data.make_split(40, seed=2)
    seen = []
    if pipeline == "device":
        monkeypatch.setattr(device_input, "plan_chunk", lambda *a: seen.append(a) or plan_chunk(*a))
    else:
        make = data_pipelines.train_dataset_from_arrays
        monkeypatch.setattr(
            data_pipelines,
            "train_dataset_from_arrays",
            lambda *a, **kw: seen.append(kw) or make(*a, **kw),
        )
    next(job.train_calls(data["image"], data["label"], 0, 5, 5))
    if pipeline == "device":
        ((plan, start, length),) = seen
        for k, seed in enumerate(replicas.seeds(config)):
            want = epoch_plan(40, 8, seed=seed, epoch=0, zoom=0.25, rotate=12.0, erase=0.5)
            np.testing.assert_array_equal(plan["affine"][:, k], want["affine"])
            np.testing.assert_array_equal(plan["erase"][:, k], want["erase"])
    else:
        assert [(kw["seed"], kw["zoom"], kw["rotate"], kw["erase"]) for kw in seen] == [
            (seed, 0.25, 12.0, 0.5) for seed in replicas.seeds(config)
        ]


def test_calls_end_at_epochs_and_checkpoints_and_resume_on_the_same_boundaries():
    calls = list(dispatches(0, 42, 14, 3, 4))
    assert sum(n for _, n in calls) == 42 and all(1 <= n <= 3 for _, n in calls)
    ends = {first + n for first, n in calls}
    assert {14, 28, 42} <= ends and {4, 8, 12, 16, 20, 24, 28, 32, 36, 40} <= ends
    starts = [first for first, _ in calls]
    assert starts == sorted(starts) and starts[0] == 0
    # A run resumed at any checkpoint makes exactly the calls the uninterrupted run made.
    for resume in (4, 14, 16, 28):
        assert list(dispatches(resume, 42, 14, 3, 4)) == [c for c in calls if c[0] >= resume]
    assert list(dispatches(0, 28, 14, 64, 0)) == [(0, 14), (14, 14)]


@pytest.mark.parametrize("bad", [-1])
def test_negative_steps_per_dispatch_is_refused_by_name(bad):
    config = synthetic.get_config()
    config.steps_per_dispatch = bad
    with pytest.raises(UserError, match="config.steps_per_dispatch"):
        config_schema.validate(config)


def test_unknown_input_pipeline_is_refused_by_name():
    config = synthetic.get_config()
    config.input_pipeline = "disk"
    with pytest.raises(UserError, match="config.input_pipeline is 'disk'"):
        config_schema.validate(config)


def test_a_scanned_chunk_equals_the_same_steps_one_call_each():
    """Also runs one-step calls (no loop) with a constant learning rate, as JAFFE's CV does."""
    # cbam='none', softmax head, two steps: CBAM's max pooling (one arg-max) and A-Softmax's
    # k = floor(m theta / pi) are discontinuous, and the loop body is fused differently from
    # the single step, so rounding differences (~1e-7 after two steps, measured) grow by
    # orders of magnitude per step from the third step on. Two steps still check that every
    # step inside the loop gets its own batch and dropout key.
    config = synthetic.get_config("cbam=none,head=softmax")
    config.model.dropout_rate = 0.1  # the per-step dropout keys must match too
    config.optimizer.schedule = "constant"  # a Python-float learning rate in the metrics
    config.batch_size = 16
    parallel = DataParallel("shard_map", jax.devices()[:1])
    model = create_model(config)
    data = synthetic_data.make_split(64, seed=1)
    arrays = device_input.put_train_arrays(parallel, data["image"], data["label"].astype(np.int32))
    step = functools.partial(train_step, config=config)
    chunk = parallel.compile(
        device_input.train_chunk_fn(step, arrays.layout), split_axes=(0, None, None)
    )
    plan = epoch_plan(64, 16, seed=0, epoch=0)
    init = create_train_state(config, model, steps_per_epoch=4)

    scanned, metrics = chunk(
        parallel.replicate(init), arrays.images, arrays.labels, device_input.plan_chunk(plan, 0, 2)
    )
    assert metrics["loss"].shape == (2,)
    one_by_one = parallel.replicate(init)
    losses = []
    for i in range(2):
        rows = device_input.plan_chunk(plan, i, 1)
        one_by_one, m = chunk(one_by_one, arrays.images, arrays.labels, rows)
        losses.append(float(m["loss"][0]))
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=1e-5)
    # The parameters: equal up to rounding, judged against how far the two steps moved them.
    # The two programs are fused differently, and XLA:CPU's rounding differences depend on the
    # CPU: ~1e-7 apart on AVX-512 machines, 2.7e-4 (max over the parameters) on an AVX2 AMD
    # EPYC (Zen 3), where the two steps moved them by up to 1.5e-2 (1.9%). A step fed the wrong
    # batch moves them as much as a step does: the control below (step 0's batch twice) is
    # 1.0e-2 (69%) away, and must fail this test.
    start = jax.device_get(parallel.replicate(init).params)

    def max_abs(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))

    def leaves(state):
        return jax.tree.leaves(jax.device_get(state.params))

    moved = max_abs(leaves(scanned), jax.tree.leaves(start))
    assert max_abs(leaves(scanned), leaves(one_by_one)) < 0.1 * moved
    wrong = parallel.replicate(init)
    for _ in range(2):
        wrong, _ = chunk(wrong, arrays.images, arrays.labels, device_input.plan_chunk(plan, 0, 1))
    assert max_abs(leaves(scanned), leaves(wrong)) > 0.1 * moved
    assert int(scanned.step) == int(one_by_one.step) == 2
