"""The Flax network equals the PyTorch reference: logits, BatchNorm statistics, one SGD step.

Width 16 keeps compilation fast; the structure is the full network's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fer_jax.model import convert, losses
from fer_jax.training.step import sgd_pytorch

torch = pytest.importorskip("torch")
from tests import torch_reference as ref  # noqa: E402

WIDTH = 16
RTOL, ATOL = 1e-4, 1e-5
ORDERS = [None, "channel_first", "spatial_first", "parallel"]


def _pair(cbam, head, seed=0, **model_kwargs):
    torch.manual_seed(seed)
    tm = ref.randomize_(ref.ResNet18(width=WIDTH, cbam=cbam, head=head), seed)
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    model, variables = convert.from_torch(
        sd, cbam=cbam, head=head, dropout_rate=0.0, **model_kwargs
    )
    return tm, model, variables


def _images(seed, b=6):
    x = np.random.default_rng(seed).uniform(size=(b, 44, 44, 1)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _max_diffs(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)), np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6))


@pytest.mark.parametrize("head", ["softmax", "a_softmax"])
@pytest.mark.parametrize("cbam", ORDERS)
def test_eval_and_train_logits_and_running_stats_equal_pytorch(cbam, head):
    tm, model, variables = _pair(cbam, head, seed=ORDERS.index(cbam))
    x, xt = _images(1)

    tm.eval()
    with torch.no_grad():
        expected = tm(xt).numpy()
    got = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    print("eval", cbam, head, _max_diffs(got, expected))

    tm.train()
    with torch.no_grad():
        expected = tm(xt).numpy()
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    got, state = apply(variables, x)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    print("train", cbam, head, _max_diffs(got, expected))
    updated = convert.to_torch({"params": variables["params"], **state})
    for name, value in tm.state_dict().items():
        if "running" in name:
            np.testing.assert_allclose(
                updated[name], value.numpy(), rtol=RTOL, atol=ATOL, err_msg=name
            )


def test_fast_convolution_impl_gives_the_same_logits():
    tm, model, variables = _pair("channel_first", "softmax", conv_impl="auto")
    x, xt = _images(2)
    tm.train()
    with torch.no_grad():
        expected = tm(xt).numpy()
    got, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("head", ["softmax", "a_softmax"])
def test_one_sgd_step_gives_equal_parameters(head):
    """SGD momentum 0.9, weight decay 5e-4, element-wise clip 0.1: the reference recipe."""
    tm, model, variables = _pair("channel_first", head, seed=7)
    x, xt = _images(3, b=8)
    labels = np.random.default_rng(4).integers(0, 7, size=8)
    lr, lam, margin = 0.01, 100.0, 4

    tm.train()
    opt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    opt.zero_grad()
    if head == "softmax":
        loss_t = torch.nn.functional.cross_entropy(tm(xt), torch.tensor(labels))
    else:
        loss_t = ref.a_softmax_loss(
            tm.features(xt), tm.linear.weight, torch.tensor(labels), margin, lam
        )
    loss_t.backward()
    for p in tm.parameters():
        p.grad.data.clamp_(-0.1, 0.1)
    opt.step()

    def loss_fn(params):
        (logits, feats), state = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            return_features=True,
            mutable=["batch_stats"],
        )
        if head == "softmax":
            loss = losses.softmax_cross_entropy(logits, labels)
        else:
            loss = losses.a_softmax_loss(
                feats, params["linear"]["kernel"], labels, margin=margin, lam=lam
            )
        return loss, state

    tx = sgd_pytorch(lr, momentum=0.9, weight_decay=5e-4, clip=0.1)
    (loss_j, state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
    params = optax.apply_updates(variables["params"], updates)

    np.testing.assert_allclose(float(loss_j), loss_t.item(), rtol=1e-5)
    got = convert.to_torch({"params": params, **state})
    worst = 0.0
    for name, value in tm.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        np.testing.assert_allclose(got[name], value.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
        worst = max(worst, _max_diffs(got[name], value.numpy())[0])
    print("sgd step", head, "max abs diff", worst)
    # The step moved the parameters (the test would be vacuous otherwise).
    before = convert.to_torch(variables)
    assert max(np.max(np.abs(got[k] - before[k])) for k in before) > 1e-4


def test_gray_fed_as_rgb_checkpoint_converts_to_identical_outputs():
    torch.manual_seed(0)
    tm = ref.randomize_(ref.ResNet18(width=WIDTH, in_channels=3), 11).eval()
    sd = {"net": tm.state_dict()}  # nested as the public FER checkpoints store it
    model, variables = convert.from_torch(sd)
    x, xt = _images(5)
    with torch.no_grad():
        expected = tm(xt.repeat(1, 3, 1, 1)).numpy()
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=RTOL, atol=ATOL)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 1, WIDTH)
    assert jnp.asarray(variables["params"]["conv1"]["kernel"]).dtype == jnp.float32
