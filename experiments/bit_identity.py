"""Bit-identity of two revisions: the same small synthetic runs in each, outputs compared bitwise.

    python -m experiments.bit_identity --base REV_A --new REV_B [--out DIR] [--keep] [--reuse]

A refactor that claims "behaviour unchanged" (issue 36) shows it with this: each revision's
tracked files are exported (`git archive`; REV `WORKTREE` copies the working tree's tracked and
untracked-not-ignored files) to OUT/tree_a and OUT/tree_b, and each runs `RUNS` through
`python -m fer_jax.main` on the CPU (`JAX_PLATFORMS=cpu`, `FER_JAX_ONEDNN_CONV=0`) into
OUT/run_a and OUT/run_b (paths of one length; each side's own paths are normalised before
comparing). Then every checkpoint's arrays (dtype, shape, bytes) and metadata, every JSON file
(timing keys `TIMING_KEYS` dropped), every PNG (bytes) and the TensorBoard scalars (tag, step,
value; timing tags dropped) are compared. Prints a table, writes OUT/summary.json; exit status
1 on any difference or a file on one side only. The two sides share one XLA compilation cache
(an executable is reused only for identical HLO): the new side compiles what changed only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

from experiments import common, provenance

SYNTHETIC = ["--config=configs/synthetic.py", "--config.synthetic.train=128"]  # 4 steps/epoch
_OVERRIDES = shlex.quote("--config.replica_overrides=({'optimizer.learning_rate': 0.1}, {})")
# Name: flags after SYNTHETIC (`shlex` words; `{runs}`: the side's run folder). The plain run
# covers the moving average, random erasing, checkpoints, selection, the report and a 2-fold
# JAFFE-style stage; evaluate_* read its checkpoint.
RUNS = {
    "plain": "--config.num_epochs=2 --config.ema_decay=0.9 --config.augment.erase=0.5 "
    "--config.jaffe.folds=2 --config.jaffe.num_epochs=1",
    "replicas": f"--config.replicas=2 {_OVERRIDES} --config.num_epochs=1 "
    "--config.cross_validate=False",
    "tf_data": "--config.input_pipeline=tf_data --config.augment.erase=0.5 --config.num_epochs=1 "
    "--config.cross_validate=False",
    "evaluate_1": "--mode=evaluate --checkpoint={runs}/plain --crops=1",
    "evaluate_10": "--mode=evaluate --checkpoint={runs}/plain --crops=10",
}
# JSON keys (anywhere in a file) and TensorBoard tags that hold timings or memory, not results.
TIMING_KEYS = frozenset(
    "seconds time wall wall_seconds train_seconds eval_seconds compile_seconds "
    "train_images_per_s images_per_s_including_eval eval_crops_per_s projected_full_recipe_s "
    "host_peak_rss_gib peak_device_memory_gib mfu_train mfu_including_eval".split()
)
TIMING_TAGS = ("perf_", "train_images_per_second")  # prefixes
CATEGORIES = ("checkpoint", "json", "png", "tensorboard", "other")
WORKTREE = "WORKTREE"


def export_tree(rev: str, dest: str, repo: str = provenance.REPO) -> str:
    """The tracked files of `rev` (or of the working tree, untracked-not-ignored files too, for
    'WORKTREE') in `dest`; returns the commit (or 'WORKTREE')."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    git = ["git", "-C", repo]
    if rev == WORKTREE:
        names = subprocess.check_output([*git, "ls-files", "-co", "--exclude-standard", "-z"])
        for name in filter(None, names.decode().split("\0")):
            if os.path.isfile(os.path.join(repo, name)):  # not a deleted tracked file
                os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
                shutil.copy2(os.path.join(repo, name), os.path.join(dest, name))
        return rev
    sha = subprocess.check_output([*git, "rev-parse", "--verify", f"{rev}^{{commit}}"], text=True)
    archive = subprocess.Popen([*git, "archive", sha.strip()], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"error: git archive {rev} failed")
    return sha.strip()


def run_side(tree: str, runs: str, cache: str, log: str) -> float:
    """`RUNS` from the exported `tree` into the folder `runs`; returns wall seconds. Output goes to
    `log`; a failing run raises SystemExit naming it."""
    shutil.rmtree(runs, ignore_errors=True)
    os.makedirs(runs)
    env = {
        **os.environ,
        "PYTHONPATH": tree,
        "FER_JAX_ONEDNN_CONV": "0",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache,
    }
    start = time.perf_counter()
    with open(log, "w") as out:
        for name, words in RUNS.items():
            flags = shlex.split(words.replace("{runs}", runs))
            cmd = [sys.executable, "-m", "fer_jax.main", f"--workdir={runs}/{name}", *SYNTHETIC]
            print(f"[{os.path.basename(runs)}] {name}", flush=True)
            out.write(f"$ {' '.join(cmd + flags)}\n")
            out.flush()
            proc = subprocess.run(cmd + flags, cwd=tree, env=env, stdout=out, stderr=out)
            if proc.returncode:
                raise SystemExit(f"error: run {name} in {tree} failed ({proc.returncode}): {log}")
    return time.perf_counter() - start


def outputs(root: str) -> dict[str, tuple[str, str]]:
    """`{relative name: (category, path)}` of a side's run folder: checkpoint folders (the ones
    holding `_CHECKPOINT_METADATA`) and `.npz` files, JSON, PNG, a folder's TensorBoard events
    (one item, `DIR/events`), every other file."""
    found: dict[str, tuple[str, str]] = {}
    for folder, subdirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        if "_CHECKPOINT_METADATA" in files:
            found[rel] = ("checkpoint", folder)
            subdirs.clear()
            continue
        for name in files:
            path, key = os.path.join(folder, name), os.path.normpath(os.path.join(rel, name))
            if name.startswith("events.out.tfevents."):
                found[os.path.normpath(os.path.join(rel, "events"))] = ("tensorboard", folder)
            elif name.endswith((".json", ".png", ".npz")):
                kind = {"json": "json", "png": "png", "npz": "checkpoint"}[name.rsplit(".", 1)[1]]
                found[key] = (kind, path)
            else:
                found[key] = ("other", path)
    return found


def _drop_timings(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_timings(v) for k, v in data.items() if k not in TIMING_KEYS}
    if isinstance(data, list):
        return [_drop_timings(v) for v in data]
    return data


def _json(path: str, root: str) -> str:
    """The JSON file at `path`, `root` (the side's run folder) replaced by '<RUNS>', timings
    dropped, canonical text (NaN compares equal to NaN)."""
    with open(path) as f:
        text = f.read().replace(root, "<RUNS>")
    return json.dumps(_drop_timings(json.loads(text)), sort_keys=True)


def arrays(path: str) -> dict[str, np.ndarray]:
    """A checkpoint's arrays by tree path: an Orbax step folder's `state` item, or an `.npz`."""
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.restore(os.path.join(path, "state"))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in flat}


def same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Equal names, dtypes, shapes and bytes."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def _scalars(folder: str) -> str:
    from experiments.tb_curves import read_scalars

    scalars = read_scalars(folder)
    kept = {tag: v for tag, v in scalars.items() if not tag.startswith(TIMING_TAGS)}
    return json.dumps(kept, sort_keys=True)


def identical(kind: str, a: str, b: str, root_a: str, root_b: str) -> bool:
    """Whether one output of category `kind` is the same on both sides (paths `a`, `b`)."""
    if kind == "json":
        return _json(a, root_a) == _json(b, root_b)
    if kind == "tensorboard":
        return _scalars(a) == _scalars(b)
    if kind == "checkpoint":
        if a.endswith(".npz"):
            return same_arrays(arrays(a), arrays(b))
        meta = [os.path.join(p, "meta", "metadata") for p in (a, b)]
        same_meta = _json(meta[0], root_a) == _json(meta[1], root_b)
        return same_meta and same_arrays(arrays(a), arrays(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def compare(root_a: str, root_b: str) -> dict[str, dict[str, Any]]:
    """Per category: `compared`, `identical`, `differing` (names), `only_base`, `only_new`."""
    found = outputs(root_a), outputs(root_b)
    out = {c: {"compared": 0, "identical": 0, "differing": [], "only_base": [], "only_new": []}
           for c in CATEGORIES}  # fmt: skip
    for key in sorted(found[0].keys() | found[1].keys()):
        (kind_a, a), (kind_b, b) = found[0].get(key, (None, "")), found[1].get(key, (None, ""))
        entry = out[kind_a or kind_b]
        if kind_a is None or kind_b is None:
            entry["only_new" if kind_a is None else "only_base"].append(key)
            continue
        entry["compared"] += 1
        if identical(kind_a, a, b, root_a, root_b):
            entry["identical"] += 1
        else:
            entry["differing"].append(key)
    return out


def verdict(categories: dict[str, dict[str, Any]]) -> str:
    """'identical', or 'differing' if any output differs or is on one side only."""
    lists = ("differing", "only_base", "only_new")
    return "differing" if any(c[k] for c in categories.values() for k in lists) else "identical"


def print_table(categories: dict[str, dict[str, Any]]) -> None:
    header = ["category", "compared", "identical", "differing", "only in base / new"]
    rows = [
        [name, c["compared"], c["identical"], ", ".join(c["differing"]) or 0,
         f"{', '.join(c['only_base']) or 0} / {', '.join(c['only_new']) or 0}"]
        for name, c in categories.items()
    ]  # fmt: skip
    print("\n".join(common.table(header, rows)))


def _side(args: Any, side: str, rev: str) -> dict[str, Any]:
    """Exports and runs one side (or, with --reuse, keeps a finished run of the same commit)."""
    tree, runs = os.path.join(args.out, f"tree_{side}"), os.path.join(args.out, f"run_{side}")
    stamp = os.path.join(args.out, f"done_{side}.json")
    sha = export_tree(rev, tree)
    if args.reuse and sha != WORKTREE and os.path.exists(stamp) and os.path.isdir(runs):
        done = common.read_json(stamp)
        if done["commit"] == sha and done["runs"] == list(RUNS):
            print(f"[run_{side}] reused: {rev} ({sha[:10]}) ran in {done['seconds']:.0f} s")
            return done
    log = os.path.join(args.out, f"log_{side}.txt")
    seconds = run_side(tree, runs, os.path.join(args.out, "jax_cache"), log)
    done = {"rev": rev, "commit": sha, "runs": list(RUNS), "seconds": seconds}
    common.save_json(stamp, done)
    print(f"[run_{side}] {rev}: {seconds:.0f} s")
    return done


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--base", required=True, help="revision before the change, or WORKTREE")
    ap.add_argument("--new", required=True, help="revision after the change, or WORKTREE")
    common.add_out(ap, help="work folder (default runs/bit_identity)")
    ap.add_argument("--keep", action="store_true", help="keep the trees and the runs")
    ap.add_argument("--reuse", action="store_true", help="reuse a kept side of the same commit")
    args = ap.parse_args(argv)
    args.out = os.path.abspath(args.out or os.path.join(provenance.REPO, "runs", "bit_identity"))
    os.makedirs(args.out, exist_ok=True)
    sides = {"base": _side(args, "a", args.base), "new": _side(args, "b", args.new)}
    categories = compare(os.path.join(args.out, "run_a"), os.path.join(args.out, "run_b"))
    print_table(categories)
    result = verdict(categories)
    print(f"verdict: {result} ({args.base} vs {args.new})")
    summary = {"verdict": result, "sides": sides, "categories": categories}
    common.save_json(os.path.join(args.out, "summary.json"), summary)
    if not args.keep:
        for name in ("tree_a", "tree_b", "run_a", "run_b", "jax_cache"):
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    return int(result != "identical")


if __name__ == "__main__":
    sys.exit(main())
