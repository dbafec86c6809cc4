"""Config validation (`fer_jax.training.config_schema`): each kind of mistake gives one line naming
the
field, the value and what is allowed; every shipped config is valid."""

from __future__ import annotations

import ml_collections
import pytest

from configs import fer2013, jaffe, synthetic
from data_pipelines import folds
from fer_jax.model import cbam, conv, resnet
from fer_jax.training import config_schema, parallel, step
from fer_jax.training.config_schema import validate
from fer_jax.training.step import LAMBDA_UNITS
from fer_jax.user_errors import UserError


@pytest.mark.parametrize(
    "make",
    [
        fer2013.get_config,
        lambda: fer2013.get_config("cbam=none,head=softmax"),
        lambda: fer2013.get_config("cbam=spatial_first"),
        lambda: fer2013.get_config("cbam=parallel,head=softmax"),
        jaffe.get_config,
        synthetic.get_config,
        lambda: synthetic.get_config("cbam=none"),
    ],
)
def test_every_shipped_config_validates(make):
    validate(make())


def _error(config) -> str:
    with pytest.raises(UserError) as e:
        validate(config)
    message = str(e.value)
    assert "\n" not in message
    return message


def _from_dict(change) -> ml_collections.ConfigDict:
    """A synthetic config changed as a plain dict (ConfigDict refuses a field of another type)."""
    fields = synthetic.get_config().to_dict()
    change(fields)
    return ml_collections.ConfigDict(fields)


def test_wrong_type():
    config = _from_dict(lambda d: d.update(num_epochs="3"))
    assert _error(config) == "config.num_epochs is '3' (type str); allowed: an integer >= 1"
    config = _from_dict(lambda d: d.update(half_precision=1))
    assert _error(config) == "config.half_precision is 1 (type int); allowed: True or False"
    config = _from_dict(lambda d: d.update(num_epochs=True))  # bool is not an epoch count
    assert _error(config).startswith("config.num_epochs is True (type bool)")


@pytest.mark.parametrize(
    "path, value, allowed",
    [
        ("num_epochs", -1, "an integer >= 1"),
        ("batch_size", 0, "an integer >= 1"),
        ("checkpoint_every_epochs", 0, "an integer >= 1"),
        ("seed", -3, "an integer from 0 to 2147483647"),
        ("model.dropout_rate", 1.0, "a number in [0, 1)"),
        ("model.width", 0, "an integer >= 1"),
        ("loss.margin", 6, "an integer from 1 to 5"),
        ("loss.margin", 0, "an integer from 1 to 5"),
        ("optimizer.learning_rate", 0.0, "a number > 0"),
        ("optimizer.momentum", 1.0, "a number in [0, 1)"),
        ("replicas", 0, "an integer >= 1"),
        ("jaffe.folds", 1, "an integer >= 2"),
        ("augment.zoom", 0.6, "a number in [0, 0.5]"),
        ("augment.rotate", -1.0, "a number in [0, 45]"),
        ("jaffe.augment.rotate", 46.0, "a number in [0, 45]"),
    ],
)
def test_out_of_range(path, value, allowed):
    config = synthetic.get_config()
    *sections, name = path.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[name] = value
    assert _error(config) == f"config.{path} is {value!r}; allowed: {allowed}"


def test_not_one_of_the_choices_which_come_from_the_code():
    config = synthetic.get_config()
    config.model.cbam = "bogus"
    orders = ", ".join(repr(o) for o in (*cbam.ORDERS, "none"))
    assert _error(config) == f"config.model.cbam is 'bogus'; allowed: one of {orders}"
    for path, constants in [
        ("model.head", resnet.HEADS),
        ("model.conv_impl", conv.IMPLS),
        ("loss.lambda_per", LAMBDA_UNITS),
        ("parallelism", parallel.MODES),
        ("input_pipeline", ("", *config_schema.INPUT_PIPELINES)),
        ("optimizer.schedule", step.SCHEDULES),
        ("jaffe.fold_protocol", folds.CHOICES),
    ]:
        config = synthetic.get_config()
        *sections, name = path.split(".")
        node = config
        for section in sections:
            node = node[section]
        for value in constants:
            node[name] = value
            validate(config)
        node[name] = "bogus"
        assert _error(config).startswith(f"config.{path} is 'bogus'; allowed: one of ")


def test_fold_protocol_is_one_protocol_or_both():
    assert folds.CHOICES == ("random", "subject", "both")
    config = jaffe.get_config()
    assert config.fold_protocol == "both"  # the default: the paper's folds and the
    assert fer2013.get_config().jaffe.fold_protocol == "both"  # subject-independent ones
    for value in folds.CHOICES:
        config.fold_protocol = value
        validate(config)
    for value in ("all", "subjects", ""):
        config.fold_protocol = value
        assert _error(config) == (
            f"config.fold_protocol is {value!r}; allowed: one of 'random', 'subject', 'both'"
        )


def test_optimizer_names_and_schedules_are_those_the_step_builds():
    config = synthetic.get_config()
    for name in step.NAMES:
        for schedule in step.SCHEDULES:
            config.optimizer.name, config.optimizer.schedule = name, schedule
            validate(config)
            step.create_optimizer(config, 10)


def test_unknown_field_names_the_closest_known_field():
    config = _from_dict(lambda d: d["model"].update(cbamm="channel_first"))
    assert _error(config) == (
        "config.model.cbamm is not a known field; the closest known field is config.model.cbam"
    )
    config = _from_dict(lambda d: d.update(num_epoch=3))
    assert _error(config).endswith("the closest known field is config.num_epochs")
    config = _from_dict(lambda d: d["jaffe"].update(fold=5))
    assert _error(config).endswith("the closest known field is config.jaffe.folds")


def test_missing_field_and_fields_that_go_together():
    config = _from_dict(lambda d: d.pop("batch_size"))
    assert _error(config) == "config.batch_size is missing; the config must set it"
    config = fer2013.get_config()
    config.data_source = "files"
    validate(
        config
    )  # whether its data is there: fer_jax.training.data_check (tests/test_data_check.py)
    config = synthetic.get_config()
    config.report_split = "test"
    assert _error(config) == (
        "config.report_split is 'test'; allowed: one of 'private_test', 'public_test', 'train'"
    )
    config = jaffe.get_config()
    config.dataset = "fer2013"
    validate(config)  # a CV config has no split fields


def test_replica_fields():
    config = synthetic.get_config()
    config.replicas = 2
    validate(config)
    config.replica_seeds = [3, 4]
    validate(config)
    config.replica_seeds = [3]
    assert _error(config) == (
        "config.replica_seeds lists 1 entries for config.replicas=2; allowed: one per replica, "
        "or none"
    )
    config.replica_seeds = []
    config.replica_overrides = [{"optimizer.learning_rate": 0.1}, {}]
    validate(config)
    config.replica_overrides = [{"optimizer.name": "adamw"}, {}]  # not replicas.OVERRIDABLE
    assert "optimizer.name" in _error(config)
    config.replica_overrides = [{}, {"loss.margin": 6}]  # the field's own rule
    assert _error(config) == (
        "config.replica_overrides[1]['loss.margin'] is 6; allowed: an integer from 1 to 5"
    )


def test_unknown_override_on_the_command_line():
    argv = ["prog", "--config=configs/synthetic.py", "--config.num_epochs=2"]
    assert config_schema.unknown_override(argv) is None
    assert config_schema.unknown_override([*argv, "--config.num_epoch=2"]) == (
        "--config.num_epoch=2: config.num_epoch is not a known field; the closest known field "
        "is config.num_epochs"
    )
    assert config_schema.unknown_override(["--config.jaffe.modl.width=3"]).endswith(
        "config.jaffe.modl is not a known field; the closest known field is config.jaffe.model"
    )
    assert config_schema.unknown_override(["--config.model.cbam.x=1"]) == (
        "--config.model.cbam.x=1: config.model.cbam is a field, not a section with fields"
    )
    assert config_schema.unknown_override(["--noconfig.cross_validat"]).endswith(
        "the closest known field is config.cross_validate"
    )
    # A known field that this config file does not set (ml_collections' KeyError names it).
    assert config_schema.unknown_override(["--config.select_crops=1"], "select_crops") == (
        "--config.select_crops=1: the config file does not set config.select_crops, so no flag "
        "can change it"
    )
    assert config_schema.bad_override_value(
        "flag --config.num_epochs=abc: invalid literal for int() with base 10: 'abc'"
    ) == ("config.num_epochs is 'abc'; allowed: an integer >= 1")
    assert config_schema.bad_override_value("flag --workdir=None: must have a value") is None


def test_mode_must_suit_the_config():
    config_schema.check_mode(synthetic.get_config(), "train")
    with pytest.raises(UserError, match="--mode=cross_validate"):
        config_schema.check_mode(jaffe.get_config(), "train")
    with pytest.raises(UserError, match="config.init_from is empty"):
        config_schema.check_mode(jaffe.get_config(), "cross_validate")
    with pytest.raises(UserError, match="needs a cross-validation config"):
        config_schema.check_mode(fer2013.get_config(), "cross_validate")
    config_schema.check_mode(fer2013.get_config(), "evaluate", "public_test")
    with pytest.raises(UserError, match="--split=test is not a split of fer2013"):
        config_schema.check_mode(fer2013.get_config(), "evaluate", "test")


def test_augment_and_ema_are_off_by_default_and_optional():
    config = fer2013.get_config()
    off = {"zoom": 0.0, "rotate": 0.0, "erase": 0.0}
    assert config.augment.to_dict() == off and config.jaffe.augment.to_dict() == off
    assert config.ema_decay == 0.0 and config.jaffe.ema_decay == 0.0
    config.augment.zoom, config.augment.rotate, config.augment.erase = 0.5, 45.0, 1.0
    config.ema_decay = 0.9999
    validate(config)
    validate(_from_dict(lambda d: d.pop("augment")))  # a config from before it existed
    validate(_from_dict(lambda d: (d["augment"].pop("erase"), d.pop("ema_decay"))))
    assert _error(_from_dict(lambda d: d.update(ema_decay=1.0))) == (
        "config.ema_decay is 1.0; allowed: a number in [0, 1)"
    )
    assert _error(_from_dict(lambda d: d["augment"].update(erase=1.5))) == (
        "config.augment.erase is 1.5; allowed: a number in [0, 1]"
    )
    config = _from_dict(lambda d: d["augment"].update(zoom="0.2"))
    assert _error(config) == (
        "config.augment.zoom is '0.2' (type str); allowed: a number in [0, 0.5]"
    )
