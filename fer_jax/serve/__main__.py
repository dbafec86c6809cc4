r"""`python -m fer_jax.serve`: the recogniser as an HTTP API and a web page, on this machine.

    python -m fer_jax.serve [--checkpoint=pretrained|RUN_DIR] [--host=127.0.0.1] [--port=8000]

Loads the model as `python -m fer_jax.predict` does, compiles and warms every program, then
listens (loopback only unless `--host` says otherwise: there is no authentication). Needs the
`serve` extra. Page, API, limits and batching: docs/serve.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import time
from collections.abc import Sequence

from data_pipelines.crops import CROP_CHOICES
from fer_jax.inference import predict
from fer_jax.inference.recognizer import Recognizer
from fer_jax.serve.service import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PIXELS,
    DEFAULT_READ_SECONDS,
    Limits,
    Service,
)
from fer_jax.user_errors import UserError, run_cli

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_BATCH_SIZE = 8  # faces per model call: CPU throughput barely grows past it


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fer_jax.serve",
        description="Serve the expression recogniser: an HTTP API (POST /v1/predict, "
        "GET /healthz, /docs) and a web page at / (photo upload and live webcam).",
    )
    predict.add_model_options(
        parser, DEFAULT_BATCH_SIZE, "most faces per model call; waiting requests batch up to it"
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default: loopback only; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    for name, kind, default, what in (
        ("max_bytes", int, DEFAULT_MAX_BYTES, "largest request body, bytes"),
        ("max_pixels", int, DEFAULT_MAX_PIXELS, "largest image in pixels, vs decompression bombs"),
        ("read_seconds", float, DEFAULT_READ_SECONDS, "most seconds for the body to arrive (408)"),
        ("max_pending", int, DEFAULT_MAX_PENDING, "requests in progress at once; more get 503"),
    ):
        parser.add_argument(f"--{name}", type=kind, default=default, help=what)
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding/detection threads (default: CPUs)"
    )
    parser.add_argument("--access_log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    names = ("batch_size", "max_bytes", "max_pixels", "max_pending", "read_seconds", "workers")
    predict.require_positive(parser, args, names)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    return args


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port`, before the model loads: a busy port fails at once."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a host name
        family = socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def load_recognizers(args: argparse.Namespace) -> dict[int, Recognizer]:
    """`{crops: Recognizer}` for ten crops and one, loaded as `python -m fer_jax.predict` loads
    its model (the options serve lacks at predict's defaults)."""
    return {crops: predict.load_recognizer(args, crops=crops) for crops in CROP_CHOICES}


def load_and_warm(args: argparse.Namespace, sock: socket.socket) -> Service:
    """The `Service` of `args`' model, every program compiled and run once; prints where."""
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"fer_jax.serve: loading {args.checkpoint} ...", flush=True)
    start = time.perf_counter()
    predict.use_compilation_cache(args.compilation_cache)
    service = Service(
        load_recognizers(args),
        limits=Limits(args.max_bytes, args.max_pixels, args.read_seconds),
        max_pending=args.max_pending,
        workers=args.workers,
        model_name=args.checkpoint,
    )
    warm = service.warm()
    print(
        f"fer_jax.serve: ready in {time.perf_counter() - start:.1f} s (compiled and warmed in "
        f"{warm:.1f} s): {url} (the page), {url}docs (the API)",
        flush=True,
    )
    if not ipaddress.ip_address(host).is_loopback:
        print(f"fer_jax.serve: listening on {host}, not only this machine: no authentication")
    return service


def serve(args: argparse.Namespace) -> int:
    """Loads, warms, then serves until interrupted."""
    try:
        import uvicorn

        from fer_jax.serve.app import create_app
    except ModuleNotFoundError as e:
        raise UserError(
            f"serving needs {e.name}, which is not installed: pip install -e '.[serve]'"
        ) from e
    sock = listen(args.host, args.port)
    try:
        service = load_and_warm(args, sock)
        config = uvicorn.Config(
            create_app(service),
            log_level="info",
            access_log=args.access_log,
            limit_concurrency=4 * args.max_pending + 16,  # connections: a backstop for floods
            timeout_graceful_shutdown=5,
        )
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raised Ctrl-C
            pass
        finally:
            service.close()
    finally:
        sock.close()
    print("fer_jax.serve: stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: an error in the input, e.g. the
    checkpoint or a busy port)."""
    args = parse_args(argv)
    try:
        return run_cli(lambda: serve(args), sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # while loading or warming
        print("fer_jax.serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
