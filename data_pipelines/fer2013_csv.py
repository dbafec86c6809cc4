"""Reading and validating FER2013 in any of its distributed layouts (numpy only, no TensorFlow).

Accepted files, looked for in this order in a directory (`find_source`): `SOURCE_FILES`, as
`MANUAL_DOWNLOAD_INSTRUCTIONS` describes them (a `.tar.gz` is streamed, never unpacked).

Columns are found by name (surrounding spaces ignored), so their order does not matter and extra
columns are ignored. Files as spreadsheet programs re-save them are accepted too: a UTF-8
byte-order mark, CRLF line ends, quoted fields, spaces around names and values. `emotion`
is an integer 0-6 (order of `labels.CLASS_NAMES`), `pixels` 2,304 space-separated integers 0-255
(48x48, row-major), `Usage` one of Training, PublicTest, PrivateTest. Any violation raises
`DataError` naming the file, the line and the problem.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import pathlib
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator

import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.labels import NUM_CLASSES

IMAGE_SIZE = 48
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
SOURCE_FILES: tuple[str, ...] = (
    "fer2013.csv",
    "fer2013/fer2013.csv",
    "fer2013.tar.gz",
    "icml_face_data.csv",
)
ARCHIVE_MEMBER = "fer2013/fer2013.csv"
# CSV `Usage` value -> split name.
USAGE_SPLITS: dict[str, str] = {
    "Training": "train",
    "PublicTest": "public_test",
    "PrivateTest": "private_test",
}
_USAGES = tuple(USAGE_SPLITS)
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
FER2013 cannot be downloaded automatically. Get it from Kaggle's "Challenges in Representation
Learning: Facial Expression Recognition Challenge"
(https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge/data)
and put ONE of these files directly in the manual directory (`--config.manual_dir`; for
`tfds build`, `--manual_dir`, default <data_dir>/downloads/manual/):
  fer2013.tar.gz          the original archive (holds fer2013/fer2013.csv; read in place)
  fer2013.csv             the original CSV (columns emotion,pixels,Usage), or
  fer2013/fer2013.csv     the same, from unpacking fer2013.tar.gz there
  icml_face_data.csv      the later CSV (columns emotion, Usage, pixels)
"""
_REQUIRED_COLUMNS = ("emotion", "pixels", "Usage")
_PIXEL_CHARS = re.compile(r"[0-9 ]*")
_INTEGER = re.compile(r"[0-9]+")
_BOM = "\ufeff"


@dataclasses.dataclass(frozen=True)
class Fer2013Rows:
    """All rows of a FER2013 file, in file order."""

    images: np.ndarray  # (N, 48, 48) uint8
    labels: np.ndarray  # (N,) int64 in [0, 7)
    splits: np.ndarray  # (N,) str, the split of each row (`USAGE_SPLITS` values)
    source: str  # the file the rows came from (`archive:member` for a tar.gz)


def find_source(directory: str | pathlib.Path) -> pathlib.Path:
    """Returns the first of `SOURCE_FILES` present in `directory`; FileNotFoundError if none."""
    directory = pathlib.Path(directory)
    for name in SOURCE_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"No FER2013 file in {directory}: expected one of "
        + ", ".join(str(directory / n) for n in SOURCE_FILES)
    )


@contextlib.contextmanager
def open_text(path: pathlib.Path) -> Iterator[tuple[Iterable[str], str]]:
    """`(the text lines, their name in errors)` of a FER2013 `.csv`, or of the CSV inside its
    `.tar.gz` (streamed)."""
    if not path.name.endswith((".tar.gz", ".tgz")):
        with open(path, encoding="utf-8", newline="") as f:
            yield f, str(path)
        return
    with tarfile.open(path, mode="r:gz") as tar:
        member = next(
            (m for m in tar if m.isfile() and m.name.lstrip("./") == ARCHIVE_MEMBER), None
        )
        if member is None:
            raise DataError(f"{path}: the archive holds no {ARCHIVE_MEMBER}")
        with io.TextIOWrapper(tar.extractfile(member), encoding="utf-8", newline="") as text:
            yield text, f"{path}:{ARCHIVE_MEMBER}"


def read_fer2013(path: str | pathlib.Path) -> Fer2013Rows:
    """Reads and validates a FER2013 `.csv` or `.tar.gz` (layouts in the module docstring)."""
    path = pathlib.Path(path)
    archive = path.name.endswith((".tar.gz", ".tgz"))
    try:
        with open_text(path) as (text, source):
            return parse_csv(text, source=source)
    except (UnicodeDecodeError, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if archive:
            why = f"{type(e).__name__}: {e}"
            raise DataError(f"{path}: unreadable or truncated archive ({why})") from e
        if isinstance(e, UnicodeDecodeError):
            raise DataError(f"{path}: not a UTF-8 text file ({e})") from e
        raise


def count_rows(path: pathlib.Path) -> dict[str, int] | None:
    """Rows per split of a FER2013 file from its `Usage` column alone (no pixel is parsed; a
    malformed file is reported when it is read); None if it cannot be counted so."""
    counts = dict.fromkeys(USAGE_SPLITS.values(), 0)
    try:
        with open_text(path) as (text, _):
            lines = iter(text)
            header = next(csv.reader([next(lines).removeprefix(_BOM)], skipinitialspace=True))
            names = [h.strip() for h in header]
            col = names.index("Usage")
            last = col == len(names) - 1
            for line in lines:
                field = line.rsplit(",", 1)[-1] if last else line.split(",", col + 1)[col]
                split = USAGE_SPLITS.get(field.strip().strip('"').strip())
                if split is not None:
                    counts[split] += 1
    except (OSError, ValueError, IndexError, StopIteration, tarfile.TarError, EOFError, zlib.error):
        return None
    return counts


def parse_csv(lines: Iterable[str], *, source: str) -> Fer2013Rows:
    """Parses FER2013 CSV text (header line first); `source` names the file in errors.

    A byte-order mark before the header is dropped; quotes and spaces after commas are read as
    the csv module does (`skipinitialspace`), other spaces around fields are stripped.
    """
    rest = iter(lines)
    first = next(rest, None)
    if first is None:
        expected = ",".join(_REQUIRED_COLUMNS)
        raise DataError(f"{source}, line 1: empty file, expected the header {expected}")
    reader = csv.reader(itertools.chain([first.removeprefix(_BOM)], rest), skipinitialspace=True)
    header = next(reader)
    names = [h.strip() for h in header]
    missing = [c for c in _REQUIRED_COLUMNS if c not in names]
    if missing:
        shown = [h if len(h) <= 40 else h[:37] + "..." for h in header]  # Not a whole data row.
        raise DataError(
            f"{source}, line 1: missing column(s) {', '.join(missing)}; header is {shown!r}, "
            f"expected the columns {', '.join(_REQUIRED_COLUMNS)}"
        )
    col_label, col_pixels, col_usage = (names.index(c) for c in _REQUIRED_COLUMNS)

    images, labels, splits = [], [], []
    start = reader.line_num + 1  # The line the next row starts on.
    for row in reader:
        where = f"{source}, line {start}"
        if reader.line_num > start:  # A quote left open swallows the lines up to the next one.
            where += f" (a quoted field runs on to line {reader.line_num})"
        start = reader.line_num + 1
        if not any(field.strip() for field in row):  # A blank line, or only commas.
            continue
        if len(row) != len(names):
            raise DataError(f"{where}: expected {len(names)} fields, found {len(row)}")
        labels.append(_parse_label(row[col_label], where))
        images.append(_parse_pixels(row[col_pixels], where))
        usage = row[col_usage].strip()
        if usage not in USAGE_SPLITS:
            raise DataError(
                f"{where}: unknown Usage {usage!r}, expected one of {', '.join(_USAGES)}"
            )
        splits.append(USAGE_SPLITS[usage])
    if not images:
        raise DataError(f"{source}: no data rows after the header")
    return Fer2013Rows(
        images=np.stack(images).reshape(-1, IMAGE_SIZE, IMAGE_SIZE),
        labels=np.asarray(labels, dtype=np.int64),
        splits=np.asarray(splits),
        source=source,
    )


def _parse_label(field: str, where: str) -> int:
    field = field.strip()
    if not _INTEGER.fullmatch(field):
        raise DataError(f"{where}: emotion {field!r} is not an integer")
    label = int(field)
    if label >= NUM_CLASSES:
        raise DataError(f"{where}: emotion {label} outside 0-{NUM_CLASSES - 1}")
    return label


def _parse_pixels(field: str, where: str) -> np.ndarray:
    """Returns (2304,) uint8; fast path by regex + np.fromstring, exact diagnosis on failure."""
    if _PIXEL_CHARS.fullmatch(field):
        values = np.fromstring(field, dtype=np.int64, sep=" ")  # Saturates on overflow.
        if values.size == NUM_PIXELS and values.max() <= 255:
            return values.astype(np.uint8)
    tokens = field.split()
    for i, token in enumerate(tokens):
        if not _INTEGER.fullmatch(token):
            raise DataError(f"{where}: pixel {i} is {token!r}, not an integer")
        if int(token) > 255:
            raise DataError(f"{where}: pixel {i} is {int(token)}, outside 0-255")
    if len(tokens) != NUM_PIXELS:
        raise DataError(f"{where}: {len(tokens)} pixels, expected {NUM_PIXELS} (48x48)")
    return np.asarray([int(t) for t in tokens], dtype=np.uint8)  # Other whitespace than ' '.
