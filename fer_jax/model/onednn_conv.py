"""oneDNN convolutions through the XLA FFI: ``conv2d(impl="onednn[:bf16]")``, and what
``"auto:bf16"`` runs on CPU where the library is built (:func:`fer_jax.model.conv.select_impl`).

Built once per machine by hand; nothing is built or downloaded at import or run time:

    apt-get install --no-install-recommends g++ libdnnl-dev   # Debian's oneDNN 2.6.3 (OpenMP)
    python -m fer_jax.model.onednn_conv                        # [--prefix DIR] [--force]

The build (:func:`build`) compiles ``onednn_conv.cc`` (shipped beside this module: three XLA FFI
handlers, forward / backward-data / backward-weights, calling oneDNN primitives) with g++
against jaxlib's FFI headers (``jax.ffi.include_dir()``) and a oneDNN >= 2.6 (the headers and
``libdnnl`` under ``--prefix``, ``$ONEDNN_PREFIX`` or /usr), into
``$FER_JAX_CACHE/onednn_conv-<source hash>-jaxlib<version>-onednn<version>.so`` (default
``~/.cache/fer_jax``), written atomically. A change of this package's source or of jaxlib
makes a new name: the old library is no longer loaded, :func:`available` says why, and the
command builds again.

:func:`conv2d_onednn` is a ``jax.custom_vjp`` over three ``jax.ffi.ffi_call`` targets; under
``jax.vmap`` (replicas) each call runs once per mapped element (``vmap_method="sequential"``).
Environment: ``FER_JAX_ONEDNN_CONV=0`` turns it off (``"auto:bf16"`` then picks what it picks
without the library); ``FER_JAX_ONEDNN_CONV_LIB=PATH`` loads that library instead of the
cache's (e.g. a second build against another oneDNN, side by side in a benchmark);
``FER_JAX_ONEDNN_CONV_THREADS=N`` sets oneDNN's threads per calling XLA thread (OpenMP runtime;
default OpenMP's: ``OMP_NUM_THREADS`` or the CPUs). Design and figures:
docs/cpu_performance.md, "oneDNN convolutions".
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("onednn_conv.cc")
CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")
MIN_ONEDNN = (2, 6)
CACHE_ENV = "FER_JAX_CACHE"
DEFAULT_CACHE = "~/.cache/fer_jax"
PREFIX_ENV = "ONEDNN_PREFIX"
DEFAULT_PREFIX = "/usr"
SWITCH_ENV = "FER_JAX_ONEDNN_CONV"  # "0" (or "false", "off"): never use the library
LIB_ENV = "FER_JAX_ONEDNN_CONV_LIB"  # a library to load instead of the cache's
BUILD_COMMAND = "python -m fer_jax.model.onednn_conv"
DTYPES = (jnp.float32, jnp.bfloat16)
"""Array dtypes :func:`conv2d_onednn` takes (the handlers' f32 and bf16)."""

_OPS = {
    "fwd": "OnednnConvFwd",
    "bwd_data": "OnednnConvBwdData",
    "bwd_weights": "OnednnConvBwdWeights",
}
_log = logging.getLogger(__name__)


# --- where the library is -----------------------------------------------------------------------


def cache_dir() -> Path:
    """``$FER_JAX_CACHE`` (default ``~/.cache/fer_jax``), where builds go."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


@functools.cache
def source_key() -> str:
    """12 hex digits of the C++ source and the compile flags: a changed source, a new name."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CXXFLAGS).encode())
    return digest.hexdigest()[:12]


def jaxlib_version() -> str:
    import jaxlib

    return jaxlib.__version__


def library_name(onednn_version: str) -> str:
    """The library's file name for this source, this jaxlib and oneDNN `onednn_version`."""
    return f"onednn_conv-{source_key()}-jaxlib{jaxlib_version()}-onednn{onednn_version}.so"


_NAME = re.compile(
    r"onednn_conv-(?P<key>[0-9a-f]+)-jaxlib(?P<jaxlib>[^-]+)-onednn(?P<onednn>.+)\.so"
)


def find_library() -> tuple[Path | None, str]:
    """(the library to load, or None, and why not). ``$FER_JAX_ONEDNN_CONV_LIB`` if set, else
    the newest build in :func:`cache_dir` for this source and this jaxlib."""
    if os.environ.get(LIB_ENV):
        path = Path(os.environ[LIB_ENV]).expanduser()
        return (path, "") if path.is_file() else (None, f"${LIB_ENV}={path} does not exist")
    want = f"onednn_conv-{source_key()}-jaxlib{jaxlib_version()}-onednn"
    builds = sorted(cache_dir().glob("onednn_conv-*.so"), key=lambda p: p.stat().st_mtime)
    mine = [p for p in builds if p.name.startswith(want)]
    if mine:
        return mine[-1], ""
    if builds:
        why = (
            f"the builds in {cache_dir()} ({', '.join(p.name for p in builds[-3:])}) are for "
            f"another jaxlib or fer_jax source (want {want}*.so)"
        )
    else:
        why = f"not built ({cache_dir()} has no onednn_conv-*.so)"
    return None, why


# --- loading ------------------------------------------------------------------------------------


class _Library:
    """A loaded build: its FFI target names (registered) and the ctypes handle."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        for name in ("onednn_conv_info", "onednn_conv_version"):
            getattr(self.lib, name).argtypes = [ctypes.c_char_p, ctypes.c_int]
            getattr(self.lib, name).restype = ctypes.c_int
        self.lib.onednn_conv_max_threads.restype = ctypes.c_int
        self.lib.onednn_conv_bf16_supported.restype = ctypes.c_int
        # Target names carry the library's digest: an XLA executable (in the persistent
        # compilation cache too) names the build it was compiled against.
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        self.targets = {op: f"fer_jax_onednn_conv_{op}_{digest}" for op in _OPS}
        for op, symbol in _OPS.items():
            capsule = jax.ffi.pycapsule(getattr(self.lib, symbol))
            jax.ffi.register_ffi_target(self.targets[op], capsule, platform="cpu")

    def version(self) -> str:
        buf = ctypes.create_string_buffer(64)
        self.lib.onednn_conv_version(buf, 64)
        return buf.value.decode()


def _switched_off() -> bool:
    return os.environ.get(SWITCH_ENV, "").strip().lower() in ("0", "false", "off", "no")


@functools.cache
def _load() -> tuple[_Library | None, str]:
    """(the loaded library, "") or (None, why not); logs the outcome once."""
    if _switched_off():
        why = f"off (${SWITCH_ENV}={os.environ[SWITCH_ENV]})"
        _log.info("oneDNN convolutions %s", why)
        return None, why
    path, why = find_library()
    if path is None:
        _log.info("oneDNN convolutions unavailable: %s; build with: %s", why, BUILD_COMMAND)
        return None, why
    try:
        lib = _Library(path)
        loaded = lib.version().split()[0]
    except Exception as e:  # noqa: BLE001 - any failure to load means: without it
        why = f"loading {path} failed: {e}"
        _log.warning("oneDNN convolutions unavailable: %s", why)
        return None, why
    built = _NAME.fullmatch(path.name)
    if built and not os.environ.get(LIB_ENV) and built["onednn"] != loaded:
        why = f"{path} was built against oneDNN {built['onednn']} but loads {loaded}"
        _log.warning("oneDNN convolutions unavailable: %s; rebuild: %s --force", why, BUILD_COMMAND)
        return None, why
    _log.info("oneDNN convolutions: %s (oneDNN %s)", path, lib.version())
    return lib, ""


def _library() -> _Library | None:
    return _load()[0]


def unavailable_reason() -> str:
    """Why the library is not loaded ("" when it is)."""
    return _load()[1]


def available(backend: str | None = None, bf16: bool = False) -> bool:
    """Whether :func:`conv2d_onednn` runs here: the library is built for this source and jaxlib,
    loads, is not switched off, and `backend` (default jax's) is the CPU; with `bf16`, also in
    bfloat16 (:func:`bf16_supported`). Never raises; the first call logs why not (once)."""
    try:
        backend = jax.default_backend() if backend is None else backend
        return backend == "cpu" and _library() is not None and (not bf16 or bf16_supported())
    except Exception as e:  # noqa: BLE001 - a broken environment means: without it
        _log.warning("oneDNN convolutions unavailable: %s", e)
        return False


@functools.cache
def bf16_supported() -> bool:
    """Whether the loaded oneDNN has bfloat16 convolutions on this CPU (oneDNN 2.x: AVX-512
    CPUs only; an AVX2 CPU has its float32 ones). Logs once when not."""
    ok = bool(_loaded().lib.onednn_conv_bf16_supported())
    if not ok:
        _log.info("oneDNN %s has no bfloat16 convolutions on this CPU", version())
    return ok


def _loaded() -> _Library:
    lib = _library()
    if lib is None:
        raise RuntimeError(
            f"impl 'onednn' needs the oneDNN convolution library ({unavailable_reason()});"
            f" build it with: {BUILD_COMMAND}"
        )
    return lib


def version() -> str:
    """The loaded oneDNN's version and CPU runtime, e.g. ``"2.6.3 omp"`` (Debian's)."""
    return _loaded().version()


def max_threads() -> int:
    """Threads oneDNN uses for a call from the calling thread (OpenMP runtime: after
    ``$FER_JAX_ONEDNN_CONV_THREADS``); -1 for other runtimes."""
    return _loaded().lib.onednn_conv_max_threads()


def info() -> str:
    """One line per cached oneDNN primitive: op, shape, dtypes, oneDNN's implementation, the
    strides of its operands/result (``REORDER:`` where they differ from NHWC/HWIO), calls."""
    lib = _loaded().lib
    n = lib.onednn_conv_info(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.onednn_conv_info(buf, n + 1)
    return buf.value.decode()


# --- the convolution ----------------------------------------------------------------------------


def _call(op: str, a: jax.Array, b: jax.Array, shape, dtype, stride: int, padding: int):
    # The operands' type with the result's shape: inside shard_map, the result varies over the
    # operands' mesh axes (conv2d matches them).
    out = jax.typeof(a).update(shape=tuple(shape), dtype=jnp.dtype(dtype))
    return jax.ffi.ffi_call(_loaded().targets[op], out, vmap_method="sequential")(
        a, b, stride=np.int64(stride), padding=np.int64(padding)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, bf16: bool) -> jax.Array:
    return _conv_fwd(x, kernel, stride, padding, bf16)[0]


def _conv_fwd(x, kernel, stride, padding, bf16):
    b, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    dtype = x.dtype
    if bf16:  # operands rounded to bfloat16; oneDNN writes x's dtype (bf16 primitives, f32 dst)
        x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    y = _call("fwd", x, kernel, (b, ho, wo, cout), dtype, stride, padding)
    return y, (x, kernel)


def _conv_bwd(stride, padding, bf16, res, dy):
    x, kernel = res  # in the compute dtype; gradients in dy's (= the caller's x and kernel)
    dtype = dy.dtype
    dy = dy.astype(x.dtype)
    dx = _call("bwd_data", dy, kernel, x.shape, dtype, stride, padding)
    dk = _call("bwd_weights", x, dy, kernel.shape, dtype, stride, padding)
    return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d_onednn(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 1, bf16: bool = False
) -> jax.Array:
    """2-D cross-correlation by oneDNN, as ``fer_jax.model.conv.conv2d`` (which calls it for
    ``impl="onednn[:bf16]"``, shapes checked there).

    x (B, H, W, Cin) float32 or bfloat16, kernel (kh, kw, Cin, Cout) HWIO in x's dtype, padding
    ``((p, p), (p, p))`` -> (B, Ho, Wo, Cout) in x's dtype; differentiable in x and kernel
    (backward-data and backward-weights primitives), gradients in x's dtype. `bf16`: operands
    (and in the backward dy) rounded to bfloat16, bf16 primitives writing x's dtype directly
    (oneDNN accumulates in float32); with bfloat16 x, bfloat16 throughout either way.
    """
    if x.dtype not in DTYPES or kernel.dtype != x.dtype:
        raise ValueError(
            f"impl 'onednn' takes float32 or bfloat16 x and a kernel of x's dtype, got "
            f"{x.dtype} and {kernel.dtype}"
        )
    bf16 = bool(bf16) or x.dtype == jnp.bfloat16
    if bf16 and not bf16_supported():
        raise ValueError(
            f"impl 'onednn' in bfloat16: oneDNN {version()} has no bfloat16 convolutions on this"
            " CPU (oneDNN 2.x needs AVX-512); use float32 operands or another impl"
        )
    return _conv(x, kernel, int(stride), int(padding), bf16)


# --- the build ----------------------------------------------------------------------------------


class BuildError(Exception):
    """What stops a build, in one line."""


def _header_define(path: Path, name: str) -> str | None:
    m = re.search(rf"^#define {name} +(\S+)", path.read_text(), re.MULTILINE)
    return m.group(1) if m else None


def onednn_headers(prefix: Path) -> tuple[str, str]:
    """(version "2.6.3", CPU runtime "OMP") of the oneDNN headers under `prefix`; BuildError
    if there are none, or too old, or a runtime this file cannot drive."""
    inc = prefix / "include" / "oneapi" / "dnnl"
    if not (inc / "dnnl.hpp").is_file():
        raise BuildError(
            f"oneDNN headers not found under {prefix}: apt-get install libdnnl-dev, or pass "
            "--prefix (or set $ONEDNN_PREFIX) to where oneDNN is installed"
        )
    parts = [
        _header_define(inc / "dnnl_version.h", f"DNNL_VERSION_{p}")
        for p in ("MAJOR", "MINOR", "PATCH")
    ]
    if None in parts:
        raise BuildError(f"no DNNL_VERSION_* in {inc / 'dnnl_version.h'}")
    version = ".".join(parts)  # type: ignore[arg-type]
    if tuple(int(p) for p in parts[:2]) < MIN_ONEDNN:  # type: ignore[arg-type]
        raise BuildError(f"oneDNN {version} under {prefix} is older than 2.6")
    runtime = (_header_define(inc / "dnnl_config.h", "DNNL_CPU_RUNTIME") or "").removeprefix(
        "DNNL_RUNTIME_"
    )
    if runtime == "THREADPOOL":
        raise BuildError(f"oneDNN under {prefix} has the THREADPOOL CPU runtime; want OMP or TBB")
    return version, runtime


def build(
    prefix: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    cxx: str = "g++",
    force: bool = False,
    echo=print,
) -> Path:
    """Compiles the library against oneDNN under `prefix` (default ``$ONEDNN_PREFIX``, else
    /usr) into `out_dir` (default :func:`cache_dir`); returns its path. An existing build of
    the same name is kept unless `force`. BuildError (one line) if the compiler or headers are
    missing or the compile fails."""
    prefix = Path(prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX).expanduser()
    version, runtime = onednn_headers(prefix)
    compiler = shutil.which(cxx)
    if compiler is None:
        raise BuildError(f"no C++ compiler {cxx!r} on PATH: apt-get install g++")
    out_dir = Path(out_dir or cache_dir()).expanduser()
    out = out_dir / library_name(version)
    if out.exists() and not force:
        echo(f"{out} is built (--force rebuilds it)")
        return out
    cmd = [compiler, *CXXFLAGS]
    if runtime == "OMP":
        cmd.append("-fopenmp")  # omp.h: threads per calling thread
    cmd += ["-I", jax.ffi.include_dir(), "-I", str(prefix / "include"), str(SOURCE)]
    cmd += [f"-L{prefix / 'lib'}", "-ldnnl"]
    if prefix != Path(DEFAULT_PREFIX):  # libdnnl and its own dependencies found there at run time
        cmd.append(f"-Wl,--disable-new-dtags,-rpath,{prefix / 'lib'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    echo(f"building {out.name} against oneDNN {version} ({runtime}) under {prefix} (~1-2 min)")
    try:
        proc = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # only a complete library gets the name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    echo(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=BUILD_COMMAND,
        description="Build fer_jax's oneDNN convolutions (then 'auto:bf16' uses them on CPU).",
    )
    ap.add_argument("--prefix", help=f"oneDNN install prefix (default ${PREFIX_ENV} or /usr)")
    ap.add_argument(
        "--out_dir", help=f"where the library goes (default ${CACHE_ENV} or {DEFAULT_CACHE})"
    )
    ap.add_argument("--cxx", default="g++", help="C++ compiler")
    ap.add_argument("--force", action="store_true", help="rebuild an existing library")
    ap.add_argument("--check", action="store_true", help="build nothing: load it and say so")
    args = ap.parse_args(argv)
    if args.check:
        lib = _library()
        print(
            f"{lib.path}: oneDNN {lib.version()}" if lib else f"unavailable: {unavailable_reason()}"
        )
        return 0 if lib else 1
    try:
        build(args.prefix, args.out_dir, args.cxx, args.force)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
