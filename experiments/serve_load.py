"""Load on `python -m fer_jax.serve`: N concurrent clients on loopback, vs the model in-process.

    python -m experiments.serve_load                          # 1 and 8 clients, crops 10 and 1
    python -m experiments.serve_load --seconds 10 --soak 0    # a short look

First, in this process and before the server starts (nothing else of ours on the CPU): the
shipped model's `Recognizer.predict_faces` on the photo's own 48x48 face, one face per call and
`--batch_size` per call (what a full batch of the server does), and `Recognizer.predict` on the
photo file (read, detect, crop, classify: the work of one request, one at a time).

Then the command itself, `python -m fer_jax.serve --port=0 --batch_size=B`, in a subprocess on
127.0.0.1 (no other address is contacted), and for each `--crops`, each way to find the face
(detected by the server, as a photo's; or given, `box=X,Y,W,H`: no detection, the model's path
alone) and each `--clients`: that many threads, each with its keep-alive HTTP/1.1 connection,
POST the photo (`--image`, the bundled astronaut by default: one face) as a raw JPEG body, one
request after another, for `--seconds` or `--max_requests` in all, whichever comes first.
Reported: requests/s, faces/s, latency p50 / p99, errors (any status but 200, or a failed
connection), the server's mean batch (requests per model call, from /healthz), and served
faces/s over the in-process figure that does the same work (the service's cost as a ratio):
`predict(photo)` for detected faces, `predict_faces` for given boxes (one face per call for
one client, `--batch_size` per call for more). Last, `--soak` seconds at the largest client
count and one crop (detected faces), the server's resident memory sampled every 10 s: flat, or
growing?

The figures are indicative where other work shares the CPU (the output records the load average
and says so). Writes `table.md` and `raw.json` to `--out` (default experiments/results/serve/).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from experiments import common, provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = re.compile(r"ready .*?http://127\.0\.0\.1:(\d+)/")


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid`, MiB (/proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rate(fn: Any, seconds: float, min_calls: int = 3) -> float:
    """Calls per second of `fn()`, over at least `seconds` and `min_calls` calls (after one)."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def in_process(image: str, crops: int, batch: int, seconds: float) -> dict[str, Any]:
    """Faces/s of `predict_faces` (1 and `batch` per call), images/s of `predict(image)`, and
    the box of the image's (one) face."""
    from fer_jax.inference.recognizer import Recognizer, read_image, to_gray

    recognizer = Recognizer.pretrained(crops=crops, batch_size=batch)
    (box,) = [f.box for f in recognizer.predict(image)]
    face = recognizer.crop_faces(to_gray(read_image(image)), np.asarray([box]))
    faces = np.repeat(face, batch, axis=0)
    return {
        "predict_faces_1": rate(lambda: recognizer.predict_faces(face), seconds),
        f"predict_faces_{batch}": batch * rate(lambda: recognizer.predict_faces(faces), seconds),
        "predict_image": rate(lambda: recognizer.predict(image), seconds),
        "box": list(box),
    }


class Server:
    """`python -m fer_jax.serve --port=0` in a subprocess; its port once ready."""

    def __init__(self, batch_size: int, timeout: float = 600):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fer_jax.serve", "--port=0", f"--batch_size={batch_size}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log: list[str] = []
        lines: queue.Queue = queue.Queue()

        def read() -> None:
            for line in self.process.stdout:
                self.log.append(line)
                lines.put(line)
            lines.put("")

        threading.Thread(target=read, daemon=True).start()
        deadline, self.port = time.monotonic() + timeout, None
        while self.port is None:
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            if not line:
                raise RuntimeError("the server stopped:\n" + "".join(self.log)[-3000:])
            if match := READY.search(line):
                self.port = int(match[1])

    def health(self) -> dict[str, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", "/healthz")
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load(port: int, body: bytes, query: str, clients: int, seconds: float, limit: int) -> dict:
    """`clients` threads POSTing `body` to /v1/predict?`query` until `seconds` pass or `limit`
    requests are sent."""
    latencies: list[float] = []
    faces, errors, lock = [0], [], threading.Lock()
    sent = [0]
    start = time.perf_counter()
    deadline = start + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Content-Type": "image/jpeg"}
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= limit:
                    break
                sent[0] += 1
            began = time.perf_counter()
            try:
                connection.request("POST", f"/v1/predict?{query}", body, headers)
                response = connection.getresponse()
                answer = response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                ok, answer = False, repr(e).encode()
            with lock:
                latencies.append(time.perf_counter() - began)
                if ok:
                    faces[0] += len(json.loads(answer)["faces"])
                else:
                    errors.append(answer[:200].decode(errors="replace"))
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ms = sorted(1000 * t for t in latencies)
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "faces_per_s": faces[0] / elapsed,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def soak(server: Server, body: bytes, clients: int, seconds: float, limit: int) -> dict:
    """Load at one crop for `seconds`, the server's RSS sampled every 10 s."""
    samples = [(0.0, rss_mib(server.process.pid))]
    start = time.perf_counter()
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(load(server.port, body, "crops=1", clients, seconds, limit))
    )
    worker.start()
    while worker.is_alive():
        worker.join(10)
        samples.append((round(time.perf_counter() - start, 1), rss_mib(server.process.pid)))
    return {**result, "rss_mib": samples}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = common.parser(__doc__)
    ap.add_argument("--image", default=os.path.join(REPO, "fer_jax", "examples", "astronaut.jpg"))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--crops", type=int, nargs="+", default=[10, 1], choices=[10, 1])
    ap.add_argument("--seconds", type=float, default=30, help="per load phase")
    ap.add_argument("--max_requests", type=int, default=5000, help="per load phase")
    ap.add_argument("--baseline_seconds", type=float, default=5, help="per in-process figure")
    ap.add_argument("--batch_size", type=int, default=8, help="the server's --batch_size")
    ap.add_argument("--soak", type=float, default=300, help="seconds of soak (0: none)")
    common.add_out(ap, help=None, default=os.path.join(REPO, "experiments", "results", "serve"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with open(args.image, "rb") as f:
        body = f.read()
    baseline = {
        c: in_process(args.image, c, args.batch_size, args.baseline_seconds) for c in args.crops
    }
    print("in-process:", json.dumps({str(c): b for c, b in baseline.items()}), flush=True)
    server = Server(args.batch_size)
    phases, soaked = [], None
    try:
        idle_rss = rss_mib(server.process.pid)
        for crops, given, clients in itertools.product(args.crops, (False, True), args.clients):
            query = f"crops={crops}"
            if given:
                query += "&box=" + ",".join(map(str, baseline[crops]["box"]))
            before = server.health()["batches"]
            result = load(server.port, body, query, clients, args.seconds, args.max_requests)
            after = server.health()["batches"]
            batches = after["batches"] - before["batches"]
            result |= {"crops": crops, "given_box": given, "clients": clients}
            result["rss_mib"] = rss_mib(server.process.pid)
            result["mean_batch"] = (after["requests"] - before["requests"]) / max(1, batches)
            phases.append(result)
            print(json.dumps(result), flush=True)
        if args.soak > 0:
            soaked = soak(server, body, max(args.clients), args.soak, 10**9)
            print("soak:", json.dumps(soaked), flush=True)
    finally:
        server.stop()
    raw = {
        "args": vars(args),
        "in_process": baseline,
        "phases": phases,
        "soak": soaked,
        "idle_rss_mib": idle_rss,
        "server_log_tail": server.log[-20:],
    }
    write(args, raw)
    return raw


def write(args: argparse.Namespace, raw: dict[str, Any]) -> None:
    """table.md (the two tables, the soak, provenance) and raw.json in `args.out`."""
    prov = provenance.provenance()
    hw = prov["hardware"]
    batched = f"predict_faces_{args.batch_size}"
    lines = [
        "# `python -m fer_jax.serve` under load (loopback)",
        "",
        f"CPU: {hw['cpu_model']}, {hw['cpu_count']} cores; load average before the run "
        f"{hw['loadavg_1_5_15']}. **Indicative figures**: other work (a training run) may share "
        "this CPU; the in-process and served figures ran one after the other, each with what "
        "the CPU had left.",
        f"Image: `{os.path.relpath(args.image, REPO)}` ({os.path.getsize(args.image):,} bytes, one "
        f"face), raw JPEG body; server `--batch_size={args.batch_size}`; each phase "
        f"{args.seconds:g} s or {args.max_requests} requests.",
        "",
        "In-process, the shipped model (faces/s; images/s for `predict`):",
        "",
        *common.table(
            [
                "crops",
                "predict_faces, 1 per call",
                f"predict_faces, {args.batch_size} per call",
                "predict(photo): read, detect, classify",
            ],
            [
                [crops] + [f"{base[k]:.1f}" for k in ("predict_faces_1", batched, "predict_image")]
                for crops, base in raw["in_process"].items()
            ],
        ),
    ]
    lines += [
        "",
        "Served (one face per request). *vs in-process*: served faces/s over the in-process "
        "figure that does the same work: `predict(photo)` where the server detects the face; "
        "where the box is given, `predict_faces` one face per call for one client, "
        f"{args.batch_size} per call (the server's full batch) for more.",
        "",
        *common.table(
            "crops, face, clients, requests, req/s, faces/s, p50 ms, p99 ms, errors, mean batch, "
            "vs in-process, server RSS MiB".split(", ")
        ),
    ]
    for p in raw["phases"]:
        base = raw["in_process"][p["crops"]]
        batch = 1 if p["clients"] == 1 else args.batch_size
        same = base[f"predict_faces_{batch}"] if p["given_box"] else base["predict_image"]
        lines.append(
            f"| {p['crops']} | {'given' if p['given_box'] else 'detected'} | {p['clients']} | "
            f"{p['requests']} | {p['requests_per_s']:.1f} | {p['faces_per_s']:.1f} | "
            f"{p['p50_ms']:.0f} | {p['p99_ms']:.0f} | {p['errors']} | {p['mean_batch']:.2f} | "
            f"{p['faces_per_s'] / same:.2f}x | {p['rss_mib']:.0f} |"
        )
    if raw["soak"]:
        s = raw["soak"]
        rss = [m for _, m in s["rss_mib"]]
        lines += [
            "",
            f"Soak: {max(args.clients)} clients, one crop, {s['seconds']:.0f} s: "
            f"{s['requests']} requests, {s['requests_per_s']:.1f} req/s, p99 {s['p99_ms']:.0f} "
            f"ms, {s['errors']} errors; server RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB (min "
            f"{min(rss):.0f}, max {max(rss):.0f}; every 10 s: "
            + ", ".join(f"{m:.0f}" for m in rss)
            + ").",
        ]
    lines += ["", provenance.markdown(prov), ""]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines))
    common.save_json(os.path.join(args.out, "raw.json"), {**raw, **prov})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
