"""examples/generate_deepseek_v3.py: its CPU logic at tiny size (the GPU acceptance run uses the same
code at DeepSeek-V3's sizes: test_generate_gpu.py beside this file)."""

from __future__ import annotations

import json

import pytest

from examples import generate_deepseek_v3 as example


def test_tiny_run_reports_phases_kernels_and_a_failing_negative_control(tmp_path, capsys):
    summary = tmp_path / "summary.json"
    rc = example.main(["--batch", "2", "--prompt-len", "10", "--new-tokens", "4", "--check", "--json", str(summary)])
    out = capsys.readouterr().out
    verdict = json.loads(summary.read_text())
    checks = verdict["checks"]
    # 2 x 13 positions: too few for the acceptance, so the run must fail, saying why.
    assert rc == 1 and not verdict["passed"] and "RESULT FAIL" in out
    assert not checks["positions >= 512"]
    assert verdict["agreement"]["positions"] == 2 * 13 and verdict["agreement"]["decode_positions"] == 2 * 3
    assert checks["our layers ran in prefill and decode"] and checks["plans recorded for both phases"]
    assert verdict["calls"] == {"prefill": 2, "decode": 2 * 3}
    assert checks["the negative control fails the criteria"]
    assert verdict["control"]["mean_kl"] > 10 * verdict["agreement"]["mean_kl"]
    assert any(line.startswith("prefill T=20 ") for line in verdict["kernels"])
    assert any(line.startswith("decode T=2 ") for line in verdict["kernels"])
    for phrase in (
        "transformers (bf16): prefill",
        "moe_backend (FP8): prefill",
        "ms/step",
        "agreement:",
        "kernels our layers ran",
    ):
        assert phrase in out


def test_real_config_is_deepseek_v3s():
    config = example.real_config(3)
    assert (
        config["hidden_size"],
        config["n_routed_experts"],
        config["num_experts_per_tok"],
        config["moe_intermediate_size"],
        config["n_group"],
        config["topk_group"],
    ) == (7168, 256, 8, 2048, 8, 4)
    assert (
        config["num_attention_heads"],
        config["kv_lora_rank"],
        config["qk_rope_head_dim"],
        config["vocab_size"],
        config["intermediate_size"],
    ) == (128, 512, 64, 129280, 18432)
    assert config["first_k_dense_replace"] == 1 and config["num_hidden_layers"] == 3
    assert example.STREAM_SCALE["real"] > example.STREAM_SCALE["tiny"] == 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "real", "--experts", "4"], "argument --experts: the real model routes each token to 8 experts"),
        (
            ["--size", "real", "--experts", "12"],
            "argument --experts: n_routed_experts (12) must be divisible by n_group",
        ),
        (["--batch", "0"], "argument --batch: expected an int >= 1, got 0"),
        (["--new-tokens", "0"], "argument --new-tokens: expected an int >= 1"),
        (["--layers", "0"], "argument --layers: expected an int >= 1"),
        (["--device", "gpu"], "argument --device: expected cpu or cuda"),
        (["--checkpoint", "/no/such/folder"], "argument --checkpoint: path: no config.json"),
        (["--json", "/no/such/folder/x.json"], "argument --json: folder '/no/such/folder' does not exist"),
    ],
)
def test_bad_arguments_are_refused_before_the_model_is_built(args, message, capsys):
    """Each mistake is one argument error (exit status 2), not a traceback minutes into the run."""
    with pytest.raises(SystemExit) as info:
        example.parse_args(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_of_another_moe_family_is_refused_up_front(tmp_path, capsys):
    from examples import make_tiny_checkpoint

    pytest.importorskip("tokenizers")
    make_tiny_checkpoint.main([str(tmp_path / "qwen3"), "--arch", "qwen3_moe"])
    with pytest.raises(SystemExit):
        example.parse_args(["--checkpoint", str(tmp_path / "qwen3")])
    assert "argument --checkpoint: n_routed_experts: absent from the config (model_type 'qwen3_moe')" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("stage", ["model", "swap"])
def test_running_out_of_gpu_memory_says_which_arguments_shrink_the_model(stage, monkeypatch):
    """Out of GPU memory, building either model, is one message naming --layers and --experts, not a
    traceback from inside the layer's constructor."""
    import types

    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB.")

    if stage == "model":
        monkeypatch.setattr(example.checkpoint, "load_model", out_of_memory)
    else:
        monkeypatch.setattr(example.swap, "swap_moe_blocks", out_of_memory)
    card = types.SimpleNamespace(total_memory=80 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    with pytest.raises(SystemExit) as info:
        example.run(example.parse_args(["--batch", "1", "--prompt-len", "4", "--new-tokens", "1"]))
    message = str(info.value.code)
    assert message.startswith("out of GPU memory building ")
    assert "(tiny size, 3 layers, 16 experts) on a 80 GiB GPU" in message
    assert "pass fewer --layers or --experts" in message


def test_the_real_size_run_takes_3_layers_only_where_they_fit():
    """The GPU test and the device step size the real-size run with this: an H100 80GB (79 GiB as
    torch reports it) gets 2 layers, an H200 (139 GiB) 3."""
    assert example.real_layers_that_fit(79 << 30) == 2
    assert example.real_layers_that_fit(139 << 30) == 3
