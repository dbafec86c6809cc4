"""The pure training step: A-Softmax's lambda clock and the metrics it reports."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from fer_jax.model import losses
from fer_jax.training import config_schema
from fer_jax.training.step import create_model, create_train_state, lambda_schedule, train_step
from fer_jax.user_errors import UserError


def _loss_config(unit: str):
    config = synthetic.get_config().loss
    config.lambda_per = unit
    return config


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_lambda_schedule_counts_optimizer_steps_or_epochs(unit):
    steps_per_epoch = 449
    schedule = jax.jit(lambda_schedule(_loss_config(unit), steps_per_epoch))
    for step in (0, 10, 449, 4490, 449 * 300):
        t = step if unit == "step" else step / steps_per_epoch
        np.testing.assert_allclose(schedule(step), losses.sphereface_lambda(t), rtol=1e-6)
    # Per step lambda reaches its floor within ~7 epochs; per epoch it is still 48 at epoch 300.
    end = float(schedule(449 * 300))
    assert end == pytest.approx(5.0 if unit == "step" else 1500 / 31, rel=1e-5)


def test_unknown_lambda_unit_is_rejected_by_name():
    config = synthetic.get_config()
    config.loss.lambda_per = "iteration"
    with pytest.raises(UserError, match="config.loss.lambda_per is 'iteration'"):
        config_schema.validate(config)


def test_train_step_reports_lambda_and_the_classifier_input_norm():
    config = synthetic.get_config("head=a_softmax")  # width 8, no dropout
    model = create_model(config)
    state = create_train_state(config, model, steps_per_epoch=10)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.random((8, 44, 44, 1), np.float32)),
        "label": jnp.asarray(rng.integers(0, 7, 8), jnp.int32),
    }
    (_, features), _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        return_features=True,
        mutable=["batch_stats"],
    )
    expected_norm = float(np.linalg.norm(np.asarray(features), axis=-1).mean())
    step = jax.jit(functools.partial(train_step, config=config, axis_name=None))
    state, metrics = step(state, batch)
    assert float(metrics["lambda"]) == pytest.approx(1500.0)
    assert float(metrics["feature_norm"]) == pytest.approx(expected_norm, rel=1e-5)
    assert expected_norm > 0
    _, metrics = step(state, batch)
    assert float(metrics["lambda"]) == pytest.approx(float(losses.sphereface_lambda(0.1)))


def _ema_setup(decay: float):
    config = synthetic.get_config()
    config.model.width = 4
    config.ema_decay = decay
    model = create_model(config)
    rng = np.random.default_rng(1)
    batch = {
        "image": jnp.asarray(rng.random((8, 44, 44, 1), np.float32)),
        "label": jnp.asarray(rng.integers(0, 7, 8), jnp.int32),
    }
    return config, model, create_train_state(config, model, steps_per_epoch=10), batch


def test_ema_starts_at_the_weights_and_follows_its_warmed_up_decay():
    config, _, state, batch = _ema_setup(0.9)
    jax.tree.map(
        np.testing.assert_array_equal,
        state.ema,
        {"params": state.params, "batch_stats": state.batch_stats},
    )
    step = jax.jit(functools.partial(train_step, config=config, axis_name=None))
    ema = state.ema
    for t in range(1, 4):  # decay min(0.9, (1 + t) / (10 + t)) after step t
        state, _ = step(state, batch)
        d = min(0.9, (1 + t) / (10 + t))
        new = {"params": state.params, "batch_stats": state.batch_stats}
        ema = jax.tree.map(lambda e, x, d=d: d * e + (1 - d) * x, ema, new)
        close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
        jax.tree.map(close, state.ema, ema)
    lag = jax.tree.map(lambda a, b: np.abs(a - b).max(), state.ema["params"], state.params)
    assert max(jax.tree.leaves(lag)) > 0  # the average lags the weights


def test_no_ema_by_default_and_the_step_leaves_it_none():
    config, _, state, batch = _ema_setup(0.0)
    assert state.ema is None
    state, _ = jax.jit(functools.partial(train_step, config=config, axis_name=None))(state, batch)
    assert state.ema is None
