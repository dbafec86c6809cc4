"""Stopping a run cleanly on SIGTERM or Ctrl-C: `StopSignal` (agreed across processes) and
the `Interrupted` it ends the loop with, after the checkpoint of the step in flight."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging


class Interrupted(Exception):
    """The loop stopped on a signal after checkpointing step `step`; rerun to resume."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}, which is "
            "checkpointed: run the same command again to resume"
        )


class StopSignal:
    """SIGTERM or Ctrl-C asks the training loop to stop after the step in flight
    (a second one stops at once). Installed from the main thread only; `restore` puts the
    previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.signum = signum
        logging.warning(
            "%s: finishing the step in flight, then checkpointing and stopping (send it "
            "again to stop at once)",
            signal.Signals(signum).name,
        )

    def agreed(self) -> bool:
        """Whether to stop now: a signal on any process of those training together."""
        mine = self.signum is not None
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils

        signums = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0))).ravel()
        if not mine and signums.any():
            self.signum = int(signums[signums > 0][0])
        return bool(signums.any())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
