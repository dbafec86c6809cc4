"""The FastAPI application: `POST /v1/predict`, `GET /healthz`, the page at `/` (docs/serve.md).

Every error is JSON `{"detail": "one message"}` with a 4xx status (503 when busy, with
`Retry-After`), and the server goes on serving. The page (`static/`) is served from the package
with a Content-Security-Policy that allows this origin only: it loads nothing from elsewhere.
The image is the raw body or the one part of a `multipart/form-data` body, parsed in memory
(Starlette spools large forms to disk; nothing uploaded may reach it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import logging
import os
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from data_pipelines.crops import CROP_CHOICES, NUM_CROPS
from fer_jax.inference.predict import parse_box
from fer_jax.serve.service import MAX_BOXES, Limits, Service, UploadError

STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
    "connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
UPLOAD_NAME = "upload"  # the record's "source" when the upload names no file
RETRY_AFTER_S = "1"
RAW_TYPES = ("image/", "application/octet-stream")  # accepted Content-Types of a raw body
MULTIPART = "multipart/form-data"
HOW_TO_SEND = (
    "send the image as the raw body with Content-Type image/jpeg (image/png, ..., or "
    "application/octet-stream), or as multipart/form-data (curl -F file=@photo.jpg)"
)


CropsQuery = Annotated[
    int,
    Query(
        description="10: average the ten 44x44 crops of each face (the paper's evaluation); "
        "1: the centre crop alone, ~10x faster",
        json_schema_extra={"enum": list(CROP_CHOICES)},
    ),
]
BoxesQuery = Annotated[
    list[str] | None,
    Query(
        description=f"a face box X,Y,W,H in pixels (repeatable, at most {MAX_BOXES}): these "
        "faces instead of detection",
    ),
]


class FaceResult(BaseModel):
    """One face, as in `python -m fer_jax.predict --json`."""

    box: list[int] = Field(description="x, y, w, h in pixels of the (EXIF-rotated) image")
    probabilities: dict[str, float] = Field(description="the seven classes, summing to 1")
    label: str = Field(description="the most probable class")


class Prediction(BaseModel):
    """One image's record, as in `python -m fer_jax.predict --json`."""

    source: str = Field(description="the uploaded file's name, or 'upload'")
    faces: list[FaceResult] = Field(description="largest first, or in the order of the boxes")


class Problem(BaseModel):
    """An error: one message."""

    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": what}
    for status, what in {
        400: "not an image, a truncated image, an empty body, a bad parameter or box",
        408: "the body took too long to arrive",
        413: "the body is over the byte limit, or the image over the pixel limit",
        415: "the Content-Type is not an image or multipart/form-data",
        422: "no face found (the body also has `source` and an empty `faces`)",
        503: "busy: too many requests in progress; retry (Retry-After)",
    }.items()
}
REQUEST_BODY = {
    "required": True,
    "description": "the image (JPEG, PNG, WebP, BMP, GIF, TIFF): the raw body, or the one "
    "part of a form",
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        MULTIPART: {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}


def create_app(service: Service) -> FastAPI:
    """The application around a `Service` (warmed or not: `warm` is the caller's)."""
    app = FastAPI(
        title="fer_jax",
        summary="Facial expression recognition: the seven FER2013 expressions of each face.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    _add_error_handlers(app)
    _add_page(app)
    _add_docs(app)
    _add_api(app, service)
    return app


def _problem(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse({"detail": message, **extra}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def upload_error(request: Request, error: UploadError) -> JSONResponse:
        extra = {"source": error.source, "faces": []} if error.status == 422 else {}
        return _problem(error.status, error.message, **extra)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
        parts = []
        for e in error.errors():
            where = ".".join(str(p) for p in e.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {e.get('msg', 'invalid')} (got {e.get('input')!r})")
        return _problem(400, "; ".join(parts))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logging.getLogger(__name__).error("%s %s failed", request.method, request.url.path)
        return _problem(500, f"internal server error ({type(error).__name__}); see the log")


def _add_files(app: FastAPI, prefix: str, folder: Any, types: dict, headers: Any = None) -> None:
    """Serves the files of `folder` named in `types` (name: media type) at `prefix/{name}`."""
    files = {name: (folder / name).read_bytes() for name in types}

    @app.get(prefix + "/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in files:
            return _problem(404, f"no such file {name!r}")
        return Response(files[name], media_type=types[name], headers=headers)


def _add_page(app: FastAPI) -> None:
    folder = importlib.resources.files("fer_jax.serve") / "static"
    page = (folder / "index.html").read_bytes()
    headers = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    _add_files(app, "/static", folder, STATIC, headers)


# Swagger UI's files, served from the swagger-ui-bundle package (FastAPI's default /docs loads
# them from a CDN): the API page works offline, as the page at / does.
DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def _add_docs(app: FastAPI) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="fer_jax API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
        )

    _add_files(app, "/docs/static", swagger_ui_path, DOCS_FILES)


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def media_type(content_type: str | None) -> str:
    """`'image/jpeg'` of `'Image/JPEG; q=1'`; '' when absent."""
    return (content_type or "").split(";")[0].strip().lower()


def check_content_type(content_type: str | None) -> str:
    """The media type of a request that may carry an image; UploadError 415 otherwise."""
    kind = media_type(content_type)
    if kind != MULTIPART and not kind.startswith(RAW_TYPES):
        raise UploadError(415, f"Content-Type {kind or '(none)'} is not an image: {HOW_TO_SEND}")
    return kind


def image_bytes(body: bytes, content_type: str | None) -> tuple[bytes, str | None]:
    """The image's bytes in a request body and the file name it was sent under (None if none);
    UploadError 415 for a type that is not an image or a form, 400 for an empty or bad body."""
    if check_content_type(content_type) == MULTIPART:
        data, filename = multipart_file(body, content_type or "")
    else:
        data, filename = body, None
    if not data:
        raise UploadError(400, f"the request has no image (an empty body): {HOW_TO_SEND}")
    return data, filename


def multipart_file(body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """The one part of a `multipart/form-data` body: `(its bytes, its file name)`."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "the multipart/form-data Content-Type has no boundary")
    parts: list[dict] = []
    field, value = bytearray(), bytearray()

    def begin() -> None:
        parts.append({"headers": {}, "data": []})

    def header_end() -> None:
        parts[-1]["headers"][bytes(field).decode("latin-1").lower()] = bytes(value)
        field.clear()
        value.clear()

    callbacks = {
        "on_part_begin": begin,
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1]["data"].append(data[start:end]),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise UploadError(400, f"the multipart/form-data body is malformed: {e}") from None
    if len(parts) != 1:
        raise UploadError(
            400,
            f"the form has {len(parts)} parts; send exactly one, the image (crops and face "
            "boxes go in the query: ?crops=1&box=X,Y,W,H)",
        )
    headers = parts[0]["headers"]
    _, disposition = parse_options_header(headers.get("content-disposition", b""))
    filename = disposition.get(b"filename")
    part_type = media_type(headers.get("content-type", b"").decode("latin-1"))
    if part_type and not part_type.startswith(RAW_TYPES):
        raise UploadError(415, f"the uploaded file is {part_type}, not an image")
    data = b"".join(parts[0]["data"])
    return data, None if filename is None else os.path.basename(filename.decode("utf-8", "replace"))


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request's body, in memory; UploadError 413 as soon as it passes `limits.max_bytes`,
    408 if it is not all there after `limits.read_seconds`."""
    too_big = f"the body is over the limit of {megabytes(limits.max_bytes)}: send a smaller image"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_bytes:
        raise UploadError(413, f"{too_big} (Content-Length {megabytes(int(length))})")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_bytes:
                raise UploadError(413, too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), limits.read_seconds)
    except asyncio.TimeoutError:
        raise UploadError(
            408, f"the upload took longer than {limits.read_seconds:g} s: send it again"
        ) from None


def parse_boxes(texts: list[str] | None) -> list[list[int]] | None:
    """`['X,Y,W,H', ...]` query values -> boxes (as `predict --box`); None: detect the faces."""
    if not texts:
        return None
    try:
        return [parse_box(text) for text in texts]
    except argparse.ArgumentTypeError as e:
        raise UploadError(400, f"box: {e}") from None


def _add_api(app: FastAPI, service: Service) -> None:
    crops_served = sorted(service.recognizers, reverse=True)

    @app.get("/healthz", summary="Ready: the model is loaded, compiled and warmed")
    async def healthz() -> dict[str, Any]:
        """The model, the limits, the requests in progress and what the batcher has done."""
        return service.health()

    @app.post(
        "/v1/predict",
        summary="The faces of one image: box, label, the seven probabilities",
        response_model=Prediction,
        responses=ERRORS,
        openapi_extra={"requestBody": REQUEST_BODY},
    )
    async def predict(
        request: Request, crops: CropsQuery = NUM_CROPS, box: BoxesQuery = None
    ) -> JSONResponse:
        """The same record as `python -m fer_jax.predict --json` prints for one image."""
        if crops not in service.recognizers:
            raise UploadError(400, f"crops must be one of {crops_served}, got {crops}")
        boxes = parse_boxes(box)
        content_type = request.headers.get("content-type")
        check_content_type(content_type)  # before reading a body that is not an image
        with service.admit():
            body = await read_body(request, service.limits)
            data, filename = image_bytes(body, content_type)
            record = await service.predict(
                data, crops=crops, boxes=boxes, name=filename or UPLOAD_NAME
            )
        return JSONResponse(record)
