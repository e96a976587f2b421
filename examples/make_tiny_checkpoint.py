"""Writes a tiny, complete Hugging Face checkpoint of a DeepSeek-V3- or Qwen3-MoE-architecture model
in the DeepSeek-V3 FP8 format: `config.json`, safetensors shards with `model.safetensors.index.json`,
and a byte-level `tokenizer.json` whose vocabulary is the model's.

    python examples/make_tiny_checkpoint.py /tmp/tiny-dsv3 [--arch deepseek_v3|qwen3_moe] [--layers 3]
        [--hidden-size 256] [--experts 16] [--top-k 4] [--shards 3] [--seed 0]

Routed experts are FP8 e4m3 with 128x128 `weight_scale_inv` blocks; every other linear (attention,
the dense MLP, shared experts, the router `mlp.gate`) is bf16 and listed in
`quantization_config.ignored_layers` and `modules_to_not_convert`, so engines without a CPU FP8
linear kernel (vLLM needs AMX for one) load it. DeepSeek-V3 models have one dense layer first
(first_k_dense_replace=1), then MoE layers. Values are random: the model says nothing sensible,
but every engine and the reference must say the same thing.

Engine constraints the default shapes meet: vLLM's CPU MLA kernel needs the latent cache
kv_lora_rank + qk_rope_head_dim = 576; SGLang's DeepSeek rotary on CPU needs yarn `rope_scaling`.

Importable: `make_tiny_checkpoint(out_dir, arch=...)` writes one; `tiny_config` and
`checkpoint_tensors` build the config and the tensors in memory (any device) without writing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Iterator

import torch

from moe_backend import MoEConfig
from moe_backend.testing import random_moe_weights

__all__ = ["ARCHS", "tiny_config", "checkpoint_tensors", "bf16_linear_names", "write_tokenizer", "make_tiny_checkpoint"]

ARCHS = ("deepseek_v3", "qwen3_moe")
# Token ids 0..255 are the bytes; then these; then reserved tokens up to the vocabulary size.
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>")

_FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def tiny_config(
    arch: str = "deepseek_v3",
    *,
    num_layers: int = 3,
    hidden_size: int = 256,
    num_experts: int = 16,
    top_k: int = 4,
    moe_intermediate_size: int = 256,
    vocab_size: int = 512,
) -> dict[str, Any]:
    """The `config.json` dict of a tiny model (quantization_config included)."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    for name, value, minimum in (
        ("num_layers", num_layers, 1),
        ("hidden_size", hidden_size, 128),
        ("num_experts", num_experts, 2),
        ("top_k", top_k, 1),
        ("moe_intermediate_size", moe_intermediate_size, 128),
        ("vocab_size", vocab_size, 256 + len(SPECIAL_TOKENS)),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if hidden_size % 128 or moe_intermediate_size % 128:
        raise ValueError(
            f"hidden_size ({hidden_size}) and moe_intermediate_size ({moe_intermediate_size}) "
            f"must be multiples of 128 (the FP8 block)"
        )
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
    bos, eos = 256, 257
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "moe_intermediate_size": moe_intermediate_size,
        "intermediate_size": 2 * moe_intermediate_size,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
    if arch == "deepseek_v3":
        # Four expert groups (two kept) where the expert count allows it, else one group.
        n_group = 4 if num_experts % 4 == 0 and num_experts >= 8 and top_k <= num_experts // 2 else 1
        config = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **common,
            "n_routed_experts": num_experts,
            "n_shared_experts": 1,
            "n_group": n_group,
            "topk_group": max(1, n_group // 2),
            "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "first_k_dense_replace": min(1, num_layers - 1),
            "moe_layer_freq": 1,
            "num_nextn_predict_layers": 0,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "q_lora_rank": 128,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 64,
            "v_head_dim": 64,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        }
    else:
        config = {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **common,
            "num_experts": num_experts,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rope_theta": 1e6,
            "sliding_window": None,
            "use_sliding_window": False,
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
        }
    ignored = bf16_linear_names(config)
    config["quantization_config"] = {**_FP8_QUANT, "ignored_layers": ignored, "modules_to_not_convert": ignored}
    return config


def _is_moe_layer(config: dict[str, Any], layer: int) -> bool:
    if config["model_type"] == "deepseek_v3":
        return layer >= config["first_k_dense_replace"]
    return layer not in config["mlp_only_layers"] and (layer + 1) % config["decoder_sparse_step"] == 0


def _attention_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """`self_attn.*` tensors (relative names) -> shape."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    if config["model_type"] == "deepseek_v3":
        q_lora, kv_lora = config["q_lora_rank"], config["kv_lora_rank"]
        nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
        return {
            "q_a_proj.weight": (q_lora, h),
            "q_a_layernorm.weight": (q_lora,),
            "q_b_proj.weight": (heads * (nope + rope), q_lora),
            "kv_a_proj_with_mqa.weight": (kv_lora + rope, h),
            "kv_a_layernorm.weight": (kv_lora,),
            "kv_b_proj.weight": (heads * (nope + v), kv_lora),
            "o_proj.weight": (h, heads * v),
        }
    d, kv_heads = config["head_dim"], config["num_key_value_heads"]
    return {
        "q_proj.weight": (heads * d, h),
        "k_proj.weight": (kv_heads * d, h),
        "v_proj.weight": (kv_heads * d, h),
        "o_proj.weight": (h, heads * d),
        "q_norm.weight": (d,),
        "k_norm.weight": (d,),
    }


def bf16_linear_names(config: dict[str, Any]) -> list[str]:
    """Every linear module left in bf16 (the quantization config's ignore list)."""
    names = []
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names += [
            p + "self_attn." + n[: -len(".weight")]
            for n in _attention_shapes(config)
            if n.endswith("proj.weight") or n.endswith("mqa.weight")
        ]
        if not _is_moe_layer(config, layer):
            names += [p + f"mlp.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")]
            continue
        names.append(p + "mlp.gate")
        if config.get("n_shared_experts"):
            names += [p + f"mlp.shared_experts.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")]
    return names + ["lm_head"]


def moe_config(config: dict[str, Any]) -> MoEConfig:
    """The routed experts' shapes as a MoEConfig (Qwen3-MoE's softmax router as one group)."""
    if config["model_type"] == "deepseek_v3":
        return MoEConfig.from_hf_config(config)
    return MoEConfig(
        hidden_size=config["hidden_size"],
        moe_intermediate_size=config["moe_intermediate_size"],
        n_routed_experts=config["num_experts"],
        num_experts_per_tok=config["num_experts_per_tok"],
        n_group=1,
        topk_group=1,
        n_shared_experts=0,
    )


def _bf16(shape: tuple[int, ...], gen: torch.Generator, device, std: float) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16)


def _norm(size: int, gen: torch.Generator, device) -> torch.Tensor:
    # Not all ones: a norm weight loaded into the wrong place must change the output.
    return (1.0 + 0.1 * torch.randn(size, generator=gen, device=device)).to(torch.bfloat16)


def layer_tensors(config: dict[str, Any], layer: int, seed: int, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """One decoder layer's tensors under Hugging Face names."""
    gen = torch.Generator(device=device).manual_seed(seed * 7919 + layer)
    h = config["hidden_size"]
    p = f"model.layers.{layer}."
    yield p + "input_layernorm.weight", _norm(h, gen, device)
    yield p + "post_attention_layernorm.weight", _norm(h, gen, device)
    for name, shape in _attention_shapes(config).items():
        tensor = _norm(shape[0], gen, device) if len(shape) == 1 else _bf16(shape, gen, device, shape[1] ** -0.5)
        yield p + "self_attn." + name, tensor
    if not _is_moe_layer(config, layer):
        inter = config["intermediate_size"]
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            yield p + f"mlp.{proj}.weight", _bf16(shape, gen, device, shape[1] ** -0.5)
        return
    moe = moe_config(config)
    for name, tensor in random_moe_weights(moe, seed=seed * 7919 + layer, with_shared_experts=False, device=device):
        if name == "gate.e_score_correction_bias" and config["model_type"] != "deepseek_v3":
            continue  # Qwen3-MoE's softmax router has no bias
        yield p + "mlp." + name, tensor.contiguous()
    shared = config.get("n_shared_experts", 0) * config["moe_intermediate_size"]
    if shared:
        for proj, shape in (("gate_proj", (shared, h)), ("up_proj", (shared, h)), ("down_proj", (h, shared))):
            yield p + f"mlp.shared_experts.{proj}.weight", _bf16(shape, gen, device, shape[1] ** -0.5)


def checkpoint_tensors(
    config: dict[str, Any], seed: int = 0, device="cpu", layers: range | None = None, embedding_std: float = 1.0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint generated on `device`, or with `layers` only those decoder
    layers' (no embeddings); each layer's values depend only on (seed, layer). embedding_std: the
    token embeddings' scale, the residual stream's size relative to each layer's update."""
    if layers is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        h, vocab = config["hidden_size"], config["vocab_size"]
        yield "model.embed_tokens.weight", _bf16((vocab, h), gen, device, embedding_std)
        yield "model.norm.weight", _norm(h, gen, device)
        yield "lm_head.weight", _bf16((vocab, h), gen, device, h**-0.5)
    for layer in layers if layers is not None else range(config["num_hidden_layers"]):
        yield from layer_tensors(config, layer, seed, device)


def _byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible byte -> printable character map (printable bytes map to
    themselves, the rest to code points from 256 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(out_dir: str, vocab_size: int) -> None:
    """A byte-level tokenizer: ids 0..255 are the bytes, then <|bos|>, <|eos|>, then reserved
    special tokens up to `vocab_size` (engines check that the tokenizer fits the embedding)."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError as exc:
        raise ImportError("write_tokenizer needs the tokenizers package: pip install tokenizers") from exc
    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS) + [f"<|reserved_{i}|>" for i in range(vocab_size - 256 - len(SPECIAL_TOKENS))]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if tokenizer.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer vocabulary {tokenizer.get_vocab_size()} != {vocab_size}")
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": SPECIAL_TOKENS[0],
                "eos_token": SPECIAL_TOKENS[1],
                "pad_token": SPECIAL_TOKENS[1],
                "add_bos_token": False,
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
            },
            f,
            indent=1,
        )
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(
            {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[1]},
            f,
            indent=1,
        )


def make_tiny_checkpoint(
    out_dir: str,
    *,
    arch: str = "deepseek_v3",
    num_layers: int = 3,
    shards: int = 3,
    seed: int = 0,
    hidden_size: int = 256,
    num_experts: int = 16,
    top_k: int = 4,
    moe_intermediate_size: int = 256,
    vocab_size: int = 512,
    config_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the checkpoint folder; returns its config dict. config_overrides are applied to
    config.json after the defaults (the tensors follow the overridden shapes)."""
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ImportError("make_tiny_checkpoint needs safetensors: pip install safetensors") from exc
    try:  # checked before any file is written: a folder without its tokenizer looks complete
        import tokenizers  # noqa: F401
    except ImportError as exc:
        raise ImportError("make_tiny_checkpoint needs the tokenizers package: pip install tokenizers") from exc
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"shards: expected an int >= 1, got {shards!r}")
    config = tiny_config(
        arch,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_experts=num_experts,
        top_k=top_k,
        moe_intermediate_size=moe_intermediate_size,
        vocab_size=vocab_size,
    )
    if config_overrides:
        config.update(config_overrides)
        ignored = bf16_linear_names(config)
        config["quantization_config"].update(ignored_layers=ignored, modules_to_not_convert=ignored)
    flat = list(checkpoint_tensors(config, seed))
    if shards > len(flat):  # a shard with no tensor is a file no loader expects
        raise ValueError(f"shards: expected at most {len(flat)} (one tensor per shard), got {shards}")
    os.makedirs(out_dir, exist_ok=True)
    # Interleave tensors across shards so a layer's tensors span several files, as in the real one.
    shard_maps: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
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
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False},
            f,
            indent=1,
        )
    write_tokenizer(out_dir, config["vocab_size"])
    return config


_FLAGS = {
    "num_layers": "--layers",
    "hidden_size": "--hidden-size",
    "num_experts": "--experts",
    "top_k": "--top-k",
    "moe_intermediate_size": "--moe-intermediate-size",
    "vocab_size": "--vocab-size",
    "shards": "--shards",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=ARCHS, default="deepseek_v3")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--moe-intermediate-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = make_tiny_checkpoint(
            args.out_dir,
            arch=args.arch,
            num_layers=args.layers,
            shards=args.shards,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_experts=args.experts,
            top_k=args.top_k,
            moe_intermediate_size=args.moe_intermediate_size,
            vocab_size=args.vocab_size,
        )
    except ImportError as exc:
        parser.error(str(exc))
    except ValueError as exc:
        # The function's parameter names, spelled as this script's flags.
        text = str(exc)
        for name, flag in _FLAGS.items():
            text = re.sub(rf"\b{name}\b", flag, text)
        parser.error(f"argument {text}" if text.startswith("--") else text)
    moe_layers = [i for i in range(args.layers) if _is_moe_layer(config, i)]
    print(
        f"wrote a {args.layers}-layer {args.arch} checkpoint (FP8 routed experts, bf16 rest) to "
        f"{args.out_dir} (MoE layers: {moe_layers})"
    )


if __name__ == "__main__":
    main()
