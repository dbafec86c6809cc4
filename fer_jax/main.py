"""Command-line entry point: train, evaluate a checkpoint, or cross-validate on JAFFE.

    python -m fer_jax.main --config=configs/fer2013.py --workdir=runs/fer2013
    python -m fer_jax.main --mode=evaluate --config=configs/fer2013.py --workdir=runs/fer2013 \
        --split=private_test [--checkpoint=runs/fer2013/checkpoints/4485]
    python -m fer_jax.main --mode=cross_validate --config=configs/jaffe.py --workdir=runs/jaffe \
        --config.init_from=runs/fer2013
    python -m fer_jax.main --mode=check --config=configs/fer2013.py --workdir=runs/fer2013

`--mode=check` runs the checks below and prints what would run (the stages, the data found
for each, devices, batch size, steps per epoch, whether the workdir resumes), then exits 0,
or 2 with the one-line error: it compiles, trains and writes nothing. It checks what
`--check_mode` would run (default: train, or cross_validate for configs/jaffe.py).

`--config.FIELD=VALUE` overrides a config field; an unknown field is an error. Running the
same command again resumes from the latest checkpoint in the workdir, with the same recipe
(`fer_jax.training.run_config`; `--allow_config_changes` lets it change).

Before any work the config is validated (`fer_jax.training.config_schema`) and every stage's data
is looked for (`fer_jax.training.data_check`: FER2013 and, with config.cross_validate, the JAFFE of
the cross-validation after it), then the run takes the workdir's lock
(`fer_jax.training.workdir_lock`) for its whole length. A mistake in the input (flags, config,
paths, data, checkpoint, a busy workdir) prints one `error: ...` line and exits with status 2
(`--verbose` or FER_JAX_VERBOSE=1: with the traceback); a bug exits with status 1 and its traceback
(`fer_jax.user_errors`).

Data (nothing is downloaded; `--config.manual_dir=DIR` for the main dataset,
`--config.jaffe.manual_dir=DIR` for the JAFFE stage, or `--config.cross_validate=False`):
- FER2013: a folder holding fer2013.csv or fer2013.tar.gz, from Kaggle's "Challenges in
  Representation Learning: Facial Expression Recognition Challenge":
https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge/data
- JAFFE: https://zenodo.org/record/3451524 : the jaffedbase folder of TIFFs.
With the default `config.data_source='tfds'` they are built into `config.data_dir` (default
~/tensorflow_datasets) on first use; with 'files' they are read from the folders every run.

On a CPU, XLA's scratch memory stays mapped between steps (`fer_jax.host_memory`: ~20% faster
training on a 2-core machine); with --multihost this is left as JAX has it.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.crops import CROP_CHOICES
from fer_jax import host_memory, user_errors
from fer_jax.training import config_schema, data_check, workdir_lock
from fer_jax.user_errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "evaluate", "cross_validate", "check"],
    "What to run; 'check': validate the config, look for every stage's data and print what "
    "--check_mode would run, without compiling or training anything.",
)
flags.DEFINE_enum(
    "check_mode",
    None,
    list(data_check.CHECK_MODES),
    "--mode=check: the mode to check (default: cross_validate for a cross-validation config "
    "such as configs/jaffe.py, else train).",
)
flags.DEFINE_string(
    "checkpoint",
    None,
    "evaluate: run dir, checkpoint dir or 'pretrained' (the model shipped in the package; "
    "fer_jax.model.pretrained) (default: workdir).",
)
flags.DEFINE_string("split", "private_test", "evaluate: the split to evaluate.")
flags.DEFINE_enum(
    "crops",
    "10",
    [str(c) for c in CROP_CHOICES],
    "evaluate: 10 averages the ten 44x44 crops (the paper's evaluation); 1 the centre crop alone.",
)
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
flags.DEFINE_bool(
    "allow_config_changes",
    False,
    "Resume even if fields that change the trained result (model, loss, optimizer, data, seed, "
    "epochs, ...) differ from the run's config.json; the new values are used and recorded.",
)
flags.DEFINE_bool("verbose", False, "Show the traceback of a user error (also: FER_JAX_VERBOSE=1).")
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


def user_set_fields() -> list[str]:
    """The config fields the command line set, dotted without `config.` (e.g. 'model.head'):
    each `--config.FIELD=VALUE` and the config argument's `cbam=`/`head=`
    (`configs/jaffe.py:head=softmax`). A cross-validation takes the others of the model and
    the loss from the model it fine-tunes (`fer_jax.training.cross_validate`)."""
    flag = FLAGS["config"]
    fields = list(config_flags.get_override_values(flag))
    _, _, arg = config_flags.get_config_filename(flag).partition(":")
    fields += [f"model.{item.partition('=')[0]}" for item in arg.split(",") if item]
    return fields


def parse_flags(argv: list[str]) -> list[str]:
    """`FLAGS(argv)` for `app.run`, with a mistake in a flag or in a `--config.FIELD=VALUE`
    override raised as `UserError` (ml_collections reports a field that does not exist with a
    bare AttributeError or KeyError, a field that is not a section with a TypeError)."""
    try:
        return FLAGS(argv)
    except SystemExit as e:  # absl's --help prints the usage and exits 1: it is no error
        if e.code == 1 and any(arg.lstrip("-") in _HELP_FLAGS for arg in argv[1:]):
            raise SystemExit(0) from None
        raise
    except flags.Error as e:
        one_line = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(config_schema.bad_override_value(one_line) or one_line) from e
    except (AttributeError, KeyError, TypeError) as e:
        message = config_schema.unknown_override_in_file(argv, FLAGS["config"].parser.parse)
        if message is None:
            raise
        raise UserError(message) from e


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "h", "?")


def main(argv: list[str]) -> None:
    """Validates the config, then runs `--mode` in the locked workdir."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    config = FLAGS.config
    config_schema.validate(config)
    if FLAGS.check_mode and FLAGS.mode != "check":
        raise UserError(f"--check_mode={FLAGS.check_mode} needs --mode=check")
    mode = FLAGS.mode if FLAGS.mode != "check" else FLAGS.check_mode
    mode = mode or data_check.default_mode(config)
    config_schema.check_mode(config, mode, FLAGS.split)
    if not FLAGS.multihost and (
        FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
    ):
        raise UserError("--coordinator_address, --num_processes and --process_id need --multihost")
    if FLAGS.mode == "check":  # compiles, trains and writes nothing
        logging.set_verbosity(logging.WARNING)  # not JAX's INFO lines about absent backends
        report = data_check.describe(
            config,
            mode,
            FLAGS.workdir,
            split=FLAGS.split,
            checkpoint=FLAGS.checkpoint,
            allow_config_changes=FLAGS.allow_config_changes,
            user_set=user_set_fields(),
        )
        print("\n".join(report))
        return
    # Every stage's data, before hours of the first one (FER2013, then JAFFE).
    data_check.check(config, mode, FLAGS.workdir, FLAGS.split)
    if FLAGS.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    if FLAGS.multihost:
        initialize_distributed()
    else:  # on CPU: scratch memory kept between steps (not tried with cross-process collectives)
        host_memory.reuse_scratch_memory()
    from fer_jax.training import checkpoint, cross_validate, train

    logging.get_absl_handler().addFilter(_QuietLibraries())
    logging.info(
        "JAX %s, process %d/%d, devices: %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.devices(),
    )
    workdir = checkpoint.prepare_workdir(FLAGS.workdir)
    from fer_jax.training.signals import Interrupted

    try:
        with workdir_lock.hold(workdir):
            if FLAGS.mode == "train":
                cross_validate.train_then_cross_validate(
                    config,
                    workdir,
                    allow_config_changes=FLAGS.allow_config_changes,
                    user_set=user_set_fields(),
                )
            elif FLAGS.mode == "evaluate":
                train.evaluate_checkpoint(
                    config, workdir, FLAGS.checkpoint or workdir, FLAGS.split, int(FLAGS.crops)
                )
            else:
                cross_validate.run(
                    config,
                    workdir,
                    user_set=user_set_fields(),
                    allow_config_changes=FLAGS.allow_config_changes,
                )
    except Interrupted as e:  # SIGTERM / Ctrl-C: checkpointed; the shell's 128 + signal
        print(f"fer_jax: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    sys.exit(user_errors.run_cli(lambda: app.run(main, flags_parser=parse_flags)))
