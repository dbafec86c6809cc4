"""What each config field may hold, checked once before a run does any work.

`validate(config)` checks every field's type and range or choices, then the rules that tie
fields together, and raises `UserError` with one line naming the field, its value and what is
allowed (an unknown field: the closest known one). The choices are the constants of the code
that uses them, which does not check them again. `check_mode` checks the config against
`--mode`; `unknown_override` and `bad_override_value` word `--config.FIELD=...` mistakes.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from fer_jax.user_errors import UserError

NORMALIZE = ("unit", "symmetric")  # or (mean, std): data_pipelines.plan.normalize_affine
CBAM_NONE = "none"  # model.cbam: the plain ResNet18 (fer_jax.model.resnet.model_from_config)
MAX_SEED = 2**31 - 1
INPUT_PIPELINES = ("device", "tf_data")  # config.input_pipeline ('': 'device')


def select_crops(config: Any) -> int:
    """`config.select_crops`: crops of the per-epoch selection evaluation (10, or 1)."""
    from data_pipelines.crops import NUM_CROPS

    return config.get("select_crops", NUM_CROPS)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One field: the types it may hold, the values allowed (`ok`; in words: `allowed`), and
    whether a config may leave it out."""

    types: tuple[type, ...]
    allowed: str
    ok: Callable[[Any], bool] = lambda value: True
    required: bool = True

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` ("is 'x' (type str); allowed: ..."), or None."""
        # bool is an int subclass: True is not an epoch count.
        if not isinstance(value, self.types) or (
            isinstance(value, bool) and bool not in self.types
        ):
            return f"is {_describe(value)} (type {type(value).__name__}); allowed: {self.allowed}"
        return None if self.ok(value) else f"is {_describe(value)}; allowed: {self.allowed}"


@dataclasses.dataclass(frozen=True)
class Section:
    """A section of fields (`model`, `jaffe`, ...)."""

    fields: dict[str, Rule | Section]
    required: bool = True


Schema = dict[str, Rule | Section]


def integer(low: int, high: int | None = None, *, required: bool = True) -> Rule:
    words = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    return Rule((int,), words, lambda v: v >= low and (high is None or v <= high), required)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    required: bool = True,
) -> Rule:
    def ok(v: float) -> bool:
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return math.isfinite(v) and above and below

    if high is not None:  # and a low bound, as every such field has
        words = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        words = f"a number {'>' if low_open else '>='} {low}"
    else:
        words = "a number"
    return Rule((int, float), words, ok, required)


def choice(values: Sequence[Any], *, required: bool = True) -> Rule:
    words = "one of " + ", ".join(repr(v) for v in values)
    return Rule(tuple({type(v) for v in values}), words, lambda v: v in values, required)


def boolean(*, required: bool = True) -> Rule:
    return Rule((bool,), "True or False", required=required)


def string(words: str = "a string", *, required: bool = True) -> Rule:
    return Rule((str,), words, required=required)


def _normalize_ok(v: Any) -> bool:
    if isinstance(v, str):
        return v in NORMALIZE
    return (
        len(v) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        and v[1] > 0
    )


def _section(value: Any) -> bool:
    return isinstance(value, ml_collections.ConfigDict | Mapping)


@functools.cache
def _recipe_sections() -> dict[str, Section]:
    from data_pipelines import labels
    from fer_jax.model import cbam, conv, losses, resnet
    from fer_jax.training import step

    model: Schema = {
        "num_classes": choice([labels.NUM_CLASSES]),  # the datasets' 7 expressions
        "width": integer(1),
        "cbam": choice([*cbam.ORDERS, CBAM_NONE]),
        "head": choice(resnet.HEADS),
        "dropout_rate": number(0, 1, high_open=True),
        "conv_impl": choice(conv.IMPLS),
        "matmul_dtype": choice(resnet.MATMUL_DTYPES, required=False),
    }
    loss: Schema = {
        "margin": integer(*losses.MARGINS),
        "lambda_base": number(0, low_open=True),
        "lambda_gamma": number(0),
        "lambda_power": number(0),
        "lambda_min": number(0),
        "lambda_per": choice(step.LAMBDA_UNITS),
        "lambda_run_epochs": number(0, low_open=True, required=False),  # lambda_per='run'
    }
    optimizer: Schema = {
        "name": choice(step.NAMES),
        "learning_rate": number(0, low_open=True),
        "momentum": number(0, 1, high_open=True),
        "weight_decay": number(0),
        "grad_clip": number(),  # element-wise; <= 0 disables
        "schedule": choice(step.SCHEDULES),
        "decay_start_epoch": integer(0),
        "decay_every_epochs": integer(1),
        "decay_rate": number(0, 1, low_open=True),
        "warmup_epochs": number(0),
    }
    return {"model": Section(model), "loss": Section(loss), "optimizer": Section(optimizer)}


def schemas() -> tuple[Section, Section]:
    """`(training schema, cross-validation schema)`, built from the code's own constants."""
    from data_pipelines import crops, files, folds
    from fer_jax.training import input_data, parallel, replicas, synthetic_data

    splits = sorted(
        {s for names in files.SPLITS.values() for s in names} | set(synthetic_data.SPLIT_SEEDS)
    )
    synthetic: Schema = {
        "train": integer(0),
        "public_test": integer(0),
        "private_test": integer(0),
        "noise": number(0),
    }
    seed = integer(0, MAX_SEED)
    run: Schema = {
        "seed": seed,
        "replicas": integer(1, required=False),
        "replica_seeds": Rule(
            (list, tuple),
            f"a list of integers from 0 to {MAX_SEED}, one per replica, or none",
            lambda v: not any(seed.problem(s) for s in v),
            required=False,
        ),
        "replica_overrides": Rule(
            (list, tuple),
            "a list of dicts {'section.field': value}, one per replica, or none",
            lambda v: all(_section(d) for d in v),
            required=False,
        ),
        "replica_map": choice(("", *replicas.MAPS), required=False),
        "data_source": choice(input_data.DATA_SOURCES),
        "data_dir": string("a directory ('' for ~/tensorflow_datasets)"),
        "manual_dir": string("a directory holding the downloaded files, or ''"),
        "normalize": Rule(
            (str, tuple, list),
            f"one of {', '.join(map(repr, NORMALIZE))} or (mean, std) with std > 0",
            _normalize_ok,
        ),
        # data_pipelines.plan.epoch_plan's zoom (a fraction), rotate (degrees), erase (a
        # probability).
        "augment": Section(
            {
                "zoom": number(0, 0.5),
                "rotate": number(0, 45),
                "erase": number(0, 1, required=False),
            },
            required=False,
        ),
        "ema_decay": number(0, 1, high_open=True, required=False),
        "input_pipeline": choice(["", *INPUT_PIPELINES]),
        "steps_per_dispatch": integer(0),
        "half_precision": boolean(),
        "parallelism": choice(parallel.MODES),
        "cross_device_bn": boolean(),
        "peak_tflops": number(0, required=False),
        "dataset": choice([*files.SPLITS, "synthetic"]),
        **_recipe_sections(),
        "num_epochs": integer(1),
        "batch_size": integer(1),
        "eval_batch_size": integer(1),
        "log_every_steps": integer(1),
        "eval_every_epochs": integer(0),
        "select_crops": choice(crops.CROP_CHOICES, required=False),
        "checkpoint_every_epochs": integer(1),
        "checkpoint_every_steps": integer(0),
        "keep_checkpoints": integer(1),
        "init_from": string("a run directory or checkpoint, or ''"),
        "synthetic": Section(synthetic, required=False),  # dataset 'synthetic' only
    }
    cv: Schema = {**run, "folds": integer(2), "fold_protocol": choice(folds.CHOICES)}
    training: Schema = {
        **run,
        "train_split": choice(splits),
        "select_split": choice(splits),
        "report_split": choice(splits),
        "cross_validate": boolean(required=False),
        "jaffe": Section(cv, required=False),  # cross_validate=True only
    }
    return Section(training), Section(cv)


def _walk(config: Any, prefix: str = "config") -> Iterator[tuple[str, Any]]:
    """`(dotted path, value)` of every field and section of a config or a `Schema`
    (`('config.model.cbam', its value or Rule)`)."""
    for key in config.keys():
        path, value = f"{prefix}.{key}", config[key]
        yield path, value
        inner = value.fields if isinstance(value, Section) else value
        if _section(inner):
            yield from _walk(inner, path)


def unknown_field_message(path: str, known: Sequence[str]) -> str:
    """`path` is unknown, and the known path most like it (difflib; one in the same section
    first, then any)."""
    siblings = [k for k in known if k.rsplit(".", 1)[0] == path.rsplit(".", 1)[0]]
    pools = [(siblings, 0.6), (known, 0.6), (siblings or known, 0.0)]
    close = [m for pool, cut in pools for m in difflib.get_close_matches(path, pool, 1, cut)]
    return f"{path} is not a known field; the closest known field is {(close or ['none'])[0]}"


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_section(config: Any, schema: Schema, path: str, known: Sequence[str]) -> None:
    if not _section(config):
        raise UserError(f"{path} is {_describe(config)}; allowed: a section of fields")
    for key in config.keys():
        if key not in schema:
            raise UserError(unknown_field_message(f"{path}.{key}", known))
    for key, rule in schema.items():
        field = f"{path}.{key}"
        if key not in config:
            if rule.required:
                raise UserError(f"{field} is missing; the config must set it")
            continue
        value = config[key]
        if isinstance(rule, Section):
            _check_section(value, rule.fields, field, known)
        elif problem := rule.problem(value):
            raise UserError(f"{field} {problem}")


def _split_names(config: Any) -> tuple[str, ...]:
    """The splits `config.dataset` has (a synthetic dataset: those of its `synthetic` sizes)."""
    from data_pipelines import files
    from fer_jax.training import synthetic_data

    if config["dataset"] == "synthetic":
        return tuple(s for s in synthetic_data.SPLIT_SEEDS if config["synthetic"][s] > 0)
    return files.SPLITS[config["dataset"]]


def _check_data(config: Any, path: str) -> None:
    """A synthetic dataset has sizes (whether other data is there: `data_check`)."""
    if config["dataset"] == "synthetic" and "synthetic" not in config:
        raise UserError(
            f"{path}.synthetic is missing; {path}.dataset='synthetic' needs its split sizes"
        )


def _check_splits(config: Any, path: str) -> None:
    have = _split_names(config)
    for key in ("train_split", "select_split", "report_split"):
        if config[key] not in have:
            raise UserError(
                f"{path}.{key} is {config[key]!r}; allowed for {path}.dataset="
                f"{config['dataset']!r}: one of {', '.join(map(repr, have))}"
            )
    if config["dataset"] == "synthetic":
        train = config["synthetic"][config["train_split"]]
        if train < config["batch_size"]:
            raise UserError(
                f"{path}.synthetic.{config['train_split']} is {train}; allowed: at least "
                f"{path}.batch_size ({config['batch_size']}) examples"
            )


def _check_replicas(config: Any, path: str) -> None:
    """One seed and dict of overrides per replica, each of an `OVERRIDABLE` field."""
    from fer_jax.training.replicas import OVERRIDABLE

    k = config.get("replicas", 1)
    for key in ("replica_seeds", "replica_overrides"):
        listed = config.get(key, [])
        if listed and len(listed) != k:
            raise UserError(
                f"{path}.{key} lists {len(listed)} entries for {path}.replicas={k}; "
                "allowed: one per replica, or none"
            )
    for i, fields in enumerate(config.get("replica_overrides", [])):
        for name, value in fields.items():
            where = f"{path}.replica_overrides[{i}][{name!r}]"
            if name not in OVERRIDABLE:
                why = _not_overridable(name, OVERRIDABLE)
                raise UserError(f"{where}: {name!r} cannot differ between replicas: {why}")
            problem = _nodes()[f"config.{name}"].problem(value)
            if problem:
                raise UserError(f"{where} {problem}")


def _not_overridable(name: str, overridable: Sequence[str]) -> str:
    """Why `name` cannot be a replica's override, and what can."""
    if name == "seed":
        return "per-replica seeds go in config.replica_seeds"
    if f"config.{name}" in _nodes():
        return "it changes the program or its shapes; replicas may differ only in " + ", ".join(
            overridable
        )
    close = difflib.get_close_matches(name, overridable, n=1)
    return "no such overridable field" + (f"; did you mean {close[0]!r}?" if close else "")


def validate(config: Any) -> None:
    """Raises `UserError`, naming the first field that is wrong, unless `config` is usable: a
    cross-validation config if it has `folds`, else a training config (its `jaffe` section one
    of the former)."""
    training, cv = schemas()
    schema = (cv if "folds" in config else training).fields
    known = sorted(path for path, _ in _walk(schema))
    _check_section(config, schema, "config", known)
    _check_replicas(config, "config")
    _check_data(config, "config")
    if schema is training.fields:
        _check_splits(config, "config")
        if config.get("cross_validate", False):
            if "jaffe" not in config:
                raise UserError(
                    "config.jaffe is missing; config.cross_validate=True fine-tunes on it"
                )
            # The CV stage reads its data as the parent run does (cross_validate.py).
            _check_replicas(config["jaffe"], "config.jaffe")
            _check_data(config["jaffe"], "config.jaffe")


def check_mode(config: Any, mode: str | None, split: str | None = None) -> str:
    """The mode `fer_jax.main` runs `config` (validated) in: `mode`, or by default
    'cross_validate' for a cross-validation config (it has `folds`), else 'train'; UserError
    where `config` does not suit it (or, for 'evaluate', lacks the split `split`)."""
    is_cv = "folds" in config
    mode = mode or ("cross_validate" if is_cv else "train")
    if mode == "train" and is_cv:
        raise UserError(
            "this is a cross-validation config (it has config.folds): run it with "
            "--mode=cross_validate, or train with configs/fer2013.py or configs/synthetic.py"
        )
    if mode == "cross_validate":
        if not is_cv:
            raise UserError(
                "--mode=cross_validate needs a cross-validation config (configs/jaffe.py); "
                "a training config cross-validates after training with --mode=train"
            )
        if not config["init_from"]:
            raise UserError(
                "config.init_from is empty; --mode=cross_validate fine-tunes the model it names: "
                "--config.init_from=pretrained (the shipped model) or RUN_DIR"
            )
    if mode == "evaluate" and split is not None:
        have = _split_names(config)
        if split not in have:
            raise UserError(
                f"--split={split} is not a split of {config['dataset']}; allowed: one of "
                + ", ".join(have)
            )
    return mode


@functools.cache
def _nodes() -> dict[str, Rule | Section]:
    """Every field and section of either schema by dotted path ('config.model.cbam')."""
    return {path: node for section in schemas() for path, node in _walk(section.fields)}


_BAD_VALUE = re.compile(r"^flag --(?P<path>[A-Za-z_]\w*\.[^=]+)=(?P<value>.*?): ")


def bad_override_value(message: str) -> str | None:
    """absl's "flag --config.FIELD=VALUE: <parse error>" as "config.FIELD is 'VALUE'; allowed:
    ..." (or None)."""
    match = _BAD_VALUE.match(message)
    rule = _nodes().get(match["path"]) if match else None
    if not isinstance(rule, Rule):
        return None
    return f"{match['path']} is {match['value']!r}; allowed: {rule.allowed}"


_OVERRIDE = re.compile(r"^--?(?:no)?config\.(?P<path>[^=]+)")


def unknown_override(argv: Sequence[str], missing: str = "") -> str | None:
    """The message for the first `--config.PATH=...` in `argv` that names no field of the
    schemas (or goes into a field that is not a section) or one the config file does not set
    (`missing`, which ml_collections did not find), or None: ml_collections words such mistakes
    as bare Python errors."""
    nodes = _nodes()
    for arg in argv:
        match = _OVERRIDE.match(arg)
        parts = ["config", *re.sub(r"\[[^]]*\]", "", match["path"]).split(".")] if match else []
        for i in range(2, len(parts) + 1):
            path, parent = ".".join(parts[:i]), ".".join(parts[: i - 1])
            if isinstance(nodes.get(parent), Rule):
                return f"{arg}: {parent} is a field, not a section with fields"
            if path not in nodes:
                return f"{arg}: {unknown_field_message(path, sorted(nodes))}"
        if missing in parts[1:]:
            path = ".".join(parts[: parts.index(missing, 1) + 1])
            return f"{arg}: the config file does not set {path}, so no flag can change it"
    return None
