"""Writes a small DeepSeek-V3-format FP8 checkpoint: `config.json`, several safetensors shards and
`model.safetensors.index.json`, with the tensor names and FP8 block scales of the real model.

    python examples/make_tiny_checkpoint.py /tmp/tiny-dsv3 [--layers 3] [--shards 3]

Layer 0 is dense (first_k_dense_replace=1), the others MoE; attention and norms are small random
stand-ins, present so that loaders must pick the MoE tensors out of a realistic name space.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from moe_backend import MoEConfig
from moe_backend.quant import quantize_fp8_blockwise
from moe_backend.testing import random_moe_weights

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def _fp8_linear(name: str, rows: int, cols: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    w_fp8, scale = quantize_fp8_blockwise(torch.randn(rows, cols, generator=gen) / cols ** 0.5)
    return {f"{name}.weight": w_fp8, f"{name}.weight_scale_inv": scale}


def layer_tensors(config: dict[str, Any], layer: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 7919 + layer)
    h = config["hidden_size"]
    p = f"model.layers.{layer}."
    tensors = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
               p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    tensors.update(_fp8_linear(p + "self_attn.q_a_proj", config["q_lora_rank"], h, gen))
    tensors.update(_fp8_linear(p + "self_attn.o_proj", h, h, gen))
    if layer < config["first_k_dense_replace"]:
        inter = config["intermediate_size"]
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            tensors.update(_fp8_linear(p + f"mlp.{proj}", *shape, gen))
    else:
        moe = MoEConfig.from_hf_config(config)
        for name, tensor in random_moe_weights(moe, seed=seed * 7919 + layer):
            tensors[p + "mlp." + name] = tensor.contiguous()
    return tensors


def make_tiny_checkpoint(out_dir: str, *, num_layers: int = 3, shards: int = 3, seed: int = 0,
                         config_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from safetensors.torch import save_file

    config = json.loads(json.dumps(TINY_CONFIG))
    config["num_hidden_layers"] = num_layers
    config.update(config_overrides or {})
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    h = config["hidden_size"]
    all_tensors: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": torch.randn(config["vocab_size"], h, generator=gen).to(torch.bfloat16),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
         "lm_head.weight": torch.randn(config["vocab_size"], h, generator=gen).to(torch.bfloat16)}]
    all_tensors += [layer_tensors(config, layer, seed) for layer in range(num_layers)]
    # Interleave tensors across shards so a layer's tensors span several files, as in the real one.
    shard_maps: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    flat = [(name, t) for group in all_tensors for name, t in group.items()]
    for i, (name, tensor) in enumerate(flat):
        shard_maps[i % shards][name] = tensor
    weight_map = {}
    for s, tensors in enumerate(shard_maps):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    total = sum(t.numel() * t.element_size() for _, t in flat)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_checkpoint(args.out_dir, num_layers=args.layers, shards=args.shards, seed=args.seed)
    print(f"wrote a {args.layers}-layer DeepSeek-V3-format FP8 checkpoint to {args.out_dir} "
          f"(MoE layers: 1..{args.layers - 1})")


if __name__ == "__main__":
    main()
