"""examples/make_tiny_checkpoint.py: complete FP8 checkpoints of both architectures."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from moe_backend.quant import FP8_DTYPE

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "make_tiny_checkpoint.py"


def _module():
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_checkpoint_is_complete_fp8_experts_bf16_rest(tmp_path, arch):
    from safetensors import safe_open

    config = _module().make_tiny_checkpoint(str(tmp_path), arch=arch, num_layers=2, shards=2, num_experts=8, top_k=2)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk == config and on_disk["model_type"] == arch
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    ignored = set(config["quantization_config"]["ignored_layers"])
    assert ignored == set(config["quantization_config"]["modules_to_not_convert"])
    tensors = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(tensors) == set(index["weight_map"])
    fp8 = {n for n, t in tensors.items() if t.dtype == FP8_DTYPE}
    # Exactly the routed experts are FP8, each with its 128x128 block scales.
    assert fp8 and all(".mlp.experts." in n for n in fp8)
    assert len(fp8) == 3 * 8 * sum(1 for i in range(2) if f"model.layers.{i}.mlp.gate.weight" in tensors)
    for name in fp8:
        scale = tensors[name + "_scale_inv"]
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == tuple(-(-d // 128) for d in tensors[name].shape)
    for name, tensor in tensors.items():
        if (
            name.endswith("proj.weight")
            and name not in fp8
            or name.endswith("mqa.weight")
            or name.endswith("mlp.gate.weight")
            or name == "lm_head.weight"
        ):
            assert tensor.dtype == torch.bfloat16, name
            assert name[: -len(".weight")] in ignored, name  # every bf16 linear is listed
    assert all(name + ".weight" in tensors for name in ignored)
    if arch == "deepseek_v3":
        assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576  # vLLM's CPU MLA kernel
        assert config["rope_scaling"]["type"] == "yarn"  # SGLang's DeepSeek rotary on CPU
        assert "model.layers.0.mlp.gate_proj.weight" in tensors  # the dense first layer
        assert "model.layers.1.mlp.shared_experts.down_proj.weight" in tensors
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in tensors
    else:
        assert "model.layers.0.mlp.gate.weight" in tensors
        assert not any("e_score_correction_bias" in n or "shared_experts" in n for n in tensors)


def test_tokenizer_vocabulary_is_the_models(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = _module().make_tiny_checkpoint(str(tmp_path), num_layers=1, shards=1, vocab_size=300)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == config["vocab_size"] == 300
    text = "Grüße, 世界! \n\t"
    ids = tokenizer(text).input_ids
    assert ids == list(text.encode()) and tokenizer.decode(ids) == text  # token id = byte value
    assert tokenizer.eos_token_id == config["eos_token_id"] and tokenizer.bos_token_id == config["bos_token_id"]


def test_same_seed_same_tensors_and_bad_arguments(tmp_path):
    m = _module()
    config = m.tiny_config("qwen3_moe", num_layers=1)
    a, b = dict(m.checkpoint_tensors(config, seed=3)), dict(m.checkpoint_tensors(config, seed=3))
    c = dict(m.checkpoint_tensors(config, seed=4))
    same = [
        torch.equal(
            a[n].view(torch.uint8) if a[n].dtype == FP8_DTYPE else a[n],
            b[n].view(torch.uint8) if b[n].dtype == FP8_DTYPE else b[n],
        )
        for n in a
    ]
    assert all(same)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    with pytest.raises(ValueError, match="arch"):
        m.tiny_config("mixtral")
    with pytest.raises(ValueError, match="hidden_size"):
        m.tiny_config(hidden_size=200)
    with pytest.raises(ValueError, match="top_k"):
        m.tiny_config(num_experts=4, top_k=8)
    with pytest.raises(ValueError, match="shards"):
        m.make_tiny_checkpoint(str(tmp_path), shards=0)


def test_command_line(tmp_path):
    m = _module()
    m.main(
        [
            str(tmp_path / "q"),
            "--arch",
            "qwen3_moe",
            "--layers",
            "1",
            "--experts",
            "4",
            "--top-k",
            "2",
            "--hidden-size",
            "128",
            "--seed",
            "5",
            "--shards",
            "1",
        ]
    )
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["hidden_size"]) == (4, 2, 128)
    assert os.path.isfile(tmp_path / "q" / "tokenizer.json")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "0"], "argument --layers: expected an int >= 1, got 0"),
        (["--top-k", "20"], "argument --top-k (20) must be <= --experts (16)"),
        (["--shards", "0"], "argument --shards: expected an int >= 1, got 0"),
        (["--vocab-size", "100"], "argument --vocab-size: expected an int >="),
        (["--shards", "100000"], "argument --shards: expected at most"),
    ],
)
def test_command_line_mistakes_name_the_flag_and_write_nothing(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        _module().main([str(tmp_path / "out"), *args])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_tokenizers_package_is_found_before_any_file_is_written(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="tokenizers"):
        _module().make_tiny_checkpoint(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
