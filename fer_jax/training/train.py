"""A whole training job, read top to bottom (as flax/examples/imagenet and big_vision):
`train_and_evaluate(config, workdir)` loads the splits, `fit`s (resuming from `workdir`), then
evaluates the model chosen on the select split on the report split and writes `results.json`;
`evaluate_checkpoint` is `fer_jax.main --mode=evaluate`.

`create_job` makes the one choice of the options: data parallelism (`parallel.DataParallel`),
K replicas (`replicas.Replicas`), tf.data (`tf_data_input.TfDataInput`). A plain run is
`step.OneDevice`, `step.OneModel` and `DeviceInput`: `step.train_step`, jitted, over the
batches `device_input` gathers on the device. After each compiled call `fit` logs (`TrainLog`),
and where its `Position` says so evaluates the select split, saves the latest and best
checkpoints, or stops (`signals.StopSignal`: SIGTERM or Ctrl-C checkpoints the step in flight).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from data_pipelines.plan import steps_per_epoch as plan_steps_per_epoch
from fer_jax import host_memory
from fer_jax.model import resnet
from fer_jax.training import (
    checkpoint,
    config_schema,
    evaluate,
    input_data,
    metrics,
    parallel,
    replicas,
    run_config,
    tf_data_input,
)
from fer_jax.training.device_input import DeviceInput
from fer_jax.training.performance import Timer, performance_scalars
from fer_jax.training.run_writers import RunWriters, write_final_reports
from fer_jax.training.signals import Interrupted, StopSignal
from fer_jax.training.step import OneDevice, OneModel, TrainState, create_model

Job = DeviceInput | tf_data_input.TfDataInput


def create_job(config: ml_collections.ConfigDict) -> Job:
    """The compiled calls of one training job (shared by the CV folds): the options are
    chosen here and only here."""
    if jax.device_count() == 1:
        devices = OneDevice()
    else:
        devices = parallel.DataParallel(config.parallelism)
    n = devices.num_devices
    if config.batch_size % n or config.eval_batch_size % n:
        raise ValueError(
            f"config.batch_size ({config.batch_size}) and config.eval_batch_size "
            f"({config.eval_batch_size}) must be divisible by the {n} devices"
        )
    model = create_model(config, axis_name=devices.axis_name)
    resnet.warn_if_onednn_missing(model)  # "auto:bf16" on CPU without oneDNN's convolutions
    if replicas.count(config) == 1:
        models = OneModel(config)
    else:
        models = replicas.Replicas(config, devices.devices[0].platform)
    if config.get("input_pipeline") == "tf_data":
        return tf_data_input.TfDataInput(config, devices, model, models)
    return DeviceInput(config, devices, model, models)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_changes: bool = False
) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one, and
    returns `results.json`'s summary (the selected model's `config.report_split` metrics).

    Validates `config` first (`UserError` naming the field) and, in a single process, keeps
    XLA:CPU's scratch memory mapped (`fer_jax.host_memory`). Writes TensorBoard events, JSON
    and PNG reports per evaluation, and the latest and best Orbax checkpoints.
    """
    config_schema.validate(config)
    if not jax.distributed.is_initialized():  # multi-process: left as JAX has it
        host_memory.reuse_scratch_memory()
    workdir = checkpoint.prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    # config.json: written at the first start; a resume with another recipe is refused.
    run_config.save_or_compare(config, workdir, allow_changes=allow_config_changes)
    splits = input_data.load_splits(
        config, [config.train_split, config.select_split, config.report_split]
    )
    train_images, train_labels = splits[config.train_split]
    job = create_job(config)
    summary = fit(
        job,
        workdir,
        train_images,
        train_labels,
        select=splits[config.select_split],
        select_name=config.select_split,
    )
    best = checkpoint.restore_best_or_latest(workdir, summary["template"])
    state = job.devices.replicate(best.state)
    report = job.evaluate(state, *splits[config.report_split])
    centre = job.evaluate(state, *splits[config.report_split], crops=1)
    performance = summary["performance"]
    if performance is None:  # finished before this call: keep the figures of the run that trained
        previous = evaluate.read_json(os.path.join(workdir, "results.json"), check=False)
        performance = (previous or {}).get("performance")
    results = replicas.results(config, best, report, performance, centre=centre)
    if is_main:
        if job.models.count > 1:  # each replica's report and the ensemble's
            replicas.write_final_reports(workdir, config.report_split, report)
        write_final_reports(workdir, config.report_split, results)
    logging.info(
        "%s accuracy of the model chosen on %s (step %d): %.4f (mean class accuracy %.4f)",
        config.report_split,
        config.select_split,
        results["selected_step"],
        results[config.report_split]["accuracy"],
        results[config.report_split].get("mean_class_accuracy", float("nan")),
    )
    return results


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the loop stands: `step` global steps done, the last call having run `steps`."""

    step: int
    steps: int
    steps_per_epoch: int
    total_steps: int

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

    def evaluation_due(self, every_epochs: int) -> bool:
        """Whether the select split is evaluated here: every `every_epochs` (> 0) epochs and
        after the last."""
        return (
            self.end_of_epoch and every_epochs > 0 and (self.epoch % every_epochs == 0 or self.last)
        )

    def save_due(self, config: ml_collections.ConfigDict) -> bool:
        """Whether the latest checkpoint is saved here (each `checkpoint_every_epochs` /
        `_steps`, and the last step; a stop saves too)."""
        every_steps = config.checkpoint_every_steps
        return (
            (self.end_of_epoch and self.epoch % config.checkpoint_every_epochs == 0)
            or (every_steps > 0 and self.step % every_steps == 0)
            or self.last
        )

    def meta(self) -> dict[str, int]:
        """The data position a checkpoint records."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
        }


class TrainLog:
    """Training curves (`metrics.train_summaries`) and the progress line, every
    `config.log_every_steps` and at every epoch end."""

    def __init__(self, job: Job, writers: RunWriters):
        self.config, self.devices, self.writers = job.config, job.devices, writers
        self.count = job.models.count
        self.history: list[dict] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def _write(self, step: int, seconds: float | None) -> None:
        history = self.devices.unreplicate(self.history)  # pmap: drop the device axis
        self.history = []
        summaries = metrics.train_summaries(history, self.count, step)
        images = sum(np.size(h["loss"]) for h in history) * self.config.batch_size  # all models'
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
    job: Job,
    workdir: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    *,
    select: tuple[np.ndarray, np.ndarray] | None = None,
    select_name: str = "",
) -> dict[str, Any]:
    """The training loop: resume, train `config.num_epochs`, evaluate, checkpoint. Returns
    `{'state': final host state, 'template': for restores, 'performance': speed figures}`."""
    config, devices = job.config, job.devices
    wall_start = time.perf_counter()
    steps_per_epoch = plan_steps_per_epoch(len(train_labels), config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    template = job.models.create_state(job.model, steps_per_epoch)
    many = job.models.count > 1  # K replicas: each one's best checkpoint, curves and reports
    manager = (replicas.Checkpoints if many else checkpoint.Checkpoints)(workdir, config)
    host_state = _resume(manager, template, config)
    at = Position(int(np.ravel(host_state.step)[0]), 0, steps_per_epoch, total_steps)
    if at.step >= total_steps:
        logging.info("Training already finished (%d steps).", at.step)
        manager.close()
        return {"state": host_state, "template": template, "performance": None}

    writers = (replicas.RunWriters if many else RunWriters)(
        workdir, config, enabled=jax.process_index() == 0
    )
    if at.step == 0:
        writers.write_start(host_state.params)
    log, timer, stop = TrainLog(job, writers), Timer(job), StopSignal()
    crops = config_schema.select_crops(config)  # of the selection evaluations
    state = devices.replicate(host_state)
    calls = job.train_calls(train_images, train_labels, at.step, total_steps, steps_per_epoch)
    try:
        for steps, run in calls:
            state, step_metrics = run(state)
            at = dataclasses.replace(at, step=at.step + steps, steps=steps)
            timer.steps += steps
            log(step_metrics, at)
            evaluate_now = select is not None and at.evaluation_due(config.eval_every_epochs)
            stop_now = stop.agreed()
            save_now = at.save_due(config) or stop_now
            if not (evaluate_now or save_now):
                continue
            timer.pause(state)
            report = None
            if evaluate_now:
                report = job.evaluate(state, *select, crops=crops)
                timer.evaluated(len(select[1]) * crops)
                writers.write_evaluation(at.step, select_name, at.epoch, report)
            log.check_pending(at.step)  # before anything is saved
            host_state = devices.unreplicate(state)
            if save_now:
                manager.save(at.step, host_state, at.meta())
            if report is not None:  # the best checkpoint, by the select split's accuracy
                manager.maybe_save_best(at.step, host_state, at.meta(), report)
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
    return {"state": devices.unreplicate(state), "template": template, "performance": performance}


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, path: str, split: str, crops: int = 10
) -> dict[str, Any]:
    """Ten-crop (or `crops=1`: centre-crop) metrics of a checkpoint on `split`, written to
    `workdir/eval/<split>_evaluate[_centre_crop].json` (and PNG); of a replica run's replicas
    as `checkpoint.init_from` takes them."""
    job = create_job(config)
    template = job.models.create_state(job.model, steps_per_epoch=1)
    state = job.devices.replicate(checkpoint.init_from(path, template, config))
    images, labels = input_data.load_splits(config, [split])[split]
    report = job.evaluate(state, images, labels, crops=crops)
    suffix = "" if crops == 10 else "_centre_crop"
    reports = replicas.named_reports(f"{split}_evaluate", report, suffix)
    if jax.process_index() == 0:
        for name, one in reports.items():
            evaluate.write_report(os.path.join(workdir, "eval"), name, one)
    for name, one in reports.items():
        logging.info("%s of %s: accuracy %.4f", name, path, one["accuracy"])
        print(
            f"{name}: {100 * one['accuracy']:.2f}% ({one['num_examples']} images; "
            f"mean class accuracy {100 * one['mean_class_accuracy']:.2f}%)"
        )
    return report
