"""Orbax checkpoints of training runs: save, resume, pick the best, start from another run.

Layout of a workdir:
  checkpoints/<step>/{state,meta}  the last `config.keep_checkpoints` saves (every epoch, and
                                   every `checkpoint_every_steps` if set)
  best/<step>/{state,meta}         the best so far by `config.select_split` accuracy
`state` holds `STATE_FIELDS` (and 'ema', the moving average, which `load_variables` gives where
there is one); `meta` (JSON) the model and the data position. A stacked checkpoint of K models
has `meta['replicas'] = K`; the readers take one out (`take_replica`). Orbax renames a complete
checkpoint into place; an unreadable one is logged and skipped. With several processes, Orbax
writes from process 0 into a workdir all share, and every restore checks all got the same one.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import serialization, traverse_util

from fer_jax.model import pretrained
from fer_jax.model.resnet import ResNet18, model_from_config, variable_shapes

if TYPE_CHECKING:  # Orbax is imported where a run directory is read or written: not for
    import orbax.checkpoint as ocp  # 'pretrained' (~0.15 s of a `predict` start).

STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "dropout_key")
EMA_FIELD = "ema"  # saved too where the state has a moving average (`state.start_ema`)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unreadable, or from an incompatible model)."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    meta: dict[str, Any]


def prepare_workdir(workdir: str) -> str:
    """Creates `workdir`, checks it is writable (and shared by all processes); its abspath."""
    path = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe"):
            pass
    except OSError as e:
        raise PermissionError(f"workdir {path} is not writable: {e}") from e
    if jax.process_count() > 1:
        _check_shared(path)
    return path


def _check_shared(path: str) -> None:
    """Raises unless every process sees a file that process 0 creates in `path` (else the
    others would silently start over instead of resuming)."""
    from jax.experimental import multihost_utils

    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    probe = os.path.join(path, f".shared_probe_{token}")
    if jax.process_index() == 0:
        with open(probe, "w"):
            pass
    multihost_utils.sync_global_devices(f"fer_jax.training.checkpoint shared workdir {token}")
    seen = np.asarray(multihost_utils.process_allgather(np.int32(os.path.exists(probe))))
    if jax.process_index() == 0:
        os.remove(probe)
    blind = np.flatnonzero(seen == 0).tolist()
    if blind:
        raise PermissionError(
            f"workdir {path} is not shared by all processes: process(es) {blind} do not see "
            "the files of process 0 there. Use a directory on a filesystem that all hosts mount."
        )


def _check_same_checkpoint(kind: int, step: int | None, what: str) -> None:
    """With several processes, raises unless all restored the same checkpoint (`kind`: which
    directory, `step`: which step; None: none) of `what`."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.array([kind, -1 if step is None else step], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    if not (every == every[0]).all():
        found = {p: (None if s < 0 else int(s)) for p, (_, s) in enumerate(every)}
        raise CheckpointError(
            f"processes restored different checkpoints of {what} (process: step {found}); "
            "is the directory shared, and the same, on every host?"
        )


def _fields(state: Any) -> tuple[str, ...]:
    return STATE_FIELDS + ((EMA_FIELD,) if getattr(state, EMA_FIELD, None) is not None else ())


def _to_tree(state: Any) -> dict[str, Any]:
    return {k: serialization.to_state_dict(getattr(state, k)) for k in _fields(state)}


def _check_compatible(template_tree: Any, tree: Any, source: str) -> None:
    want = traverse_util.flatten_dict(template_tree, sep="/")
    got = traverse_util.flatten_dict(tree, sep="/")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{source} is from an incompatible model or optimizer: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}"
        )
    for key, value in want.items():
        if _shape(value) != _shape(got[key]):
            raise CheckpointError(
                f"{source} is from an incompatible model: {key} has shape "
                f"{_shape(got[key])}, this config expects {_shape(value)}"
            )


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def stack(trees: Sequence[Any]) -> Any:
    """K host pytrees -> one with a leading axis `(K, ...)` on every leaf."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def take(tree: Any, k: int) -> Any:
    """Slice k of a stacked host pytree."""
    return jax.tree.map(lambda x: np.asarray(x)[k], tree)


def _from_tree(template: Any, tree: Mapping[str, Any], source: str) -> Any:
    fields = {k: getattr(template, k) for k in _fields(template)}
    return template.replace(**_from_tree_part(fields, jax.device_get(dict(tree)), source))


def replica_count(meta: Mapping[str, Any]) -> int:
    """K of a checkpoint's meta (1: a plain run)."""
    return int(meta.get("replicas", 1))


def chosen_replica(meta: Mapping[str, Any]) -> int:
    """The replica with the best select-split accuracy in `meta` (0 without selection)."""
    accuracy = meta.get("select_accuracy")
    if replica_count(meta) == 1 or accuracy is None:
        return 0
    return int(np.argmax(accuracy))


def _check_model(meta: Mapping[str, Any], model_config: Mapping[str, Any], source: str) -> None:
    saved = meta.get("model", {})
    differ = {
        k: (saved.get(k), model_config.get(k))
        for k in ("num_classes", "width", "cbam", "head")
        if saved.get(k) != model_config.get(k)
    }
    if differ:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"{source} is from an incompatible model ({desc})")


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
    # Orbax's multi-process barriers are named after the step: the latest and best managers,
    # both saving step N, would meet at the same ones. A prefix per directory keeps them apart.
    import orbax.checkpoint as ocp

    prefix = os.path.basename(os.path.normpath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix),
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def _restore_step(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
    import orbax.checkpoint as ocp

    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    return restored["state"], dict(restored["meta"])


def _readable(
    manager: ocp.CheckpointManager, steps: list[int] | None = None
) -> Iterator[tuple[int, dict, dict, str]]:
    """`(step, state tree, meta, its directory)` of each readable checkpoint of `steps`
    (default: all, newest first)."""
    for step in sorted(manager.all_steps(), reverse=True) if steps is None else steps:
        path = os.path.join(str(manager.directory), str(step))
        try:
            tree, meta = _restore_step(manager, step)
        except Exception as e:  # noqa: BLE001 - any read failure means: try the previous one
            error = f"{type(e).__name__}: {e}"
            logging.error("checkpoint %s is unreadable (%s); trying the previous one.", path, error)
            continue
        yield step, tree, meta, path


def _restore_newest(
    manager: ocp.CheckpointManager,
    template: Any,
    label: str,
    model_config: Mapping[str, Any] | None = None,
    replicas: int = 0,
) -> Restored | None:
    """Newest readable checkpoint of `manager` as a state like `template`, checked to be of
    `model_config` and (> 0) of `replicas`."""
    for step, tree, meta, path in _readable(manager):
        source = f"{label} checkpoint {path}"
        if model_config is not None:
            _check_model(meta, model_config, source)
        if replicas and replica_count(meta) != replicas:
            raise CheckpointError(
                f"{source} holds {replica_count(meta)} replica(s) and config.replicas is "
                f"{replicas}: resume with the run's config.replicas, or use another workdir"
            )
        return Restored(step, _from_tree(template, tree, source), meta)
    return None


class Checkpoints:
    """The latest-few and best checkpoint managers of one workdir."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.model_config = config.model.to_dict()
        self.replicas = int(config.get("replicas", 1))
        self.latest = _manager(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
        self.best = _manager(os.path.join(workdir, "best"), 1)
        self.best_meta: dict[str, Any] = {}
        if self.best.latest_step() is not None:
            try:
                _, meta = _restore_step(self.best, self.best.latest_step())
                if replica_count(meta) == self.replicas:
                    self.best_meta = meta
            except Exception as e:  # noqa: BLE001
                logging.error("best checkpoint in %s is unreadable: %s", workdir, e)
        self.best_accuracy = self.best_meta.get("select_accuracy", -1.0)

    def _save(self, manager, step: int, state: Any, meta: dict[str, Any]) -> None:
        import orbax.checkpoint as ocp

        meta = {**meta, "step": step, "model": self.model_config}
        if self.replicas > 1:
            meta["replicas"] = self.replicas
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_tree(state)), meta=ocp.args.JsonSave(meta)
            ),
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves host `state` at `step` (asynchronously; `close` waits)."""
        self._save(self.latest, step, state, meta)

    def maybe_save_best(self, step: int, state: Any, meta: dict[str, Any], report: dict) -> None:
        """Keeps `state` as the best checkpoint if its select-split `report` (`metrics.report`)
        beats the best accuracy so far."""
        accuracy = float(report["accuracy"])
        if accuracy > self.best_accuracy:
            self.best_accuracy = accuracy
            self._save(self.best, step, state, {**meta, "select_accuracy": accuracy})

    def restore_latest(self, template: Any) -> Restored | None:
        """The newest readable checkpoint as a host state like `template`, or None."""
        restored = _restore_newest(
            self.latest, template, "latest", self.model_config, self.replicas
        )
        step = None if restored is None else restored.step
        _check_same_checkpoint(0, step, f"{self.latest.directory} (resuming)")
        return restored

    def restore_best(self, template: Any) -> Any:
        """The state of the best checkpoint saved so far, like `template`."""
        step = self.best.latest_step()
        tree, _ = _restore_step(self.best, step)
        return _from_tree(template, tree, f"best checkpoint {step}")

    def close(self) -> None:
        for manager in (self.latest, self.best):
            manager.wait_until_finished()
            manager.close()


def restore_best_or_latest(workdir: str, template: Any) -> Restored:
    """The best checkpoint of a finished run, else its latest one (no selection split)."""
    restored, kind = None, -1
    for i, sub in enumerate(("best", "checkpoints")):
        directory = os.path.join(workdir, sub)
        if not os.path.isdir(directory):
            continue
        manager = _manager(directory, 1_000_000)
        try:
            restored = _restore_newest(manager, template, sub)
        finally:
            manager.close()
        if restored is not None:
            kind = i
            break
    _check_same_checkpoint(kind, None if restored is None else restored.step, workdir)
    if restored is None:
        raise CheckpointError(f"no readable checkpoint in {workdir}")
    return restored


def _resolve(path: str) -> tuple[ocp.CheckpointManager, int | None]:
    """A run directory (best, else latest) or one checkpoint directory `.../<step>`."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return _manager(os.path.dirname(path), 1_000_000), int(base)
    for sub in ("best", "checkpoints"):
        directory = os.path.join(path, sub)
        if os.path.isdir(directory):
            manager = _manager(directory, 1_000_000)
            if manager.all_steps():
                return manager, None
            manager.close()
    raise FileNotFoundError(
        f"{path} is neither a run directory with best/ or checkpoints/ nor a checkpoint "
        "directory <step>/ holding state/ and meta/"
    )


def load_variables(
    path: str, *, average: bool = True
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """`(variables {'params', 'batch_stats'} as numpy, meta, source)` from a run or checkpoint:
    its moving average where it has one (`meta['ema'] = True` then); `average=False`: the
    optimizer's weights (`meta['has_ema']`: it had an average too). `pretrained[:NAME]` or an
    `.npz` is a model shipped in the package: every checkpoint argument learns that word here.
    """
    if pretrained.is_reference(path):
        return pretrained.load_as_checkpoint(path)
    manager, step = _resolve(path)
    try:
        found = next(_readable(manager, None if step is None else [step]), None)
    finally:
        manager.close()
    kind = int(os.path.basename(os.path.normpath(str(manager.directory))) == "best")
    _check_same_checkpoint(kind, None if found is None else found[0], path)
    if found is None:
        raise CheckpointError(f"no readable checkpoint at {path}")
    _, tree, meta, source = found
    if EMA_FIELD in tree and average:
        tree, meta = tree[EMA_FIELD], {**meta, "ema": True}
    elif EMA_FIELD in tree:
        meta = {**meta, "has_ema": True}
    return {k: jax.device_get(tree[k]) for k in ("params", "batch_stats")}, meta, source


def take_replica(
    variables: dict[str, Any], meta: Mapping[str, Any], replica: int | None, source: str
) -> tuple[dict[str, Any], int]:
    """`(variables of one replica, its index)` of a replica run's stacked `variables`:
    `replica`, or (None) `chosen_replica`. A plain run's are returned as is."""
    k = replica_count(meta)
    if k == 1:
        if replica not in (None, 0):
            raise CheckpointError(f"{source} holds one model, not replicas: replica {replica}")
        return variables, 0
    index = chosen_replica(meta) if replica is None else replica
    if not 0 <= index < k:
        raise CheckpointError(f"{source} holds replicas 0..{k - 1}, not {index}")
    return take(variables, index), index


def init_from(path: str, template: Any, config: ml_collections.ConfigDict) -> Any:
    """`template` with params and BatchNorm statistics from another run (`load_variables`),
    and its moving average (if any) starting there. A stacked source with as many models gives
    each its namesake; otherwise its `chosen_replica` (or only model) goes to every one.
    """
    variables, meta, source = load_variables(path)
    _check_model(meta, config.model.to_dict(), source)
    k = int(config.get("replicas", 1))
    if replica_count(meta) != k:
        variables, index = take_replica(variables, meta, None, source)
        if replica_count(meta) > 1:
            logging.info("%s: replica %d (chosen on its select split)", source, index)
        if k > 1:
            variables = stack([variables] * k)
    params = _from_tree_part(template.params, variables["params"], source)
    batch_stats = _from_tree_part(template.batch_stats, variables["batch_stats"], source)
    logging.info(
        "Initialised params and BatchNorm statistics from %s%s",
        source,
        " (its moving average)" if meta.get("ema") else "",
    )
    ema = None if template.ema is None else {"params": params, "batch_stats": batch_stats}
    ema = jax.tree.map(np.copy, ema)
    return template.replace(params=params, batch_stats=batch_stats, ema=ema)


def _from_tree_part(template: Any, tree: Any, source: str) -> Any:
    want = serialization.to_state_dict(template)
    _check_compatible(want, tree, source)
    return serialization.from_state_dict(template, tree)


def load_for_inference(
    path: str, replica: int | str | None = None, **overrides: Any
) -> tuple[ResNet18, dict[str, Any]]:
    """`(model, variables)` for `model.apply(variables, x, train=False)` from a run (its best
    checkpoint, else its latest), a checkpoint or `pretrained` (`load_variables`); `overrides`
    go to the model. Of a replica run: `take_replica`'s, or (`replica='all'`) all stacked.
    """
    variables, meta, source = load_variables(path)
    if "model" not in meta:
        raise CheckpointError(f"{source} has no model description in its meta")
    model = model_from_config(meta["model"], dropout_rate=0.0, **overrides)
    shapes = variable_shapes(model)
    if replica == "all":
        k = replica_count(meta)
        if k > 1:
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct((k, *a.shape), a.dtype), shapes)
        else:
            variables = jax.tree.map(lambda x: np.asarray(x)[None], variables)
    else:
        variables, _ = take_replica(variables, meta, replica, source)
    return model, {
        k: _from_tree_part(shapes[k], variables[k], source) for k in ("params", "batch_stats")
    }
