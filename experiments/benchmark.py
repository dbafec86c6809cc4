"""fer_jax vs the PyTorch reference, side by side on this machine: training and ten-crop eval.

    python -m experiments.benchmark                       # full width (64), batches 64 and 128
    python -m experiments.benchmark --width 16 --batches 64 --steps 2 --reps 2   # quick look

Each contestant runs in its own worker process (so that its peak memory, `ru_maxrss`, is its
own), built and warmed up first (`--warmup_steps` untimed train steps and one eval batch); the
parent then asks the workers in turn ("alternately") for `--steps` training steps, `--reps`
times, and takes the median, so that load from other processes on a shared machine hits every
contestant alike. Then the same for ten-crop evaluation batches. Contestants:

- `torch`: `tests/torch_reference.ResNet18` (the same CBAM-ResNet18 + A-Softmax, dropout 0.5),
  its `a_softmax_loss`, `torch.optim.SGD(0.01, momentum 0.9, weight decay 5e-4)` after
  element-wise gradient clipping to 0.1 (the reference recipe), eager, NCHW,
  `torch.set_num_threads(--threads)`.
- `torch:bf16`: the same under `torch.autocast("cpu", dtype=torch.bfloat16)` (mixed precision
  as PyTorch does it: float32 master weights and optimizer, the network's forward in bfloat16
  where autocast casts, the loss in float32 on the float32-cast features); its ten-crop
  evaluation under autocast too. Pick the PyTorch contestants with `--torch_contestants`.
- `jax:IMPL`: `fer_jax.training.step.train_step` / `eval_step` of `configs/fer2013.py`, jitted with
  `config.model.conv_impl=IMPL` (`xla`, `matmul_grad`, `auto`) and no compiler options.
  `jax:IMPL+eigen` also passes `compiler_options=fer_jax.model.conv.cpu_compiler_options()` (XLA:CPU
  convolutions by Eigen instead of YNNPACK): `auto+eigen` is what training runs on CPU.
  Every JAX worker first calls `fer_jax.host_memory.reuse_scratch_memory()`, as
  `python -m fer_jax.main` does, except with the suffix `+fresh_scratch` (e.g.
  `auto+eigen+fresh_scratch`: what a script that drives `fer_jax.training.train` without it gets).
  `IMPL:bf16` takes oneDNN's convolutions where they are built (`fer_jax.model.onednn_conv`;
  `onednn:bf16` for them alone); the suffix `+no_onednn` runs the worker with them off
  (`FER_JAX_ONEDNN_CONV=0`): `auto:bf16+eigen+no_onednn` is fer_jax's own bf16 forms.
- `jax:SPEC@REV` (e.g. `auto+eigen@96aab9e`): the same contestant from git commit REV (its
  tracked files, exported by `git archive` to the temp dir; the worker runs there), so that a
  change is measured before and after in one run, beside PyTorch:

      python -m experiments.benchmark --batches 64 --conv_impls auto+eigen auto+eigen@HEAD~3

Also: compile time (JAX: lower + compile of each step; PyTorch: its first, warm-up step), the
first step's loss of every JAX contestant from the same initial state and batch (the impls must
agree to float32 rounding), and the input pipeline's images/s and crops/s
(`experiments/pipeline_throughput.py` on a built FER2013 when `--data_dir` has one, else the
same tf.data pipelines on in-memory arrays of FER2013's size). Prints a markdown table and
writes it with the raw figures to `--out` (default experiments/results/benchmark_cpu/; name
the CPU in `--out` for a result you keep).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from experiments import common, provenance

REPO = provenance.REPO


# --- workers -------------------------------------------------------------------------------------


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


JAX_VARIANTS = ("eigen", "fresh_scratch", "no_onednn")


class JaxContestant:
    """fer_jax's train and ten-crop eval steps for one conv impl (+eigen: compiler options;
    +fresh_scratch: without `fer_jax.host_memory`; +no_onednn: without oneDNN's convolutions)."""

    def __init__(self, spec: str, args: argparse.Namespace):
        import functools

        import jax
        import jax.numpy as jnp
        import numpy as np

        from configs import fer2013
        from fer_jax import host_memory
        from fer_jax.model import conv
        from fer_jax.training.step import create_model, create_train_state, eval_step, train_step

        impl, *variants = spec.split("+")
        if "no_onednn" in variants:  # before anything asks onednn_conv.available()
            os.environ["FER_JAX_ONEDNN_CONV"] = "0"
        if "fresh_scratch" not in variants:
            host_memory.reuse_scratch_memory()  # as `python -m fer_jax.main` does
        config = fer2013.get_config(f"cbam={args.cbam},head={args.head}")
        config.model.width = args.width
        config.model.conv_impl = impl
        config.batch_size = args.batch
        self.config = config
        opts = conv.cpu_compiler_options() if "eigen" in variants else None
        model = create_model(config)
        rng = np.random.default_rng(0)
        self.batch = {
            "image": jnp.asarray(rng.random((args.batch, 44, 44, 1), np.float32)),
            "label": jnp.asarray(rng.integers(0, 7, args.batch).astype(np.int32)),
        }
        b = args.eval_batch
        self.eval_batch = {
            "image": jnp.asarray(rng.random((b, 10, 44, 44, 1), np.float32)),
            "label": jnp.asarray(rng.integers(0, 7, b).astype(np.int32)),
            "mask": jnp.ones((b,), bool),
        }
        state = create_train_state(config, model, steps_per_epoch=448)
        step = functools.partial(train_step, config=config, axis_name=None)
        evaluate = functools.partial(eval_step, axis_name=None)
        t = time.perf_counter()
        self.train_fn = (
            jax.jit(step, donate_argnums=0, compiler_options=opts)
            .lower(state, self.batch)
            .compile()
        )
        self.compile_train_s = time.perf_counter() - t
        t = time.perf_counter()
        self.eval_fn = (
            jax.jit(evaluate, compiler_options=opts).lower(state, self.eval_batch).compile()
        )
        self.compile_eval_s = time.perf_counter() - t
        self.state = state
        self.jax = jax
        # The first step: from the seeded initial state (equal for every impl) on a fixed batch.
        self.state, metrics = self.train_fn(self.state, self.batch)
        self.first_loss = float(metrics["loss"])
        from fer_jax.model import onednn_conv

        self.onednn = onednn_conv.version() if onednn_conv.available() else "-"

    def ready(self) -> dict[str, Any]:
        return {
            "compile_train_s": self.compile_train_s,
            "compile_eval_s": self.compile_eval_s,
            "first_loss": self.first_loss,
            "onednn": self.onednn,  # the oneDNN this worker's convolutions could use
        }

    def train(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.train_fn(self.state, self.batch)
        self.jax.block_until_ready(metrics)
        return time.perf_counter() - t

    def evaluate(self, batches: int) -> float:
        t = time.perf_counter()
        for _ in range(batches):
            out = self.eval_fn(self.state, self.eval_batch)
        self.jax.block_until_ready(out)
        return time.perf_counter() - t


TORCH_CONTESTANTS = ("torch", "torch:bf16")


class TorchContestant:
    """The PyTorch reference network, loss and optimizer (eager, NCHW); `bf16`: its forward
    passes under `torch.autocast("cpu", dtype=torch.bfloat16)`."""

    def __init__(self, args: argparse.Namespace, bf16: bool = False):
        import numpy as np
        import torch
        import torch.nn.functional as F

        sys.path.insert(0, REPO)
        from tests import torch_reference

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        cbam = None if args.cbam == "none" else args.cbam
        self.model = torch_reference.ResNet18(
            num_classes=7, width=args.width, cbam=cbam, head=args.head, dropout=0.5
        )
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4
        )
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.random((args.batch, 1, 44, 44), np.float32))
        self.y = torch.from_numpy(rng.integers(0, 7, args.batch))
        b = args.eval_batch
        self.ex = torch.from_numpy(rng.random((b * 10, 1, 44, 44), np.float32))
        self.head = args.head
        self.torch, self.F, self.ref = torch, F, torch_reference
        self.bf16 = bf16
        self.step_count = 0
        t = time.perf_counter()
        self.first_loss = self._step()
        self.first_step_s = time.perf_counter() - t
        t = time.perf_counter()
        self.evaluate(1)
        self.first_eval_s = time.perf_counter() - t

    def _autocast(self) -> Any:
        """bfloat16 autocast for `torch:bf16`, else a no-op context."""
        return self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16)

    def _step(self) -> float:
        torch = self.torch
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        if self.head == "a_softmax":
            with self._autocast():
                features = self.model.features(self.x)
            lam = max(5.0, 1500.0 / (1 + 0.1 * self.step_count))
            loss = self.ref.a_softmax_loss(
                features.float(), self.model.linear.weight, self.y, 4, lam
            )
        else:
            with self._autocast():
                logits = self.model(self.x)
            loss = self.F.cross_entropy(logits.float(), self.y)
        loss.backward()
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-0.1, 0.1)
        self.opt.step()
        self.step_count += 1
        return float(loss.detach())

    def ready(self) -> dict[str, Any]:
        return {
            "first_step_s": self.first_step_s,
            "first_eval_s": self.first_eval_s,
            "first_loss": self.first_loss,
        }

    def train(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self._step()
        return time.perf_counter() - t

    def evaluate(self, batches: int) -> float:
        torch = self.torch
        self.model.eval()
        t = time.perf_counter()
        with torch.no_grad(), self._autocast():
            for _ in range(batches):
                logits = self.model(self.ex).float()
                logits.view(-1, 10, logits.shape[-1]).mean(1).argmax(-1)
        return time.perf_counter() - t


def worker(args: argparse.Namespace) -> None:
    """Builds one contestant, then serves `train N` / `eval N` / `quit` lines on stdin."""
    t = time.perf_counter()
    contestant = (
        TorchContestant(args, bf16=args.worker == "torch:bf16")
        if args.worker in TORCH_CONTESTANTS
        else JaxContestant(args.worker.removeprefix("jax:"), args)
    )
    _send(
        {
            "ready": True,
            "setup_s": time.perf_counter() - t,
            **contestant.ready(),
            "maxrss_gib": _maxrss_gib(),
        }
    )
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "quit":
            break
        n = int(rest[0])
        seconds = contestant.train(n) if cmd == "train" else contestant.evaluate(n)
        _send({"seconds": seconds, "maxrss_gib": _maxrss_gib()})


# --- the parent ----------------------------------------------------------------------------------


def resolve_commit(rev: str) -> str:
    """The full hash of git revision `rev` of this checkout; ValueError naming it if none."""
    out = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise ValueError(f"git cannot resolve {rev!r} to a commit of {REPO}")
    return out.stdout.strip()


def source_tree(commit: str) -> str:
    """A directory holding the tracked files of `commit` (`git archive`), for `SPEC@REV`
    contestants; kept in the temp dir and reused by later runs (a commit never changes)."""
    path = os.path.join(tempfile.gettempdir(), f"fer_jax_src_{commit}")
    if not os.path.isdir(path):
        tmp = tempfile.mkdtemp(prefix=f"{path}.partial.")
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        os.replace(tmp, path)  # only a complete tree gets the name
    return path


class Worker:
    """A contestant's process, talked to by lines of JSON."""

    def __init__(self, name: str, args: argparse.Namespace, batch: int, env: dict[str, str]):
        self.name = name
        spec, _, rev = name.partition("@")
        self.commit = resolve_commit(rev) if rev else None
        cmd = [
            sys.executable,
            "-m",
            "experiments.benchmark",
            f"--worker={spec}",
            f"--width={args.width}",
            f"--batch={batch}",
            f"--eval_batch={args.eval_batch}",
            f"--threads={args.threads}",
            f"--cbam={args.cbam}",
            f"--head={args.head}",
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=source_tree(self.commit) if self.commit else REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if not args.verbose else None,
            text=True,
            env=env,
        )
        self.info: dict[str, Any] = {}
        self.maxrss_gib = 0.0

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                msg = json.loads(line)
                self.maxrss_gib = max(self.maxrss_gib, msg.get("maxrss_gib", 0.0))
                return msg
        raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")

    def wait_ready(self) -> dict[str, Any]:
        self.info = self.read()
        if self.commit:
            self.info["source_commit"] = self.commit
        return self.info

    def ask(self, cmd: str, n: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd} {n}\n")
        self.proc.stdin.flush()
        return self.read()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def bench_batch(
    batch: int, args: argparse.Namespace, with_eval: bool, impls: list[str]
) -> dict[str, Any]:
    """Contestants `impls` (+ torch) at one training batch size: setup, then alternate rounds."""
    env = dict(os.environ)
    names = [*(f"jax:{c}" for c in impls), *args.torch_contestants]
    results: dict[str, Any] = {}
    workers = []
    # Build one at a time: compiles and the warm-up step do not overlap (2 cores).
    for name in names:
        w = Worker(name, args, batch, env)
        info = w.wait_ready()
        print(
            f"  [{name} b{batch}] ready in {info['setup_s']:.0f} s: "
            + ", ".join(
                f"{k}={v:.3g}" for k, v in info.items() if isinstance(v, float) and k != "setup_s"
            ),
            flush=True,
        )
        workers.append(w)
    try:
        # Untimed: XLA:CPU's scratch buffers settle into glibc's heap over the first steps
        # (`fer_jax.host_memory`; ~9 steps for the 0.8 GB of the Winograd train step).
        for w in workers:
            w.ask("train", args.warmup_steps)
            if with_eval:
                w.ask("eval", 1)
        train_times: dict[str, list[float]] = {w.name: [] for w in workers}
        eval_times: dict[str, list[float]] = {w.name: [] for w in workers}
        for rep in range(args.reps):
            for w in workers:
                time.sleep(0.2)  # let the previous worker's threads go idle
                train_times[w.name].append(w.ask("train", args.steps))
            print(
                f"  train rep {rep + 1}/{args.reps}: "
                + ", ".join(
                    f"{n} {batch * args.steps / t[-1]:.2f} img/s" for n, t in train_times.items()
                ),
                flush=True,
            )
        if with_eval:
            for rep in range(args.reps):
                for w in workers:
                    time.sleep(0.2)
                    eval_times[w.name].append(w.ask("eval", args.eval_batches))
                print(
                    f"  eval rep {rep + 1}/{args.reps}: "
                    + ", ".join(
                        f"{n} {10 * args.eval_batch * args.eval_batches / t[-1]:.1f} crops/s"
                        for n, t in eval_times.items()
                    ),
                    flush=True,
                )
        for w in workers:
            med = statistics.median(train_times[w.name])
            r: dict[str, Any] = {
                "train_seconds": train_times[w.name],
                "train_images_per_s": batch * args.steps / med,
                **w.info,
            }
            if with_eval:
                emed = statistics.median(eval_times[w.name])
                r["eval_seconds"] = eval_times[w.name]
                r["eval_crops_per_s"] = 10 * args.eval_batch * args.eval_batches / emed
            results[w.name] = r
    finally:
        for w in workers:
            w.close()
    for w in workers:
        results[w.name]["peak_rss_gib"] = w.maxrss_gib
    return results


def pipeline_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Input pipeline figures, measured in a subprocess (TensorFlow's threads stay out of the
    model benchmark)."""
    code = (
        "import json, sys\n"
        "from experiments import benchmark\n"
        "print('RESULT ' + json.dumps(benchmark._pipeline_in_process(sys.argv[1], "
        "float(sys.argv[2]))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, args.data_dir or "", str(args.pipeline_seconds)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def _pipeline_in_process(data_dir: str, seconds: float) -> dict[str, Any]:
    """`experiments/pipeline_throughput.py` on a built FER2013 if there is one, else the same
    pipelines on in-memory uint8 arrays of FER2013's split sizes."""
    import io
    from contextlib import redirect_stdout

    import numpy as np

    from experiments import pipeline_throughput as pt

    built = bool(data_dir) and os.path.isdir(os.path.join(data_dir, "fer2013"))
    if built:
        try:
            buf = io.StringIO()
            with redirect_stdout(buf):
                out = pt.main(["--data_dir", data_dir, "--seconds", str(seconds)])
            return {**out, "source": f"pipeline_throughput.py on {data_dir}", "log": buf.getvalue()}
        except Exception as e:  # noqa: BLE001 - not built after all: fall through
            built_error = f"{type(e).__name__}: {e}"
    else:
        built_error = "no built dataset"
    import data_pipelines

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (28709, 48, 48, 1), dtype=np.uint8)
    labels = rng.integers(0, 7, 28709).astype(np.int32)
    train = data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=128, seed=0
    ).as_numpy_iterator()
    train_rate, _ = pt._rate(train, seconds, 20, lambda b: len(b["label"]))
    ds = data_pipelines.eval_dataset_from_arrays(
        images[:3589], labels[:3589], batch_size=128
    ).repeat()
    eval_rate, _ = pt._rate(ds.as_numpy_iterator(), seconds, 5, lambda b: 10 * b["mask"].sum())
    return {
        "train_images_per_s": train_rate,
        "eval_crops_per_s": float(eval_rate),
        "source": f"in-memory arrays of FER2013's size ({built_error} in {data_dir or '-'})",
    }


def _fastest(batch_results: dict[str, Any]) -> str:
    """The conv impl spec of the fastest fer_jax contestant in one batch's results."""
    jax_names = [n for n in batch_results if n.startswith("jax:")]
    best = max(jax_names, key=lambda n: batch_results[n]["train_images_per_s"])
    return best.removeprefix("jax:")


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def train_gflop_per_image(args: argparse.Namespace) -> float:
    """GFLOP per training image of the benchmarked model (`fer_jax.model.flops`, 3 x forward)."""
    from configs import fer2013
    from fer_jax.model.flops import model_flops_per_image

    config = fer2013.get_config(f"cbam={args.cbam},head={args.head}")
    config.model.width = args.width
    return model_flops_per_image(config.model)["train"] / 1e9


def torch_peer(jax_name: str, torch_names: list[str]) -> str | None:
    """The PyTorch contestant a fer_jax one is compared with: `torch:bf16` (when run) for a
    bfloat16 spec (`IMPL:bf16...`), else `torch`; None if that one did not run."""
    impl = jax_name.removeprefix("jax:").partition("@")[0].partition("+")[0]
    want = "torch:bf16" if impl.endswith(":bf16") and "torch:bf16" in torch_names else "torch"
    return want if want in torch_names else None


def markdown(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The side-by-side table: one column per contestant, then each fer_jax / torch ratio (a
    bfloat16 fer_jax contestant against `torch:bf16` when it ran, see `torch_peer`)."""
    jax_names: list[str] = []
    for r in res["batches"].values():
        jax_names += [n for n in r if n.startswith("jax:") and n not in jax_names]
    torch_names = list(args.torch_contestants)
    names = jax_names + torch_names
    gflop = train_gflop_per_image(args)
    cols = [n.replace("jax:", "fer_jax ") for n in names]
    peers = {n: torch_peer(n, torch_names) for n in jax_names}
    ratio_names = [n for n in jax_names if peers[n]]
    ratio_cols = [f"{n.replace('jax:', '')} / {peers[n]}" for n in ratio_names]
    head = ["metric", *cols, *ratio_cols]
    lines = common.table(head)

    def row(label: str, r: dict[str, Any], get, spec: str, ratio: bool) -> None:
        values = {n: get(r[n]) for n in names if n in r}
        cells = [_f(values.get(n), spec) for n in names]
        for n in ratio_names:
            v, t = values.get(n), values.get(peers[n])
            cells.append(f"**{v / t:.2f}x**" if ratio and v and t else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for i, batch in enumerate(args.batches):
        r = res["batches"][str(batch)]
        row(f"train images/s, batch {batch}", r, lambda x: x["train_images_per_s"], ".2f", True)
        row(
            f"= GFLOP/s (x {gflop:.2f} GFLOP/image), batch {batch}",
            r,
            lambda x: x["train_images_per_s"] * gflop,
            ".0f",
            False,
        )
        if any("eval_crops_per_s" in x for x in r.values()):
            row(
                f"ten-crop eval crops/s ({args.eval_batch} images x 10 per batch)",
                r,
                lambda x: x.get("eval_crops_per_s"),
                ".1f",
                True,
            )
        row(
            f"compile train step / torch first step (s), batch {batch}",
            r,
            lambda x: x.get("compile_train_s", x.get("first_step_s")),
            ".1f",
            False,
        )
        if i == 0:
            row(
                "compile eval step / torch first eval batch (s)",
                r,
                lambda x: x.get("compile_eval_s", x.get("first_eval_s")),
                ".1f",
                False,
            )
        row(
            f"peak RSS of the worker (GiB), batch {batch}",
            r,
            lambda x: x["peak_rss_gib"],
            ".2f",
            False,
        )
        row(f"first-step loss, batch {batch}", r, lambda x: x["first_loss"], ".6f", False)
        if i == 0 and any("onednn" in x for x in r.values()):
            row(
                "oneDNN convolutions (for IMPL:bf16, onednn)",
                r,
                lambda x: x.get("onednn"),
                "",
                False,
            )
    return "\n".join(lines + _pipeline_lines(res.get("pipeline") or {}))


def _pipeline_lines(p: dict[str, Any]) -> list[str]:
    """The input pipeline's figures under the table (none if it was not run)."""
    if "train_images_per_s" in p:
        return [
            "",
            f"Input pipeline (tf.data, {p['source']}): training {p['train_images_per_s']:,.0f} "
            f"images/s (batch 128), ten-crop evaluation {p['eval_crops_per_s']:,.0f} crops/s.",
        ]
    return ["", f"Input pipeline: not measured ({p.get('error', '')[-300:]})"] if p else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = common.parser(__doc__)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=2, help="train steps per timed round")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (median)")
    ap.add_argument(
        "--warmup_steps", type=int, default=10, help="untimed train steps per contestant first"
    )
    ap.add_argument("--eval_batch", type=int, default=16, help="images (x10 crops) per batch")
    ap.add_argument("--eval_batches", type=int, default=1, help="eval batches per timed round")
    ap.add_argument(
        "--conv_impls",
        nargs="+",
        default=["xla", "auto", "auto+eigen"],
        help="fer_jax contestants: IMPL, IMPL+eigen, IMPL+eigen+fresh_scratch, ...; "
        "SPEC@REV: the same from git commit REV",
    )
    ap.add_argument(
        "--large_batch_impls",
        nargs="+",
        help="fer_jax contestants at the batches after the first (default: the fastest at the "
        "first batch; every contestant's worker is alive at once, so memory adds up)",
    )
    ap.add_argument(
        "--torch_contestants",
        nargs="*",
        default=["torch"],
        choices=TORCH_CONTESTANTS,
        help="PyTorch contestants: torch (float32), torch:bf16 (bfloat16 autocast)",
    )
    ap.add_argument(
        "--no_torch", dest="torch_contestants", action="store_const", const=[], help="no PyTorch"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--cbam", default="channel_first")
    ap.add_argument("--head", default="a_softmax")
    ap.add_argument("--data_dir", default="/tmp/tfds_data", help="TFDS dir for the pipeline")
    ap.add_argument("--pipeline_seconds", type=float, default=5.0)
    ap.add_argument("--no_pipeline", dest="pipeline", action="store_false")
    common.add_out(ap, help="results folder (default: experiments/results/benchmark_cpu)")
    ap.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for spec in [*args.conv_impls, *(args.large_batch_impls or [])]:
        variants, _, rev = spec.partition("@")
        unknown = set(variants.split("+")[1:]) - set(JAX_VARIANTS)
        if unknown:
            ap.error(f"contestant {spec}: unknown suffix {sorted(unknown)}; known {JAX_VARIANTS}")
        if rev:
            try:
                resolve_commit(rev)
            except ValueError as e:
                ap.error(f"contestant {spec}: {e}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    prov = provenance.provenance()
    print(f"load average before: {os.getloadavg()}", flush=True)
    res: dict[str, Any] = {"batches": {}}
    if args.pipeline:
        res["pipeline"] = pipeline_throughput(args)
        print(f"pipeline: {res['pipeline']}", flush=True)
    for i, batch in enumerate(args.batches):
        impls = args.conv_impls
        if i > 0:  # larger batches: fewer contestants (memory, time)
            impls = args.large_batch_impls or [_fastest(res["batches"][str(args.batches[0])])]
        print(f"batch {batch}: {impls}", flush=True)
        res["batches"][str(batch)] = bench_batch(batch, args, with_eval=i == 0, impls=impls)
    res["loadavg_after"] = os.getloadavg()
    table = markdown(res, args)
    print("\n" + table)
    out = args.out or os.path.join(REPO, "experiments", "results", "benchmark_cpu")
    os.makedirs(out, exist_ok=True)
    common.save_json(
        os.path.join(out, "benchmark.json"),
        {"args": vars(args), "results": res, "provenance": prov},
    )
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write("# fer_jax vs PyTorch reference: training and ten-crop evaluation\n\n")
        f.write(
            f"CPU: {prov['hardware']['cpu_model']}, {prov['hardware']['cpu_count']} cores. "
            f"Width {args.width}, cbam {args.cbam}, head {args.head}; float32 except `IMPL:bf16` "
            "(bfloat16 matmul operands, float32 accumulation) and `torch:bf16` (autocast); "
            f"{args.steps} steps x {args.reps} alternating rounds (median); load average "
            f"before {prov['hardware']['loadavg_1_5_15']}, after "
            f"{[round(x, 2) for x in res['loadavg_after']]}.\n\n"
        )
        f.write(table + "\n\n## Provenance\n\n" + provenance.markdown(prov) + "\n")
    print(f"wrote {out}/benchmark.md")
    return res


if __name__ == "__main__":
    main()
