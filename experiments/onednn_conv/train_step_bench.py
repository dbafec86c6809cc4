"""``experiments.benchmark`` with oneDNN convolutions as extra ``conv_impl`` contestants.

    PYTHONPATH=$PWD python -m experiments.onednn_conv.train_step_bench --batches 64 \\
        --conv_impls auto:bf16+eigen onednn:bf16+eigen --torch_contestants torch:bf16 ...

Same arguments and output as ``experiments/benchmark.py``; its workers run this module too, which
first installs :func:`patch`: a scratch monkeypatch (fer_jax's package code is unchanged) making
``fer_jax.model.conv.conv2d`` accept ``impl="onednn"`` (float32), ``"onednn:bf16"`` (float32
arrays, bfloat16 oneDNN primitives with float32 results, ``compute_dtype="bfloat16"``) and
``"onednn/any:bf16"`` (the same with ``layout="any"``). These send every convolution with
Cout >= 16 to ``conv2d_onednn``; the rest (CBAM's 7x7 2->1) to ``conv2d(impl="auto[:bf16]")``
(``shifted_sums``).

``onednn3`` (e.g. ``onednn3:bf16+eigen``) is the same in a worker that loads the library named by
``$ONEDNN3_CONV_LIB`` instead (a second build against another oneDNN,
``OUT=.../libonednn_conv_v3.so ONEDNN_PREFIX=... build.sh``), so that two oneDNN versions run side
by side in one benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys

from experiments import benchmark


def patch() -> None:
    """Installs the ``impl="onednn..."`` forms into ``fer_jax.model.conv`` (idempotent)."""
    from experiments import onednn_conv
    from fer_jax.model import conv

    if getattr(conv.conv2d, "_onednn_patched", False):
        return
    original = conv.conv2d

    def conv2d(x, kernel, *, stride=1, padding=1, impl="xla"):
        if not impl.startswith("onednn"):
            return original(x, kernel, stride=stride, padding=padding, impl=impl)
        base, _, suffix = impl.partition(":")
        bf16 = suffix == "bf16"
        if kernel.shape[-1] < 16:
            return original(
                x, kernel, stride=stride, padding=padding, impl="auto:bf16" if bf16 else "auto"
            )
        layout = "any" if base.endswith("/any") else "nhwc"  # onednn, onednn3: nhwc
        return onednn_conv.conv2d_onednn(
            x, kernel, stride, padding, layout, "bfloat16" if bf16 else None
        )

    conv2d._onednn_patched = True
    conv.conv2d = conv2d
    conv.IMPLS = (*conv.IMPLS, "onednn", "onednn3", "onednn/any")
    conv.BF16_IMPLS = (*conv.BF16_IMPLS, "onednn", "onednn3", "onednn/any")


class _Subprocess:
    """``subprocess`` for ``experiments.benchmark``, starting its workers as this module."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(cmd, *args, **kwargs):  # noqa: N802
        if cmd[1:3] == ["-m", "experiments.benchmark"]:
            cmd = [cmd[0], "-m", "experiments.onednn_conv.train_step_bench", *cmd[3:]]
            if any(a.startswith("--worker=jax:onednn3") for a in cmd):
                env = dict(kwargs.get("env") or os.environ)
                env["ONEDNN_CONV_LIB"] = env["ONEDNN3_CONV_LIB"]
                kwargs["env"] = env
        return subprocess.Popen(cmd, *args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    patch()
    benchmark.subprocess = _Subprocess()
    benchmark.main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
