"""An uploaded image, from the bytes of a request to gray pixels, in memory and within limits.

The image is the raw body or the one part of a `multipart/form-data` body, parsed in memory
(Starlette spools large forms to disk; nothing uploaded may reach it). Each refusal is an
`UploadError`: an HTTP status and one message (docs/serve.md). The pixel limit is checked from
the image's header before any pixel is decoded, against decompression bombs.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from fer_jax.inference.recognizer import ImageError, read_image, to_gray

DEFAULT_MAX_BYTES = 10 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000  # a 48-megapixel phone photo is refused; 8K video (33 MP) is not
DEFAULT_READ_SECONDS = 30.0
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
RAW_TYPES = ("image/", "application/octet-stream")  # accepted Content-Types of a raw body
MULTIPART = "multipart/form-data"
HOW_TO_SEND = (
    "send the image as the raw body with Content-Type image/jpeg (image/png, ..., or "
    "application/octet-stream), or as multipart/form-data (curl -F file=@photo.jpg)"
)


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
