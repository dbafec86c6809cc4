"""The commands and Python blocks of README.md, MODEL_CARD.md and docs/*.md run as written: the
docs cannot drift from the code.

Every `python -m fer_jax.<module> ...` or `python -m experiments.<module> ...` command in a code
block (fenced, except ```python blocks, or indented by 4 spaces; backslash line continuations
and multi-line quotes joined), and in README.md's inline code too, is run against tiny data in
the real formats:
- `fer_jax.predict` and `fer_jax.export` on the shipped model (no `--checkpoint`, or
  `--checkpoint=pretrained`) run for real, in a fresh working directory (seconds: the shipped
  weights, a one-face photo, the StableHLO export); what they write (`--annotate`,
  `--out_dir`) must be there, and every photo must have its face found;
- `fer_jax.main` with `--mode=check` in place of its `--mode=X` (and `--check_mode=X`, so the
  data of that mode is what is checked): config, flags and data are checked, nothing is trained
  (a training costs hours);
- any other module with `--help` first; each `--flag` the command uses must be in the help.
Each must exit 0. A failure names the command (the test id is its first 60 characters) and
shows its output.

README.md's ```python blocks run too, each in its own process, unchanged but for the
placeholders and two things the test provides: the names a block takes as given (`GIVEN`:
`faces`, a face crop) and smaller sizes for the training recipe (`SMALL_RECIPE`: width 8, one
epoch, on the tiny FER2013), so that the block that trains does so in seconds.

For README writers, the placeholders a command may use (and what the test puts there):
    ~/data/fer2013   a folder holding Kaggle's fer2013.csv  -> a tiny fer2013.csv
    ~/data/jaffe     the jaffedbase folder of JAFFE TIFFs   -> a tiny jaffedbase folder
    runs/NAME        a workdir or run directory             -> a fresh temporary directory
    photo.jpg        a photo                                -> the bundled one-face photo
Anything else is used as written (relative paths from the repository root, or from a fresh
directory for the commands run for real); `~` is a fresh home directory (no
~/tensorflow_datasets). So write, e.g.:

    python -m fer_jax.main --config=configs/fer2013.py --workdir=runs/fer2013 \\
        --config.manual_dir=~/data/fer2013 --config.jaffe.manual_dir=~/data/jaffe
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.test_data_check import write_fer2013_dir, write_jaffe_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "MODEL_CARD.md", *sorted((REPO / "docs").glob("*.md"))]
# Placeholder -> fixture name (see the module docstring); `runs/...` is handled apart.
PLACEHOLDERS = {"~/data/fer2013": "fer2013", "~/data/jaffe": "jaffe", "photo.jpg": "photo"}
RUNS = re.compile(r"(?<![\w./~-])runs/")  # `runs/NAME` at the start of a path
COMMAND = re.compile(r"\bpython3? -m ((?:fer_jax|experiments)\.\w+)")
FENCE = re.compile(r"^ {0,3}(```+|~~~+)\s*([\w+-]*)")
SUBCOMMAND = re.compile(r"[a-z][a-z0-9_-]*")  # a bare word: a subcommand, not a file name
ENDS = ("&&", "||", ";", "|")  # where a command ends (a `|` inside [--a | --b] does not)
INLINE = re.compile(r"`(python3? -m (?:fer_jax|experiments)\.\w+[^`]*)`")
# Run for real when they use the shipped model: seconds, not hours.
REAL = ("fer_jax.predict", "fer_jax.export")
OUTPUT_FLAGS = ("--annotate", "--attention", "--out_dir")  # what a real run must have written
PHOTO = REPO / "fer_jax" / "examples" / "astronaut.jpg"  # one face, public domain
# Names README's Python blocks use as given (their comments say what they are), with a value.
GIVEN = {"faces": "np.random.default_rng(0).integers(0, 256, (1, 48, 48), np.uint8)"}
# The training recipe at a size that trains in seconds; everything else as the block says.
SMALL_RECIPE = """
import configs.fer2013_cpu as _recipe

_get_config = _recipe.get_config


def _small(arg=None):
    config = _get_config(arg)
    config.model.width, config.model.conv_impl = 8, "xla"
    config.num_epochs, config.batch_size, config.eval_batch_size = 1, 32, 32
    config.steps_per_dispatch = 1
    return config


_recipe.get_config = _small
"""


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


def inline_commands(text: str) -> list[tuple[int, str]]:
    """`(line number, command)` of each `python -m fer_jax.*|experiments.*` command in the
    inline code of Markdown `text` (outside code blocks; a span may wrap onto the next line)."""
    in_blocks = {number for number, _ in code_lines(text) if number}
    in_blocks |= {number for number, _ in python_blocks(text, lines=True)}
    out = []
    for match in INLINE.finditer(text):
        number = text.count("\n", 0, match.start()) + 1
        if number not in in_blocks:
            out.append((number, " ".join(match[1].split())))
    return out


def python_blocks(text: str, lines: bool = False) -> list[tuple[int, str]]:
    """`(line number, code)` of each ```python block of Markdown `text` (with `lines`: one
    entry per line of them instead)."""
    out, start, code = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if start is None and match and match[2].lower() in ("python", "py"):
            start, code = number, []
        elif start is not None and line.strip().startswith("```"):
            out += (
                [(start + 1 + i, c) for i, c in enumerate(code)]
                if lines
                else [(start, "\n".join(code))]
            )
            start = None
        elif start is not None:
            code.append(line)
    return out


def _documented() -> list:
    params = []
    for doc in DOCS:
        if not doc.is_file():
            continue
        text = doc.read_text(encoding="utf-8")
        found = extract_commands(text)
        if doc.name == "README.md":
            found += [(n, c) for n, c in inline_commands(text)]
        for number, command in found:
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
    shutil.copy(PHOTO, photo)
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


def runs_for_real(module: str, args: list[str]) -> bool:
    """A command of `REAL` on the shipped model, written as a user types it (no `[--a | --b]`
    alternatives)."""
    checkpoints = [a.split("=", 1)[1] for a in args if a.startswith("--checkpoint=")]
    alternatives = any(a.startswith("[") or a.endswith("]") or a == "|" for a in args)
    return module in REAL and all(c == "pretrained" for c in checkpoints) and not alternatives


def _environment(fixtures: dict[str, str]) -> dict[str, str]:
    """The tests' environment with a fresh HOME, every compile kept in the session's persistent
    cache (conftest's; the shipped model's programs are shared between the real runs)."""
    os.makedirs(fixtures["home"], exist_ok=True)
    return {
        **os.environ,
        "HOME": fixtures["home"],
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


@pytest.mark.parametrize("command, where", COMMANDS + EXAMPLES)
def test_documented_command_runs(command, where, fixtures, tmp_path):
    module, args = split_command(command)
    args = [substitute(a, fixtures, tmp_path) for a in args]
    real = runs_for_real(module, args)
    cwd = tmp_path / "cwd" if real else REPO
    cwd.mkdir(exist_ok=True)
    if module == "fer_jax.main":
        modes = [a.split("=", 1)[1] for a in args if a.startswith("--mode=")]
        args = [a for a in args if not a.startswith("--mode=")] + ["--mode=check"]
        args += [f"--check_mode={m}" for m in modes[-1:] if m != "check"]
    elif not real:  # --help after a leading subcommand, if any (`M sub --flag` -> sub's help)
        words = next((i for i, a in enumerate(args) if not SUBCOMMAND.fullmatch(a)), len(args))
        args = [*args[:words], "--help", *args[words:]]
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(fixtures),
    )
    shown = f"{where}: {command}\nran: {shlex.join([module, *args])}\n"
    assert result.returncode == 0, shown + result.stdout[-2000:] + result.stderr[-3000:]
    if real:
        assert "no face found" not in result.stderr, shown + result.stderr[-2000:]
        for flag, value in (a.split("=", 1) for a in args if a.startswith(OUTPUT_FLAGS)):
            written = cwd / value
            assert written.is_dir() and any(written.iterdir()), shown + f"{flag}: nothing written"
    elif module != "fer_jax.main":
        unknown = [
            f
            for f in _flags(args)
            if f != "help" and not re.search(rf"--(\[no\])?{f}\b", result.stdout)
        ]
        assert not unknown, shown + f"flags not in --help: {unknown}\n" + result.stdout[-3000:]


def test_the_shipped_model_commands_run_for_real():
    """`predict --example` (README's first command) and the shipped model's export are among
    the commands run for real, not as `--help`."""
    real = {
        split_command(c.values[0])[0]
        for c in COMMANDS
        if runs_for_real(*split_command(c.values[0]))
    }
    commands = [" ".join(c.values[0].split()) for c in COMMANDS]
    assert any(c.endswith("python -m fer_jax.predict --example") for c in commands)
    assert real == set(REAL), real


def test_inline_commands_are_found_outside_code_blocks_and_across_a_line_break():
    text = (
        "Export: `python -m fer_jax.export --checkpoint=pretrained\n--out_dir=exported` writes.\n"
        "\n"
        "    python -m fer_jax.predict `python -m fer_jax.main --in=block`\n"
    )
    assert inline_commands(text) == [
        (1, "python -m fer_jax.export --checkpoint=pretrained --out_dir=exported")
    ]


README_PYTHON = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks():
    assert len(README_PYTHON) >= 2


@pytest.mark.parametrize(
    "line, code", README_PYTHON, ids=[f"README.md:{n}" for n, _ in README_PYTHON]
)
def test_readme_python_block_runs(line, code, fixtures, tmp_path):
    given = [
        f"{name} = {value}" for name, value in GIVEN.items() if re.search(rf"\b{name}\b", code)
    ]
    script = "\n".join(
        ["import numpy as np", SMALL_RECIPE, *given, substitute(code, fixtures, tmp_path)]
    )
    (tmp_path / "block.py").write_text(script, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "block.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_environment(fixtures),
    )
    shown = f"README.md:{line}:\n{code}\n"
    assert result.returncode == 0, shown + result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.strip(), shown + "printed nothing"
    assert "no face found" not in result.stderr, shown + result.stderr[-2000:]
