"""Speed figures of a run (`results.json`'s 'performance'): `Timer` splits the loop's wall
clock into training, evaluation and the rest; `performance` turns it into images/s, MFU and
the projected time of the whole recipe."""

from __future__ import annotations

import resource
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from fer_jax.model import flops
from fer_jax.training import config_schema


class Timer:
    """Training time runs from `resume` to `pause` (which waits for the steps), evaluation
    time over `job.evaluate`, each less its compiles."""

    def __init__(self, job: Any):
        self.job = job  # `fer_jax.training.train.Job`
        self.steps = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.evaluations = 0
        self.evaluated_crops = 0
        self._compiles = job.compile_seconds
        self._start: float | None = time.perf_counter()

    def _compiled_since(self, kind: str) -> float:
        now = self.job.compile_seconds[kind]
        spent, self._compiles[kind] = now - self._compiles[kind], now
        return spent

    def pause(self, state: Any) -> None:
        if self._start is not None:
            jax.block_until_ready(state)
            self.train_seconds += time.perf_counter() - self._start
            self.train_seconds -= self._compiled_since("train")
            self._start = None
        self._eval_start = time.perf_counter()

    def evaluated(self, num_crops: int) -> None:
        """One selection evaluation of `num_crops` crops (images x crops each) has ended."""
        self.eval_seconds += time.perf_counter() - self._eval_start - self._compiled_since("eval")
        self.evaluations += 1
        self.evaluated_crops += num_crops

    def resume(self) -> None:
        self._start = time.perf_counter()

    def performance(
        self, config: ml_collections.ConfigDict, steps_per_epoch: int, wall_seconds: float
    ) -> dict[str, Any]:
        """`results.json`'s 'performance'; images counted over all the models trained."""
        num_models = self.job.models.count
        images = self.steps * config.batch_size * num_models
        train_ips = images / self.train_seconds if self.train_seconds > 0 else None
        busy = self.train_seconds + self.eval_seconds
        total_ips = images / busy if busy > 0 else None
        device = self.job.devices.devices[0]
        compile_s = self.job.compile_seconds
        peak = config.get("peak_tflops", 0.0) or flops.peak_tflops(device.device_kind)
        per_image = _model_flops(config)
        num_devices = self.job.devices.num_devices

        def mfu(ips):
            if ips is None or not peak or per_image is None:
                return None
            return ips * per_image["train"] / (peak * 1e12 * num_devices)

        epochs = self.steps / steps_per_epoch
        projected = None
        if epochs > 0:
            projected = self.train_seconds / epochs * config.num_epochs
            if self.evaluations and config.eval_every_epochs > 0:
                evals = -(-config.num_epochs // config.eval_every_epochs)
                projected += self.eval_seconds / self.evaluations * evals
            projected += compile_s["train"] + compile_s["eval"]
        return {
            "platform": device.platform,
            "device_kind": device.device_kind,
            "num_devices": num_devices,
            "input_pipeline": self.job.input_pipeline,
            "steps_per_dispatch": self.job.steps_per_dispatch,
            "half_precision": bool(config.half_precision),
            "replicas": num_models,
            "replica_map": getattr(self.job.models, "map_kind", None),
            "batch_size": config.batch_size,
            "steps_per_epoch": steps_per_epoch,
            "num_epochs": config.num_epochs,
            "eval_every_epochs": config.eval_every_epochs,
            "steps_timed": self.steps,
            "epochs_timed": epochs,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "evaluations": self.evaluations,
            "train_images_per_s": train_ips,
            "images_per_s_including_eval": total_ips,
            "select_crops": config_schema.select_crops(config),
            "eval_crops_per_s": (
                self.evaluated_crops / self.eval_seconds if self.eval_seconds > 0 else None
            ),
            "compile_seconds": compile_s,
            "peak_device_memory_gib": _peak_device_memory_gib(device),
            "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "flops_per_image": per_image,
            "peak_tflops": peak or None,
            "mfu_train": mfu(train_ips),
            "mfu_including_eval": mfu(total_ips),
            "projected_full_recipe_s": projected,
            "wall_seconds": wall_seconds,
        }


def _model_flops(config: ml_collections.ConfigDict) -> dict[str, float] | None:
    try:
        return flops.model_flops_per_image(config.model)
    except Exception as e:  # noqa: BLE001 - a failed count must not lose a finished run
        logging.error("Could not count the model's FLOPs: %s: %s", type(e).__name__, e)
        return None


def _peak_device_memory_gib(device: jax.Device) -> float | None:
    try:
        stats = device.memory_stats() or {}
    except (NotImplementedError, RuntimeError):  # not every backend reports memory
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def performance_scalars(performance: dict[str, Any]) -> dict[str, float]:
    keys = (
        "train_images_per_s",
        "images_per_s_including_eval",
        "eval_crops_per_s",
        "mfu_train",
        "mfu_including_eval",
        "peak_device_memory_gib",
        "projected_full_recipe_s",
    )
    out = {f"perf_{k}": performance[k] for k in keys if performance[k] is not None}
    out.update({f"perf_compile_{k}_s": v for k, v in performance["compile_seconds"].items()})
    return out
