import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flux1.nn.linear import Linear
from flux1.quantize import quantize_linears
from flux1.weights import saved
from flux1.weights.safetensors_io import WeightFileError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = [Linear(128, 64), Linear(64, 40)]
        self.narrow = Linear(40, 16, bias=False)
        self.scale = mx.ones((16,))


def _random_net(seed: int) -> Net:
    net = Net()
    params = tree_flatten(net.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    net.load_weights([(n, mx.random.normal(p.shape, key=k)) for (n, p), k in zip(params, keys, strict=True)])
    return net


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_save_and_load_round_trip_exactly(tmp_path, bits, monkeypatch):
    net = _random_net(0)
    if bits:
        quantize_linears(net, bits, 64)
    monkeypatch.setattr(saved, "SHARD_BYTES", 2_000)  # force several shards and an index
    saved.save_component(net, tmp_path)
    assert (tmp_path / "flux1.safetensors.index.json").is_file()
    loaded = Net()
    quantization = saved.load_saved_component(loaded, tmp_path, "net")
    assert quantization == ({"blocks.0": [bits, 64], "blocks.1": [bits, 64]} if bits else {})
    assert saved.bits_of(quantization) == bits
    ours, theirs = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(net.parameters()))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype
        assert np.array_equal(np.array(ours[name]), np.array(theirs[name])), name
    x = mx.random.normal((3, 128))
    assert np.array_equal(
        np.array(loaded.blocks[1](loaded.blocks[0](x))), np.array(net.blocks[1](net.blocks[0](x)))
    )


def test_saved_folder_without_quantization_metadata_is_refused(tmp_path):
    mx.save_safetensors(str(tmp_path / "flux1.safetensors"), {"scale": mx.ones((16,))})
    with pytest.raises(WeightFileError, match="flux1 shards without 'flux1_quantization' metadata"):
        saved.load_saved_component(Net(), tmp_path, "net")
