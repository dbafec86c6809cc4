"""The recogniser behind the API: admission, decoding and detection threads, one batching worker.

`Service.admit` holds one of `max_pending` places (one more request is answered 503);
`Service.find` decodes and crops on a thread pool (detection one image at a time: the shared
Haar cascade is not thread-safe); a `Batcher` thread classifies the crops of every request
waiting with the same crop count as one batch. In full: docs/serve.md, Concurrency. The answer
is predict's `--json` record (`fer_jax.inference.predict.record`). Each refusal is an
`UploadError`: an HTTP status and one message (docs/serve.md); `decode` checks the pixel limit
from the image's header before any pixel is decoded, against decompression bombs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import io
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fer_jax.inference.predict import record
from fer_jax.inference.recognizer import (
    FACE_SIZE,
    ImageError,
    Recognizer,
    find_faces,
    label_faces,
    read_image,
    to_gray,
)

DEFAULT_MAX_PENDING = 32
MAX_BOXES = 64  # caller-given boxes per request
DEFAULT_MAX_BYTES = 10 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000  # a 48-megapixel phone photo is refused; 8K video (33 MP) is not
DEFAULT_READ_SECONDS = 30.0
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


class UploadError(Exception):
    """A request that cannot be served as sent: an HTTP status and one message for the client
    (and, for an image without a face, the image's name: `source`)."""

    def __init__(self, status: int, message: str, source: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.source = source


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may send: `max_bytes` of body within `read_seconds` (a slow upload
    holds one of the server's places), `max_pixels` of decoded image."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_seconds: float = DEFAULT_READ_SECONDS


def decode(data: bytes, limits: Limits, name: str) -> np.ndarray:
    """`(H, W)` uint8 gray pixels of an encoded image (EXIF orientation applied), in memory;
    UploadError 400 not an image, truncated or unusable, 413 over `limits.max_pixels`."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UploadError(
            400, f"{name}: not an image, or not one of {', '.join(IMAGE_FORMATS)}"
        ) from None
    except Image.DecompressionBombError as e:  # over Pillow's own, higher, limit
        raise UploadError(413, f"{name}: the image is refused unread: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadError(400, f"{name}: cannot read the image: {e}") from None
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise UploadError(
                413,
                f"{name}: the image is {width}x{height} = {width * height:,} pixels; the limit is "
                f"{limits.max_pixels:,} (a guard against decompression bombs): send it smaller",
            )
        try:
            image.load()
            return to_gray(read_image(image))
        except ImageError as e:  # pixels of a kind the recogniser does not take
            raise UploadError(400, f"{name}: cannot use the image: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise UploadError(400, f"{name}: the image is truncated or corrupt: {e}") from None


@dataclasses.dataclass
class BatchStats:
    """What the batching worker has done: model calls, requests and faces through it."""

    batches: int = 0
    requests: int = 0
    faces: int = 0
    largest_batch: int = 0  # requests in the largest batch
    model_seconds: float = 0.0


class Batcher:
    """One thread runs `predictors[key](faces)` on the requests with the same key waiting for
    it, as one batch of at most `max_faces` faces (a larger request goes alone). `submit` is
    thread-safe; its future has the request's rows, or the error of a failing batch."""

    def __init__(
        self, predictors: Mapping[Any, Callable[[np.ndarray], np.ndarray]], max_faces: int
    ):
        self._predictors = dict(predictors)
        self.max_faces = max_faces
        self.stats = BatchStats()
        self._queue: deque = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fer_jax-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Any, faces: np.ndarray) -> concurrent.futures.Future:
        """Queues `faces` (a leading batch axis) for `predictors[key]`."""
        if key not in self._predictors:
            raise ValueError(f"no predictor {key!r}; there are {sorted(self._predictors)}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((key, faces, future))
            self._ready.notify()
        return future

    def close(self) -> None:
        """Stops the thread after the batch it is running; requests still queued are cancelled."""
        with self._ready:
            self._closed = True
            for _, _, future in self._queue:
                future.cancel()
            self._queue.clear()
            self._ready.notify_all()
        self._thread.join()

    def _take(self) -> tuple[Any, list[tuple[np.ndarray, concurrent.futures.Future]]] | None:
        """The next batch: the oldest request and the waiting ones with its key that fit."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            key, faces, future = self._queue.popleft()
            batch, total, others = [(faces, future)], len(faces), deque()
            while self._queue:
                item = self._queue.popleft()
                if item[0] == key and total + len(item[1]) <= self.max_faces:
                    batch.append(item[1:])
                    total += len(item[1])
                else:
                    others.append(item)
            self._queue.extend(others)
        return key, batch

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            key, batch = taken
            batch = [(f, future) for f, future in batch if future.set_running_or_notify_cancel()]
            if batch:
                self._predict(key, batch)

    def _predict(self, key: Any, batch: list[tuple[np.ndarray, concurrent.futures.Future]]):
        start = time.perf_counter()
        try:
            outputs = self._predictors[key](np.concatenate([faces for faces, _ in batch]))
        except Exception as e:  # noqa: BLE001 - the batch's requests get it, the thread goes on
            for _, future in batch:
                future.set_exception(e)
            return
        stats = self.stats
        stats.model_seconds += time.perf_counter() - start
        stats.batches += 1
        stats.requests += len(batch)
        stats.faces += len(outputs)
        stats.largest_batch = max(stats.largest_batch, len(batch))
        ends = np.cumsum([len(faces) for faces, _ in batch])[:-1]
        for (_, future), rows in zip(batch, np.split(outputs, ends), strict=True):
            future.set_result(rows)


class Service:
    """Recognises the faces of uploaded images for many concurrent requests (module docstring)
    with `recognizers` `{crops: Recognizer}` (one model, sharing `batch_size` and `class_names`);
    `workers`: decoding threads (default: the CPUs); `model_name`: what `health` reports."""

    def __init__(
        self,
        recognizers: Mapping[int, Recognizer],
        *,
        limits: Limits = Limits(),  # noqa: B008 - frozen
        max_pending: int = DEFAULT_MAX_PENDING,
        workers: int | None = None,
        model_name: str = "",
    ):
        if not recognizers:
            raise ValueError("no recognizer to serve")
        first = next(iter(recognizers.values()))
        if any(r.batch_size != first.batch_size for r in recognizers.values()):
            raise ValueError("the recognizers must share one batch_size")
        self.recognizers, self.limits, self.model_name = dict(recognizers), limits, model_name
        self.class_names, self.batch_size = first.class_names, first.batch_size
        self.max_pending, self.rejected, self._pending = max_pending, 0, 0
        self.warm_seconds: float | None = None
        self.batcher = Batcher(
            {crops: r.predict_faces for crops, r in self.recognizers.items()}, self.batch_size
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 2, thread_name_prefix="fer_jax-decode"
        )
        self._lock = threading.Lock()
        self._detecting = threading.Lock()  # one detectMultiScale at a time (module docstring)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one of the `max_pending` places for a request; UploadError 503 when full."""
        with self._lock:
            if self._pending >= self.max_pending:
                self.rejected += 1
                raise UploadError(
                    503,
                    f"the server is busy: {self._pending} requests in progress, at most "
                    f"{self.max_pending}; retry in a moment",
                )
            self._pending += 1
        try:
            yield
        finally:
            with self._lock:
                self._pending -= 1

    def warm(self) -> float:
        """Compiles and runs every program a request can need (each recogniser's batch-size
        buckets, the face detector); returns the seconds it took."""
        start = time.perf_counter()
        for recognizer in self.recognizers.values():
            sizes = {recognizer.bucket(n) for n in range(1, recognizer.batch_size + 1)}
            for size in sorted(sizes):
                recognizer.predict_faces(np.zeros((size, FACE_SIZE, FACE_SIZE), np.uint8))
        find_faces(np.full((64, 64), 128, np.uint8))  # loads the Haar cascade
        self.warm_seconds = time.perf_counter() - start
        return self.warm_seconds

    def find(
        self, data: bytes, crops: int, boxes: list[list[int]] | None, name: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(boxes (N, 4), 48x48 crops (N, 48, 48))` of the faces of an encoded image."""
        if boxes is not None and len(boxes) > MAX_BOXES:
            raise UploadError(400, f"{len(boxes)} face boxes; at most {MAX_BOXES} per request")
        gray = decode(data, self.limits, name)
        recognizer = self.recognizers[crops]
        try:
            with self._detecting:
                found = recognizer.locate(gray, boxes, name)
        except ImageError as e:
            raise UploadError(400, str(e)) from None
        return found, recognizer.crop_faces(gray, found)

    async def predict(
        self, data: bytes, *, crops: int, boxes: list[list[int]] | None, name: str
    ) -> dict[str, Any]:
        """The `predict --json` record of the image `data` (`{'source', 'faces'}`).

        Raises:
          UploadError: a bad image or box (4xx), or 422 when no face is found.
        """
        loop = asyncio.get_running_loop()
        found, faces = await loop.run_in_executor(self._pool, self.find, data, crops, boxes, name)
        if not len(found):
            raise UploadError(
                422,
                f"{name}: no face found (faces are found frontal and at least "
                f"{self.recognizers[crops].min_face} pixels wide; or give boxes: box=X,Y,W,H)",
                source=name,
            )
        probabilities = await asyncio.wrap_future(self.batcher.submit(crops, faces))
        return record(name, label_faces(found, probabilities, self.class_names), self.class_names)

    def health(self) -> dict[str, Any]:
        """The service's state: model, limits, load, and what the batcher has done."""
        return {
            "status": "ok",
            "model": self.model_name,
            "class_names": list(self.class_names),
            "crops": sorted(self.recognizers),
            "batch_size": self.batch_size,
            "warm_seconds": None if self.warm_seconds is None else round(self.warm_seconds, 2),
            "limits": {**dataclasses.asdict(self.limits), "max_pending": self.max_pending},
            "pending": self._pending,
            "rejected": self.rejected,
            "batches": dataclasses.asdict(self.batcher.stats),
        }

    def close(self) -> None:
        """Stops the threads (requests in progress are answered first)."""
        self._pool.shutdown(wait=True)
        self.batcher.close()
