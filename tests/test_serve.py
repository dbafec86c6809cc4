"""The HTTP API of `python -m fer_jax.serve`, in-process: every endpoint, every bad input, bursts,
and concurrent requests that agree with `Recognizer.predict` (a width-reduced random model; the
shipped model and a real browser: tests/test_serve_page.py)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.client
import io
import json
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

import uvicorn  # noqa: E402

from data_pipelines.labels import CLASS_NAMES  # noqa: E402
from fer_jax.inference import predict as predict_cli  # noqa: E402
from fer_jax.inference.recognizer import Recognizer  # noqa: E402
from fer_jax.serve import __main__ as serve_cli  # noqa: E402
from fer_jax.serve.app import create_app  # noqa: E402
from fer_jax.serve.service import Batcher, Limits, Service  # noqa: E402
from fer_jax.user_errors import UserError  # noqa: E402
from tests.test_recognizer import ASTRONAUT_BOX, small_model  # noqa: E402

LIMITS = Limits(max_bytes=2 * 2**20, max_pixels=4_000_000)
BATCH = 2  # as tests/test_recognizer.py's recognizer: the same programs, compiled once


def _encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, fmt, **kwargs)
    return out.getvalue()


# ----------------------------------------------------------------------------- a real server


@dataclasses.dataclass
class Answer:
    """An HTTP response: status, headers, body text."""

    status_code: int
    headers: http.client.HTTPMessage
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def multipart(parts: list[tuple[str, str, bytes]], boundary: str = "XyZ") -> bytes:
    """A `multipart/form-data` body of `(name, content type, bytes)` file parts."""
    out = b""
    for name, kind, data in parts:
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{name}"\r\nContent-Type: {kind}\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


class Client:
    """HTTP/1.1 to a server on this machine, one connection per request (as concurrent
    browsers open); the standard library only."""

    def __init__(self, port: int):
        self.port = port

    def request(
        self, method: str, path: str, body: bytes | Iterable[bytes] | None = None, headers=None
    ) -> Answer:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            chunked = body is not None and not isinstance(body, bytes)
            connection.request(method, path, body, headers or {}, encode_chunked=chunked)
            response = connection.getresponse()
            return Answer(response.status, response.headers, response.read().decode())
        finally:
            connection.close()

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def post(self, path: str, content=b"", headers=None, files=None) -> Answer:
        """`files={'file': (file name, bytes, content type)}`: a form of that one part."""
        if files is not None:
            ((filename, data, kind),) = files.values()
            content = multipart([(filename, kind, data)])
            headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
        return self.request("POST", path, content, headers)


@contextlib.contextmanager
def serving(app: Any) -> Iterator[Client]:
    """`app` served by uvicorn on a free loopback port, in a thread of this process."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the test server did not start"
    try:
        yield Client(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _recognizers() -> dict[int, Recognizer]:
    return {c: Recognizer(*small_model(), batch_size=BATCH, crops=c) for c in (10, 1)}


@pytest.fixture(scope="module")
def recognizers() -> dict[int, Recognizer]:
    return _recognizers()


@pytest.fixture(scope="module")
def service(recognizers):
    service = Service(recognizers, limits=LIMITS, max_pending=16, model_name="small")
    service.warm()
    yield service
    service.close()


@pytest.fixture(scope="module")
def client(service):
    with serving(create_app(service)) as client:
        yield client


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def astronaut_png(astronaut) -> bytes:
    return _encode(astronaut)


def _good_request(client) -> None:
    """The server still answers: one face at a given box, one crop (fast)."""
    response = client.post(
        "/v1/predict?crops=1&box=10,10,40,40",
        content=_encode(np.full((64, 64), 90, np.uint8)),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["faces"]) == 1


# ----------------------------------------------------------------------------- what it answers


def test_healthz_reports_the_model_the_crops_and_the_limits(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "small"
    assert health["class_names"] == list(CLASS_NAMES)
    assert health["crops"] == [1, 10] and health["batch_size"] == BATCH
    assert health["limits"] == {
        "max_bytes": 2 * 2**20,
        "max_pixels": 4_000_000,
        "read_seconds": 30,
        "max_pending": 16,
    }
    assert health["warm_seconds"] > 0


def test_an_upload_gets_the_record_of_predict_json(client, recognizers, astronaut, tmp_path):
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    args = predict_cli.parse_args(["--json", "--quiet", str(path)])
    out, err = io.StringIO(), io.StringIO()
    assert predict_cli.run(args, recognizers[10], out, err) == 0
    (expected,) = json.loads(out.getvalue())

    files = {"file": ("astronaut.png", path.read_bytes(), "image/png")}
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["source"] == "astronaut.png" and list(record) == ["source", "faces"]
    (face,) = record["faces"]
    (want,) = expected["faces"]
    assert face["box"] == want["box"] == list(ASTRONAUT_BOX)
    assert face["label"] == want["label"] and list(face["probabilities"]) == list(CLASS_NAMES)
    np.testing.assert_allclose(
        list(face["probabilities"].values()), list(want["probabilities"].values()), atol=1e-5
    )


def test_a_raw_body_with_one_crop_and_given_boxes(client, recognizers, astronaut_png, astronaut):
    boxes = [[177, 66, 95, 95], [300, 200, 80, 90]]
    query = "crops=1&" + "&".join(f"box={','.join(map(str, b))}" for b in boxes)
    response = client.post(
        f"/v1/predict?{query}", content=astronaut_png, headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["source"] == "upload"
    expected = recognizers[1].predict(astronaut, boxes=boxes)
    assert [f["box"] for f in record["faces"]] == boxes
    for face, want in zip(record["faces"], expected, strict=True):
        np.testing.assert_allclose(
            list(face["probabilities"].values()), want.probabilities, atol=1e-5
        )
        assert face["label"] == want.label


def _variants(astronaut: np.ndarray) -> list[np.ndarray]:
    """Eight images with a face: the astronaut flipped, cropped, scaled, darkened, gray."""
    gray = (astronaut.mean(axis=-1)).astype(np.uint8)
    return [
        astronaut,
        astronaut[:, ::-1],
        astronaut[20:400, 60:460],
        np.asarray(Image.fromarray(astronaut).resize((400, 400))),
        np.asarray(Image.fromarray(astronaut).resize((700, 700))),
        (astronaut * 0.7).astype(np.uint8),
        gray,
        np.ascontiguousarray(gray[:, ::-1][:450]),
    ]


def test_concurrent_requests_agree_with_recognizer_predict(client, service, recognizers, astronaut):
    images = _variants(astronaut)
    before = service.batcher.stats.requests

    def post(k: int):
        crops = (10, 1)[k % 2]
        response = client.post(
            f"/v1/predict?crops={crops}",
            files={"file": (f"v{k}.png", _encode(images[k]), "image/png")},
        )
        return crops, response

    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(post, range(len(images))))
    for image, (crops, response) in zip(images, answers, strict=True):
        assert response.status_code == 200, response.text
        expected = recognizers[crops].predict(image)
        faces = response.json()["faces"]
        assert [f["box"] for f in faces] == [list(f.box) for f in expected]
        for face, want in zip(faces, expected, strict=True):
            got = list(face["probabilities"].values())
            np.testing.assert_allclose(got, want.probabilities, atol=1e-5)
            assert face["label"] == want.label
    assert service.batcher.stats.requests - before == len(images)


def test_the_batcher_runs_the_requests_waiting_as_one_batch():
    calls, gate = [], threading.Event()

    def slow(faces: np.ndarray) -> np.ndarray:
        calls.append(len(faces))
        gate.wait(10)
        return faces.reshape(len(faces), -1)[:, :2].astype(np.float32)

    batcher = Batcher({"a": slow, "b": slow}, max_faces=5)
    try:
        first = batcher.submit("a", np.zeros((1, 2, 2)))
        while not calls:  # the worker is busy with the first request
            time.sleep(0.01)
        waiting = [batcher.submit(key, np.full((n, 2, 2), n)) for key, n in
                   [("a", 2), ("b", 1), ("a", 3), ("a", 1)]]  # fmt: skip
        gate.set()
        results = [f.result(10) for f in [first, *waiting]]
    finally:
        batcher.close()
    # 'a' x2 and x3 fill a batch of 5; then 'b' (another program), then the last 'a'.
    assert calls == [1, 5, 1, 1]
    assert [r.shape[0] for r in results] == [1, 2, 1, 3, 1]
    assert results[3][0, 0] == 3 and results[1][0, 0] == 2  # each request its own rows
    assert batcher.stats.largest_batch == 2 and batcher.stats.requests == 5


def test_a_failing_batch_fails_its_requests_not_the_worker():
    def broken(faces: np.ndarray) -> np.ndarray:
        if faces.shape[0] == 1:
            raise RuntimeError("boom")
        return np.zeros((len(faces), 7), np.float32)

    batcher = Batcher({1: broken}, max_faces=4)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit(1, np.zeros((1, 48, 48))).result(10)
        assert batcher.submit(1, np.zeros((2, 48, 48))).result(10).shape == (2, 7)
    finally:
        batcher.close()


# ----------------------------------------------------------------------------- bad input


def _truncated_jpeg(astronaut: np.ndarray) -> bytes:
    data = _encode(astronaut, "JPEG", quality=90)
    return data[: len(data) // 2]


def _png_bomb(side: int = 50_000) -> bytes:
    """A valid PNG of a few hundred bytes that declares `side` x `side` 1-bit pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" + b"\0" * ((side + 7) // 8)
    idat = zlib.compressobj(9)
    compressed = idat.compress(row * 16) + idat.flush()  # the first rows only: never decoded
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed)


BAD = {
    # name: (query, content type, body, status, words in the message)
    "not an image": ("", "image/jpeg", b"hello, world" * 10, 400, "not an image"),
    "truncated": ("", "image/jpeg", "truncated", 400, "truncated or corrupt"),
    "too many bytes": ("", "image/png", b"\0" * (3 * 2**20), 413, "over the limit of 2.0 MB"),
    "too many pixels": ("", "image/png", "big", 413, "3000x2000 = 6,000,000 pixels"),
    "a decompression bomb": ("", "image/png", "bomb", 413, "decompression bomb"),
    "text": ("", "text/plain", b"a photo", 415, "text/plain is not an image"),
    "json": ("", "application/json", b"{}", 415, "application/json is not an image"),
    "no content type": ("", None, b"\xff\xd8", 415, "(none) is not an image"),
    "empty": ("", "image/jpeg", b"", 400, "no image (an empty body)"),
    "no face": ("", "image/png", "blank", 422, "upload: no face found"),
    "bad crops": ("crops=3", "image/png", "blank", 400, "crops must be one of [10, 1], got 3"),
    "crops not a number": ("crops=ten", "image/png", "blank", 400, "crops: Input should be"),
    "bad box": ("box=1,2,3", "image/png", "blank", 400, "a box is X,Y,W,H"),
    "box outside": ("box=500,10,20,20", "image/png", "blank", 400, "outside the 120x100 image"),
    "too many boxes": ("box=1,1,5,5&" * 65, "image/png", "blank", 400, "65 face boxes"),
    "two form parts": ("", "multipart", "two", 400, "the form has 2 parts"),
    "a text form part": ("", "multipart", "text part", 415, "uploaded file is text/plain"),
    "no boundary": ("", "multipart/form-data", b"--x\r\n", 400, "has no boundary"),
}


def _body(kind: str | bytes, astronaut: np.ndarray) -> bytes:
    if isinstance(kind, bytes):
        return kind
    return {
        "truncated": lambda: _truncated_jpeg(astronaut),
        "big": lambda: _encode(np.zeros((2000, 3000), np.uint8)),
        "bomb": _png_bomb,
        "blank": lambda: _encode(np.full((100, 120), 128, np.uint8)),
        "two": lambda: multipart([("a", "image/png", b"1"), ("b", "image/png", b"2")]),
        "text part": lambda: multipart([("file", "text/plain", b"hello")]),
    }[kind]()


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_input_gets_one_message_and_the_server_goes_on(client, astronaut, name):
    query, content_type, body, status, words = BAD[name]
    if content_type == "multipart":
        content_type = "multipart/form-data; boundary=XyZ"
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = client.post(f"/v1/predict?{query}", content=_body(body, astronaut), headers=headers)
    assert response.status_code == status, response.text
    answer = response.json()
    assert isinstance(answer["detail"], str) and words in answer["detail"], answer
    if status == 422:  # no face: still the record's shape
        assert answer["faces"] == [] and answer["source"] == "upload"
    _good_request(client)


def test_a_body_over_the_limit_without_content_length_is_cut_off(client):
    def chunks():
        for _ in range(40):
            yield b"\0" * 2**16  # 2.5 MB, streamed (chunked: no Content-Length)

    response = client.post("/v1/predict", content=chunks(), headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]
    _good_request(client)


def test_an_upload_too_slow_is_cut_off(recognizers):
    service = Service(recognizers, limits=Limits(read_seconds=0.5))

    def trickle():
        for _ in range(4):
            time.sleep(0.3)
            yield b"\0" * 100

    try:
        with serving(create_app(service)) as client:
            headers = {"Content-Type": "image/png"}
            response = client.post("/v1/predict", content=trickle(), headers=headers)
            assert response.status_code == 408, response.text
            assert response.json()["detail"] == "the upload took longer than 0.5 s: send it again"
            _good_request(client)
    finally:
        service.close()


def test_other_methods_and_paths_are_json_errors(client):
    assert client.get("/v1/predict").status_code == 405
    missing = client.get("/v2/predict")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    assert client.get("/static/../app.py").status_code == 404


def test_a_burst_beyond_max_pending_gets_503_and_the_rest_are_answered(recognizers):
    gate = threading.Event()

    def gated(recognizer: Recognizer) -> Recognizer:
        """The recogniser, its model held back until the gate opens."""
        clone = Recognizer(*small_model(), batch_size=BATCH, crops=recognizer.crops)

        def predict_faces(faces: np.ndarray) -> np.ndarray:
            gate.wait(30)
            return recognizer.predict_faces(faces)

        clone.predict_faces = predict_faces
        return clone

    service = Service({c: gated(r) for c, r in recognizers.items()}, limits=LIMITS, max_pending=3)
    image = _encode(np.full((64, 64), 90, np.uint8))

    def post(_):
        return client.post(
            "/v1/predict?crops=1&box=10,10,40,40",
            content=image,
            headers={"Content-Type": "image/png"},
        )

    try:
        with serving(create_app(service)) as client:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(post, k) for k in range(8)]
                deadline = time.monotonic() + 30
                while service.rejected < 5 and time.monotonic() < deadline:
                    time.sleep(0.02)  # three are admitted and wait for the gate
                gate.set()
                responses = [f.result() for f in futures]
            codes = sorted(r.status_code for r in responses)
            assert codes == [200] * 3 + [503] * 5
            busy = next(r for r in responses if r.status_code == 503)
            assert busy.headers["Retry-After"] == "1"
            assert "the server is busy: 3 requests in progress, at most 3" in busy.json()["detail"]
            assert post(0).status_code == 200  # and then it serves again
    finally:
        service.close()


def test_uploads_never_touch_the_disk(client, monkeypatch, tmp_path):
    import starlette.formparsers

    def refuse(*args, **kwargs):
        raise AssertionError("an upload went to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", refuse)
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), np.uint8)
    data = _encode(noise)  # ~1.4 MB: Starlette's form parser would spool it to disk
    assert len(data) > 2**20
    response = client.post("/v1/predict", files={"file": ("noise.png", data, "image/png")})
    assert response.status_code in (200, 422), response.text  # (noise may look like a face)
    assert response.json()["source"] == "noise.png"


# ----------------------------------------------------------------------------- page and docs


def test_the_page_and_its_files_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert "/static/app.js" in links and "/static/style.css" in links
    assert all(link.startswith(("/", "data:")) for link in links), links
    files = {}
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        files[name] = response.text
    assert "url(" not in files["style.css"] and "@import" not in files["style.css"]
    fetched = re.findall(r"fetch\(\s*[`\"']([^`\"']*)", files["app.js"])
    assert fetched and all(url.startswith("/") for url in fetched), fetched
    assert "import " not in files["app.js"]


def test_the_openapi_schema_describes_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/v1/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {
        "image/*",
        "application/octet-stream",
        "multipart/form-data",
    }
    assert {p["name"] for p in predict["parameters"]} == {"crops", "box"}
    assert {"200", "400", "413", "415", "422", "503"} <= set(predict["responses"])
    assert "/healthz" in schema["paths"]


def test_the_api_page_loads_its_scripts_from_the_server_not_a_cdn(client):
    page = client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/docs/static/swagger-ui-bundle.js" in sources and sources
    assert not [s for s in sources if "://" in s or s.startswith("//")], sources
    assert "/openapi.json" in page.text
    for url in [s for s in sources if s.endswith((".js", ".css"))]:
        answer = client.get(url)
        assert answer.status_code == 200 and len(answer.text) > 1000, url
    assert client.get("/docs/static/../app.py").status_code == 404


# ----------------------------------------------------------------------------- the command


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch_size=0"], "--batch_size must be >= 1"),
        (["--port=70000"], "--port must be in 0..65535"),
        (["--max_pixels=-1"], "--max_pixels must be >= 1"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_cli.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_matmul_dtype_flag_reaches_both_recognizers(monkeypatch):
    """`--matmul_dtype` as predict's (default 'auto'), for the ten-crop and centre-crop ones."""
    seen = []
    monkeypatch.setattr(
        Recognizer, "from_checkpoint", lambda *a, **kw: seen.append(kw["matmul_dtype"])
    )
    serve_cli.load_recognizers(serve_cli.parse_args(["--matmul_dtype=float32"]))
    serve_cli.load_recognizers(serve_cli.parse_args([]))
    assert seen == ["float32", "float32", "auto", "auto"]


def test_a_busy_port_is_a_user_error_before_the_model_loads():
    with serve_cli.listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_cli.listen("127.0.0.1", port)


def test_a_checkpoint_that_cannot_be_loaded_is_one_error_line(tmp_path, capsys):
    status = serve_cli.main([f"--checkpoint={tmp_path / 'none'}", "--port=0"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: cannot load the checkpoint"), err
    assert err.count("\n") == 1


def test_the_server_imports_no_tensorflow():
    code = (
        "import sys\nimport fer_jax.serve.__main__, fer_jax.serve.app\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip() == "[]"
