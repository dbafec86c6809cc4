"""Where a result came from: the exact command, git commit (+ dirty flag) and hardware.

Every script in `experiments/` stores `provenance()` next to its numbers, e.g.

    python3 -m experiments.provenance    # prints this machine's provenance as JSON

Outside a git checkout (e.g. a copy of the working tree on another machine) the commit comes from
`$FER_JAX_GIT_COMMIT` / `$FER_JAX_GIT_DIRTY` when set, else it is recorded as unknown.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(repo: str = REPO) -> dict[str, Any]:
    """`{'commit': sha or 'unknown', 'dirty': bool or None, 'source': 'git' | 'env' | None}`."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.CalledProcessError):
        pass
    if os.environ.get("FER_JAX_GIT_COMMIT"):
        dirty = os.environ.get("FER_JAX_GIT_DIRTY")
        return {
            "commit": os.environ["FER_JAX_GIT_COMMIT"],
            "dirty": None if dirty is None else dirty.lower() in ("1", "true", "yes"),
            "source": "env",
        }
    return {"commit": "unknown", "dirty": None, "source": None}


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides CPU kernel speed


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, family/model numbers and vector flags from /proc/cpuinfo, e.g.
    'AMD EPYC (family 25, model 17; avx2 avx512f avx512_bf16)': names like 'AMD EPYC' alone do
    not tell a Zen 3 from a Zen 5. `platform.processor()` where there is no /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    vector = " ".join(f for f in VECTOR_FLAGS if f in flags) or "no AVX2"
    return (
        f"{fields['model name']} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')}; {vector})"
    )


def hardware(with_jax: bool = True) -> dict[str, Any]:
    """CPU model, core count, load average, memory and (if `with_jax`) JAX's devices."""
    out: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        out["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    if with_jax:
        import jax

        out["jax"] = jax.__version__
        out["jax_backend"] = jax.default_backend()
        out["jax_devices"] = [str(d) for d in jax.devices()]
        out["jax_device_kind"] = jax.devices()[0].device_kind
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this process, shell-quoted (`python3 path args...`)."""
    if argv is None:
        argv = list(sys.argv)
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name and argv:  # run as `python -m package.module`
            argv = ["-m", spec.name.removesuffix(".__main__"), *argv[1:]]
    return shlex.join([os.path.basename(sys.executable), *argv])


def provenance(with_jax: bool = True, argv: list[str] | None = None) -> dict[str, Any]:
    """Command, working directory, UTC time, git state and hardware of this run."""
    return {
        "command": command_line(argv),
        "cwd": os.getcwd(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "hardware": hardware(with_jax),
    }


def markdown(prov: dict[str, Any]) -> str:
    """A short markdown block of `provenance()` for the top or bottom of a results file."""
    git = prov["git"]
    hw = prov["hardware"]
    dirty = {True: " (dirty working tree)", False: "", None: " (dirty: unknown)"}[git["dirty"]]
    lines = [
        f"- command: `{prov['command']}`",
        f"- git commit: `{git['commit']}`{dirty}",
        f"- date (UTC): {prov['utc']}",
        f"- hardware: {hw['cpu_model']}, {hw['cpu_count']} cores"
        + (f", {hw['memory_gib']} GiB" if "memory_gib" in hw else "")
        + f"; load average {hw['loadavg_1_5_15']}",
    ]
    if "jax_devices" in hw:
        lines.append(
            f"- jax {hw['jax']} ({hw['jax_backend']}): {', '.join(hw['jax_devices'])}"
            f" [{hw['jax_device_kind']}]"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(provenance(), indent=1))
