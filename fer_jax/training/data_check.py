"""Before any work: can every stage of a run have its data? And what `--mode=check` prints.

`check` finds each stage's data (a built TFDS dataset or the downloaded files) by name, without
reading it, or raises a one-line `UserError` naming what is missing and the ways out;
`describe` is `--mode=check`'s report (docs/runs_and_failures.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
from collections.abc import Collection

import ml_collections
import numpy as np

from data_pipelines import fer2013_csv, files, jaffe_files
from fer_jax.training import input_data
from fer_jax.user_errors import UserError

NAMES = {"fer2013": "FER2013", "jaffe": "JAFFE", "synthetic": "synthetic data"}
# What a dataset's `manual_dir` holds, and where to get it.
WHERE = {
    "fer2013": "a folder holding fer2013.csv or fer2013.tar.gz, from Kaggle's \"Challenges in "
    'Representation Learning: Facial Expression Recognition Challenge"',
    "jaffe": "the jaffedbase folder of TIFFs, from https://zenodo.org/record/3451524",
}
CHECK_MODES = ("train", "evaluate", "cross_validate")  # what --mode=check can check
Folds = dict[str, list[tuple[np.ndarray, np.ndarray]]]  # {protocol: [(train, test) indices]}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run and the config its data comes from."""

    kind: str  # 'train', 'cross_validate' or 'evaluate'
    title: str  # e.g. "FER2013 training"
    label: str  # in errors, e.g. "JAFFE (cross-validation after FER2013)"
    config: ml_collections.ConfigDict  # dataset, data_source, data_dir, manual_dir, ...
    field: str  # where its data fields are set: 'config' or 'config.jaffe'
    splits: tuple[str, ...]


@dataclasses.dataclass
class Found:
    """Where a stage's data is, and how much of it (None where not counted)."""

    stage: Stage
    source: str  # 'files', 'tfds (built)', 'tfds, built into DIR on first use', 'synthetic'
    path: str  # the built dataset, the downloaded files, or how the data is generated
    sizes: dict[str, int] | None = None  # examples per split
    jaffe: list[jaffe_files.JaffeFile] | None = None  # JAFFE photos listed by name

    @functools.cached_property
    def folds(self) -> tuple[np.ndarray, np.ndarray, Folds] | None:
        """`(labels, subjects, {protocol: its folds})` of JAFFE listed by name (else None), made
        once from the stage's folds, seed and protocol, as the run makes them; UserError where
        they cannot be made."""
        from fer_jax.training.cross_validate import make_folds

        if self.jaffe is None:
            return None
        labels = np.asarray([item.label for item in self.jaffe])
        subjects = np.asarray([item.subject for item in self.jaffe])
        stage = self.stage
        made = make_folds(labels, subjects, stage.config, stage.label, stage.field)
        return labels, subjects, made

    def fold_train_sizes(self) -> list[int] | None:
        """Training images of each fold of JAFFE listed by name (else None)."""
        if self.folds is None:
            return None
        return [len(train) for split in self.folds[2].values() for train, _ in split]


def stages(
    config: ml_collections.ConfigDict, mode: str, workdir: str, split: str = "private_test"
) -> list[Stage]:
    """The stages of `fer_jax.main --mode=mode` with `config` (validated, suited to `mode`)."""
    name = NAMES.get(config.dataset, config.dataset)
    if mode == "evaluate":
        title = f"{name} evaluation of {split}"
        return [Stage(mode, title, f"{name} ({split})", config, "config", (split,))]
    if mode == "cross_validate":
        title, label = f"{name} cross-validation", f"{name} (cross-validation)"
        return [Stage(mode, title, label, config, "config", ("train",))]
    splits = tuple(dict.fromkeys([config.train_split, config.select_split, config.report_split]))
    out = [Stage(mode, f"{name} training", f"{name} (training)", config, "config", splits)]
    if config.get("cross_validate"):
        from fer_jax.training import cross_validate

        cv = cross_validate.config_from_parent(config, workdir)
        cv_name = NAMES.get(cv.dataset, cv.dataset)
        out.append(
            Stage(
                "cross_validate",
                f"{cv_name} cross-validation",
                f"{cv_name} (cross-validation after {name})",
                cv,
                "config.jaffe",
                ("train",),
            )
        )
    return out


def check(
    config: ml_collections.ConfigDict,
    mode: str,
    workdir: str,
    split: str = "private_test",
    *,
    count: bool = False,
) -> list[Found]:
    """Finds every stage's data (`count`: FER2013's rows too); UserError where it is missing,
    DataError for a JAFFE photo whose name does not parse."""
    found = []
    for stage in stages(config, mode, workdir, split):
        if stage.config.get("input_pipeline") == "tf_data":
            _need_tfds(stage, "config.input_pipeline='tf_data'", "--config.input_pipeline=device")
        found.append(find(stage, count=count))
        folds = found[-1].fold_train_sizes() if stage.kind == "cross_validate" else None
        for k, train in enumerate(folds or []):  # each fold fills a training batch
            if train < stage.config.batch_size:
                raise UserError(
                    f"{stage.label}: fold {k} has {train} training images, fewer than "
                    f"{stage.field}.batch_size={stage.config.batch_size}; use more images, "
                    f"fewer folds or a smaller {stage.field}.batch_size"
                )
    return found


def find(stage: Stage, *, count: bool = False) -> Found:
    """Where `stage`'s data is; UserError (one line) if it cannot be had."""
    config = stage.config
    if config.dataset == "synthetic":
        sizes = {s: int(config.synthetic[s]) for s in stage.splits}
        return Found(stage, "synthetic", f"generated from {stage.field}.seed", sizes)
    source, data_dir = input_data.data_source(config), input_data.data_dir(config)
    manual = os.path.expanduser(config.manual_dir) if config.manual_dir else ""
    if source == "tfds":
        _need_tfds(stage, "data_source 'tfds'", "--config.data_source=files")
        built = built_tfds(config.dataset, data_dir)
        if built is not None:
            return Found(stage, "tfds (built)", str(built), tfds_sizes(built))
    if manual:
        found = _manual_files(stage, manual, count)
        if found is not None:
            if source == "tfds":
                found.source = f"tfds, built into {data_dir} on first use"
            return found
    raise UserError(_missing(stage, source, manual, data_dir))


def built_tfds(name: str, data_dir: str) -> pathlib.Path | None:
    """`<data_dir>/<name>/<version>` if TFDS has built `name` there, else None."""
    path = pathlib.Path(data_dir, name, files.TFDS_VERSIONS.get(name, ""))
    ok = all((path / f).is_file() for f in ("dataset_info.json", "features.json"))
    return path if ok else None


def tfds_sizes(path: pathlib.Path) -> dict[str, int] | None:
    """Examples per split of a built TFDS dataset, from its `dataset_info.json`."""
    try:
        info = json.loads((path / "dataset_info.json").read_text())
        return {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info["splits"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _need_tfds(stage: Stage, what: str, instead: str) -> None:
    for module in ("tensorflow_datasets", "tensorflow"):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"{stage.label}: {what} needs {module}, which is not installed: "
                f"pip install -e '.[tfds]', or {instead}"
            )


def _manual_files(stage: Stage, manual: str, count: bool) -> Found | None:
    """The downloaded files of the stage's dataset in `manual`, or None if there are none."""
    try:
        if stage.config.dataset == "fer2013":
            source = fer2013_csv.find_source(manual)
            return Found(
                stage, "files", str(source), fer2013_csv.count_rows(source) if count else None
            )
        items = jaffe_files.list_images(manual)  # 'jaffe': names only; DataError for a bad name
    except FileNotFoundError:
        return None
    return Found(stage, "files", manual, {"train": len(items)}, jaffe=items)


def _missing(stage: Stage, source: str, manual: str, data_dir: str) -> str:
    """The one-line error for a stage whose data is not there."""
    name, field = stage.config.dataset, stage.field
    if not manual:
        problem = f"{field}.manual_dir is empty"
    elif os.path.isfile(manual):
        problem = f"{field}.manual_dir={manual} is a file, not the folder holding it"
    elif not os.path.isdir(manual):
        problem = f"{field}.manual_dir={manual} does not exist"
    elif name == "fer2013":
        wanted = ", ".join(fer2013_csv.SOURCE_FILES)
        problem = f"no FER2013 file ({wanted}) in {field}.manual_dir={manual}"
    else:
        problem = f"no JAFFE images (*.tiff) under {field}.manual_dir={manual}"
    if source == "tfds":
        problem += f" and no built TFDS {name!r} in {data_dir}"
    else:
        problem += " (data_source 'files' reads the downloaded files from it)"
    ways = f"--{field}.manual_dir=DIR ({WHERE.get(name, 'the downloaded files')})"
    if field == "config.jaffe":  # the stage after training, which it may skip
        ways += " or --config.cross_validate=False"
    elif source == "tfds":
        ways += f" or --{field}.data_dir=DIR (where TFDS {name!r} is built)"
    else:
        ways += ", or try the tool without data: --config=configs/synthetic.py"
    return f"{stage.label} not found: {problem}; pass {ways}"


# --mode=check: the report.


def _steps(n: int | None, batch: int) -> str:
    if n is None:
        return "? steps/epoch (counted when the data is read)"
    return f"{n // batch} steps/epoch"


def _sizes(found: Found) -> str:
    if not found.sizes:
        return ""
    shown = ", ".join(f"{s} {found.sizes[s]:,}" for s in found.sizes if s in found.stage.splits)
    if found.jaffe is not None:
        shown += f" images, {len({item.subject for item in found.jaffe})} subjects"
    return f": {shown}" if shown else ""


def _stage_lines(i: int, found: Found, devices: int, workdir: str) -> list[str]:
    config, stage = found.stage.config, found.stage
    batch = config.batch_size
    if batch % devices:
        raise UserError(
            f"{stage.field}.batch_size={batch} is not divisible by the {devices} devices"
        )
    per_device = f"batch {batch}" + (f" ({batch // devices} per device)" if devices > 1 else "")
    replicas = config.get("replicas", 1)
    if replicas > 1:
        per_device += f", {replicas} replicas"
    if stage.kind == "cross_validate":
        sizes = found.fold_train_sizes()
        total = (found.sizes or {}).get("train")
        if sizes:
            low, high = min(sizes) // batch, max(sizes) // batch
            step_text = f"{low}-{high} steps/epoch" if low != high else f"{low} steps/epoch"
        elif total is not None:
            train = total * (config.folds - 1) // config.folds
            step_text = f"about {train // batch} steps/epoch"
        else:
            step_text = _steps(None, batch)
        start = config.init_from
        if stage.field == "config.jaffe" and start == workdir:
            start = "the model selected in stage 1"
        what = (
            f"{_folds_text(config)}, {config.num_epochs} epochs a fold, "
            f"{per_device}, {step_text}; fine-tunes {start}"
        )
    elif stage.kind == "train":
        n = (found.sizes or {}).get(config.train_split)
        if n is not None and n < batch:
            raise UserError(
                f"{stage.label}: {n} {config.train_split} images do not fill one batch of "
                f"{stage.field}.batch_size={batch}"
            )
        what = (
            f"{config.num_epochs} epochs, {per_device}, {_steps(n, batch)}; "
            f"selects on {config.select_split}, reports {config.report_split}"
        )
    else:
        what = f"ten-crop, eval batch {config.eval_batch_size}"
    return [
        f"  {i}. {stage.title}: {what}",
        f"     data ({found.source}): {found.path}{_sizes(found)}",
    ]


def _folds_text(config: ml_collections.ConfigDict) -> str:
    """'5 folds (random)', or '5 folds of each protocol (random, subject)' for 'both'."""
    from data_pipelines import folds

    protocols = folds.protocols_of(config.fold_protocol)
    if len(protocols) == 1:
        return f"{config.folds} folds ({protocols[0]})"
    return f"{config.folds} folds of each protocol ({', '.join(protocols)})"


def _names(directory: str) -> list[str]:
    """The entries of `directory` ([] where it is not a readable directory)."""
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _folds_done(directory: str, config: ml_collections.ConfigDict, field: str) -> str:
    """How many folds of a cross-validation workdir have their `result.json` (per protocol)."""
    from data_pipelines import folds
    from fer_jax.training.cross_validate import check_layout

    check_layout(directory, config.fold_protocol, field)

    def done(path: str) -> int:
        return sum(os.path.isfile(os.path.join(path, d, "result.json")) for d in _names(path))

    if config.fold_protocol != folds.BOTH:
        return f"{done(directory)} fold(s) done"
    return ", ".join(
        f"{p}: {done(os.path.join(directory, p))} fold(s) done"
        for p in folds.protocols_of(config.fold_protocol)
    )


def _workdir_lines(
    config: ml_collections.ConfigDict, mode: str, workdir: str, allow_config_changes: bool
) -> list[str]:
    """What the workdir holds: a run to resume (its recipe unchanged), a lock, permissions."""
    from fer_jax.training import run_config, workdir_lock

    path = os.path.abspath(os.path.expanduser(workdir))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK) or not os.path.isdir(existing):
        raise UserError(f"workdir {path} cannot be created or written ({existing} is not writable)")
    if not os.path.isdir(path):
        what = "the evaluation reports" if mode == "evaluate" else "a new run"
        return [f"workdir: {path}: created for {what}"]
    workdir_lock.check_free(path)
    if mode == "evaluate":
        return [f"workdir: {path}: the evaluation reports go to {path}/eval/"]
    if mode == "cross_validate":
        return [
            f"workdir: {path}: {_folds_done(path, config, 'config')}, the others resume or start"
        ]
    run_config.compare(config, path, allow_changes=allow_config_changes)
    steps = sorted(int(d) for d in _names(os.path.join(path, "checkpoints")) if d.isdigit())
    if steps:
        lines = [f"workdir: {path}: resumes from the checkpoint of step {steps[-1]}"]
    else:
        lines = [f"workdir: {path}: no checkpoint, starts from step 0"]
    cv_dir = os.path.join(path, "cross_validation")
    if os.path.isdir(cv_dir) and config.get("cross_validate"):
        lines.append(f"  cross-validation: {_folds_done(cv_dir, config.jaffe, 'config.jaffe')}")
    return lines


def _checkpoint_exists(path: str) -> bool:
    """A run/checkpoint directory exists, or `pretrained[:NAME]` / an `.npz` is installed."""
    from fer_jax.model import pretrained

    is_pretrained, name = pretrained.parse_reference(path)
    if is_pretrained:
        return pretrained.available(name)
    return os.path.exists(os.path.expanduser(path))


def describe(
    config: ml_collections.ConfigDict,
    mode: str,
    workdir: str,
    *,
    split: str = "private_test",
    checkpoint: str | None = None,
    allow_config_changes: bool = False,
    user_set: Collection[str] = (),
) -> list[str]:
    """`--mode=check`'s report of what `--mode=mode` would run, compiling, training and writing
    nothing; UserError where the run would fail at once."""
    import jax

    found = check(config, mode, workdir, split, count=True)
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    lines = [f"fer_jax.main --mode={mode}: the config is valid; stages:"]
    for i, item in enumerate(found, 1):
        lines += _stage_lines(i, item, len(devices), workdir)
    if mode == "evaluate":
        target = checkpoint or workdir
        there = "found" if _checkpoint_exists(target) else "NOT FOUND"
        lines.append(f"  checkpoint: {target} ({there})")
    init = config.init_from  # the first stage's (a later one's may be stage 1's model)
    if init and not _checkpoint_exists(init):
        lines.append(f"  warning: config.init_from={init} does not exist (yet): the run needs it")
    lines.append(f"devices: {len(devices)} x {', '.join(kinds)} ({devices[0].platform}): {devices}")
    lines += _workdir_lines(config, mode, workdir, allow_config_changes)
    lines += cross_validation_lines(config, mode, workdir, user_set)
    lines.append("check passed: nothing was compiled, trained or written")
    return lines


def _fold_plan_lines(stage: Stage) -> list[str]:
    """The fold plan of a stage whose images are listed by name (without reading them)."""
    from fer_jax.training.cross_validate import fold_plan_lines

    made = find(stage).folds
    if made is None:
        return [f"fold plan: {_folds_text(stage.config)}, made when the data is read"]
    labels, subjects, splits = made
    return [
        line
        for protocol, split in splits.items()
        for line in fold_plan_lines(split, labels, subjects, stage.config, protocol)
    ]


def cross_validation_lines(
    config: ml_collections.ConfigDict, mode: str, workdir: str, user_set: Collection[str] = ()
) -> list[str]:
    """`--mode=check`'s report of the cross-validation stage of `mode` (none: []): the
    fine-tuning settings and the fold plan, without reading images or weights."""
    from fer_jax.model import pretrained
    from fer_jax.training import cross_validate as cv_module

    stage = next((s for s in stages(config, mode, workdir) if s.kind == "cross_validate"), None)
    if stage is None:
        return []
    cv, field = stage.config, f"{stage.field}.init_from"
    after_training = stage.field == "config.jaffe"
    if after_training:
        user_set = [f.removeprefix("jaffe.") for f in user_set if f.startswith("jaffe.")]
    if after_training and not config.jaffe.init_from:
        where = "the config of stage 1"
        source = cv_module.source_from_config(
            config.to_dict(), "the model selected in stage 1", where
        )
    elif pretrained.is_reference(cv.init_from) or os.path.exists(os.path.expanduser(cv.init_from)):
        source = cv_module.read_source(cv.init_from, field)
    else:  # data_check warns that it is not there (yet)
        settings = f"fine-tuning {cv.init_from}: its settings are read from it when the run starts"
        return [settings] + _fold_plan_lines(stage)
    tuned, settings = cv_module.fine_tuning_config(cv, source, user_set)
    return cv_module.settings_lines(settings, tuned) + _fold_plan_lines(stage)
