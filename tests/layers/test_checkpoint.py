import importlib.util
import json
import os

import pytest
import torch

from moe_backend import MoEConfig
from moe_backend.layers import DeepseekV3MoE

_EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "make_tiny_checkpoint.py")


def _make_tiny_checkpoint():
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-dsv3")
    _make_tiny_checkpoint().make_tiny_checkpoint(str(path), num_layers=3, shards=3)
    return str(path)


def test_checkpoint_layout(checkpoint):
    index = json.load(open(os.path.join(checkpoint, "model.safetensors.index.json")))
    shards = set(index["weight_map"].values())
    assert len(shards) == 3
    moe_names = [n for n in index["weight_map"] if n.startswith("model.layers.1.mlp.")]
    assert len({index["weight_map"][n] for n in moe_names}) == 3  # one layer spans every shard
    assert "model.layers.1.mlp.experts.15.down_proj.weight_scale_inv" in index["weight_map"]


@pytest.mark.parametrize("expert_range", [None, (4, 12)])
def test_load_from_checkpoint_equals_loading_from_memory(checkpoint, expert_range):
    from safetensors import safe_open

    config = MoEConfig.from_hf_config(checkpoint)
    from_disk = DeepseekV3MoE(config, expert_range=expert_range)
    from_disk.load_from_checkpoint(checkpoint, 2)

    index = json.load(open(os.path.join(checkpoint, "model.safetensors.index.json")))
    prefix = "model.layers.2.mlp."
    tensors = []
    for name, shard in index["weight_map"].items():
        if name.startswith(prefix):
            with safe_open(os.path.join(checkpoint, shard), framework="pt") as f:
                tensors.append((name[len(prefix) :], f.get_tensor(name)))
    from_memory = DeepseekV3MoE(config, expert_range=expert_range)
    from_memory.load_weights(tensors)

    for (name, a), (_, b) in zip(from_disk.state_dict().items(), from_memory.state_dict().items()):
        assert torch.equal(
            a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
            b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b,
        ), name
    x = torch.randn(13, config.hidden_size, dtype=torch.bfloat16)
    assert torch.equal(from_disk(x), from_memory(x))


def test_layers_differ_and_dense_layer_is_refused(checkpoint):
    config = MoEConfig.from_hf_config(checkpoint)
    one, two = DeepseekV3MoE(config), DeepseekV3MoE(config)
    one.load_from_checkpoint(checkpoint, 1)
    two.load_from_checkpoint(checkpoint, 2)
    assert not torch.equal(one.w2_scale_inv, two.w2_scale_inv)
    with pytest.raises(ValueError, match="layer_idx"):
        DeepseekV3MoE(config).load_from_checkpoint(checkpoint, 0)  # dense layer
    with pytest.raises(ValueError, match="layer_idx"):
        DeepseekV3MoE(config).load_from_checkpoint(checkpoint, 7)
    with pytest.raises(ValueError, match="path"):
        DeepseekV3MoE(config).load_from_checkpoint(os.path.join(checkpoint, "nope"), 1)
