"""The network's structure: exact parameter counts, shapes, padding, attention maps, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.model.resnet import ResNet18


def _param_count(model: ResNet18) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 44, 44, 1)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize(
    "cbam, head, expected",
    [
        (None, "softmax", 11_171_271),
        ("channel_first", "softmax", 11_261_151),
        ("channel_first", "a_softmax", 11_261_144),
        ("spatial_first", "softmax", 11_261_151),
        ("parallel", "a_softmax", 11_261_144),
    ],
)
def test_full_width_parameter_counts_match_the_paper_network(cbam, head, expected):
    assert _param_count(ResNet18(width=64, cbam=cbam, head=head)) == expected


def test_feature_map_sizes_follow_44_44_22_11_6():
    model = ResNet18(width=16)
    x = jnp.zeros((2, 44, 44, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    bs = variables["batch_stats"]
    # BatchNorm statistics have one entry per channel: widths w, 2w, 4w, 8w.
    assert [bs[f"layer{i}_0"]["bn1"]["mean"].shape[0] for i in range(1, 5)] == [16, 32, 64, 128]
    _, state = jax.eval_shape(lambda v: model.apply(v, x, mutable=["intermediates"]), variables)
    spatial = [
        state["intermediates"][f"layer{i}_{b}"]["cbam"]["spatial_attention"][0].shape
        for i in range(1, 5)
        for b in range(2)
    ]
    assert [s[1] for s in spatial] == [44, 44, 22, 22, 11, 11, 6, 6]


def test_returns_logits_features_and_attention_maps_in_unit_interval():
    model = ResNet18(width=16, head="a_softmax")
    x = jax.random.uniform(jax.random.key(1), (3, 44, 44, 1))
    variables = model.init(jax.random.key(0), x)
    (logits, features), state = model.apply(
        variables, x, return_features=True, mutable=["intermediates"]
    )
    assert logits.shape == (3, 7) and features.shape == (3, 128)
    ms = state["intermediates"]["layer1_0"]["cbam"]["spatial_attention"][0]
    mc = state["intermediates"]["layer4_1"]["cbam"]["channel_attention"][0]
    assert ms.shape == (3, 44, 44, 1) and mc.shape == (3, 1, 1, 128)
    assert bool(jnp.all((ms > 0) & (ms < 1))) and bool(jnp.all((mc > 0) & (mc < 1)))
    # A-Softmax inference logits are |x| cos(theta): bounded by the feature norm.
    norms = jnp.linalg.norm(features, axis=-1, keepdims=True)
    assert bool(jnp.all(jnp.abs(logits) <= norms * (1 + 1e-5)))


def test_dropout_is_active_only_in_training():
    model = ResNet18(width=16, cbam=None, dropout_rate=0.5)
    x = jax.random.uniform(jax.random.key(1), (4, 44, 44, 1))
    variables = model.init(jax.random.key(0), x)
    run = lambda key: model.apply(  # noqa: E731
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
    )[0]
    assert not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)))
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
    model = ResNet18(width=16, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(1), (2, 44, 44, 1))
    variables = model.init(jax.random.key(0), x)
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, state = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
    )
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}
    ref = ResNet18(width=16).apply(variables, x)
    np.testing.assert_allclose(model.apply(variables, x), ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("kwargs", [{"cbam": "diagonal"}, {"head": "arcface"}])
def test_unknown_options_are_rejected_by_name(kwargs):
    model = ResNet18(width=16, **kwargs)
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        model.init(jax.random.key(0), jnp.zeros((1, 44, 44, 1)))


def test_cbam_max_pooling_gradient_reaches_exactly_one_argmax_under_jit():
    from fer_jax.model.cbam import max_along

    x = jnp.array([[1.0, 3.0, 3.0, 2.0], [0.5, -1.0, 0.25, 0.0]])
    for fn in (
        jax.grad(lambda x: jnp.sum(max_along(x * 1.1, -1))),
        jax.jit(jax.grad(lambda x: jnp.sum(max_along(x * 1.1, -1)))),
    ):
        g = np.asarray(fn(x))
        np.testing.assert_allclose(g, [[0, 1.1, 0, 0], [1.1, 0, 0, 0]], rtol=1e-6)


@pytest.mark.parametrize("axis", [1, -1])
def test_cbam_max_pooling_gradient_without_ties_is_one_hot_at_the_max(axis):
    from fer_jax.model.cbam import max_along

    x = jax.random.normal(jax.random.key(0), (4, 36, 16))
    # `sin(x)` is computed by a fusion inside the jitted gradient, as activations are in the net.
    grad = jax.jit(jax.grad(lambda x: jnp.sum(max_along(jnp.sin(x), axis) ** 2)))(x)
    x64 = np.asarray(x, np.float64)
    first = np.expand_dims(np.argmax(np.sin(x64), axis=axis), axis)
    at_max = np.take_along_axis(x64, first, axis)
    want = np.zeros_like(x64)
    np.put_along_axis(want, first, 2 * np.sin(at_max) * np.cos(at_max), axis)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(np.asarray(grad)) == first.size


def test_angle_linear_kernel_starts_with_unit_columns_like_the_reference():
    # The raw kernel's scale sets the classifier's effective learning rate (lr / |w|^2), so it
    # must start at the reference's unit columns, not at uniform(-1, 1)'s |w| ~ sqrt(D / 3).
    model = ResNet18(width=8, head="a_softmax")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 44, 44, 1)), train=False)
    kernel = np.asarray(variables["params"]["linear"]["kernel"])
    assert kernel.shape == (64, 7)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, rtol=1e-6)
    assert (kernel > 0).any() and (kernel < 0).any()


@pytest.mark.parametrize(
    "matmul_dtype, flags, backend, impl",
    [
        ("float32", {"amx_bf16"}, "cpu", "auto"),
        ("bfloat16", set(), "cpu", "auto:bf16"),
        ("auto", {"amx_bf16", "avx512_bf16"}, "cpu", "auto:bf16"),
        ("auto", {"avx512_bf16", "avx2"}, "cpu", "auto:bf16"),  # Zen 4: 1.07x, same loss
        ("auto", {"avx2", "fma"}, "cpu", "auto"),  # no native bf16: slower (Zen 3: 0.6x)
        ("auto", {"amx_bf16"}, "gpu", "auto"),
    ],
)
def test_matmul_dtype_becomes_the_conv_impl_suffix_where_it_pays(
    monkeypatch, matmul_dtype, flags, backend, impl
):
    from fer_jax.model import resnet

    monkeypatch.setattr(resnet, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(resnet.jax, "default_backend", lambda: backend)
    config = {"width": 8, "conv_impl": "auto", "matmul_dtype": matmul_dtype}
    assert resnet.model_from_config(config).conv_impl == impl
    # An impl without matmuls (e.g. export's 'xla') takes no suffix; no field means float32.
    assert resnet.model_from_config(config, conv_impl="xla").conv_impl == "xla"
    assert resnet.model_from_config({"conv_impl": "auto"}).conv_impl == "auto"
    with pytest.raises(ValueError, match="matmul_dtype"):
        resnet.model_from_config({**config, "matmul_dtype": "fp16"})


def test_bf16_matmuls_train_like_float32_at_small_width():
    """Logits and gradients of a width-16 network with bfloat16 matmul operands stay within
    bf16 rounding of float32's (the training-step equality test, at bf16 tolerance)."""
    from fer_jax.model.resnet import model_from_config

    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 44, 44, 1))
    f32 = model_from_config({"width": 16, "conv_impl": "auto", "dropout_rate": 0.0})
    bf16 = f32.clone(conv_impl="auto:bf16")
    variables = f32.init(jax.random.PRNGKey(0), x)

    def loss(params, model):
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2), logits

    (l32, y32), g32 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        variables["params"], f32
    )
    (l16, y16), g16 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        variables["params"], bf16
    )
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(y16, y32, atol=3e-2 * scale)
    assert not np.array_equal(np.asarray(y16), np.asarray(y32))

    def cosine(a: jax.Array, b: jax.Array) -> float:
        return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))

    leaves16, leaves32 = jax.tree.leaves(g16), jax.tree.leaves(g32)
    assert all(a.dtype == jnp.float32 for a in leaves16)
    flat16, flat32 = (jnp.concatenate([g.ravel() for g in ls]) for ls in (leaves16, leaves32))
    whole = cosine(flat16, flat32)
    # Per leaf only where a cosine means something (>= 16 elements): a 1-element leaf's cosine
    # is its sign, and the 1-element SpatialGate BatchNorm bias flipped sign on a Zen 4
    # (AVX512_BF16): -0.0005 against float32's 0.03 (the tree's gradient RMS is 0.09).
    per_leaf = [cosine(a, b) for a, b in zip(leaves16, leaves32, strict=True) if a.size >= 16]
    # Measured (Zen 4): whole 0.992; leaves >= 16 elements mean 0.986, min 0.92 (a BatchNorm
    # bias). half_precision (bf16 everywhere), over all leaves: mean 0.92, min -1.
    assert whole > 0.98 and np.mean(per_leaf) > 0.96 and min(per_leaf) > 0.8
