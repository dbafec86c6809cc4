"""Training, evaluation and prediction work where TensorFlow and TFDS cannot be imported.

Each test runs a command line in a subprocess where `tensorflow` and `tensorflow_datasets` cannot
be imported, as if they were not installed (like on a bare CUDA image). The synthetic main job
(train, select, report, cross-validate) runs that way in tests/test_train.py's fixture.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from data_pipelines import synthetic
from tests.test_recognizer_checkpoint import photo, run_dir  # noqa: F401  (fixtures)

REPO = pathlib.Path(__file__).resolve().parents[1]
BLOCKED = ("tensorflow", "tensorflow_datasets")
# Runs module sys.argv[1] as __main__ with arguments sys.argv[2:], TensorFlow and TFDS blocked:
# with None in sys.modules, `import tensorflow` raises ModuleNotFoundError and
# `importlib.util.find_spec("tensorflow")` returns None, exactly as when it is not installed
# (libraries such as etils probe for TensorFlow that way).
_BLOCK_TENSORFLOW = f"import sys\nsys.modules.update(dict.fromkeys({BLOCKED!r}))\n"
_RUN_WITHOUT_TENSORFLOW = _BLOCK_TENSORFLOW + (
    "import runpy\n"
    "module, sys.argv = sys.argv[1], sys.argv[1:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def _run_without_tensorflow(module: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT_TENSORFLOW, module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout


def test_importing_the_data_and_inference_modules_imports_no_tensorflow():
    out = _python(
        "import sys, data_pipelines, fer_jax.training.input_data, fer_jax.inference.recognizer\n"
        "import fer_jax.inference.predict, fer_jax.inference.export, fer_jax.main\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{BLOCKED!r}))"
    )
    assert out.strip() == "[]"


def test_blocked_tensorflow_looks_uninstalled():
    check = "import importlib.util\nassert importlib.util.find_spec('tensorflow') is None\n"
    for name in BLOCKED:
        result = subprocess.run(
            [sys.executable, "-c", _BLOCK_TENSORFLOW + check + f"import {name}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert f"ModuleNotFoundError: import of {name} halted" in result.stderr


def test_fer2013_from_files_without_tensorflow(tmp_path):
    rows = synthetic.fer2013_rows((64, 16, 16), seed=3)
    text = synthetic.fer2013_csv_text(rows["images"], rows["labels"], rows["usages"])
    synthetic.write_fer2013(tmp_path / "manual", text, "csv")
    _run_without_tensorflow(
        "fer_jax.main",
        "--config=configs/fer2013.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.data_source=files",
        f"--config.manual_dir={tmp_path / 'manual'}",
        "--config.model.width=8",
        "--config.num_epochs=1",
        "--config.batch_size=16",
        "--config.eval_batch_size=16",
        "--config.cross_validate=False",
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["private_test"]["num_examples"] == 16


def test_predict_cli_without_tensorflow(run_dir, photo, tmp_path):  # noqa: F811
    output = tmp_path / "out.json"
    _run_without_tensorflow(
        "fer_jax.predict",
        f"--checkpoint={run_dir[0]}",
        "--json",
        "--batch_size=2",
        f"--output={output}",
        photo,
    )
    (record,) = json.loads(output.read_text())
    assert record["source"] == photo and len(record["faces"]) == 1
    assert sum(record["faces"][0]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
