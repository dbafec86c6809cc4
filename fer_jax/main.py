"""Command line: train, evaluate a checkpoint, cross-validate on JAFFE, or check a command.

    python -m fer_jax.main --config=configs/fer2013.py --workdir=runs/fer2013 [--mode=MODE]

The modes, configs and flags: docs/training.md; the checks before any work (config, every
stage's data, the workdir lock), `--mode=check` and the one-line errors (exit status 2):
docs/runs_and_failures.md; where the data comes from: docs/data.md.
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


class _QuietLibraries(std_logging.Filter):
    """Drops Orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def user_set_fields() -> list[str]:
    """The config fields the command line set ('model.head'), the config argument's too."""
    flag = FLAGS["config"]
    fields = list(config_flags.get_override_values(flag))
    _, _, arg = config_flags.get_config_filename(flag).partition(":")
    return fields + [f"model.{item.partition('=')[0]}" for item in arg.split(",") if item]


def parse_flags(argv: list[str]) -> list[str]:
    """`FLAGS(argv)`, a mistake in a flag or a `--config.FIELD=VALUE` raised as `UserError`."""
    try:
        return FLAGS(argv)
    except SystemExit as e:  # absl's --help prints the usage and exits 1: it is no error
        if e.code == 1 and any(arg.lstrip("-") in _HELP_FLAGS for arg in argv[1:]):
            raise SystemExit(0) from None
        raise
    except flags.Error as e:
        one_line = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(config_schema.bad_override_value(one_line) or one_line) from e
    except (AttributeError, KeyError, TypeError) as e:  # ml_collections: no such field
        missing = str(e.args[0] if e.args else e).splitlines()[0].strip("\"'")
        message = config_schema.unknown_override(argv, missing)
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
    mode = FLAGS.check_mode if FLAGS.mode == "check" else FLAGS.mode
    mode = config_schema.check_mode(config, mode, FLAGS.split)
    if not FLAGS.multihost and (
        FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
    ):
        raise UserError("--coordinator_address, --num_processes and --process_id need --multihost")
    options = {"allow_config_changes": FLAGS.allow_config_changes, "user_set": user_set_fields()}
    if FLAGS.mode == "check":  # compiles, trains and writes nothing
        logging.set_verbosity(logging.WARNING)  # not JAX's INFO lines about absent backends
        report = data_check.describe(
            config, mode, FLAGS.workdir, split=FLAGS.split, checkpoint=FLAGS.checkpoint, **options
        )
        print("\n".join(report))
        return
    data_check.check(config, mode, FLAGS.workdir, FLAGS.split)  # before hours of stage 1
    if FLAGS.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    if FLAGS.multihost:  # CPU collectives: 'gloo' unless chosen
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    else:  # on CPU: scratch memory kept between steps (not tried with cross-process collectives)
        host_memory.reuse_scratch_memory()
    from fer_jax.training import checkpoint, cross_validate, train
    from fer_jax.training.signals import Interrupted

    logging.get_absl_handler().addFilter(_QuietLibraries())
    logging.info(
        "JAX %s, process %d/%d, devices: %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.devices(),
    )
    workdir = checkpoint.prepare_workdir(FLAGS.workdir)
    try:
        with workdir_lock.hold(workdir):
            if FLAGS.mode == "evaluate":
                checkpoint_dir = FLAGS.checkpoint or workdir
                train.evaluate_checkpoint(
                    config, workdir, checkpoint_dir, FLAGS.split, int(FLAGS.crops)
                )
            elif FLAGS.mode == "train":
                cross_validate.train_then_cross_validate(config, workdir, **options)
            else:
                cross_validate.run(config, workdir, **options)
    except Interrupted as e:  # SIGTERM / Ctrl-C: checkpointed; the shell's 128 + signal
        print(f"fer_jax: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    sys.exit(user_errors.run_cli(lambda: app.run(main, flags_parser=parse_flags)))
