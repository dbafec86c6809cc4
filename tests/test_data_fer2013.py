"""FER2013: parsing every layout, bad input, the TFDS builder and the files source (synthetic)."""

from __future__ import annotations

import gzip
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_pipelines
from data_pipelines import fer2013_csv, files, loading, synthetic
from data_pipelines.errors import DataError

ROWS = synthetic.fer2013_rows((12, 5, 4), seed=1)
SPLIT_OF_USAGE = {"Training": "train", "PublicTest": "public_test", "PrivateTest": "private_test"}


def _text(rows=ROWS, icml=False) -> str:
    return synthetic.fer2013_csv_text(rows["images"], rows["labels"], rows["usages"], icml=icml)


def _check_rows(parsed: fer2013_csv.Fer2013Rows) -> None:
    np.testing.assert_array_equal(parsed.images, ROWS["images"])
    np.testing.assert_array_equal(parsed.labels, ROWS["labels"])
    np.testing.assert_array_equal(parsed.splits, [SPLIT_OF_USAGE[u] for u in ROWS["usages"]])


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_every_layout_parses_to_the_same_rows(tmp_path, layout):
    path = synthetic.write_fer2013(tmp_path, _text(icml=layout == "icml"), layout)
    assert fer2013_csv.find_source(tmp_path) == path
    _check_rows(fer2013_csv.read_fer2013(path))


def test_icml_header_has_leading_spaces_and_other_column_order():
    header, first = _text(icml=True).splitlines()[:2]
    assert header == "emotion, Usage, pixels"
    assert first.split(",")[1] in synthetic.USAGES


def test_find_source_prefers_the_original_csv(tmp_path):
    synthetic.write_fer2013(tmp_path, _text(icml=True), "icml")
    synthetic.write_fer2013(tmp_path, _text(), "tar.gz")
    assert fer2013_csv.find_source(tmp_path).name == "fer2013.tar.gz"
    synthetic.write_fer2013(tmp_path, _text(), "csv")
    assert fer2013_csv.find_source(tmp_path).name == "fer2013.csv"


def test_find_source_names_the_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="fer2013.csv.*fer2013.tar.gz.*icml_face_data.csv"):
        fer2013_csv.find_source(tmp_path)


def _replace_line(text: str, line: int, fn) -> str:
    lines = text.splitlines()
    lines[line - 1] = fn(lines[line - 1])
    return "\n".join(lines) + "\n"


def _set_pixel(i: int, value: str):
    def fn(line: str) -> str:
        label, pixels, usage = line.split(",")
        tokens = pixels.split(" ")
        tokens[i] = value
        return ",".join([label, " ".join(tokens), usage])

    return fn


BAD_ROWS = {
    "short": (
        lambda line: line.rsplit(" ", 1)[0] + "," + line.rsplit(",", 1)[1],
        r"line 4: 2303 pixels, expected 2304",
    ),
    "float_pixel": (_set_pixel(17, "12.5"), r"line 4: pixel 17 is '12.5', not an integer"),
    "word_pixel": (_set_pixel(0, "abc"), r"line 4: pixel 0 is 'abc', not an integer"),
    "negative_pixel": (_set_pixel(5, "-1"), r"line 4: pixel 5 is '-1', not an integer"),
    "big_pixel": (_set_pixel(2303, "256"), r"line 4: pixel 2303 is 256, outside 0-255"),
    "huge_pixel": (_set_pixel(9, "9" * 30), r"line 4: pixel 9 is 9{30}, outside 0-255"),
    "label_7": (lambda line: "7" + line[1:], r"line 4: emotion 7 outside 0-6"),
    "label_word": (lambda line: "x" + line[1:], r"line 4: emotion 'x' is not an integer"),
    "usage": (
        lambda line: line.rsplit(",", 1)[0] + ",Validation",
        r"line 4: unknown Usage 'Validation'",
    ),
    "fields": (lambda line: line + ",extra", r"line 4: expected 3 fields, found 4"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_is_an_error_naming_file_line_and_problem(tmp_path, kind):
    fn, message = BAD_ROWS[kind]
    path = synthetic.write_fer2013(tmp_path, _replace_line(_text(), 4, fn), "csv")
    with pytest.raises(DataError, match=f"{path}, {message}"):
        fer2013_csv.read_fer2013(path)


def test_bad_row_inside_the_archive_names_archive_and_member(tmp_path):
    text = _replace_line(_text(), 3, _set_pixel(1, "300"))
    path = synthetic.write_fer2013(tmp_path, text, "tar.gz")
    with pytest.raises(DataError, match=rf"{path}:fer2013/fer2013.csv, line 3: pixel 1 is 300"):
        fer2013_csv.read_fer2013(path)


def test_bad_row_in_icml_layout(tmp_path):
    text = _replace_line(_text(icml=True), 2, lambda line: "9" + line[1:])
    path = synthetic.write_fer2013(tmp_path, text, "icml")
    with pytest.raises(DataError, match=rf"{path}, line 2: emotion 9 outside 0-6"):
        fer2013_csv.read_fer2013(path)


def test_missing_column_is_an_error(tmp_path):
    text = _text().replace("emotion,pixels,Usage", "emotion,pixels,usage", 1)
    path = synthetic.write_fer2013(tmp_path, text, "csv")
    with pytest.raises(DataError, match=rf"{path}, line 1: missing column\(s\) Usage"):
        fer2013_csv.read_fer2013(path)


def test_empty_file_is_an_error(tmp_path):
    path = synthetic.write_fer2013(tmp_path, "", "csv")
    with pytest.raises(DataError, match=rf"{path}, line 1: empty file"):
        fer2013_csv.read_fer2013(path)


def test_truncated_archive_is_an_error(tmp_path):
    path = synthetic.write_fer2013(tmp_path, _text(), "tar.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"{path}: unreadable or truncated archive"):
        fer2013_csv.read_fer2013(path)


def test_archive_without_the_csv_is_an_error(tmp_path):
    path = tmp_path / "fer2013.tar.gz"
    path.write_bytes(gzip.compress(b"\0" * 1024))  # An empty tar stream.
    with pytest.raises(DataError, match=rf"{path}: the archive holds no fer2013/fer2013.csv"):
        fer2013_csv.read_fer2013(path)


# --- Files as people have them (re-saved by a spreadsheet program, hand-edited). -------------


def _fields(text: str) -> list[list[str]]:
    """The plain synthetic text as fields per line (it has no quotes, so split on commas)."""
    return [line.split(",") for line in text.splitlines()]


def _join(rows: list[list[str]], newline: str = "\n") -> str:
    return newline.join(",".join(row) for row in rows) + newline


def _bom(rows: list[list[str]]) -> str:
    return "\ufeff" + _join(rows, "\r\n")


def _quoted(rows: list[list[str]]) -> str:
    return _join([[f'"{f.strip()}"' for f in row] for row in rows])


def _pixels_quoted(rows: list[list[str]]) -> str:
    col = [f.strip() for f in rows[0]].index("pixels")
    return _join([[f'"{f}"' if i == col else f for i, f in enumerate(row)] for row in rows])


def _trailing_spaces(rows: list[list[str]]) -> str:
    return _join([[f + "  " for f in row] for row in rows])


def _extra_columns(rows: list[list[str]]) -> str:
    extra = [["id", *rows[0], "note"]] + [[str(i), *row, '"a, b"'] for i, row in enumerate(rows)]
    return _join(extra[:1] + extra[2:])


def _reordered(rows: list[list[str]]) -> str:
    names = [f.strip() for f in rows[0]]
    order = [names.index(c) for c in ("pixels", "Usage", "emotion")]
    return _join([[row[i] for i in order] for row in rows])


def _blank_rows(rows: list[list[str]]) -> str:
    return _join(rows[:3] + [[""], ["", "", ""], [" ", " ", " "]] + rows[3:] + [["", "", ""]])


def _spreadsheet(rows: list[list[str]]) -> str:
    """Everything at once: BOM, CRLF, all quoted, spaces, an extra column, another order."""
    names = [f.strip() for f in rows[0]]
    order = [names.index(c) for c in ("Usage", "emotion", "pixels")]
    out = [[f' "{row[i].strip()} "' for i in order] + [' "x"'] for row in rows]
    return "\ufeff" + _join(out, "\r\n")


VARIANTS = {
    "bom_crlf": _bom,
    "quoted": _quoted,
    "pixels_quoted": _pixels_quoted,
    "trailing_spaces": _trailing_spaces,
    "extra_columns": _extra_columns,
    "reordered": _reordered,
    "blank_rows": _blank_rows,
    "spreadsheet": _spreadsheet,
}


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_gives_exactly_the_rows_of_the_plain_file(tmp_path, variant, layout):
    text = VARIANTS[variant](_fields(_text(icml=layout == "icml")))
    path = synthetic.write_fer2013(tmp_path, text, layout)
    assert fer2013_csv.find_source(tmp_path) == path
    plain = fer2013_csv.read_fer2013(synthetic.write_fer2013(tmp_path / "plain", _text(), "csv"))
    parsed = fer2013_csv.read_fer2013(path)
    for got, expected in ((parsed.images, plain.images), (parsed.labels, plain.labels)):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(parsed.splits, plain.splits)
    _check_rows(parsed)


def test_bom_and_crlf_reach_the_file_as_bytes(tmp_path):
    path = synthetic.write_fer2013(tmp_path, _bom(_fields(_text())), "csv")
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbfemotion,pixels,Usage\r\n") and data.endswith(b"\r\n")


BAD_VARIANT_ROWS = {  # kind: (change to line 4's fields, text added to line 4, message).
    "short": (lambda row: [row[0], row[1].rsplit(" ", 1)[0], row[2]], "", "2303 pixels"),
    "label_word": (lambda row: ["x", *row[1:]], "", "emotion 'x' is not an integer"),
    "fields": (lambda row: row, ',"extra"', r"expected (\d) fields, found (?!\1)\d"),
}


@pytest.mark.parametrize("variant", ["bom_crlf", "quoted", "pixels_quoted", "spreadsheet"])
@pytest.mark.parametrize("kind", sorted(BAD_VARIANT_ROWS))
def test_bad_row_in_a_variant_names_file_and_line(tmp_path, variant, kind):
    fn, suffix, message = BAD_VARIANT_ROWS[kind]
    rows = _fields(_text())
    rows[3] = fn(rows[3])
    lines = VARIANTS[variant](rows).split("\n")
    lines[3] = lines[3].removesuffix("\r") + suffix + ("\r" if lines[3].endswith("\r") else "")
    path = synthetic.write_fer2013(tmp_path, "\n".join(lines), "csv")
    with pytest.raises(DataError, match=f"^{path}, line 4: {message}"):
        fer2013_csv.read_fer2013(path)


def test_bad_row_in_a_quoted_archive_names_archive_member_and_line(tmp_path):
    rows = _fields(_text())
    rows[6][1] = rows[6][1].replace(" ", " 1.5 ", 1)
    path = synthetic.write_fer2013(tmp_path, _spreadsheet(rows), "tar.gz")
    with pytest.raises(DataError, match=rf"{path}:fer2013/fer2013.csv, line 7: pixel 1 is '1.5'"):
        fer2013_csv.read_fer2013(path)


def test_unclosed_quote_names_the_line_it_starts_on_and_where_it_runs_to(tmp_path):
    lines = _quoted(_fields(_text())).splitlines()
    lines[4] = lines[4][:-1]  # Line 5 loses its closing quote: line 6's first quote closes it.
    path = synthetic.write_fer2013(tmp_path, "\n".join(lines) + "\n", "csv")
    message = r"line 5 \(a quoted field runs on to line 6\): expected 3 fields, found 5"
    with pytest.raises(DataError, match=rf"^{path}, {message}$"):
        fer2013_csv.read_fer2013(path)


def test_missing_column_in_a_bom_file_is_named(tmp_path):
    text = _bom([row[:2] for row in _fields(_text())])
    path = synthetic.write_fer2013(tmp_path, text, "csv")
    with pytest.raises(
        DataError, match=rf"{path}, line 1: missing column\(s\) Usage; header is \['emotion', "
    ):
        fer2013_csv.read_fer2013(path)


def test_parse_csv_drops_a_bom_from_lines_given_directly():
    lines = ("\ufeff" + _text()).splitlines(keepends=True)
    _check_rows(fer2013_csv.parse_csv(lines, source="given"))


# --- The TFDS builder. -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> pathlib.Path:
    """A data_dir with fer2013 built from the synthetic tar.gz."""
    manual = tmp_path_factory.mktemp("manual")
    synthetic.write_fer2013(manual, _text(), "tar.gz")
    data_dir = tmp_path_factory.mktemp("tfds")
    data_pipelines.build("fer2013", data_dir=data_dir, manual_dir=manual)
    return data_dir


def test_builder_is_registered_with_the_conventions():
    builder_cls = tfds.builder_cls("fer2013")
    assert builder_cls is loading.Fer2013
    assert str(builder_cls.VERSION) == "1.0.0"
    assert "fer2013.tar.gz" in builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_built_splits_features_and_order(built):
    builder = tfds.builder("fer2013", data_dir=built)
    info = builder.info
    assert info.features["label"].names == list(data_pipelines.CLASS_NAMES)
    assert info.features["image"].shape == (48, 48, 1)
    assert {s: info.splits[s].num_examples for s in info.splits} == {
        "train": 12,
        "public_test": 5,
        "private_test": 4,
    }
    for usage, split in SPLIT_OF_USAGE.items():
        arrays = data_pipelines.load_split("fer2013", split, built)
        rows = np.flatnonzero(ROWS["usages"] == usage)
        np.testing.assert_array_equal(arrays["index"], rows)  # CSV order, original row index.
        np.testing.assert_array_equal(arrays["image"][..., 0], ROWS["images"][rows])
        np.testing.assert_array_equal(arrays["label"], ROWS["labels"][rows])
        assert arrays["image"].dtype == np.uint8


def test_tfds_load_reads_the_built_dataset(built):
    ds = tfds.load("fer2013", split="public_test", data_dir=built, download=False)
    images = np.stack([ex["image"] for ex in tfds.as_numpy(ds)])
    assert images.shape == (5, 48, 48, 1)


def _assert_same_arrays(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_files_source_gives_the_arrays_of_the_built_dataset(tmp_path, layout):
    manual = tmp_path / "manual"
    synthetic.write_fer2013(manual, _text(icml=layout == "icml"), layout)
    data_pipelines.build("fer2013", data_dir=tmp_path / "tfds", manual_dir=manual)
    for usage, split in SPLIT_OF_USAGE.items():
        built = data_pipelines.load_split("fer2013", split, tmp_path / "tfds")
        _assert_same_arrays(files.load_split_from_files("fer2013", split, manual), built)
        rows = np.flatnonzero(ROWS["usages"] == usage)
        np.testing.assert_array_equal(built["index"], rows)
        np.testing.assert_array_equal(built["image"][..., 0], ROWS["images"][rows])


def test_bad_row_fails_build_and_files_source_alike_leaving_nothing_loadable(tmp_path):
    text = _replace_line(_text(), 20, _set_pixel(3, "999"))
    path = synthetic.write_fer2013(tmp_path / "manual", text, "csv")
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError, match=rf"{path}, line 20: pixel 3 is 999") as from_builder:
        data_pipelines.build("fer2013", data_dir=data_dir, manual_dir=tmp_path / "manual")
    with pytest.raises(DataError) as from_files:
        files.load_split_from_files("fer2013", "private_test", tmp_path / "manual")
    assert str(from_files.value) == str(from_builder.value)
    assert not tfds.builder("fer2013", data_dir=data_dir).is_prepared()
    with pytest.raises(Exception, match="fer2013"):
        tfds.load("fer2013", split="train", data_dir=data_dir, download=False)
    with pytest.raises(FileNotFoundError, match="is not built"):
        data_pipelines.load_arrays("fer2013", "train", data_dir)


def test_missing_manual_file_gives_instructions_and_expected_paths_in_both_sources(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "README").write_text("not the data")
    with pytest.raises(FileNotFoundError) as e:
        data_pipelines.build("fer2013", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    assert str(tmp_path / "manual" / "fer2013.csv") in str(e.value)
    assert "kaggle.com" in str(e.value)
    with pytest.raises(FileNotFoundError, match="kaggle.com"):
        data_pipelines.build("fer2013", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "none")
    for manual in (tmp_path / "manual", tmp_path / "none"):
        with pytest.raises(FileNotFoundError) as e:
            files.load_split_from_files("fer2013", "train", manual)
        assert f"No FER2013 file in {manual}: expected one of {manual / 'fer2013.csv'}" in str(
            e.value
        )
        assert "kaggle.com" in str(e.value) and "--config.manual_dir" in str(e.value)


def test_load_arrays_of_unbuilt_dataset_gives_instructions(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data_pipelines.load_arrays("fer2013", "train", tmp_path)
    message = str(e.value)
    assert str(tmp_path / "fer2013" / "1.0.0") in message
    assert "tfds build fer2013 --imports=data_pipelines" in message
    assert "kaggle.com" in message


def test_pipelines_on_a_built_split_with_indices(built):
    indices = np.array([7, 2, 9, 0])
    images, labels = data_pipelines.load_arrays("fer2013", "train", built)
    assert labels.dtype == np.int32
    ds = data_pipelines.eval_dataset(built, "train", batch_size=3, indices=indices)
    batches = list(ds.as_numpy_iterator())
    got = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(got, labels[indices])
    first = next(
        data_pipelines.train_dataset(
            built, batch_size=4, seed=0, indices=indices, return_index=True
        ).as_numpy_iterator()
    )
    np.testing.assert_array_equal(first["label"], labels[indices][first["index"]])


# --- The files source. -----------------------------------------------------------------------


def test_files_source_parses_the_file_once_for_all_splits_and_again_when_it_changes(
    tmp_path, monkeypatch
):
    path = synthetic.write_fer2013(tmp_path, _text(), "csv")
    parsed = []
    read = fer2013_csv.read_fer2013
    monkeypatch.setattr(fer2013_csv, "read_fer2013", lambda p: parsed.append(p) or read(p))
    for split in SPLIT_OF_USAGE.values():
        files.load_split_from_files("fer2013", split, tmp_path)
    first = files.load_split_from_files("fer2013", "train", tmp_path)
    assert parsed == [path]
    first["label"][:] = 6  # The caller's own arrays: the cache is untouched.
    np.testing.assert_array_equal(
        files.load_split_from_files("fer2013", "train", tmp_path)["label"],
        ROWS["labels"][ROWS["usages"] == "Training"],
    )
    other = synthetic.fer2013_rows((3, 1, 1), seed=5)
    path.write_text(synthetic.fer2013_csv_text(other["images"], other["labels"], other["usages"]))
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))  # Even on coarse mtime clocks.
    again = files.load_split_from_files("fer2013", "public_test", tmp_path)
    assert len(parsed) == 2
    np.testing.assert_array_equal(again["label"], other["labels"][other["usages"] == "PublicTest"])


def test_files_source_rejects_unknown_splits_and_datasets(tmp_path):
    synthetic.write_fer2013(tmp_path, _text(), "csv")
    with pytest.raises(ValueError, match="fer2013 has no split 'test'; its splits are train, "):
        files.load_split_from_files("fer2013", "test", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'fer2014', expected one of fer2013, "):
        files.load_split_from_files("fer2014", "train", tmp_path)


def test_tfds_then_package_import_registers_the_builders_and_hides_gpus():
    """As `tfds build fer2013 --imports=data_pipelines` does: TFDS first, then the package."""
    code = (
        "import importlib, tensorflow as tf, tensorflow_datasets as tfds\n"
        "hidden = []\n"
        "tf.config.set_visible_devices = lambda devices, kind: hidden.append((devices, kind))\n"
        "importlib.import_module('data_pipelines')\n"
        "print(tfds.builder_cls('fer2013').__module__, tfds.builder_cls('jaffe').__module__)\n"
        "print(hidden)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "data_pipelines.loading data_pipelines.loading",
        "[([], 'GPU')]",
    ]
