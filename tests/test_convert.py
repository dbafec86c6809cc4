"""PyTorch state dict <-> Flax conversion: exact round trip and errors that name the key."""

import numpy as np
import pytest

from fer_jax.model import convert

torch = pytest.importorskip("torch")
from tests import torch_reference as ref  # noqa: E402


def _state_dict(cbam="channel_first", head="softmax", seed=0):
    tm = ref.randomize_(ref.ResNet18(width=16, cbam=cbam, head=head), seed)
    return {
        k: v.numpy().copy()
        for k, v in tm.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize(
    "cbam, head", [(None, "softmax"), ("channel_first", "a_softmax"), ("parallel", "softmax")]
)
def test_round_trip_returns_the_state_dict_exactly(cbam, head):
    sd = _state_dict(cbam, head)
    _, variables = convert.from_torch(sd, cbam=cbam, head=head)
    back = convert.to_torch(variables)
    assert set(back) == set(sd)
    for name, value in sd.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_accepts_torch_tensors_num_batches_tracked_and_dataparallel_prefix():
    tm = ref.randomize_(ref.ResNet18(width=16), 1)
    sd = {"module." + k: v for k, v in tm.state_dict().items()}
    assert any(k.endswith("num_batches_tracked") for k in sd)
    model, variables = convert.from_torch({"net": sd, "acc": 71.2, "epoch": 3})
    assert model.width == 16 and model.num_classes == 7
    np.testing.assert_array_equal(
        convert.to_torch(variables)["linear.weight"], tm.linear.weight.detach().numpy()
    )


def test_missing_key_is_named_with_its_expected_shape():
    sd = _state_dict()
    del sd["layer2.0.cbam.SpatialGate.spatial.bn.running_var"]
    with pytest.raises(
        KeyError,
        match=r"layer2\.0\.cbam\.SpatialGate\.spatial\.bn\.running_var "
        r"\(expected shape \(1,\)\)",
    ):
        convert.from_torch(sd)


def test_unexpected_keys_are_named():
    sd = _state_dict(cbam="channel_first")
    with pytest.raises(KeyError, match=r"unexpected keys.*layer1\.0\.cbam\.ChannelGate"):
        convert.from_torch(sd, cbam=None)


def test_shape_mismatch_names_the_key_and_both_shapes():
    sd = _state_dict()
    sd["layer3.1.conv2.weight"] = np.zeros((64, 64, 5, 5), np.float32)
    with pytest.raises(
        ValueError,
        match=r"layer3\.1\.conv2\.weight.*\(64, 64, 5, 5\).*"
        r"\(64, 64, 3, 3\)",
    ):
        convert.from_torch(sd)


def test_not_a_resnet_checkpoint_is_reported():
    with pytest.raises(KeyError, match="conv1.weight"):
        convert.from_torch({"fc.weight": np.zeros((7, 10))})
