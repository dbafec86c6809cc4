"""The commands in README.md and docs/*.md run as written: the docs cannot drift from the code.

Every `python -m fer_jax.<module> ...` or `python -m experiments.<module> ...` command in a code
block (fenced, except ```python blocks, or indented by 4 spaces; backslash line continuations
and multi-line quotes joined) is run against tiny data in the real formats:
- `fer_jax.main` with `--mode=check` in place of its `--mode=X` (and `--check_mode=X`, so the
  data of that mode is what is checked): config, flags and data are checked, nothing is trained;
- any other module with `--help` first; each `--flag` the command uses must be in the help.
Each must exit 0. A failure names the command (the test id is its first 60 characters) and
shows its output.

For README writers, the placeholders a command may use (and what the test puts there):
    ~/data/fer2013   a folder holding Kaggle's fer2013.csv  -> a tiny fer2013.csv
    ~/data/jaffe     the jaffedbase folder of JAFFE TIFFs   -> a tiny jaffedbase folder
    runs/NAME        a workdir or run directory             -> a fresh temporary directory
    photo.jpg        a photo                                -> a small JPEG
Anything else is used as written (relative paths from the repository root); `~` is a fresh
home directory (no ~/tensorflow_datasets). So write, e.g.:

    python -m fer_jax.main --config=configs/fer2013.py --workdir=runs/fer2013 \\
        --config.manual_dir=~/data/fer2013 --config.jaffe.manual_dir=~/data/jaffe
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.test_data_check import write_fer2013_dir, write_jaffe_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Placeholder -> fixture name (see the module docstring); `runs/...` is handled apart.
PLACEHOLDERS = {"~/data/fer2013": "fer2013", "~/data/jaffe": "jaffe", "photo.jpg": "photo"}
RUNS = re.compile(r"(?<![\w./~-])runs/")  # `runs/NAME` at the start of a path
COMMAND = re.compile(r"\bpython3? -m ((?:fer_jax|experiments)\.\w+)")
FENCE = re.compile(r"^ {0,3}(```+|~~~+)\s*([\w+-]*)")
SUBCOMMAND = re.compile(r"[a-z][a-z0-9_-]*")  # a bare word: a subcommand, not a file name
ENDS = ("&&", "||", ";", "|")  # where a command ends (a `|` inside [--a | --b] does not)


def code_lines(text: str) -> list[tuple[int, str]]:
    """`(line number, text)` of each line of the fenced (not ```python) and indented code
    blocks of Markdown `text`; blocks are separated by a `(0, '')` entry."""
    out: list[tuple[int, str]] = []
    fence, language, previous_blank, indented = None, "", True, False
    for number, line in enumerate(text.splitlines(), 1):
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
                out.append((0, ""))
            elif language not in ("python", "py", "pycon"):
                out.append((number, line))
            continue
        match = FENCE.match(line)
        if match:
            fence, language = match[1], match[2].lower()
            indented = False
            continue
        if line.startswith(("    ", "\t")) and (indented or previous_blank):
            indented = True
            out.append((number, line))
        elif line.strip():
            if indented:
                out.append((0, ""))
            indented = False
        previous_blank = not line.strip()
    return out


def extract_commands(text: str) -> list[tuple[int, str]]:
    """`(line number, command)` of each `python -m fer_jax.*|experiments.*` command in the
    code blocks of Markdown `text`, its continuation lines joined."""
    lines = code_lines(text)
    commands = []
    for i, (number, line) in enumerate(lines):
        match = COMMAND.search(line)
        if number == 0 or match is None:
            continue
        command, j = line[match.start() :].rstrip(), i
        while j + 1 < len(lines) and lines[j + 1][0] != 0:
            if command.endswith("\\"):  # a continuation line
                joint = " "
                command = command[:-1].rstrip()
            elif _quote_open(command):  # a quoted argument goes on
                joint = "\n"
            else:
                break
            j += 1
            command += joint + lines[j][1].strip()
        commands.append((number, command))
    return commands


def _quote_open(command: str) -> bool:
    try:
        shlex.split(command, comments=True)
    except ValueError:  # "No closing quotation"
        return True
    return False


def split_command(command: str) -> tuple[str, list[str]]:
    """`(module, arguments)` of a documented command, cut at `&&`, `;`, a pipe."""
    tokens = shlex.split(command, comments=True)
    args, brackets = [], 0
    for token in tokens[3:]:
        brackets += token.count("[") - token.count("]")
        if token in ENDS and not (token == "|" and brackets > 0):
            break
        args.append(token)
    return tokens[2], args


def _documented() -> list:
    params = []
    for doc in DOCS:
        if not doc.is_file():
            continue
        for number, command in extract_commands(doc.read_text(encoding="utf-8")):
            where = f"{doc.relative_to(REPO)}:{number}"
            params.append(pytest.param(command, where, id=" ".join(command.split())[:60]))
    return params


COMMANDS = _documented()
# The example of the module docstring: the placeholders work (a README without them would pass).
EXAMPLES = [
    pytest.param(command, f"tests/test_readme_commands.py:{n}", id="example")
    for n, command in extract_commands(__doc__)
]


def test_the_readme_documents_commands():
    assert COMMANDS, "no `python -m fer_jax...` command found in README.md"
    assert len(EXAMPLES) == 1


def test_extraction_joins_continuations_and_skips_python_blocks():
    text = (
        "Run:\n\n"
        "    pip install x && python -m fer_jax.main --config=a.py \\\n"
        "        --workdir=runs/a --config.x='(1,\n"
        "            2)'\n"
        "    python -m experiments.table1 --epochs=2  # a comment\n"
        "- a list item\n"
        "  python -m fer_jax.main --not=code\n"
        "```python\n"
        "subprocess.run('python -m fer_jax.main --in=python')\n"
        "```\n"
        "```bash\n"
        "$ python -m fer_jax.predict --checkpoint=runs/r photo.jpg [--json | --csv] | head\n"
        "```\n"
    )
    commands = [c for _, c in extract_commands(text)]
    assert len(commands) == 3
    assert split_command(commands[0]) == (
        "fer_jax.main",
        ["--config=a.py", "--workdir=runs/a", "--config.x=(1,\n2)"],
    )
    assert split_command(commands[1]) == ("experiments.table1", ["--epochs=2"])
    assert split_command(commands[2]) == (
        "fer_jax.predict",
        ["--checkpoint=runs/r", "photo.jpg", "[--json", "|", "--csv]"],
    )


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("readme")
    photo = root / "photo.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(photo)
    return {
        "fer2013": str(write_fer2013_dir(root / "fer2013")),
        "jaffe": str(write_jaffe_dir(root / "jaffedbase")),
        "photo": str(photo),
        "home": str(root / "home"),
    }


def substitute(arg: str, fixtures: dict[str, str], tmp_path: pathlib.Path) -> str:
    for placeholder, name in PLACEHOLDERS.items():
        arg = arg.replace(placeholder, fixtures[name])
    return RUNS.sub(f"{tmp_path}/runs/", arg)


def _flags(args: list[str]) -> list[str]:
    return [m[1] for a in args for m in re.finditer(r"(?:^|[\[|])--?([A-Za-z_]\w*)", a)]


@pytest.mark.parametrize("command, where", COMMANDS + EXAMPLES)
def test_documented_command_runs(command, where, fixtures, tmp_path):
    module, args = split_command(command)
    args = [substitute(a, fixtures, tmp_path) for a in args]
    if module == "fer_jax.main":
        modes = [a.split("=", 1)[1] for a in args if a.startswith("--mode=")]
        args = [a for a in args if not a.startswith("--mode=")] + ["--mode=check"]
        args += [f"--check_mode={m}" for m in modes[-1:] if m != "check"]
    else:  # --help after a leading subcommand, if any (`python -m M sub --flag` -> sub's help)
        words = next((i for i, a in enumerate(args) if not SUBCOMMAND.fullmatch(a)), len(args))
        args = [*args[:words], "--help", *args[words:]]
    os.makedirs(fixtures["home"], exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": fixtures["home"]},
    )
    shown = f"{where}: {command}\nran: {shlex.join([module, *args])}\n"
    assert result.returncode == 0, shown + result.stdout[-2000:] + result.stderr[-3000:]
    if module != "fer_jax.main":
        unknown = [
            f
            for f in _flags(args)
            if f != "help" and not re.search(rf"--(\[no\])?{f}\b", result.stdout)
        ]
        assert not unknown, shown + f"flags not in --help: {unknown}\n" + result.stdout[-3000:]
