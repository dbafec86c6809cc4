"""Command-line entry point: train, evaluate a checkpoint, or cross-validate on JAFFE.

    python -m fer_jax.main --config=configs/fer2013.py --workdir=runs/fer2013
    python -m fer_jax.main --mode=evaluate --config=configs/fer2013.py --workdir=runs/fer2013 \
        --split=private_test [--checkpoint=runs/fer2013/checkpoints/4485]
    python -m fer_jax.main --mode=cross_validate --config=configs/jaffe.py --workdir=runs/jaffe \
        --config.init_from=runs/fer2013

`--config.FIELD=VALUE` overrides a config field; an unknown field is an error. Running the
same command again resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "cross_validate"], "What to run.")
flags.DEFINE_string("checkpoint", None, "evaluate: run dir or checkpoint dir (default: workdir).")
flags.DEFINE_string("split", "private_test", "evaluate: the split to evaluate.")
flags.DEFINE_string(
    "compilation_cache",
    "~/.cache/fer_jax/jax",
    "Persistent XLA compilation cache ('' disables; $JAX_COMPILATION_CACHE_DIR wins): a rerun "
    "or resume skips the compiles.",
)
flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first (multi-process runs; see README). Every process "
    "runs the same command (same config and workdir, on a filesystem all of them share).",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "--multihost: host:port of process 0's coordinator service, e.g. 10.0.0.1:1234 (default: "
    "detected on Slurm, Open MPI, Cloud TPU, ...).",
)
flags.DEFINE_integer("num_processes", None, "--multihost: number of processes (default: detected).")
flags.DEFINE_integer(
    "process_id", None, "--multihost: this process's index, 0..num_processes-1 (default: detected)."
)
config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """`jax.distributed.initialize` from the --multihost flags, before JAX starts its backends.

    On CPU, cross-process collectives need an implementation: 'gloo' (TCP) unless one was
    chosen ($JAX_CPU_COLLECTIVES_IMPLEMENTATION, e.g. 'mpi'). It is JAX's default in recent
    releases; older ones had none. It only concerns the CPU backend: harmless on accelerators.
    """
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


class _QuietLibraries(std_logging.Filter):
    """Drops Orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def evaluate_checkpoint(config, workdir: str, path: str, split: str) -> dict:
    """Ten-crop metrics of a checkpoint on `split`, written to `workdir/eval/`."""
    from fer_jax import checkpoint, evaluate, input_data, train

    trainer = train.Trainer.create(config)
    template = train.create_train_state(config, trainer.model, steps_per_epoch=1)
    state = trainer.parallel.replicate(checkpoint.init_from(path, template, config))
    images, labels = input_data.load_splits(config, [split])[split]
    metrics = trainer.evaluate(state, images, labels)
    if jax.process_index() == 0:
        evaluate.write_report(os.path.join(workdir, "eval"), f"{split}_evaluate", metrics)
    logging.info("%s accuracy of %s: %.4f", split, path, metrics["accuracy"])
    print(f"{split} accuracy: {100 * metrics['accuracy']:.2f}% ({metrics['num_examples']} images)")
    return metrics


def train_then_cross_validate(config, workdir: str) -> dict:
    """The main job: train on `config.dataset`, then (`config.cross_validate`) fine-tune the
    selected model on JAFFE's folds in `workdir/cross_validation`; returns `results.json`."""
    from fer_jax import cross_validate, evaluate, train

    results = train.train_and_evaluate(config, workdir)
    if config.get("cross_validate"):
        cv_config = cross_validate.config_from_parent(config, workdir)
        results["cross_validation"] = cross_validate.run(
            cv_config, os.path.join(workdir, "cross_validation")
        )
        if jax.process_index() == 0:
            evaluate.write_json(os.path.join(workdir, "results.json"), results)
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    if FLAGS.multihost:
        initialize_distributed()
    elif FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
        raise app.UsageError(
            "--coordinator_address, --num_processes and --process_id need --multihost"
        )
    from fer_jax import checkpoint, cross_validate

    config = FLAGS.config
    logging.get_absl_handler().addFilter(_QuietLibraries())
    logging.info(
        "JAX %s, process %d/%d, devices: %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.devices(),
    )
    workdir = checkpoint.prepare_workdir(FLAGS.workdir)
    if FLAGS.mode == "train":
        train_then_cross_validate(config, workdir)
    elif FLAGS.mode == "evaluate":
        evaluate_checkpoint(config, workdir, FLAGS.checkpoint or workdir, FLAGS.split)
    else:
        cross_validate.run(config, workdir)


if __name__ == "__main__":
    app.run(main)
