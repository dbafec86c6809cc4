"""fer_jax.model.onednn_conv: oneDNN's convolutions through the XLA FFI, and where "auto:bf16"
takes them.

The library tests (values and gradients at every network shape, the whole network, vmap,
shard_map / pmap) skip unless ``python -m fer_jax.model.onednn_conv`` has built the library
for this jaxlib (.ci/run builds it); the selection, fallback, warning and build-error tests
run everywhere.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fer_jax.model import conv, onednn_conv, resnet

needs_library = pytest.mark.skipif(
    not onednn_conv.available(),
    reason=f"oneDNN convolutions unavailable ({onednn_conv.unavailable_reason() or 'not CPU'}):"
    " python -m fer_jax.model.onednn_conv builds them",
)
needs_bf16 = pytest.mark.skipif(
    not onednn_conv.available(bf16=True),
    reason="oneDNN's bfloat16 convolutions unavailable (not built, or none on this CPU: oneDNN"
    " 2.x has them on AVX-512 CPUs only)",
)

# (H=W, Cin, Cout, k, stride, padding): every convolution of the network (batch 64 in it).
NETWORK = [
    (44, 1, 64, 3, 1, 1),
    (44, 64, 64, 3, 1, 1),
    (44, 2, 1, 7, 1, 3),
    (44, 64, 128, 3, 2, 1),
    (44, 64, 128, 1, 2, 0),
    (22, 128, 128, 3, 1, 1),
    (22, 128, 256, 3, 2, 1),
    (22, 128, 256, 1, 2, 0),
    (11, 256, 256, 3, 1, 1),
    (11, 2, 1, 7, 1, 3),
    (11, 256, 512, 3, 2, 1),
    (11, 256, 512, 1, 2, 0),
    (6, 512, 512, 3, 1, 1),
    (6, 2, 1, 7, 1, 3),
]
# What "auto:bf16" picked before oneDNN (and still picks without the library).
PICKS_WITHOUT_ONEDNN = [
    "matmul_grad",
    "winograd",
    "shifted_sums",
    "matmul_grad",
    "matmul_grad",
    "winograd",
    "matmul_grad",
    "matmul_grad",
    "im2col",
    "shifted_sums",
    "im2col",
    "matmul_grad",
    "im2col",
    "xla",
]


def _shapes(case, batch=64):
    h, cin, cout, k, s, p = case
    return (batch, h, h, cin), (k, k, cin, cout), s, p


def _fresh_load(monkeypatch):
    """A fresh cache of onednn_conv._load for this test (the session's comes back after)."""
    monkeypatch.setattr(onednn_conv, "_load", functools.cache(onednn_conv._load.__wrapped__))


# --- selection: everywhere ----------------------------------------------------------------------


def test_auto_bf16_takes_onednn_where_built_and_todays_picks_where_not(monkeypatch):
    got = {}
    for built in (True, False):
        monkeypatch.setattr(onednn_conv, "available", lambda backend=None, bf16=False, b=built: b)
        got[built] = [conv.select_impl(*_shapes(c), backend="cpu", bf16=True) for c in NETWORK]
        # float32 "auto" and other backends never take it.
        for c in NETWORK:
            f32 = conv.select_impl(*_shapes(c), backend="cpu")
            assert f32 == conv.select_impl(*_shapes(c), backend="cpu", onednn=False)
            assert conv.select_impl(*_shapes(c), backend="gpu", bf16=True) == "xla"
    assert got[False] == PICKS_WITHOUT_ONEDNN
    assert got[True] == [
        "onednn" if c[2] >= 16 else p for c, p in zip(NETWORK, got[False], strict=True)
    ]
    assert got[True].count("shifted_sums") == 2  # CBAM's 7x7 2 -> 1 at 44 and 11


def test_float32_auto_never_asks_for_the_library(monkeypatch):
    def boom(backend=None, bf16=False):
        raise AssertionError("asked")

    monkeypatch.setattr(onednn_conv, "available", boom)
    for c in NETWORK:
        conv.select_impl(*_shapes(c), backend="cpu")


def test_without_the_library_auto_bf16_traces_todays_program(monkeypatch):
    """No library: conv2d("auto:bf16") is the same program as before, impl by impl."""
    monkeypatch.setattr(onednn_conv, "available", lambda backend=None, bf16=False: False)
    x = jnp.ones((2, 11, 11, 16))
    k = jnp.ones((3, 3, 16, 16)) / 100
    auto = jax.make_jaxpr(lambda x, k: conv.conv2d(x, k, impl="auto:bf16"))(x, k)
    im2col = jax.make_jaxpr(lambda x, k: conv.conv2d(x, k, impl="im2col:bf16"))(x, k)
    assert str(auto) == str(im2col) and "ffi_call" not in str(auto)


@needs_library
def test_a_cpu_without_onednn_bf16_keeps_todays_picks_and_refuses_it_in_one_line(monkeypatch):
    """oneDNN 2.x has no bfloat16 convolutions on AVX2 CPUs: "auto:bf16" keeps fer_jax's own
    forms there (float32 oneDNN still runs), and an explicit "onednn:bf16" says why."""
    monkeypatch.setattr(onednn_conv, "bf16_supported", lambda: False)
    assert [conv.select_impl(*_shapes(c), backend="cpu", bf16=True) for c in NETWORK] == (
        PICKS_WITHOUT_ONEDNN
    )
    x, k = jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    assert "ffi_call" in str(jax.make_jaxpr(lambda x: conv.conv2d(x, k, impl="onednn"))(x))
    with pytest.raises(ValueError, match="no bfloat16 convolutions on this CPU") as e:
        conv.conv2d(x, k, impl="onednn:bf16")
    assert "\n" not in str(e.value)


def test_unsupported_dtypes_fall_back(monkeypatch):
    """float16 / float64 x: "auto:bf16" takes today's forms; explicit "onednn" refuses."""
    monkeypatch.setattr(onednn_conv, "available", lambda backend=None, bf16=False: True)
    x = jnp.ones((2, 11, 11, 16), jnp.float16)
    k = jnp.ones((3, 3, 16, 16), jnp.float16)
    assert "ffi_call" not in str(jax.make_jaxpr(lambda x: conv.conv2d(x, k, impl="auto:bf16"))(x))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        conv.conv2d(x, k, impl="onednn")


def test_unavailable_library_gives_reasons_never_raises(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FER_JAX_CACHE", str(tmp_path))
    monkeypatch.delenv("FER_JAX_ONEDNN_CONV_LIB", raising=False)
    monkeypatch.delenv("FER_JAX_ONEDNN_CONV", raising=False)
    _fresh_load(monkeypatch)
    with caplog.at_level(logging.INFO, logger=onednn_conv.__name__):
        assert not onednn_conv.available("cpu") and not onednn_conv.available("cpu")
    assert "not built" in onednn_conv.unavailable_reason()
    assert len([r for r in caplog.records if "unavailable" in r.message]) == 1  # logged once
    assert not onednn_conv.available("gpu")
    with pytest.raises(RuntimeError, match="python -m fer_jax.model.onednn_conv"):
        conv.conv2d(jnp.ones((1, 6, 6, 16)), jnp.ones((3, 3, 16, 16)), impl="onednn")

    # A build for another jaxlib is not loaded; a broken file fails to load, and says so.
    other = tmp_path / f"onednn_conv-{onednn_conv.source_key()}-jaxlib0.0.1-onednn2.6.3.so"
    other.write_bytes(b"")
    _fresh_load(monkeypatch)
    assert not onednn_conv.available("cpu")
    assert "another jaxlib" in onednn_conv.unavailable_reason()
    (tmp_path / onednn_conv.library_name("2.6.3")).write_bytes(b"not a library")
    _fresh_load(monkeypatch)
    assert not onednn_conv.available("cpu")
    assert "failed" in onednn_conv.unavailable_reason()

    monkeypatch.setenv("FER_JAX_ONEDNN_CONV", "0")
    _fresh_load(monkeypatch)
    assert not onednn_conv.available("cpu") and onednn_conv.unavailable_reason().startswith("off")


def test_training_warns_once_where_onednn_would_pay(monkeypatch, caplog):
    import fer_jax.model.resnet as rn

    monkeypatch.setattr(rn, "_ONEDNN_WARNED", [])
    monkeypatch.setattr(rn, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(onednn_conv, "available", lambda backend=None, bf16=False: False)
    monkeypatch.setattr(onednn_conv, "unavailable_reason", lambda: "not built (...)")
    model = resnet.ResNet18(width=8, conv_impl="auto:bf16")
    with caplog.at_level(logging.WARNING):
        assert not resnet.warn_if_onednn_missing(model.clone(conv_impl="auto"), "cpu")
        assert not resnet.warn_if_onednn_missing(model, "gpu")
        assert resnet.warn_if_onednn_missing(model, "cpu")
        assert resnet.warn_if_onednn_missing(model, "cpu")  # ... logged once
    (record,) = [r for r in caplog.records if "oneDNN" in r.message]
    assert (
        "1.7x slower" in record.message and "python -m fer_jax.model.onednn_conv" in record.message
    )
    monkeypatch.setattr(rn, "cpu_flags", lambda: frozenset({"avx2"}))
    assert not resnet.warn_if_onednn_missing(model, "cpu")  # no native bf16: nothing to gain
    monkeypatch.setattr(rn, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(onednn_conv, "available", lambda backend=None, bf16=False: True)
    assert not resnet.warn_if_onednn_missing(model, "cpu")


# --- the build command: everywhere --------------------------------------------------------------


def test_build_says_what_is_missing_in_one_line(tmp_path, capsys):
    assert onednn_conv.main(["--prefix", str(tmp_path), "--out_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"oneDNN headers not found under {tmp_path}: apt-get install libdnnl-dev" in err
    # Headers there but no compiler: the same, one line; nothing written.
    inc = tmp_path / "include" / "oneapi" / "dnnl"
    inc.mkdir(parents=True)
    (inc / "dnnl.hpp").write_text("")
    (inc / "dnnl_version.h").write_text(
        "#define DNNL_VERSION_MAJOR 2\n#define DNNL_VERSION_MINOR 6\n#define DNNL_VERSION_PATCH 3\n"
    )
    (inc / "dnnl_config.h").write_text("#define DNNL_CPU_RUNTIME DNNL_RUNTIME_OMP\n")
    assert onednn_conv.onednn_headers(tmp_path) == ("2.6.3", "OMP")
    argv = ["--prefix", str(tmp_path), "--out_dir", str(tmp_path / "out"), "--cxx", "no-such-c++"]
    assert onednn_conv.main(argv) == 1
    assert "no C++ compiler 'no-such-c++'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (inc / "dnnl_version.h").write_text(
        "#define DNNL_VERSION_MAJOR 2\n#define DNNL_VERSION_MINOR 5\n#define DNNL_VERSION_PATCH 0\n"
    )
    with pytest.raises(onednn_conv.BuildError, match="older than 2.6"):
        onednn_conv.onednn_headers(tmp_path)


def test_library_name_encodes_source_jaxlib_and_onednn():
    name = onednn_conv.library_name("2.6.3")
    m = onednn_conv._NAME.fullmatch(name)
    assert m and m["key"] == onednn_conv.source_key() and m["onednn"] == "2.6.3"
    assert m["jaxlib"] == onednn_conv.jaxlib_version()


# --- the library: where built -------------------------------------------------------------------


def _reference(x, k, stride, padding):
    """XLA's convolution in float32 at full precision."""
    return lax.conv_general_dilated(
        x.astype(jnp.float32),
        k.astype(jnp.float32),
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


def _values_and_grads(fn, x, k, dy):
    y, vjp = jax.vjp(fn, x, k)
    return (y, *vjp(dy))


def _rel_err(a, b) -> float:
    """max |a - b| / max |b| (float32)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@needs_library
@pytest.mark.parametrize(
    "impl,dtype,tol",
    [
        ("onednn", "float32", 2e-5),
        pytest.param("onednn", "bfloat16", 2e-2, marks=needs_bf16),
        pytest.param("onednn:bf16", "float32", 2e-2, marks=needs_bf16),
    ],
)
@pytest.mark.parametrize("case", NETWORK, ids=lambda s: "{}x{}x{}->{} k{} s{} p{}".format(s[0], *s))
def test_matches_xla(case, impl, dtype, tol):
    """conv2d(impl) at batch 2: y, dx, dk against XLA's float32 convolution of the same
    operands (rounded to bfloat16 first where oneDNN computes in it)."""
    h, cin, cout, ksz, stride, padding = case
    rng = np.random.default_rng(sum(case))
    ho = conv.output_size(h, ksz, stride, padding)
    dt = jnp.dtype(dtype)
    rounded = jnp.bfloat16 if impl.endswith("bf16") else dt
    x = jnp.asarray(rng.standard_normal((2, h, h, cin)), rounded).astype(dt)
    k = jnp.asarray(rng.standard_normal((ksz, ksz, cin, cout)) / np.sqrt(ksz * ksz * cin), rounded)
    k = k.astype(dt)
    dy = jnp.asarray(rng.standard_normal((2, ho, ho, cout)), rounded).astype(dt)
    fn = lambda x, k: conv.conv2d(x, k, stride=stride, padding=padding, impl=impl)
    got = jax.jit(lambda x, k, dy: _values_and_grads(fn, x, k, dy))(x, k, dy)
    f32 = (a.astype(jnp.float32) for a in (x, k, dy))
    want = _values_and_grads(lambda x, k: _reference(x, k, stride, padding), *f32)
    for name, g, w, like in zip(("y", "dx", "dk"), got, want, (dy, x, k), strict=True):
        assert g.shape == w.shape and g.dtype == like.dtype, (name, g.shape, g.dtype)
        assert _rel_err(g, w) < tol, (name, _rel_err(g, w))


@needs_library
def test_info_version_threads():
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    conv.conv2d(x, jnp.ones((3, 3, 4, 8), jnp.float32), impl="onednn").block_until_ready()
    assert "fwd n1 8x8x4->8 3x3 s1 p1 in=f32 out=f32 impl=" in onednn_conv.info()
    assert onednn_conv.version().split()[0].count(".") == 2
    assert onednn_conv.max_threads() != 0


@needs_bf16
def test_network_with_onednn_bf16_trains_like_float32():
    """A width-16 network: "auto:bf16" (oneDNN's convolutions here) within bf16 rounding of
    float32's logits and gradients (the tolerances of tests/test_resnet.py's bf16 test; float32
    by XLA's convolutions, which compile faster than "auto"'s forms)."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 44, 44, 1))
    f32 = resnet.model_from_config({"width": 16, "conv_impl": "xla", "dropout_rate": 0.0})
    variables = f32.init(jax.random.PRNGKey(0), x)

    def loss(params, model):
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, y32), g32 = grad(variables["params"], f32)
    bf16 = f32.clone(conv_impl="auto:bf16")
    assert "ffi_call" in str(jax.make_jaxpr(loss, static_argnums=1)(variables["params"], bf16))
    (_, y16), g16 = grad(variables["params"], bf16)
    np.testing.assert_allclose(y16, y32, atol=3e-2 * float(jnp.max(jnp.abs(y32))))

    def cosine(a, b) -> float:
        return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30))

    leaves16, leaves32 = jax.tree.leaves(g16), jax.tree.leaves(g32)
    assert all(a.dtype == jnp.float32 for a in leaves16)
    flat16, flat32 = (jnp.concatenate([g.ravel() for g in ls]) for ls in (leaves16, leaves32))
    per_leaf = [cosine(a, b) for a, b in zip(leaves16, leaves32, strict=True) if a.size >= 16]
    assert cosine(flat16, flat32) > 0.98 and np.mean(per_leaf) > 0.96 and min(per_leaf) > 0.8


@needs_library
def test_vmapped_gradient():
    """Replicas run the model under jax.vmap: each oneDNN call once per replica."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 2, 11, 11, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 16, 32)) / 12, jnp.float32)

    def grads(impl):
        loss = lambda x, k: jnp.sum(conv.conv2d(x, k, stride=2, impl=impl) ** 2)
        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(x, k)

    for got, want in zip(grads("onednn"), grads("xla"), strict=True):
        assert _rel_err(got, want) < 2e-5


_MULTI_DEVICE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from fer_jax.model import conv
assert jax.device_count() == 2
x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 11, 11, 16)), jnp.float32)
k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 16, 16)) / 12, jnp.float32)
mesh = Mesh(np.array(jax.devices()), ("batch",))
def grads(impl, check_vma):
    local = lambda k, a: jax.grad(lambda k_: jnp.sum(conv.conv2d(a, k_, impl=impl) ** 2))(k)
    if not check_vma:  # as training's shard_map: per-device gradients, averaged by hand
        local = lambda k, a, f=local: jax.lax.psum(f(k, a), "batch")
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P(),
                                 check_vma=check_vma))(k, x)
ref = grads("xla", True)
for check_vma in (True, False):
    np.testing.assert_allclose(grads("onednn", check_vma), ref, rtol=1e-4, atol=1e-3)
pm = jax.pmap(lambda a: conv.conv2d(a, k, impl="onednn"))(x.reshape(2, 2, 11, 11, 16))
np.testing.assert_allclose(pm.reshape(4, 11, 11, 16), conv.conv2d(x, k), rtol=1e-4, atol=1e-4)
print("OK")
"""


@needs_library
def test_shard_map_and_pmap_on_two_host_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE], env=env, capture_output=True, text=True, cwd=root
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
