"""JAFFE k-fold cross-validation: fine-tune a FER2013 model on each fold, test on the rest.

`read_source` reads how the model at `config.init_from` was trained, `fine_tuning_config` takes
what the command line does not set from it, `run` trains and evaluates each fold (resuming);
`train_then_cross_validate` is `--mode=train`'s job (docs/training.md, "JAFFE cross-validation").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from data_pipelines import folds as folds_module
from data_pipelines.folds import jaffe_folds
from data_pipelines.labels import CLASS_NAMES
from fer_jax.model import pretrained
from fer_jax.training import checkpoint, evaluate, input_data, run_config
from fer_jax.training.train import Job, create_job, fit, train_and_evaluate
from fer_jax.user_errors import UserError

# The shipped model's loss (margin 4, lambda held at 48, where the paper's 300-epoch schedule
# ends), taken for a source that records none (the weights' manifest, a bare checkpoint).
SHIPPED_MARGIN = 4
SHIPPED_LAMBDA = 48.0
SHIPPED_RECIPE = "the shipped model's recipe (cross_validate.SHIPPED_LAMBDA)"
LAMBDA_FIELDS = tuple(f"lambda_{f}" for f in ("base", "gamma", "power", "min", "per", "run_epochs"))
NETWORK_FIELDS = ("num_classes", "width", "cbam", "head")  # what the weights' shapes fix


@dataclasses.dataclass(frozen=True)
class Source:
    """How the model a cross-validation fine-tunes was trained, and where each value was read
    (`model` empty: unknown)."""

    name: str  # e.g. 'pretrained (/.../cbam_resnet18_fer2013.npz)'
    model: dict[str, Any]
    margin: int
    lam: float  # A-Softmax's lambda where its training ended
    origin: dict[str, str]  # 'model', 'matmul_dtype', 'loss' -> where it was read


def config_from_parent(
    config: ml_collections.ConfigDict, workdir: str
) -> ml_collections.ConfigDict:
    """The CV config of a FER2013 run: `config.jaffe`, fine-tuning that run's model."""
    cv = ml_collections.ConfigDict(config.jaffe.to_dict())
    cv.model = ml_collections.ConfigDict(config.model.to_dict())
    cv.init_from = cv.init_from or workdir
    cv.data_dir = cv.data_dir or config.data_dir
    for key in ("data_source", "input_pipeline", "steps_per_dispatch", "half_precision"):
        cv[key] = config[key]
    cv.parallelism = config.parallelism
    return cv


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        data = evaluate.read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); it describes the model to fine-tune") from e
    return data if isinstance(data, dict) else None


def _lambda_at_end(run: Mapping[str, Any], steps_per_epoch: int | None) -> float:
    """A-Softmax's lambda at the last step of a run of config `run` (its JSON); a per-step
    clock without the run's steps per epoch: `lambda_min` (reached within a few epochs)."""
    from fer_jax.training.step import lambda_schedule

    loss = ml_collections.ConfigDict(dict(run["loss"]))
    if loss.lambda_per == "step" and not steps_per_epoch:
        return float(loss.lambda_min)
    spe = steps_per_epoch or 1  # the per-epoch and per-run clocks do not depend on it
    epochs = int(run["num_epochs"])
    return float(lambda_schedule(loss, spe, epochs)(epochs * spe))


def source_from_config(
    run: Mapping[str, Any], name: str, where: str, steps_per_epoch: int | None = None
) -> Source:
    """The `Source` of a run trained with config `run` (a dict read from `where`)."""
    lam = _lambda_at_end(run, steps_per_epoch)
    origin = {"model": where, "matmul_dtype": where, "loss": f"{where}: where its schedule ends"}
    return Source(name, dict(run["model"]), int(run["loss"]["margin"]), lam, origin)


def _pretrained_source(reference: str) -> Source:
    _, name_or_path = pretrained.parse_reference(reference)
    meta = pretrained.read_manifest(name_or_path).get("meta", {})
    path = pretrained.resolve(name_or_path)
    model = dict(meta.get("model", {}))
    provenance = meta.get("provenance", {})
    origin = {"model": "its metadata", "matmul_dtype": "its metadata"}
    if provenance.get("trained_matmul_dtype"):
        model["matmul_dtype"] = provenance["trained_matmul_dtype"]
        origin["matmul_dtype"] = "its provenance's trained_matmul_dtype, what it trained with"
    loss = provenance.get("loss")
    if isinstance(loss, Mapping) and "lambda" in loss:
        margin, lam = int(loss.get("margin", SHIPPED_MARGIN)), float(loss["lambda"])
        origin["loss"] = "its provenance's loss"
    else:
        margin, lam = SHIPPED_MARGIN, SHIPPED_LAMBDA
        origin["loss"] = f"{SHIPPED_RECIPE}: its metadata does not record its loss"
    return Source(f"{reference} ({path})", model, margin, lam, origin)


def read_source(init_from: str, field: str = "config.init_from") -> Source:
    """How the model at `init_from` (`pretrained[:NAME]`, a run or a checkpoint) was trained:
    its manifest, else its run's `config.json`, else the shipped recipe's loss."""
    if pretrained.is_reference(init_from):
        return _pretrained_source(init_from)
    path = os.path.abspath(os.path.expanduser(init_from))
    if not os.path.exists(path):
        raise UserError(
            f"{field}={init_from} does not exist; it names the model to fine-tune: pretrained "
            "(the shipped model), a FER2013 run directory or one of its checkpoints"
        )
    run = path
    if os.path.basename(path).isdigit():  # RUN/best/<step> or RUN/checkpoints/<step>
        run = os.path.dirname(os.path.dirname(path))
    saved = _read_json(os.path.join(run, run_config.CONFIG_FILE))
    if saved is None or "model" not in saved or "loss" not in saved:
        origin = {"loss": f"{SHIPPED_RECIPE}: no {run_config.CONFIG_FILE} in {run}"}
        return Source(init_from, {}, SHIPPED_MARGIN, SHIPPED_LAMBDA, origin)
    results = _read_json(os.path.join(run, "results.json")) or {}
    steps = (results.get("performance") or {}).get("steps_per_epoch")
    where = os.path.join(run, run_config.CONFIG_FILE)
    return source_from_config(saved, init_from, where, steps_per_epoch=steps)


def fine_tuning_config(
    config: ml_collections.ConfigDict, source: Source, user_set: Collection[str] = ()
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """`(config to fine-tune with, its settings)`: `config` with the model fields, A-Softmax's
    margin and lambda (held) of `source`, except the dotted fields in `user_set` (the command
    line's). The settings (`summary.json`'s `fine_tuning`) say where each value came from."""
    out = ml_collections.ConfigDict(config.to_dict())
    origin: dict[str, str] = {}
    for key in out.model.keys():
        if key not in source.model:
            continue
        field, value = f"model.{key}", source.model[key]
        if field in user_set:
            if key in NETWORK_FIELDS and out.model[key] != value:
                raise UserError(
                    f"config.{field}={out.model[key]!r} (set on the command line) does not fit "
                    f"the model it fine-tunes, {source.name}, whose {key} is {value!r}: leave "
                    f"--config.{field} out, or fine-tune another model"
                )
            continue
        out.model[key] = value
        origin[field] = source.origin["matmul_dtype" if key == "matmul_dtype" else "model"]
    loss: dict[str, Any] = {}
    if out.model.head == "a_softmax":
        if "loss.margin" not in user_set:
            out.loss.margin = source.margin
            origin["loss.margin"] = source.origin["loss"]
        set_lambda = [f"loss.{f}" for f in LAMBDA_FIELDS if f"loss.{f}" in user_set]
        if not set_lambda:
            out.loss.lambda_base = out.loss.lambda_min = source.lam
            origin["loss.lambda"] = source.origin["loss"]
        loss = {"margin": out.loss.margin, "lambda_held": None if set_lambda else source.lam}
        loss.update({f: out.loss[f] for f in LAMBDA_FIELDS if f in out.loss})
    settings = {
        "source": source.name,
        "model": out.model.to_dict(),
        "loss": loss or None,  # None: the softmax head has no margin or lambda
        "origin": origin,
        "set_on_command_line": sorted(f for f in user_set if f.split(".")[0] in ("model", "loss")),
    }
    return out, settings


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _field(config: ml_collections.ConfigDict, dotted: str) -> str:
    """`dotted` ('model.head') and its value in `config`, for the settings lines."""
    section, _, name = dotted.partition(".")
    return f"{dotted} {_value(config[section][name])}"


def settings_lines(settings: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """What `fine_tuning_config` chose, one line per origin, for the log and `--mode=check`."""
    by_origin: dict[str, list[str]] = {}
    for field, where in settings["origin"].items():
        if field == "loss.lambda":
            held = _value(settings["loss"]["lambda_held"])
            text = f"lambda held at {held} (loss.lambda_base = loss.lambda_min = {held})"
        else:
            text = _field(config, field)
        by_origin.setdefault(where, []).append(text)
    lines = [f"fine-tuning {settings['source']}; what the command line does not set comes from it:"]
    lines += [f"  {', '.join(texts)}: {where}" for where, texts in by_origin.items()]
    set_here = settings["set_on_command_line"]
    if set_here:
        lines.append(f"  {', '.join(_field(config, f) for f in set_here)}: the command line")
    loss = settings["loss"]
    if loss is None:
        lines.append("  no margin or lambda: head softmax")
    elif loss["lambda_held"] is None:
        schedule = ", ".join(f"{f} {_value(loss[f])}" for f in LAMBDA_FIELDS if f in loss)
        lines.append(f"  lambda: the config's schedule ({schedule}), as the command line set it")
    o = config.optimizer
    lines.append(
        f"  {o.name} at {_value(o.learning_rate)} ({o.schedule}), {config.num_epochs} epochs a "
        f"fold, batch {config.batch_size}: the config"
    )
    return lines


def make_folds(
    labels: np.ndarray,
    subjects: np.ndarray,
    config: ml_collections.ConfigDict,
    label: str = "JAFFE (cross-validation)",
    field: str = "config",
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """`{protocol: its folds}` for each protocol `config.fold_protocol` runs, or a UserError
    (`label`: the stage, `field`: its config section)."""
    made = {}
    for protocol in folds_module.protocols_of(config.fold_protocol):
        try:
            made[protocol] = jaffe_folds(
                labels, subjects, k=config.folds, protocol=protocol, seed=config.seed
            )
        except ValueError as e:
            other = f" or {field}.fold_protocol='random'" if protocol == "subject" else ""
            raise UserError(
                f"{label}: {e} for the {protocol} folds ({field}.fold_protocol="
                f"{config.fold_protocol!r}): use more images, fewer {field}.folds{other}"
            ) from e
    return made


def fold_plan_lines(
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray,
    subjects: np.ndarray,
    config: ml_collections.ConfigDict,
    protocol: str | None = None,
) -> list[str]:
    """Each fold's training and test sizes, test images per class and subjects."""
    labels, subjects = np.asarray(labels), np.asarray(subjects)
    lines = [
        f"fold plan: {len(folds)} folds ({protocol or config.fold_protocol}, seed {config.seed}) "
        f"of {labels.size} images, {np.unique(subjects).size} subjects:"
    ]
    for k, (train, test) in enumerate(folds):
        counts = np.bincount(labels[test], minlength=len(CLASS_NAMES))
        per_class = ", ".join(f"{n} {c}" for n, c in zip(CLASS_NAMES, counts, strict=True))
        who = np.unique(subjects[test])
        shown = ", ".join(who) if who.size <= 4 else f"{who.size} subjects"
        lines.append(f"  fold {k}: train {len(train)}, test {len(test)} ({per_class}; {shown})")
    return lines


def check_layout(workdir: str, choice: str, field: str = "config") -> None:
    """UserError where `workdir` holds the other layout than `fold_protocol=choice` runs: one
    protocol's folds in `fold_<k>/`, or both protocols' in `random/` and `subject/`."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(path):
        return
    # Unreadable: run_config.save_or_compare says what is wrong with it.
    saved = evaluate.read_json(os.path.join(path, run_config.CONFIG_FILE), check=False)
    saved = saved.get("fold_protocol") if isinstance(saved, dict) else None
    saved = saved if isinstance(saved, str) else None
    names = os.listdir(path)
    one = saved in folds_module.PROTOCOLS or (
        saved is None and any(n.startswith("fold_") for n in names)
    )
    both = saved == folds_module.BOTH or (
        saved is None and any(n in folds_module.PROTOCOLS for n in names)
    )
    if choice == folds_module.BOTH and one:
        was = saved or "random or subject, whichever it ran"
        raise UserError(
            f"workdir {path} holds a one-protocol cross-validation ({field}.fold_protocol="
            f"{was}, its folds in {path}/fold_<k>/), not both protocols' (in random/ and "
            f"subject/): resume it with --{field}.fold_protocol={saved or 'random'}, or run "
            "both protocols in another --workdir"
        )
    if choice in folds_module.PROTOCOLS and both:
        alone = f", or --workdir={path}/{choice} (that protocol's own)" if field == "config" else ""
        raise UserError(
            f"workdir {path} holds a cross-validation of both protocols ({field}.fold_protocol="
            f"both, in {path}/random/ and {path}/subject/): resume it with "
            f"--{field}.fold_protocol=both{alone}, or use another --workdir"
        )


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    user_set: Collection[str] = (),
    allow_config_changes: bool = False,
    field: str = "config",
) -> dict[str, Any]:
    """Runs (or resumes) every fold of `config` in `workdir` (each protocol of 'both' in its
    subdirectory), fine-tuning `config.init_from`; returns the summary. `field`: where the
    config sits in the user's."""
    config, settings = fine_tuning_config(config, read_source(config.init_from), user_set)
    for line in settings_lines(settings, config):
        logging.info("%s", line)
    workdir = checkpoint.prepare_workdir(workdir)
    check_layout(workdir, config.fold_protocol, field)
    run_config.save_or_compare(config, workdir, allow_changes=allow_config_changes)
    arrays = input_data.load_split_arrays(config, "train")
    plans = make_folds(arrays["label"], arrays["subject"], config, field=field)
    for protocol, folds in plans.items():
        for line in fold_plan_lines(folds, arrays["label"], arrays["subject"], config, protocol):
            logging.info("%s", line)
    job = create_job(config)
    both = config.fold_protocol == folds_module.BOTH
    extra = {"init_from": config.init_from, "fine_tuning": settings}
    by_protocol = {}
    for protocol, folds in plans.items():
        if not both:
            by_protocol[protocol] = _run_protocol(config, job, arrays, folds, workdir)
            continue
        sub_config = ml_collections.ConfigDict({**config.to_dict(), "fold_protocol": protocol})
        subdir = checkpoint.prepare_workdir(os.path.join(workdir, protocol))
        run_config.save_or_compare(sub_config, subdir, allow_changes=allow_config_changes)
        by_protocol[protocol] = _run_protocol(sub_config, job, arrays, folds, subdir)
        for line in summary_lines(by_protocol[protocol]):
            logging.info("%s", line)
        if jax.process_index() == 0:
            alone = {protocol: by_protocol[protocol]}  # as a one-protocol run's summary
            evaluate.write_json(
                os.path.join(subdir, "summary.json"),
                {**by_protocol[protocol], "protocols": alone, **extra},
            )
    # The paper's protocol (random) leads 'both', its figures at the top as a one-protocol
    # summary has them; `protocols` holds each protocol's.
    lead = by_protocol[folds_module.PROTOCOLS[0] if both else config.fold_protocol]
    summary = {**lead, "protocols": by_protocol, **extra}
    if jax.process_index() == 0:
        evaluate.write_json(os.path.join(workdir, "summary.json"), summary)
    for line in summary_lines(summary):
        logging.info("%s", line)
    return summary


def _run_protocol(
    config: ml_collections.ConfigDict,
    job: Job,
    arrays: Mapping[str, np.ndarray],
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    workdir: str,
) -> dict[str, Any]:
    """Runs (or resumes) the folds of one protocol in `workdir/fold_<k>/`, writes its
    `confusion.png`; returns its figures."""
    is_main = jax.process_index() == 0  # every process trains; process 0 writes the reports
    images, labels = arrays["image"], arrays["label"]
    protocol = config.fold_protocol
    fold_results = []
    for k, (train_idx, test_idx) in enumerate(folds):
        fold_dir = os.path.join(workdir, f"fold_{k}")
        result_path = os.path.join(fold_dir, "result.json")
        result = evaluate.read_json(result_path)
        if result is None:
            sizes = f"{len(train_idx)} training, {len(test_idx)} test images"
            logging.info("Fold %d/%d (%s): %s.", k + 1, len(folds), protocol, sizes)
            out = fit(job, fold_dir, images[train_idx], labels[train_idx])
            state = job.devices.replicate(out["state"])
            metrics = job.evaluate(state, images[test_idx], labels[test_idx])
            result = {"fold": k, "test_indices": np.asarray(test_idx).tolist(), **metrics}
            if is_main:
                evaluate.write_report(os.path.join(fold_dir, "eval"), "test_fold", metrics)
                evaluate.write_json(result_path, result)
        logging.info("Fold %d (%s) accuracy: %.4f", k, protocol, result["accuracy"])
        fold_results.append(result)

    accuracies = np.array([r["accuracy"] for r in fold_results])
    pooled = np.sum([np.asarray(r["confusion_counts"]) for r in fold_results], axis=0)
    pooled_metrics = evaluate.metrics_from_confusion(pooled)
    summary = {
        "protocol": protocol,
        "folds": len(folds),
        "fold_accuracy": accuracies.tolist(),
        "mean_accuracy": float(accuracies.mean()),
        "std_accuracy": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
        "pooled": pooled_metrics,
    }
    if is_main:
        evaluate.plot_confusion(
            pooled_metrics["confusion_normalized"],
            pooled_metrics["class_names"],
            os.path.join(workdir, "confusion.png"),
            f"{config.folds}-fold CV ({protocol}): "
            f"{100 * summary['mean_accuracy']:.2f} ± {100 * summary['std_accuracy']:.2f}%",
        )
    return summary


def _figures_line(summary: Mapping[str, Any]) -> str:
    pooled = summary["pooled"]
    folds = ", ".join(f"{100 * a:.2f}" for a in summary["fold_accuracy"])
    recall = ", ".join(
        f"{n} {100 * pooled['per_class_accuracy'][n]:.1f}" for n in pooled["class_names"]
    )
    return (
        f"{100 * summary['mean_accuracy']:.2f}% ± {100 * summary['std_accuracy']:.2f} over "
        f"{summary['folds']} folds ({folds}); mean class recall "
        f"{100 * pooled.get('mean_class_accuracy', np.nan):.2f}% ({recall})"
    )


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary in words: mean ± std, each fold, per-class recall, the pooled matrices."""
    by_protocol = summary.get("protocols") or {summary["protocol"]: summary}
    if len(by_protocol) == 1:
        (protocol, only), *_ = by_protocol.items()
        lines = [f"Cross-validation ({protocol}): {_figures_line(only)}"]
    else:
        width = max(len(p) for p in by_protocol)
        lines = [f"Cross-validation, {len(by_protocol)} protocols:"]
        lines += [f"  {p:<{width}}: {_figures_line(s)}" for p, s in by_protocol.items()]
    names = summary["pooled"]["class_names"]
    header = " ".join(n[:3] for n in names)
    width = max(len(n) for n in names)
    title = "Pooled confusion matrix" if len(by_protocol) == 1 else "Pooled confusion matrices"
    lines.append(
        f"{title} (rows: true class, columns: predicted; "
        + " | ".join(f"{p}: {header}" if len(by_protocol) > 1 else header for p in by_protocol)
        + "):"
    )
    for i, name in enumerate(names):
        rows = [
            " ".join(f"{c:3d}" for c in s["pooled"]["confusion_counts"][i])
            for s in by_protocol.values()
        ]
        lines.append(f"  {name:>{width}} " + " | ".join(rows))
    return lines


def train_then_cross_validate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_changes: bool = False,
    user_set: Sequence[str] = (),
) -> dict[str, Any]:
    """Trains `config`, then (`config.cross_validate`) cross-validates the selected model in
    `workdir/cross_validation`; returns `results.json`."""
    results = train_and_evaluate(config, workdir, allow_config_changes=allow_config_changes)
    if config.get("cross_validate"):
        cv_config = config_from_parent(config, workdir)
        results["cross_validation"] = run(
            cv_config,
            os.path.join(workdir, "cross_validation"),
            user_set=[f.removeprefix("jaffe.") for f in user_set if f.startswith("jaffe.")],
            allow_config_changes=allow_config_changes,
            field="config.jaffe",
        )
        if jax.process_index() == 0:
            evaluate.write_json(os.path.join(workdir, "results.json"), results)
    return results
