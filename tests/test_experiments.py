"""experiments/: tables, curves, benchmark, FLOPs and run summaries on fabricated inputs."""

from __future__ import annotations

import argparse
import json
import os
import types

import numpy as np
import pytest

from experiments import (
    asoftmax_collapse,
    benchmark,
    compare_curves,
    paper_tables,
    photo_framing,
    profile_step,
    tb_curves,
)
from fer_jax.model import flops
from fer_jax.training import evaluate

RNG = np.random.default_rng(0)


def _metrics(n: int = 70) -> dict:
    truth = RNG.integers(0, 7, n)
    pred = np.where(RNG.random(n) < 0.7, truth, RNG.integers(0, 7, n))
    confusion = np.zeros((7, 7))
    np.add.at(confusion, (truth, pred), 1)
    return evaluate.metrics_from_confusion(confusion, loss_sum=1.5 * n)


def _write_run(workdir: str, *, cv: bool = True, events: bool = True) -> dict:
    """A finished fer_jax.main workdir: results.json, CV summary, TensorBoard scalars."""
    report = _metrics()
    results = {
        "report_split": "private_test",
        "selected_on": "public_test",
        "selected_step": 56,
        "selected_epoch": 4,
        "select_accuracy": 0.7,
        "private_test": report,
    }
    evaluate.write_json(os.path.join(workdir, "results.json"), results)
    if cv:
        folds = [0.9, 0.95, 1.0, 0.85, 0.9]
        pooled = _metrics(213)
        evaluate.write_json(
            os.path.join(workdir, "cross_validation", "summary.json"),
            {
                "protocol": "random",
                "folds": 5,
                "fold_accuracy": folds,
                "mean_accuracy": float(np.mean(folds)),
                "std_accuracy": float(np.std(folds, ddof=1)),
                "pooled": pooled,
                "init_from": workdir,
            },
        )
    if events:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.util import tensor_util

        writer = EventFileWriter(workdir)
        for step in range(1, 9):
            values = [
                summary_pb2.Summary.Value(tag="train_loss", simple_value=2.0 / step),
                summary_pb2.Summary.Value(tag="train_learning_rate", simple_value=0.01),
                # clu/TF2 style: a scalar tensor
                summary_pb2.Summary.Value(
                    tag="train_accuracy",
                    tensor=tensor_util.make_tensor_proto(np.float32(step / 10)),
                ),
            ]
            writer.add_event(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=values)))
        writer.close()
    return results


def _args(tmp_path, **kw) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    paper_tables.add_run_flags(ap)
    argv = [
        "--dataset=synthetic",
        "--width=8",
        "--epochs=2",
        "--cv_epochs=1",
        "--collect_only",
        f"--runs_dir={tmp_path / 'runs'}",
        f"--results_dir={tmp_path / 'results'}",
    ]
    return ap.parse_args(argv + [f"--{k}={v}" for k, v in kw.items()])


def test_run_workdir_and_command_follow_the_settings(tmp_path):
    args = _args(tmp_path)
    overrides = paper_tables.overrides_from_args(args)
    assert overrides == [
        "--config.num_epochs=2",
        "--config.jaffe.num_epochs=1",
        "--config.model.width=8",
    ]
    run = paper_tables.Run(paper_tables.TABLE1[0], "synthetic", overrides, args.runs_dir)
    same = paper_tables.Run(paper_tables.TABLE2[0], "synthetic", overrides, args.runs_dir)
    other = paper_tables.Run(paper_tables.TABLE1[0], "synthetic", overrides[:1], args.runs_dir)
    assert (
        paper_tables.Run(paper_tables.TABLE1[2], "synthetic", overrides, args.runs_dir).workdir
        == same.workdir
    )  # Table 1 row 3 = Table 2 row 1
    assert run.workdir != other.workdir
    cmd = run.command()
    assert cmd[1:4] == [
        "-m",
        "fer_jax.main",
        "--config=configs/synthetic.py:cbam=none,head=softmax",
    ]
    assert f"--workdir={run.workdir}" in cmd and cmd[-3:] == overrides
    assert not run.finished()
    _write_run(run.workdir, events=False)
    assert run.finished()


def test_table_scripts_collect_a_fabricated_results_folder(tmp_path):
    from experiments import confusion_tables, table1

    args = _args(tmp_path)
    overrides = paper_tables.overrides_from_args(args)
    written = {}
    for row in paper_tables.TABLE1 + paper_tables.TABLE2[1:2]:  # parallel: left missing
        wd = paper_tables.Run(row, "synthetic", overrides, args.runs_dir).workdir
        written[row.key] = _write_run(wd, cv=row.key != "resnet18_softmax")
    argv = [
        "--dataset=synthetic",
        "--width=8",
        "--epochs=2",
        "--cv_epochs=1",
        "--collect_only",
        f"--runs_dir={args.runs_dir}",
    ]
    md1 = open(table1.main(argv + [f"--results_dir={tmp_path / 't1'}"])).read()
    runs2 = {
        r.key: paper_tables.Run(r, "synthetic", overrides, args.runs_dir)
        for r in paper_tables.TABLE2
    }
    md2 = paper_tables.accuracy_table(
        paper_tables.TABLE2,
        {k: paper_tables.collect(r.workdir) for k, r in runs2.items()},
        "synthetic",
    )
    md3 = open(confusion_tables.main(argv + [f"--results_dir={tmp_path / 'cm'}"])).read()

    acc = written["cbam_asoftmax"]["private_test"]["accuracy"]
    assert "NOT FER2013" in md1 and "NOT JAFFE" in md1 and "Smoke run on generated data" in md1
    assert (
        f"| CBAM + ResNet18 + A-Softmax | {100 * acc:.1f} | 73.5 | {100 * acc - 73.5:+.1f} |" in md1
    )
    assert "| ResNet18 + softmax |" in md1 and "| 97.6 | - |" in md1  # no CV for that row
    assert "| parallel | - | 73.2 | - | - | 98.6 | - | - |" in md2
    assert "git commit" in md1 and "python -m fer_jax.main" in md1
    for name in ("table1_accuracy.png", "curves_resnet18_softmax.png", "table1.json"):
        assert os.path.getsize(tmp_path / "t1" / name) > 1000
    data = json.load(open(tmp_path / "t1" / "table1.json"))
    assert data["paper"]["cbam_softmax"] == {"fer2013": 73.1, "jaffe": 98.4}
    assert data["provenance"]["git"]["commit"]
    config = data["runs"]["cbam_softmax"]["config"]
    assert (config["model"]["width"], config["num_epochs"], config["jaffe"]["num_epochs"]) == (
        8,
        2,
        1,
    )
    assert (config["model"]["cbam"], config["model"]["head"]) == ("channel_first", "softmax")
    assert "Table 3" in md3 and "Table 4" in md3 and "pooled over 5 folds" in md3
    for name in ("table3_confusion.png", "table4_confusion.png"):
        assert os.path.getsize(tmp_path / "cm" / name) > 1000


def test_confusion_table_is_row_normalised_with_bold_diagonal():
    metrics = evaluate.metrics_from_confusion(np.diag([1, 2, 3, 4, 5, 6, 7]) + 1)
    md = paper_tables.confusion_table(metrics, "T")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "predicted" not in line]
    assert len(rows) == 7
    cells = rows[0].split("|")[2:-2]
    assert cells[0].strip() == "**25.0**"  # angry: 2 of 8 correct
    assert sum(float(c.strip(" *")) for c in cells) == pytest.approx(100, abs=0.2)
    assert rows[0].split("|")[-2].strip() == "8"


def test_tb_curves_reads_simple_and_tensor_scalars(tmp_path):
    _write_run(str(tmp_path), cv=False)
    scalars = tb_curves.read_scalars(str(tmp_path))
    assert scalars["train_loss"][0] == list(range(1, 9))
    assert scalars["train_accuracy"][1] == pytest.approx([s / 10 for s in range(1, 9)])
    drawn = tb_curves.plot_curves(str(tmp_path), str(tmp_path / "c.png"))
    assert drawn == {"train_loss": 8, "train_accuracy": 8, "train_learning_rate": 8}
    assert os.path.getsize(tmp_path / "c.png") > 1000


def test_compare_curves_pairs_the_common_steps_and_finds_the_largest_gap(tmp_path):
    a = {"train_loss": ([25, 50, 75, 100], [1.0, 1.1, 1.2, 1.3])}
    b = {"train_loss": ([25, 50, 100, 125], [1.0, 1.15, 1.28, 0.0])}
    points = compare_curves.common_points(a, b, ["train_loss"], max_step=110)
    assert points == {"train_loss": [(25, 1.0, 1.0), (50, 1.1, 1.15), (100, 1.3, 1.28)]}
    summary = compare_curves.summarize(points)["train_loss"]
    assert summary["steps"] == 3 and summary["max_gap_step"] == 50
    assert summary["max_abs_gap"] == pytest.approx(0.05)
    assert summary["mean_abs_gap"] == pytest.approx(0.07 / 3)
    with pytest.raises(KeyError, match="second run logged no 'train_accuracy'"):
        compare_curves.common_points(a | {"train_accuracy": ([1], [0.5])}, b, ["train_accuracy"])


def test_compare_curves_writes_its_table_from_two_runs(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        _write_run(str(tmp_path / name), cv=False)
    summary = compare_curves.main(
        [
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--labels",
            "f32",
            "bf16",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert summary["train_loss"]["steps"] == 8 and summary["train_loss"]["max_abs_gap"] == 0
    assert "| 4 | 0.50000 | 0.50000 | +0.00000 |" in (tmp_path / "cmp" / "curves.md").read_text()
    assert os.path.getsize(tmp_path / "cmp" / "curves.png") > 1000
    with pytest.raises(SystemExit, match="logged no 'nope'"):
        compare_curves.main(
            [
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--tags",
                "nope",
                "--out",
                str(tmp_path / "x"),
            ]
        )


def test_flop_count_of_a_conv_and_a_dense_layer():
    import jax
    import jax.numpy as jnp

    def f(x, k, w):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y.reshape(2, -1) @ w

    x, k, w = jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)), jnp.zeros((8 * 8 * 4, 5))
    expected = 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3) + 2 * 2 * 5 * 256
    assert flops.jaxpr_flops(jax.make_jaxpr(f)(x, k, w).jaxpr) == expected


def test_model_flops_match_the_papers_network():
    from configs import fer2013

    counts = flops.model_flops_per_image(fer2013.get_config().model)
    assert counts["train"] == pytest.approx(6.6e9, rel=0.02)  # the issue's ~6.6 GFLOP
    assert counts["train"] == 3 * counts["forward"]


def test_peak_tflops_matches_the_most_specific_device_kind():
    assert flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_tflops("nvidia h100 pcie") == 756.0  # not the SXM part's 989
    assert flops.peak_tflops("NVIDIA L40S") == 362.0  # not the L4's 121
    assert flops.peak_tflops("TPU v5 lite") == 197.0  # not v5p's 459
    assert flops.peak_tflops("cpu") is None
    assert flops.peak_tflops("Some Future Accelerator") is None


PERFORMANCE = {
    "platform": "gpu",
    "device_kind": "NVIDIA H200",
    "num_devices": 1,
    "input_pipeline": "device",
    "steps_per_dispatch": 64,
    "half_precision": True,
    "batch_size": 64,
    "steps_per_epoch": 448,
    "num_epochs": 300,
    "eval_every_epochs": 1,
    "steps_timed": 1792,
    "epochs_timed": 4.0,
    "train_seconds": 8.2,
    "eval_seconds": 2.4,
    "evaluations": 4,
    "train_images_per_s": 14000.0,
    "images_per_s_including_eval": 11000.0,
    "eval_crops_per_s": 130000.0,
    "compile_seconds": {"train": 25.0, "eval": None},
    "peak_device_memory_gib": 9.9,
    "host_peak_rss_gib": 3.1,
    "flops_per_image": {"forward": 2.19e9, "train": 6.58e9},
    "peak_tflops": 989.0,
    "mfu_train": 0.093,
    "mfu_including_eval": 0.073,
    "projected_full_recipe_s": 821.0,
    "wall_seconds": 60.0,
}


def _write_device_run(workdir: str) -> dict:
    """A fer_jax.main workdir with a performance block, config.json and per-epoch evals."""
    results = _write_run(workdir, cv=False)
    results["performance"] = PERFORMANCE
    evaluate.write_json(os.path.join(workdir, "results.json"), results)
    evaluate.write_json(
        os.path.join(workdir, "config.json"),
        {
            "model": {"width": 64, "cbam": "channel_first", "head": "a_softmax"},
            "half_precision": True,
            "select_split": "public_test",
            "report_split": "private_test",
        },
    )
    for epoch, acc in enumerate([0.4, 0.6, 0.7, 0.7], start=1):  # epoch 3 is the first best
        evaluate.write_json(
            os.path.join(workdir, "eval", f"public_test_epoch{epoch:03d}.json"),
            {"accuracy": acc, "loss": 2.0 - acc},
        )
    return results


def test_run_summary_reports_speed_mfu_and_the_private_accuracy_chosen_on_public(tmp_path):
    from experiments import run_summary

    results = _write_device_run(str(tmp_path / "run"))
    out = tmp_path / "summary"
    summary = run_summary.main([str(tmp_path / "run"), f"--out={out}"])
    md = (out / "summary.md").read_text()
    acc = results["private_test"]["accuracy"]
    assert f"| **PrivateTest acc. (chosen on PublicTest)** | **{100 * acc:.2f}%** |" in md
    assert "| PublicTest acc. of selected epoch | 70.00% (epoch 4, step 56) |" in md
    assert "| device | 1 x NVIDIA H200 (gpu) |" in md
    assert "| model | width 64, cbam channel_first, head a_softmax, bf16 |" in md
    assert "| input pipeline / steps per dispatch | device / 64 |" in md
    assert (
        "| training images/s | 14,000 |" in md and "| compile (train, eval) | 25.0 s, n/a |" in md
    )
    assert "| MFU vs 989 TFLOP/s peak (train, incl. eval) | 9.3%, 7.3% |" in md
    assert "821 s (13.7 min)" in md and "Interrupted" not in md and "git commit" in md
    saved = json.load(open(out / "summary.json"))
    assert saved["performance"] == PERFORMANCE and saved["report_accuracy"] == acc
    assert [r["epoch"] for r in saved["evaluations"]] == [1, 2, 3, 4]
    assert summary["final_train"]["train_loss"] == pytest.approx(2.0 / 8)
    assert os.path.getsize(out / "curves.png") > 1000


def test_run_summary_of_an_interrupted_run_uses_the_eval_jsons(tmp_path):
    from experiments import run_summary

    _write_device_run(str(tmp_path))
    os.remove(tmp_path / "results.json")
    summary = run_summary.write_summary(str(tmp_path))
    md = (tmp_path / "summary.md").read_text()
    assert not summary["complete"] and "Interrupted run" in md
    assert (summary["selected_epoch"], summary["select_accuracy"]) == (3, 0.7)  # first best
    assert "| PublicTest acc. of selected epoch | 70.00% (epoch 3) |" in md
    assert "| **PrivateTest acc. (chosen on PublicTest)** | n/a |" in md
    assert "| training images/s | n/a |" in md


def test_benchmark_refuses_an_unknown_contestant_suffix(capsys):
    args = benchmark.parse_args(["--conv_impls", "auto+eigen+fresh_scratch"])
    assert args.conv_impls == ["auto+eigen+fresh_scratch"]
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--conv_impls", "auto+egien"])
    assert e.value.code == 2 and "unknown suffix ['egien']" in capsys.readouterr().err


_IN_GIT = os.path.isdir(os.path.join(benchmark.REPO, ".git"))


@pytest.mark.skipif(not _IN_GIT, reason="needs the repository's git history")
def test_benchmark_contestant_from_a_commit_runs_that_commits_tracked_files(capsys):
    """`SPEC@REV`: the worker's directory is REV's tracked tree; a bad REV is named at parse."""
    import subprocess

    args = benchmark.parse_args(["--conv_impls", "auto+eigen", "auto+eigen@HEAD"])
    assert args.conv_impls == ["auto+eigen", "auto+eigen@HEAD"]
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--conv_impls", "auto+eigen@no_such_rev"])
    assert e.value.code == 2 and "cannot resolve 'no_such_rev'" in capsys.readouterr().err

    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], cwd=benchmark.REPO, capture_output=True, text=True, check=True
        ).stdout

    commit = benchmark.resolve_commit("HEAD")  # (HEAD: also in a shallow clone)
    assert commit == git("rev-parse", "HEAD").strip()
    tree = benchmark.source_tree(commit)
    files = {os.path.relpath(os.path.join(d, f), tree) for d, _, fs in os.walk(tree) for f in fs}
    assert files == set(git("ls-tree", "-r", "--name-only", commit).split("\n")) - {""}
    with open(os.path.join(tree, "fer_jax", "model", "conv.py")) as f:
        assert f.read() == git("show", f"{commit}:fer_jax/model/conv.py")
    assert benchmark.source_tree(commit) == tree  # reused, not exported again


def test_benchmark_markdown_puts_the_contestants_side_by_side():
    args = benchmark.parse_args(["--batches", "64", "128", "--conv_impls", "xla", "auto"])
    res = {
        "batches": {
            "64": {
                "jax:xla": {
                    "train_images_per_s": 5.0,
                    "eval_crops_per_s": 30.0,
                    "compile_train_s": 45.0,
                    "compile_eval_s": 10.0,
                    "peak_rss_gib": 3.0,
                    "first_loss": 2.0,
                },
                "jax:auto": {
                    "train_images_per_s": 20.0,
                    "eval_crops_per_s": 33.0,
                    "compile_train_s": 50.0,
                    "compile_eval_s": 10.0,
                    "peak_rss_gib": 3.5,
                    "first_loss": 2.0000001,
                },
                "torch": {
                    "train_images_per_s": 16.0,
                    "eval_crops_per_s": 33.0,
                    "first_step_s": 5.0,
                    "first_eval_s": 5.0,
                    "peak_rss_gib": 2.0,
                    "first_loss": 2.1,
                },
            },
            "128": {  # larger batch: only the fastest fer_jax impl and torch
                "jax:auto": {
                    "train_images_per_s": 24.0,
                    "compile_train_s": 60.0,
                    "peak_rss_gib": 6.0,
                    "first_loss": 2.0,
                },
                "torch": {
                    "train_images_per_s": 16.0,
                    "first_step_s": 9.0,
                    "peak_rss_gib": 3.0,
                    "first_loss": 2.1,
                },
            },
        },
        "pipeline": {"train_images_per_s": 25000.0, "eval_crops_per_s": 90000.0, "source": "x"},
    }
    md = benchmark.markdown(res, args)
    assert "| metric | fer_jax xla | fer_jax auto | torch | xla / torch | auto / torch |" in md
    assert "| train images/s, batch 64 | 5.00 | 20.00 | 16.00 | **0.31x** | **1.25x** |" in md
    assert "| train images/s, batch 128 | - | 24.00 | 16.00 |  | **1.50x** |" in md
    assert "ten-crop eval crops/s" in md and "25,000 images/s" in md
    assert benchmark._fastest(res["batches"]["64"]) == "auto"


def test_benchmark_compares_bf16_contestants_with_torch_autocast():
    """A bfloat16 fer_jax contestant's ratio is to `torch:bf16`, a float32 one's to `torch`."""
    args = benchmark.parse_args(
        ["--batches", "64", "--conv_impls", "auto+eigen", "auto:bf16+eigen"]
        + ["--torch_contestants", "torch", "torch:bf16"]
    )
    names = ["torch", "torch:bf16"]
    assert benchmark.torch_peer("jax:auto+eigen", names) == "torch"
    assert benchmark.torch_peer("jax:auto:bf16+eigen@HEAD", names) == "torch:bf16"
    assert benchmark.torch_peer("jax:auto:bf16+eigen", ["torch"]) == "torch"
    assert benchmark.torch_peer("jax:auto", []) is None
    assert benchmark.parse_args(["--no_torch"]).torch_contestants == []
    one = {"peak_rss_gib": 1.0, "first_loss": 2.0, "compile_train_s": 1.0, "compile_eval_s": 1.0}
    res = {
        "batches": {
            "64": {
                "jax:auto+eigen": {**one, "train_images_per_s": 40.0, "eval_crops_per_s": 150.0},
                "jax:auto:bf16+eigen": {
                    **one,
                    "train_images_per_s": 60.0,
                    "eval_crops_per_s": 200,
                    "onednn": "2.6.3 omp",
                },
                "torch": {**one, "train_images_per_s": 40.0, "eval_crops_per_s": 100.0},
                "torch:bf16": {**one, "train_images_per_s": 50.0, "eval_crops_per_s": 160.0},
            }
        }
    }
    md = benchmark.markdown(res, args)
    head = (
        "| metric | fer_jax auto+eigen | fer_jax auto:bf16+eigen | torch | torch:bf16 "
        "| auto+eigen / torch | auto:bf16+eigen / torch:bf16 |"
    )
    assert head in md
    assert (
        "| train images/s, batch 64 | 40.00 | 60.00 | 40.00 | 50.00 | **1.00x** | **1.20x** |" in md
    )
    assert (
        "| ten-crop eval crops/s (16 images x 10 per batch) | 150.0 | 200.0 | 100.0 | 160.0 " in md
    )
    assert "| oneDNN convolutions (for IMPL:bf16, onednn) | - | 2.6.3 omp | - | - |" in md
    # Today's bf16 forms beside oneDNN's: the same spec with oneDNN off in its worker.
    args = benchmark.parse_args(["--conv_impls", "auto:bf16+eigen", "auto:bf16+eigen+no_onednn"])
    assert args.conv_impls[1] == "auto:bf16+eigen+no_onednn"


def test_benchmark_torch_bf16_contestant_runs_under_autocast():
    """`torch:bf16`: the reference network trains and evaluates under bfloat16 autocast, its
    weights stay float32, and its first loss is float32's within bf16 rounding (width 4)."""
    pytest.importorskip("torch")
    args = benchmark.parse_args(["--width", "4", "--eval_batch", "2", "--threads", "1"])
    args.batch = 4
    f32 = benchmark.TorchContestant(args)
    bf16 = benchmark.TorchContestant(args, bf16=True)
    assert f32.first_loss != bf16.first_loss  # autocast took effect
    assert abs(bf16.first_loss - f32.first_loss) < 0.05 * abs(f32.first_loss)
    assert all(p.dtype == bf16.torch.float32 for p in bf16.model.parameters())
    assert bf16.train(1) > 0 and bf16.evaluate(1) > 0


def test_asoftmax_collapse_runs_variants_from_a_fer2013_csv(tmp_path):
    from data_pipelines import synthetic

    rows = synthetic.fer2013_rows((40, 2, 2), seed=1)
    csv = synthetic.write_fer2013(
        tmp_path, synthetic.fer2013_csv_text(rows["images"], rows["labels"], rows["usages"])
    )
    workdirs = tmp_path / "runs"
    argv = [
        f"--csv={csv}",
        "--width=8",
        "--batch_size=16",
        "--steps=4",
        "--log_every=2",
        "--variant=soft=model.head=softmax,model.dropout_rate=0.0",
        "--variant=l5=loss.lambda_base=5,loss.lambda_gamma=0",
        f"--out={tmp_path}",
        f"--workdir_root={workdirs}",
    ]
    md = asoftmax_collapse.main(argv)
    data = json.load(open(os.path.join(os.path.dirname(md), "asoftmax_collapse.json")))
    assert list(data["variants"]) == ["soft", "l5"]
    for name, res in data["variants"].items():
        # 40 rows, batch 16: 2 full batches; fit trains 2 epochs of 2 steps (rows 0-31).
        assert (res["train_examples"], res["steps_per_epoch"], res["num_epochs"]) == (32, 2, 2)
        assert [r["step"] for r in res["log"]] == [2, 4]
        assert all(r["feature_norm"] > 0 and np.isfinite(r["loss"]) for r in res["log"])
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdirs / name))
    assert data["variants"]["l5"]["log"][0]["lambda"] == 5.0
    assert "| l5 | `loss.lambda_base=5,loss.lambda_gamma=0` |" in open(md).read()
    # Finished workdirs are read back, not retrained; other settings there are refused.
    first = data["variants"]["l5"]["log"]
    asoftmax_collapse.main(argv)
    again = json.load(open(os.path.join(os.path.dirname(md), "asoftmax_collapse.json")))
    assert again["variants"]["l5"]["log"] == first
    with pytest.raises(ValueError, match="other settings"):
        asoftmax_collapse.main([*argv[:2], "--batch_size=8", *argv[3:]])


def test_asoftmax_collapse_epoch_divides_the_steps():
    # Defaults: 8000 rows / 64 = 125 full batches; 400 steps = 4 epochs of 100.
    assert asoftmax_collapse.epoch_steps(400, 125, 100) == 100
    assert asoftmax_collapse.epoch_steps(50, 125, 100) == 50  # one epoch
    assert asoftmax_collapse.epoch_steps(2, 2, 1) == 2
    assert asoftmax_collapse.epoch_steps(300, 125, 7) == 100  # no multiple of 7 divides 300
    with pytest.raises(ValueError, match="--steps=401"):
        asoftmax_collapse.epoch_steps(401, 125, 100)


def test_asoftmax_collapse_variant_spec_errors_name_the_spec():
    assert asoftmax_collapse.parse_variant("a=x.y=1,z=2") == ("a", ["x.y=1", "z=2"])
    with pytest.raises(ValueError, match="'nospec'"):
        asoftmax_collapse.parse_variant("nospec")
    with pytest.raises(ValueError, match="'a/b=x.y=1'"):
        asoftmax_collapse.parse_variant("a/b=x.y=1")


def test_a_replica_row_reads_mean_and_std_over_its_seeds():
    entries = [{"private_test": {"accuracy": a}} for a in (0.70, 0.72, 0.74)]
    results = {
        "report_split": "private_test",
        "private_test": {"accuracy": 0.74},
        "replicas": entries,
        "mean_accuracy": 0.72,
        "std_accuracy": 0.02,
        "ensemble_accuracy": 0.75,
    }
    value, text = paper_tables.fer_cell(results)
    assert value == 0.72 and text == "72.00 ± 2.00 (n=3; ensemble 75.00)"
    one = {**results, "replicas": entries[:1], "private_test": {"accuracy": 0.7}}
    assert paper_tables.fer_cell(one) == (0.7, "70.0")
    table = paper_tables.accuracy_table(
        paper_tables.TABLE1[2:], {"cbam_asoftmax": {"fer2013": results, "cv": None}}, "fer2013"
    )
    assert "72.00 ± 2.00 (n=3" in table and "| -1.5 |" in table
    args = _args_replicas()
    assert "--config.replicas=4" in paper_tables.overrides_from_args(args)


def _args_replicas() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    paper_tables.add_run_flags(ap)
    return ap.parse_args(["--replicas=4"])


def test_profile_splits_wall_time_between_overlapping_thunks():
    # a runs 0-10 us, b 5-15 (overlapping 5-10: split), then nothing until c at 20-22.
    events = [
        {"name": "a", "ts": 0},
        {"name": "b", "ts": 5},
        {"name": "end: a", "ts": 10},
        {"name": "end: b", "ts": 15},
        {"name": "c", "ts": 20},
        {"name": "end: c", "ts": 22},
        {"name": "no end mark", "ts": 1},
    ]
    share, idle = profile_step.split_wall_time(profile_step._thunk_intervals(events))
    assert share == {"a": 7.5, "b": 7.5, "c": 2.0} and idle == 5.0


def test_profile_kinds_follow_the_module_path_and_direction():
    kind = profile_step.jax_kind
    fwd, bwd = "jit(train_step)/jvp(ResNet18)", "jit(train_step)/transpose(jvp(ResNet18))"
    assert kind("conv_general_dilated.3", f"{fwd}/layer1_0/conv1/x") == "convolution forward"
    assert kind("convolution.9", f"{bwd}/layer1_0/conv1/x") == "convolution backward"
    assert kind("convolution.31", "") == "convolution backward"  # XLA's weight gradients
    assert kind("while.2", f"{bwd}/layer1_0/conv1/while") == "weight gradient as matmuls (fer_jax)"
    dw = f"{bwd}/layer1_0/conv1/weight_grad_matmul/while/body/closed_call/dot_general"
    assert kind("ynn_fusion.3", dw) == "weight gradient as matmuls (fer_jax)"
    # Winograd's loops are convolutions: the forward's and the input gradient's.
    assert kind("while.4", f"{fwd}/layer1_0/conv1/winograd/while") == "convolution forward"
    assert kind("dot.5", f"{bwd}/layer1_0/conv1/winograd/while/body/dot") == "convolution backward"
    assert kind("add_fusion.1", f"{bwd}/layer2_1/bn2/mul") == "BatchNorm"
    assert (
        kind("reduce.4", f"{fwd}/layer2_1/cbam/SpatialGate/reduce_max")
        == "CBAM pooling, MLP and gates"
    )
    assert kind("copy.5", "") == "no source recorded"
    assert profile_step.torch_kind("aten::convolution_backward") == "convolution backward"
    assert profile_step.torch_kind("aten::native_batch_norm") == "BatchNorm"


def test_model_card_refuses_to_skip_an_evaluation_it_does_not_make(tmp_path, capsys):
    from experiments import model_card

    argv = ["--run", str(tmp_path), "--out", str(tmp_path / "card"), "--train_command", "x"]
    with pytest.raises(SystemExit):
        model_card.main([*argv, "--skip", "float32:public_test:10", "float32:private_test:10"])
    assert "--skip: ['float32:private_test:10'] are not among" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="results.json is missing"):  # A valid --skip passes.
        model_card.main([*argv, "--skip", "float32:public_test:10"])


def test_model_card_training_time_sums_the_sessions_and_skips_the_gaps(tmp_path, monkeypatch):
    """Two sessions of one resumed run (two event files): 300 s + 100 s of training logs, with
    a 2.7 h pause between them that is not training time."""
    from experiments import model_card
    from fer_jax.training import run_writers

    clock = iter([1000.0, 1100.0, 1200.0, 1300.0, 11000.0, 11100.0])
    # The events' clock only (TensorBoard's writer keeps the real one for its file names).
    monkeypatch.setattr(run_writers, "time", types.SimpleNamespace(time=lambda: next(clock)))
    for steps in ((100, 200, 300, 400), (500, 600)):
        writer = run_writers.SummaryWriter(str(tmp_path))
        for step in steps:
            writer.write_scalars(step, {"train_loss": 1.0})
        writer.close()
    assert model_card.training_wall_seconds(str(tmp_path)) == pytest.approx(400.0)
    assert model_card.training_wall_seconds(str(tmp_path), tag="no_such_tag") is None


def test_cpu_model_names_family_model_and_vector_flags(tmp_path):
    from experiments import provenance

    cpuinfo = tmp_path / "cpuinfo"
    block = "model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: {m}\nflags\t\t: fpu {f}\n\n"
    cpuinfo.write_text(block.format(m=17, f="avx2 avx512f avx512_bf16") + block.format(m=1, f=""))
    got = provenance.cpu_model(str(cpuinfo))
    assert got == "AMD EPYC (family 25, model 17; avx2 avx512f avx512_bf16)"
    cpuinfo.write_text(block.format(m=1, f="sse2"))
    assert provenance.cpu_model(str(cpuinfo)).endswith("model 1; no AVX2)")


class _AlwaysHappy:
    """A recogniser that calls every face happy (label 3): accuracy = the share of happy faces."""

    def predict_faces(self, faces: np.ndarray) -> np.ndarray:
        return np.tile(np.eye(7, dtype=np.float32)[3], (len(faces), 1))


def test_photo_framing_finds_a_real_face_in_its_own_frame_and_scores_each_margin():
    from PIL import Image

    from data_pipelines.faces import crop_face
    from fer_jax.inference.recognizer import find_faces, to_gray

    gray = to_gray(np.asarray(Image.open("fer_jax/examples/astronaut.jpg")))
    face = crop_face(gray, find_faces(gray)[0], margin=0.0, size=48)  # framed by the detector
    photo, frame = photo_framing.as_photo(face, 4, 0.5)
    assert photo.shape == (384, 384) and frame == (96, 96, 192)
    images = np.stack([face, np.full_like(face, 128)])  # a face, and a blank with none
    r = photo_framing.measure_split(_AlwaysHappy(), images, np.array([3, 0]), [0.0, 0.2], 4, 0.5)
    assert (r["faces"], r["detected"]) == (2, 1)
    assert (r["given_accuracy"], r["given_accuracy_detected"]) == (0.5, 1.0)
    assert r["photo_accuracy"] == {"0.0": 1.0, "0.2": 1.0}
    # The detector finds the face where it framed it: the same box, to a few percent.
    assert 0.95 < r["median_box_over_frame"] < 1.05
    assert max(abs(v) for v in r["median_centre_offset"]) < 0.03
    expected = (1 / r["median_box_over_frame"] - 1) / 2
    assert r["margin_matching_frame"] == pytest.approx(expected)


def test_photo_framing_box_geometry_is_relative_to_the_frame():
    # A 40 px box centred at (30, 25) on the 20 px frame centred at (10, 20).
    ratio, dx, dy = photo_framing.frame_geometry(np.array([10, 5, 40, 40]), (0, 10, 20))
    assert (ratio, dx, dy) == (2.0, 1.0, 0.25)


def test_photo_framing_eye_spacing_of_a_real_face_and_of_none():
    from PIL import Image

    from fer_jax.inference.recognizer import find_faces, to_gray

    gray = to_gray(np.asarray(Image.open("fer_jax/examples/astronaut.jpg")))
    x, y, w, h = find_faces(gray)[0]
    spacing, height = photo_framing.eye_spacing(gray[y : y + h, x : x + w])
    # A frontal face's eyes: ~0.3-0.5 of the face box apart, ~0.3-0.45 of it down.
    assert 0.3 < spacing < 0.55 and 0.3 < height < 0.45
    assert photo_framing.eye_spacing(np.full((96, 96), 128, np.uint8)) is None


def test_bf16_inference_scores_agreement_and_table_rows():
    """experiments.bf16_inference on made-up probabilities: one face of 50 changes its label in
    bfloat16; its accuracy delta, agreement and per-round faces/s land in the right cells."""
    from experiments import bf16_inference

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 50)
    p32 = rng.dirichlet(np.ones(7), 50).astype(np.float32)
    p32[0] = np.eye(7, dtype=np.float32)[labels[0]] * 0.9 + 0.1 / 7  # face 0 right in float32
    p16 = p32.copy()
    p16[0] = np.roll(p16[0], 1)  # ... and wrong in bfloat16
    probs = {
        f"{c}/{d}": p16 if d == "bfloat16" else p32
        for c in bf16_inference.CROPS
        for d in bf16_inference.PRECISIONS
    }
    offsets = np.zeros(7, np.float32)
    agreement = bf16_inference.agreement(probs, offsets)
    assert agreement["10"]["same_argmax_own"] == agreement["1"]["same_argmax_adjusted"] == 0.98
    results = {
        "scores": {k: bf16_inference.scores(p, labels, offsets) for k, p in probs.items()},
        "rounds_s": {k: [1.0, 0.5] for k in probs},
    }
    rows = bf16_inference.rows(results, speed_faces=4)
    assert len(rows) == 8  # crops x adjusted x precision
    crops, adjusted, dtype, _, delta, _, per_round, best = rows[1]
    assert (crops, adjusted, dtype, delta) == ("10", "no", "bfloat16", "-2.00")
    assert (per_round, best) == ("4.0 / 8.0", "**8.0**")
