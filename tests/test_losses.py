"""A-Softmax and softmax losses: equal to the PyTorch reference in value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.model import losses

torch = pytest.importorskip("torch")
from tests import torch_reference as ref  # noqa: E402


def _torch_loss_and_grads(x, w, labels, m, lam):
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    loss = ref.a_softmax_loss(xt, wt, torch.tensor(labels), m, lam)
    loss.backward()
    return loss.item(), xt.grad.numpy(), wt.grad.numpy()


def _jax_loss_and_grads(x, w, labels, m, lam):
    fn = lambda x, w: losses.a_softmax_loss(x, w, labels, margin=m, lam=lam)  # noqa: E731
    loss, (gx, gw) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    return float(loss), np.asarray(gx), np.asarray(gw)


def _batch(seed, b=16, d=32, k=7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d)).astype(np.float32) * 3
    w = rng.uniform(-1, 1, size=(d, k)).astype(np.float32)
    labels = rng.integers(0, k, size=b)
    return x, w, labels


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [1500.0, 50.0, 5.0, 0.0])
def test_a_softmax_loss_and_gradients_equal_pytorch(m, lam):
    x, w, labels = _batch(seed=m * 10 + int(lam) % 7)
    lt, gxt, gwt = _torch_loss_and_grads(x, w, labels, m, lam)
    lj, gxj, gwj = _jax_loss_and_grads(x, w, labels, m, lam)
    np.testing.assert_allclose(lj, lt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gxj, gxt, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gwj, gwt, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_features_parallel_and_antiparallel_to_a_column_give_finite_equal_gradients(m):
    x, w, labels = _batch(seed=99, b=4)
    x[0] = 2.5 * w[:, labels[0]]  # cos(theta_y) = +1
    x[1] = -1.5 * w[:, labels[1]]  # cos(theta_y) = -1
    x[2] = 0.7 * w[:, (labels[2] + 1) % 7]  # parallel to a non-target column
    lt, gxt, gwt = _torch_loss_and_grads(x, w, labels, m, 10.0)
    lj, gxj, gwj = _jax_loss_and_grads(x, w, labels, m, 10.0)
    assert np.isfinite(lj) and np.all(np.isfinite(gxj)) and np.all(np.isfinite(gwj))
    np.testing.assert_allclose(lj, lt, rtol=1e-5)
    np.testing.assert_allclose(gxj, gxt, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gwj, gwt, rtol=1e-4, atol=1e-5)


def test_margin_one_is_the_modified_softmax():
    x, w, labels = _batch(seed=3)
    logits = losses.angular_logits(jnp.asarray(x), jnp.asarray(w))
    expected = losses.softmax_cross_entropy(logits, labels)
    for lam in (0.0, 5.0, 1500.0):
        got = losses.a_softmax_loss(x, w, labels, margin=1, lam=lam)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # A larger margin makes the target harder: the loss grows.
    assert float(losses.a_softmax_loss(x, w, labels, margin=4, lam=0.0)) > float(expected)


def test_angular_logits_normalise_the_kernel_columns_on_every_call():
    x, w, _ = _batch(seed=4)
    scaled = w * np.array([1.0, 2.0, 0.5, 10.0, 3.0, 0.1, 7.0], np.float32)
    np.testing.assert_allclose(
        losses.angular_logits(x, w), losses.angular_logits(x, scaled), rtol=1e-5, atol=1e-5
    )


def test_psi_is_monotonically_decreasing_in_theta():
    theta = jnp.linspace(0.0, jnp.pi, 1001)
    for m in (1, 2, 3, 4, 5):
        values = np.asarray(losses.psi(jnp.cos(theta), m))
        assert np.all(np.diff(values) <= 1e-5), m
        np.testing.assert_allclose(values[0], 1.0, atol=1e-6)


def test_sphereface_lambda_anneals_from_base_to_its_floor():
    np.testing.assert_allclose(losses.sphereface_lambda(0), 1500.0)
    np.testing.assert_allclose(losses.sphereface_lambda(10), 750.0)
    np.testing.assert_allclose(losses.sphereface_lambda(10**6), 5.0)
    np.testing.assert_allclose(
        losses.sphereface_lambda(10, base=1000, gamma=0.2, power=2), 1000 / 9
    )
    # A traced step works under jit: the lambda comes from the state's step, not a counter.
    np.testing.assert_allclose(jax.jit(losses.sphereface_lambda)(jnp.asarray(2990)), 5.0)


def test_softmax_cross_entropy_equals_pytorch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 7)).astype(np.float32) * 4
    labels = rng.integers(0, 7, size=8)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels))
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits, labels), expected.item(), rtol=1e-6
    )
