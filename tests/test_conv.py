"""fer_jax.model.conv: every impl equals the plain XLA convolution (values and both gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from fer_jax.model import conv, onednn_conv

# (batch, H=W, Cin, Cout, k, stride, padding); batch 4 runs the chunked (lax.scan) weight
# gradient, batch 3 and 1 the single-chunk path.
CASES = [
    (4, 44, 3, 4, 3, 1, 1),  # network's 44x44 stride-1 3x3 (narrow)
    (4, 22, 4, 5, 3, 2, 1),  # stride 2 on an even size (PyTorch's symmetric padding)
    (3, 11, 4, 6, 3, 2, 1),  # stride 2 on an odd size
    (4, 6, 8, 8, 3, 1, 1),
    (3, 7, 3, 2, 7, 1, 3),  # 7x7 on 7x7
    (2, 44, 2, 1, 7, 1, 3),  # CBAM spatial attention, 2 -> 1
    (4, 22, 4, 6, 1, 2, 0),  # shortcut 1x1 stride 2, even
    (1, 7, 4, 6, 1, 2, 0),  # 1x1 stride 2, odd
    (4, 7, 3, 4, 1, 1, 0),  # 1x1 stride 1
    (4, 7, 3, 4, 3, 1, 0),  # no padding
    (4, 6, 3, 4, 3, 2, 2),  # padding 2, stride 2
    (2, 9, 2, 3, 5, 3, 2),  # stride 3: nine input-gradient phases
    (2, 7, 2, 2, 4, 2, 1),  # even kernel, stride 2, odd size
    (2, 8, 2, 3, 3, 2, 0),  # stride 2, no padding
]
CUSTOM_IMPLS = ["matmul_grad", "phase_dx", "im2col", "auto"]


def _inputs(case, dtype=jnp.float32, seed=0):
    b, h, cin, cout, k, s, p = case
    ho = conv.output_size(h, k, s, p)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, h, cin)).astype(np.float32)
    kern = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    dy = rng.standard_normal((b, ho, ho, cout)).astype(np.float32)
    return tuple(jnp.asarray(a, dtype) for a in (x, kern, dy))


def _fwd_bwd(impl: str, stride: int, padding: int):
    """jit(x, k, dy) -> (y, dx, dk) for conv2d(impl)."""

    def f(x, k, dy):
        y, vjp = jax.vjp(
            lambda a, b: conv.conv2d(a, b, stride=stride, padding=padding, impl=impl), x, k
        )
        return (y, *vjp(dy))

    return jax.jit(f)


def _assert_close(actual, expected, rtol=1e-4, atol_rel=1e-5):
    """allclose with an absolute tolerance relative to the expected magnitude."""
    expected = np.asarray(expected, np.float32)
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), expected, rtol=rtol, atol=atol_rel * scale
    )


@pytest.mark.parametrize("impl", CUSTOM_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}_{}to{}_k{}_s{}_p{}".format(*c))
def test_matches_xla(case, impl):
    x, kern, dy = _inputs(case)
    s, p = case[5], case[6]
    ref = _fwd_bwd("xla", s, p)(x, kern, dy)
    out = _fwd_bwd(impl, s, p)(x, kern, dy)
    for name, a, r in zip(("y", "dx", "dk"), out, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        _assert_close(a, r)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c[5] == 1],
    ids=lambda c: "b{}_h{}_{}to{}_k{}_s{}_p{}".format(*c),
)
def test_shifted_sums_matches_xla_at_stride_1(case):
    x, kern, dy = _inputs(case)
    ref = _fwd_bwd("xla", 1, case[6])(x, kern, dy)
    out = _fwd_bwd("shifted_sums", 1, case[6])(x, kern, dy)
    for name, a, r in zip(("y", "dx", "dk"), out, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        _assert_close(a, r)


@pytest.mark.parametrize(
    "case",
    [
        (4, 44, 3, 4, 3, 1, 1),
        (3, 11, 4, 6, 3, 1, 1),  # odd size: padded to 12 and cropped
        (4, 6, 8, 8, 3, 1, 1),
        (2, 7, 16, 16, 3, 1, 1),
        (8, 22, 16, 32, 3, 1, 1),  # several images per Winograd chunk (lax.map)
    ],
    ids=lambda c: "b{}_h{}_{}to{}_k{}_s{}_p{}".format(*c),
)
def test_winograd_matches_xla(case):
    x, kern, dy = _inputs(case)
    ref = _fwd_bwd("xla", 1, 1)(x, kern, dy)
    out = _fwd_bwd("winograd", 1, 1)(x, kern, dy)
    for name, a, r in zip(("y", "dx", "dk"), out, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        _assert_close(a, r)


@pytest.mark.parametrize(
    "case, pads",
    [
        ((16, 6, 4, 5, 3, 1, 1), ((1, 1), (1, 1))),  # 2 chunks of 8 images (lax.map)
        ((7, 6, 4, 5, 3, 1, 1), ((1, 1), (1, 1))),  # no divisor of 7 >= 8: one chunk
        ((2, 9, 3, 4, 3, 2, 1), ((2, 0), (1, -1))),  # asymmetric, negative: cropped
        ((2, 8, 3, 4, 1, 2, 0), ((0, 0), (0, 0))),  # 1x1, stride 2
    ],
)
def test_conv_im2col_matches_lax_conv(case, pads):
    """conv_im2col with any (even negative) padding per side, chunked or not, equals XLA's."""
    x, kern, _ = _inputs(case)
    s = case[5]
    ref = jax.lax.conv_general_dilated(
        x, kern, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    out = jax.jit(conv.conv_im2col, static_argnums=(2, 3, 4))(x, kern, s, pads, False)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    _assert_close(out, ref)
    bf = jax.jit(conv.conv_im2col, static_argnums=(2, 3, 4))(x, kern, s, pads, True)
    assert bf.dtype == jnp.float32
    _assert_close(bf, ref, rtol=5e-2, atol_rel=2e-2)


def test_winograd_refuses_other_shapes_by_name():
    x, kern, _ = _inputs((1, 8, 2, 2, 3, 2, 1))
    with pytest.raises(ValueError, match="winograd.*3x3 kernel, stride 1 and padding 1"):
        conv.conv2d(x, kern, stride=2, impl="winograd")
    with pytest.raises(ValueError, match="winograd"):
        conv.conv2d(x, kern[:1, :1], stride=1, padding=0, impl="winograd")


def test_shifted_sums_refuses_strides_by_name():
    x, kern, _ = _inputs((1, 8, 2, 1, 3, 2, 1))
    with pytest.raises(ValueError, match="shifted_sums.*stride"):
        conv.conv2d(x, kern, stride=2, impl="shifted_sums")


def test_xla_impl_is_lax_conv_with_symmetric_padding():
    """At stride 2 on an even size the padding is (1, 1), not XLA 'SAME''s (0, 1)."""
    x, kern, _ = _inputs((2, 22, 3, 4, 3, 2, 1))
    y = conv.conv2d(x, kern, stride=2, padding=1)
    ref = jax.lax.conv_general_dilated(
        x, kern, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    same = jax.lax.conv_general_dilated(
        x, kern, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert y.shape == (2, 11, 11, 4)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    assert not np.allclose(np.asarray(y), np.asarray(same), atol=1e-3)


@pytest.mark.parametrize(
    "case",
    [(2, 11, 3, 4, 3, 2, 1), (2, 8, 3, 4, 1, 2, 0), (2, 9, 2, 3, 5, 3, 2), (2, 6, 2, 2, 3, 1, 1)],
)
def test_tap_row_patches_layout(case):
    """P_r[(j, c), (b, q, w)] = x_padded[b, s*q + r, s*w + j, c], per phase r of the kernel rows."""
    b, h, cin, _, k, s, p = case
    x, _, _ = _inputs(case)
    ho = conv.output_size(h, k, s, p)
    xp = np.pad(np.asarray(x), ((0, 0), (p, p), (p, p), (0, 0)))
    parts = conv.tap_row_patches(x, k, k, s, p, ho, ho)
    assert [taps for taps, _ in parts] == [range(r, k, s) for r in range(min(s, k))]
    for taps, patches in parts:
        q = ho + len(taps) - 1
        want = np.stack(
            [xp[:, taps.start + s * np.arange(q)][:, :, j + s * np.arange(ho)] for j in range(k)]
        )  # (kw, B, Q, Wo, C)
        want = want.transpose(0, 4, 1, 2, 3).reshape(k * cin, b * q * ho)
        np.testing.assert_array_equal(np.asarray(patches), want)


@pytest.mark.parametrize("impl", ["xla", "matmul_grad", "phase_dx"])
def test_against_torch(impl):
    torch = pytest.importorskip("torch")
    case = (3, 22, 4, 5, 3, 2, 1)  # stride 2 on an even size
    x, kern, dy = _inputs(case, seed=1)
    y, dx, dk = _fwd_bwd(impl, 2, 1)(x, kern, dy)

    tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    tk = torch.tensor(
        np.asarray(kern).transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True
    )
    ty = torch.nn.functional.conv2d(tx, tk, stride=2, padding=1)
    ty.backward(torch.tensor(np.asarray(dy).transpose(0, 3, 1, 2), dtype=torch.float64))
    _assert_close(y, ty.detach().numpy().transpose(0, 2, 3, 1))
    _assert_close(dx, tx.grad.numpy().transpose(0, 2, 3, 1))
    _assert_close(dk, tk.grad.numpy().transpose(2, 3, 1, 0))


def test_vmap_and_per_example_grads():
    """vmap over an extra leading axis, and per-example kernel gradients via vmap(grad)."""
    x, kern, _ = _inputs((4, 12, 3, 4, 3, 1, 1))
    xv = x.reshape(2, 2, *x.shape[1:])
    for impl in ("matmul_grad", "auto"):
        f = lambda a, impl=impl: conv.conv2d(a, kern, impl=impl)
        _assert_close(jax.vmap(f)(xv), jax.vmap(lambda a: conv.conv2d(a, kern))(xv))

    def loss(k, a, impl):
        return jnp.sum(jnp.sin(conv.conv2d(a[None], k, stride=2, padding=1, impl=impl)))

    per_ex = {
        impl: jax.jit(jax.vmap(jax.grad(loss), (None, 0, None)), static_argnums=2)(kern, x, impl)
        for impl in ("xla", "matmul_grad")
    }
    assert per_ex["matmul_grad"].shape == (4, *kern.shape)
    _assert_close(per_ex["matmul_grad"], per_ex["xla"])


def test_shard_map_and_pmap():
    """Works inside shard_map (grads psum'ed over the batch axis) and pmap."""
    n = jax.device_count()
    x, kern, _ = _inputs((2 * n, 12, 3, 4, 3, 1, 1))
    mesh = Mesh(np.array(jax.devices()), ("batch",))

    def grads(impl):
        def local(k, a):  # JAX psums the replicated kernel's gradient over "batch" itself
            return jax.grad(lambda k_: jnp.sum(conv.conv2d(a, k_, impl=impl) ** 2))(k)

        specs = (PartitionSpec(), PartitionSpec("batch"))
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=PartitionSpec()))(
            kern, x
        )

    _assert_close(grads("matmul_grad"), grads("xla"))
    full = jax.grad(lambda k_: jnp.sum(conv.conv2d(x, k_) ** 2))(kern)
    _assert_close(grads("matmul_grad"), full)

    xp = x.reshape(n, 2, *x.shape[1:])
    pm = jax.pmap(lambda a: conv.conv2d(a, kern, impl="matmul_grad"))(xp)
    _assert_close(pm.reshape(-1, *pm.shape[2:]), conv.conv2d(x, kern))


@pytest.mark.parametrize("impl", ["xla", "matmul_grad", "phase_dx", "winograd", "im2col"])
def test_bfloat16(impl):
    """bf16 activations (kernel cast by the caller or by conv2d) run and are close to f32."""
    # stride 2: the input-gradient phases run in bf16 too (Winograd: stride 1 only)
    s = 1 if impl == "winograd" else 2
    case = (4, 22, 8, 8, 3, s, 1)
    x, kern, dy = _inputs(case)
    y32, dx32, dk32 = _fwd_bwd("xla", s, 1)(x, kern, dy)
    xb, kb, dyb = (a.astype(jnp.bfloat16) for a in (x, kern, dy))
    y, dx, dk = _fwd_bwd(impl, s, 1)(xb, kb, dyb)
    assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    for a, r in ((y, y32), (dx, dx32), (dk, dk32)):
        _assert_close(a, r, rtol=5e-2, atol_rel=2e-2)

    # f32 master kernel: conv2d casts it to x.dtype; its gradient comes back in float32.
    dk_master = jax.jit(
        jax.grad(
            lambda k: jnp.vdot(conv.conv2d(xb, k, stride=s, impl=impl).astype(jnp.float32), dy)
        )
    )(kern)
    assert dk_master.dtype == jnp.float32
    _assert_close(dk_master, dk32, rtol=5e-2, atol_rel=2e-2)


@pytest.mark.parametrize(
    "impl, case",
    [
        ("winograd:bf16", (4, 22, 16, 16, 3, 1, 1)),
        ("matmul_grad:bf16", (4, 22, 16, 16, 3, 1, 1)),
        ("matmul_grad:bf16", (4, 22, 8, 16, 3, 2, 1)),  # strided: per phase of kernel rows
        ("auto:bf16", (4, 44, 16, 16, 3, 1, 1)),  # auto picks Winograd here
        ("im2col:bf16", (4, 6, 16, 16, 3, 1, 1)),
        ("im2col:bf16", (4, 11, 16, 32, 3, 2, 1)),  # strided: input gradient per phase
        ("im2col:bf16", (4, 11, 16, 32, 1, 2, 0)),
        ("auto:bf16", (16, 11, 16, 16, 3, 1, 1)),  # auto picks im2col here (4 chunks)
        ("auto:bf16", (8, 6, 16, 16, 3, 1, 1)),
    ],
)
def test_bf16_matmul_operands_keep_float32_outputs_close_to_xla(impl, case, monkeypatch):
    """':bf16': float32 in and out, matmul operands rounded to bfloat16 (relative error ~1e-2
    of the magnitude), and not bit-equal to float32, so the suffix really took effect.
    fer_jax's own forms: "auto:bf16" as without oneDNN's (tests/test_onednn_conv.py)."""
    monkeypatch.setattr(onednn_conv, "available", lambda backend=None, bf16=False: False)
    x, kern, dy = _inputs(case)
    s, p = case[5], case[6]
    ref = _fwd_bwd("xla", s, p)(x, kern, dy)
    out = _fwd_bwd(impl, s, p)(x, kern, dy)
    plain = _fwd_bwd(impl.split(":")[0], s, p)(x, kern, dy)
    changed = []
    for name, a, r, f in zip(("y", "dx", "dk"), out, ref, plain, strict=True):
        assert a.dtype == jnp.float32, name
        _assert_close(a, r, rtol=5e-2, atol_rel=2e-2)
        changed.append(not np.array_equal(np.asarray(a), np.asarray(f)))
    # Winograd and im2col round y, dx and dk; matmul_grad only its weight gradient.
    assert changed == ([True] * 3 if "matmul_grad" not in impl else [False, False, True])


def test_auto_bf16_leaves_float32_picks_alone():
    """Without oneDNN's convolutions, `bf16=True` changes select_impl's pick only for layers
    3-4's 3x3 convolutions ("im2col": stride 1 at 11x11 and 6x6, and 11x11 -> 6x6 at stride 2);
    every float32 pick is as before. (With them: tests/test_onednn_conv.py.)"""
    shapes = [  # (x_shape, kernel_shape, stride, padding): every convolution of the network
        ((64, 44, 44, 1), (3, 3, 1, 64), 1, 1),
        ((64, 44, 44, 64), (3, 3, 64, 64), 1, 1),
        ((64, 44, 44, 2), (7, 7, 2, 1), 1, 3),
        ((64, 44, 44, 64), (3, 3, 64, 128), 2, 1),
        ((64, 44, 44, 64), (1, 1, 64, 128), 2, 0),
        ((64, 22, 22, 128), (3, 3, 128, 128), 1, 1),
        ((64, 22, 22, 128), (3, 3, 128, 256), 2, 1),
        ((64, 22, 22, 128), (1, 1, 128, 256), 2, 0),
        ((64, 11, 11, 256), (3, 3, 256, 256), 1, 1),
        ((64, 11, 11, 2), (7, 7, 2, 1), 1, 3),
        ((64, 11, 11, 256), (3, 3, 256, 512), 2, 1),
        ((64, 11, 11, 256), (1, 1, 256, 512), 2, 0),
        ((64, 6, 6, 512), (3, 3, 512, 512), 1, 1),
        ((64, 6, 6, 2), (7, 7, 2, 1), 1, 3),
    ]
    changed = {}
    for x_shape, k_shape, s, p in shapes:
        f32 = conv.select_impl(x_shape, k_shape, s, p, backend="cpu")
        bf16 = conv.select_impl(x_shape, k_shape, s, p, backend="cpu", bf16=True, onednn=False)
        assert f32 == conv.select_impl(x_shape, k_shape, s, p, backend="cpu", bf16=False)
        if bf16 != f32:
            changed[(x_shape[1], k_shape)] = (f32, bf16)
        assert conv.select_impl(x_shape, k_shape, s, p, backend="gpu", bf16=True) == "xla"
    assert changed == {
        (11, (3, 3, 256, 256)): ("xla", "im2col"),
        (6, (3, 3, 512, 512)): ("xla", "im2col"),
        (11, (3, 3, 256, 512)): ("matmul_grad", "im2col"),
    }


def test_bf16_suffix_only_on_impls_with_matmuls():
    x, kern, _ = _inputs((1, 7, 2, 2, 3, 1, 1))
    for impl in ("xla:bf16", "phase_dx:bf16", "winograd:fp8"):
        with pytest.raises(ValueError, match="unknown impl"):
            conv.conv2d(x, kern, impl=impl)


def test_select_impl():
    for shape, kernel in (
        ((64, 44, 44, 64), (3, 3, 64, 64)),
        ((64, 22, 22, 128), (3, 3, 128, 128)),
    ):
        assert conv.select_impl(shape, kernel, 1, 1, backend="cpu") == "winograd"
    assert conv.select_impl((64, 11, 11, 256), (3, 3, 256, 256), 1, 1, backend="cpu") == "xla"
    assert conv.select_impl((64, 44, 44, 1), (3, 3, 1, 64), 1, 1, backend="cpu") == "matmul_grad"
    assert conv.select_impl((64, 44, 44, 64), (3, 3, 64, 64), 1, 0, backend="cpu") == "matmul_grad"
    for shape, kernel in (
        ((64, 44, 44, 64), (3, 3, 64, 128)),
        ((64, 11, 11, 256), (3, 3, 256, 512)),
    ):
        assert conv.select_impl(shape, kernel, 2, 1, backend="cpu") == "matmul_grad"
    assert conv.select_impl((64, 6, 6, 512), (3, 3, 512, 512), 1, 1, backend="cpu") == "xla"
    assert (
        conv.select_impl((64, 11, 11, 256), (1, 1, 256, 512), 2, 0, backend="cpu") == "matmul_grad"
    )
    assert conv.select_impl((64, 44, 44, 2), (7, 7, 2, 1), 1, 3, backend="cpu") == "shifted_sums"
    assert conv.select_impl((64, 11, 11, 2), (7, 7, 2, 1), 1, 3, backend="cpu") == "shifted_sums"
    assert conv.select_impl((64, 6, 6, 2), (7, 7, 2, 1), 1, 3, backend="cpu") == "xla"
    assert conv.select_impl((64, 44, 44, 2), (7, 7, 2, 1), 1, 3, backend="gpu") == "xla"
    for backend in ("gpu", "tpu"):
        assert conv.select_impl((64, 44, 44, 64), (3, 3, 64, 64), 1, 1, backend=backend) == "xla"


def test_cpu_compiler_options():
    assert conv.cpu_compiler_options("gpu") == {}
    opts = conv.cpu_compiler_options()
    x, kern, dy = _inputs((2, 12, 20, 20, 3, 1, 1))
    f = lambda a, k: conv.conv2d(a, k)
    if jax.default_backend() == "cpu":
        assert opts
        text = jax.jit(f, compiler_options=opts).lower(x, kern).compile().as_text()
        assert "__ynn_fusion" not in text  # the convolution stays with XLA's Eigen runtime
    _assert_close(jax.jit(f, compiler_options=opts)(x, kern), f(x, kern))


def test_bad_arguments():
    x, kern, _ = _inputs((1, 6, 3, 4, 3, 1, 1))
    with pytest.raises(ValueError, match="unknown impl"):
        conv.conv2d(x, kern, impl="cudnn")
    with pytest.raises(ValueError, match="channels"):
        conv.conv2d(x, kern[:, :, :2])
    with pytest.raises(ValueError, match="larger than"):
        conv.conv2d(x[:, :2, :2], kern, padding=0)


def test_unknown_cpu_compiler_option_falls_back_to_none(monkeypatch, caplog):
    # A later XLA may drop the experimental option: compile without it, and say so.
    monkeypatch.setattr(conv, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
    conv._cpu_options_supported.cache_clear()
    try:
        assert conv.cpu_compiler_options("cpu") == {}
        assert "xla_cpu_no_such_option" in caplog.text
    finally:
        conv._cpu_options_supported.cache_clear()
