"""Errors caused by the user's input: one `error: ...` line on stderr and exit status 2.

Under `run_cli`, a `UserError` or another exception only the user's input causes prints `error:
<message>` (and the traceback under `--verbose` or `FER_JAX_VERBOSE=1`) and gives status 2; any
other exception is a bug and propagates (status 1).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from data_pipelines.errors import DataError

EXIT_USER_ERROR = 2
VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "FER_JAX_VERBOSE"
# A path that does not exist, cannot be read or written, or is of the wrong kind.
PATH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)
# Optional packages (import name -> the extra that installs them).
OPTIONAL_PACKAGES = {"tensorflow": "tfds", "tensorflow_datasets": "tfds"}


class UserError(Exception):
    """A mistake in the user's input; the message, one line, says what is allowed or to do."""


def verbose(argv: Sequence[str] | None = None) -> bool:
    """Whether tracebacks of user errors are wanted: `--verbose` in `argv` (default
    `sys.argv`) or `$FER_JAX_VERBOSE` set."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    if env not in ("", "0", "false", "no"):
        return True
    argv = sys.argv[1:] if argv is None else argv
    return any(
        arg == VERBOSE_FLAG or arg.lower() in (f"{VERBOSE_FLAG}=true", f"{VERBOSE_FLAG}=1")
        for arg in argv
    )


def _module_class(module: str, name: str) -> type | None:
    """`module.name` if `module` is already imported (its exceptions cannot occur otherwise)."""
    return getattr(sys.modules.get(module), name, None)


def user_message(error: BaseException) -> str | None:
    """The message to print for `error` if the user's input caused it, else None (a bug)."""
    if isinstance(error, PATH_ERRORS) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"  # `path: reason`
    user_types = [
        UserError,
        DataError,
        *PATH_ERRORS,
        _module_class("fer_jax.training.checkpoint", "CheckpointError"),
        _module_class("absl.flags", "Error"),
    ]
    if any(t is not None and isinstance(error, t) for t in user_types):
        return str(error)
    if isinstance(error, ModuleNotFoundError) and error.name:
        root = error.name.split(".")[0]
        if root in OPTIONAL_PACKAGES:
            return (
                f"this needs the optional package {root}, which is not installed: "
                f"pip install -e '.[{OPTIONAL_PACKAGES[root]}]' (or, for data, use "
                "--config.data_source=files)"
            )
    return None


def run_cli(main: Callable[[], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs `main()` and returns its exit status (None: 0); a user error is printed (with its
    traceback if `verbose(argv)`) and gives 2, a bug propagates."""
    try:
        return main() or 0
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs by `user_message`
        message = user_message(e)
        if message is None:
            raise
        if verbose(argv):
            traceback.print_exception(e)
        sys.stdout.flush()
        sys.stderr.write(f"error: {message.strip()}\n")  # lines after the first as they are
        sys.stderr.flush()
        return EXIT_USER_ERROR
