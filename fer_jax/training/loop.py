"""The training loop, `fit`: resume, then run the compiled calls and hand each one's result to
a few named actions, in the spirit of `clu.periodic_actions` and flax/examples/imagenet:

- `TrainLog`: training curves and the progress line (every `log_every_steps`, each epoch);
- `Selection`: evaluation on the select split (each `eval_every_epochs`, and the last epoch);
- `Saving`: checkpoints (each `checkpoint_every_epochs` / `_steps`, the last step, before a
  stop) and the best by the select split's accuracy;
- `signals.StopSignal`: SIGTERM or Ctrl-C checkpoints the step in flight, then stops.

Replicas are not branched on here: `Trainer` maps the steps over them, `metrics` and
`run_writers.RunWriters` lay out their results.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from data_pipelines.plan import steps_per_epoch as plan_steps_per_epoch
from fer_jax.training import checkpoint, metrics
from fer_jax.training.feed import train_feed
from fer_jax.training.parallel import DataParallel
from fer_jax.training.performance import Timer, performance_scalars
from fer_jax.training.run_writers import RunWriters
from fer_jax.training.signals import Interrupted, StopSignal
from fer_jax.training.state import TrainState, create_train_state
from fer_jax.training.trainer import Trainer, select_crops


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the loop stands: `step` global steps done, the last call having run `steps`."""

    step: int
    steps: int
    steps_per_epoch: int
    total_steps: int

    def advance(self, steps: int) -> Position:
        return dataclasses.replace(self, step=self.step + steps, steps=steps)

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.step // self.steps_per_epoch

    @property
    def step_in_epoch(self) -> int:
        return self.step % self.steps_per_epoch

    @property
    def end_of_epoch(self) -> bool:
        return self.step_in_epoch == 0

    @property
    def last(self) -> bool:
        return self.step == self.total_steps

    def meta(self) -> dict[str, int]:
        """The data position a checkpoint records."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
        }


class TrainLog:
    """Training curves (`metrics.train_summaries`: means since the last log, checked finite)
    and the progress line, every `config.log_every_steps` and at every epoch end."""

    def __init__(self, config: ml_collections.ConfigDict, parallel: DataParallel, writers):
        self.config, self.parallel, self.writers = config, parallel, writers
        self.history: list[dict] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def _write(self, step: int, seconds: float | None) -> None:
        history = self.parallel.unreplicate(self.history)  # pmap: drop the device axis
        self.history = []
        summaries = metrics.train_summaries(history, self.writers.num_replicas, step)
        images = sum(np.size(h["loss"]) for h in history) * self.config.batch_size  # all replicas
        self.writers.write_train(step, summaries, images / seconds if seconds else float("nan"))

    def __call__(self, step_metrics: dict[str, Any], at: Position) -> None:
        self.history.append(step_metrics)
        every = self.config.log_every_steps
        if not (at.step // every > (at.step - at.steps) // every or at.end_of_epoch):
            return
        self._write(at.step, time.perf_counter() - self.clock)
        logging.info(
            "epoch %d/%d, step %d/%d (global %d/%d)",
            at.epoch + (not at.end_of_epoch),
            self.config.num_epochs,
            at.step_in_epoch or at.steps_per_epoch,
            at.steps_per_epoch,
            at.step,
            at.total_steps,
        )
        self.restart_clock()

    def check_pending(self, step: int) -> None:
        """Writes (and so checks) the steps since the last log: before anything is saved."""
        if self.history:
            self._write(step, None)


class Selection:
    """Evaluation on the select split (`config.select_crops` crops) after every
    `config.eval_every_epochs` epochs and the last one; returns each replica's accuracy."""

    def __init__(self, trainer: Trainer, writers: RunWriters, select, select_name: str):
        self.trainer, self.writers = trainer, writers
        self.select, self.select_name = select, select_name
        self.every = trainer.config.eval_every_epochs
        self.crops = select_crops(trainer.config)

    def due(self, at: Position) -> bool:
        return (
            at.end_of_epoch
            and self.select is not None
            and self.every > 0
            and (at.epoch % self.every == 0 or at.last)
        )

    def __call__(self, state: TrainState, at: Position, timer: Timer) -> list[float]:
        report = self.trainer.evaluate(state, *self.select, crops=self.crops)
        timer.evaluated(len(self.select[1]) * self.crops)
        self.writers.write_evaluation(at.step, self.select_name, at.epoch, report)
        return [m["accuracy"] for m in metrics.per_replica(report)]


class Saving:
    """Checkpoints: the latest (each `checkpoint_every_epochs` epochs and
    `checkpoint_every_steps` steps, the last step, and before a stop) and the best by the
    select split's accuracy (per replica)."""

    def __init__(self, manager: checkpoint.Checkpoints, parallel: DataParallel, config):
        self.manager, self.parallel, self.config = manager, parallel, config

    def due(self, at: Position, stopping: bool) -> bool:
        every_steps = self.config.checkpoint_every_steps
        return (
            (at.end_of_epoch and at.epoch % self.config.checkpoint_every_epochs == 0)
            or (every_steps > 0 and at.step % every_steps == 0)
            or at.last
            or stopping
        )

    def __call__(
        self, state: TrainState, at: Position, save: bool, accuracy: list[float] | None
    ) -> None:
        host_state = self.parallel.unreplicate(state)
        if save:
            self.manager.save(at.step, host_state, at.meta())
        if accuracy is not None:
            self.manager.maybe_save_best(at.step, host_state, at.meta(), accuracy)


def _resume(manager: checkpoint.Checkpoints, template: TrainState, config) -> TrainState:
    """The latest checkpoint's state, else a fresh one (from `config.init_from` if set)."""
    restored = manager.restore_latest(template)
    if restored is not None:
        logging.info(
            "Resuming from step %d (epoch %d, step %d of it).",
            restored.step,
            restored.meta["epoch"],
            restored.meta["step_in_epoch"],
        )
        return restored.state
    if config.init_from:
        return checkpoint.init_from(config.init_from, template, config)
    return template


def fit(
    trainer: Trainer,
    workdir: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    *,
    select: tuple[np.ndarray, np.ndarray] | None = None,
    select_name: str = "",
) -> dict[str, Any]:
    """The training loop: resume, train `config.num_epochs`, evaluate, checkpoint.

    Returns `{'state': final host state, 'template': host template for restores,
    'performance': speed figures of this process's training (`performance` keys)}`.
    """
    config, parallel = trainer.config, trainer.parallel
    wall_start = time.perf_counter()
    steps_per_epoch = plan_steps_per_epoch(len(train_labels), config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    template = create_train_state(config, trainer.model, steps_per_epoch)
    manager = checkpoint.Checkpoints(workdir, config)
    host_state = _resume(manager, template, config)
    at = Position(int(np.ravel(host_state.step)[0]), 0, steps_per_epoch, total_steps)
    if at.step >= total_steps:
        logging.info("Training already finished (%d steps).", at.step)
        manager.close()
        return {"state": host_state, "template": template, "performance": None}

    writers = RunWriters(workdir, config, enabled=jax.process_index() == 0)
    if at.step == 0:
        writers.write_start(host_state.params)
    log = TrainLog(config, parallel, writers)
    selection = Selection(trainer, writers, select, select_name)
    saving, timer, stop = Saving(manager, parallel, config), Timer(trainer), StopSignal()
    state = parallel.replicate(host_state)
    feed = train_feed(trainer, train_images, train_labels, at.step, total_steps, steps_per_epoch)
    try:
        for steps, run in feed:
            state, step_metrics = run(state)
            at = at.advance(steps)
            timer.steps += steps
            log(step_metrics, at)
            evaluate_now, stop_now = selection.due(at), stop.agreed()
            save_now = saving.due(at, stop_now)
            if not (evaluate_now or save_now):
                continue
            timer.pause(state)
            accuracy = selection(state, at, timer) if evaluate_now else None
            log.check_pending(at.step)
            saving(state, at, save_now, accuracy)
            writers.flush()
            if stop_now:
                manager.close()  # waits for the checkpoint to be written
                raise Interrupted(stop.signum, at.step)
            timer.resume()
            log.restart_clock()
    finally:
        stop.restore()
    timer.pause(state)
    manager.close()
    performance = timer.performance(config, steps_per_epoch, time.perf_counter() - wall_start)
    writers.main.write_scalars(at.step, performance_scalars(performance))
    writers.close()
    return {"state": parallel.unreplicate(state), "template": template, "performance": performance}
