"""The run's config, kept in `workdir/config.json`: a resume must train the same recipe.

The first start writes it; a later start refuses (a `UserError` listing `old -> new`) a config
whose result-changing fields (all but `RESULT_NEUTRAL`) differ, unless `allow_changes`
(`--allow_config_changes`). Then `config.json` holds the new config (written by process 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
from absl import logging

from fer_jax.training import evaluate
from fer_jax.user_errors import UserError

CONFIG_FILE = "config.json"
# Fields that do not change what is trained or which model is selected and reported, at the
# top level of a config and in its `jaffe` section (the cross-validation stage); every other
# field, and any field added later, does. Paths and data source: 'tfds' and 'files' give the
# same arrays. Input pipeline, steps per call, parallelism: the same batches and steps
# (tests/test_device_input.py, tests/test_parallel.py); replica_map: vmapped or unrolled
# replicas, the same steps. Logging, checkpoint cadence and count, evaluation batch size, the
# MFU peak: bookkeeping. cross_validate: whether the CV stage runs after training, not what it
# or the training produces. (eval_every_epochs is not here: which epochs are evaluated decides
# which checkpoint is selected.)
RESULT_NEUTRAL = frozenset(
    "data_source data_dir manual_dir input_pipeline steps_per_dispatch parallelism replica_map "
    "peak_tflops eval_batch_size log_every_steps checkpoint_every_epochs checkpoint_every_steps "
    "keep_checkpoints cross_validate".split()
)
NEUTRAL_SECTIONS = ("", "jaffe")  # where RESULT_NEUTRAL applies: the top level, config.jaffe
ABSENT = "<absent>"
# Fields added after runs were first written, and the value their absence from an older
# `config.json` stands for (what those runs trained with): no change, if the new value is it.
ADDED_FIELDS = {
    "replicas": 1,
    "replica_seeds": [],
    "replica_overrides": [],
    "replica_map": "",
    "zoom": 0.0,  # config.augment
    "rotate": 0.0,
    "erase": 0.0,
    "ema_decay": 0.0,
}


def changes_result(path: str) -> bool:
    """Whether the field at dotted `path` ('model.width') changes the trained result."""
    section, _, name = path.rpartition(".")
    return not (section in NEUTRAL_SECTIONS and name in RESULT_NEUTRAL)


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping) and tree:
        for key in sorted(tree):
            yield from _leaves(tree[key], f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """`(dotted path, old value, new value)` of each leaf that differs (`ABSENT`: in one config
    only), sorted by path."""
    before, after = dict(_leaves(old)), dict(_leaves(new))

    def was(path: str) -> Any:
        return before.get(path, ADDED_FIELDS.get(path.rpartition(".")[2], ABSENT))

    return [
        (path, was(path), after.get(path, ABSENT))
        for path in sorted(before.keys() | after.keys())
        if was(path) != after.get(path, ABSENT)
    ]


def _describe(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"config.{path} {old!r} -> {new!r}" for path, old, new in changes)


def to_json(config: ml_collections.ConfigDict) -> str:
    """The config as `config.json` holds it."""
    return config.to_json_best_effort(indent=1, sort_keys=True)


def compare(
    config: ml_collections.ConfigDict, workdir: str, *, allow_changes: bool = False
) -> list[tuple[str, Any, Any]] | None:
    """`differences` of `config` from the one saved in `workdir` (None: none saved); unless
    `allow_changes`, UserError where that is unreadable or a result-changing field differs."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        old = evaluate.read_json(path)
    except (OSError, ValueError) as e:
        if not allow_changes:
            raise UserError(
                f"{path} is unreadable ({e}); remove it, or pass --allow_config_changes to "
                "replace it with this config"
            ) from e
        return None
    changed = None if old is None else differences(old, json.loads(to_json(config)))
    recipe = [c for c in changed or [] if changes_result(c[0])]
    if recipe and not allow_changes:
        raise UserError(
            f"the run in {workdir} was started with a different recipe: {_describe(recipe)}; "
            "resume with the same values, use another --workdir, or pass "
            "--allow_config_changes to train on with the new ones"
        )
    return changed


def save_or_compare(
    config: ml_collections.ConfigDict, workdir: str, *, allow_changes: bool = False
) -> None:
    """Writes `workdir/config.json` at a run's first start; later, `compare`s and logs the
    changes it lets through."""
    import jax

    changed = compare(config, workdir, allow_changes=allow_changes)
    if changed == []:
        return  # the same config
    recipe = [c for c in changed or [] if changes_result(c[0])]
    neutral = [c for c in changed or [] if not changes_result(c[0])]
    if recipe:
        logging.warning("Config changes allowed (--allow_config_changes): %s", _describe(recipe))
    if neutral:
        logging.info("Config changes that do not affect the result: %s", _describe(neutral))
    if jax.process_index() == 0:  # atomically: `to_json`'s text, sorted, one space indents
        evaluate.write_json(
            os.path.join(workdir, CONFIG_FILE), json.loads(to_json(config)), indent=1
        )
