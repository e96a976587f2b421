"""Every public entry point x a bad input -> the error it raises (docs/reliability.md, one row per case).

The table below is the single source: each row is a test, and `test_doc_table_matches` checks the
doc lists exactly these rows (`python -m tests.test_reliability` prints the doc's table). Each
error must be a ValueError/TypeError (RuntimeError for calling forward before loading) whose
message names the argument, field or file (`names`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from moe_backend import MoEConfig, ops, reference
from moe_backend import experts as moe_experts
from moe_backend.dispatch import Policy
from moe_backend.layers import DeepseekV3MoE
from moe_backend.layers.router import noaux_tc_route
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from moe_backend.testing import random_moe_weights

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"

TINY = dict(
    hidden_size=256,
    moe_intermediate_size=256,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    n_shared_experts=1,
)
HF_TINY = {
    **TINY,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
}
LAYER = 0
PREFIX = f"model.layers.{LAYER}.mlp."


class Env:
    """What a case may use: a tiny config, a loaded layer, a scratch folder, a tiny checkpoint."""

    def __init__(self, tmp_path: Path, layer: DeepseekV3MoE, checkpoint: Path) -> None:
        self.tmp = tmp_path
        self.config = layer.config
        self.layer = layer
        self._checkpoint = checkpoint

    def hf(self, **changes) -> dict:
        cfg = json.loads(json.dumps(HF_TINY))
        for key, value in changes.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return cfg

    def config_file(self, text: str) -> Path:
        path = self.tmp / "config.json"
        path.write_text(text)
        return path

    def checkpoint(self) -> Path:
        """A fresh copy of the tiny two-shard checkpoint, to damage."""
        copy = self.tmp / "ckpt"
        shutil.copytree(self._checkpoint, copy)
        return copy

    def load(self, path: Path) -> None:
        DeepseekV3MoE(self.config).load_from_checkpoint(path, LAYER)

    def weights(self, **replace) -> list:
        weights = dict(random_moe_weights(self.config, seed=3))
        weights.update(replace)
        return list(weights.items())

    def x(self, tokens: int = 4) -> torch.Tensor:
        return torch.randn(tokens, self.config.hidden_size, dtype=torch.bfloat16)

    def routed(self, x=None, **kwargs):
        layer = self.layer
        x = self.x() if x is None else x
        ids = torch.randint(0, 16, (x.shape[0], 4), dtype=torch.int32)
        args = dict(
            x=x,
            w13_fp8=layer.w13_fp8,
            w13_scale_inv=layer.w13_scale_inv,
            w2_fp8=layer.w2_fp8,
            w2_scale_inv=layer.w2_scale_inv,
            topk_weights=torch.rand(x.shape[0], 4),
            topk_ids=ids,
        )
        args.update(kwargs)
        return moe_experts.routed_experts(**args)

    def gemm(self, **kwargs):
        a_fp8, a_scale = quantize_fp8_per_token_group(self.x(8))
        layer = self.layer
        args = dict(
            a_fp8=a_fp8,
            a_scale=a_scale,
            b_fp8=layer.w13_fp8,
            b_scale=layer.w13_scale_inv,
            expert_ids=torch.zeros(8, dtype=torch.int32),
        )
        args.update(kwargs)
        return ops.grouped_gemm_contiguous(**args)

    def route(self, **kwargs):
        args = dict(
            hidden=self.x(3).float(),
            gate_weight=self.layer.gate_weight,
            correction_bias=self.layer.e_score_correction_bias,
            config=self.config,
        )
        args.update(kwargs)
        return noaux_tc_route(**args)


def _fp8_x(env: Env, nan_row: int | None = None, inf_scale_row: int | None = None) -> dict:
    """An already quantized `x` (+ `x_scale`) of 4 tokens, with one row poisoned."""
    x_fp8, x_scale = quantize_fp8_per_token_group(env.x())
    if nan_row is not None:
        x_fp8.view(torch.uint8)[nan_row, 7] = 0x7F  # e4m3fn's NaN
    if inf_scale_row is not None:
        x_scale[inf_scale_row, 0] = math.inf
    return dict(x=x_fp8, x_scale=x_scale)


@dataclass(frozen=True)
class Case:
    entry: str  # the public entry point
    bad: str  # the bad input, in words
    error: type[Exception]
    names: str  # what the message must name (argument, field or file)
    run: Callable[[Env], object]
    needs: str | None = None  # an optional module the case imports (skipped without it)

    @property
    def row(self) -> tuple[str, str, str]:
        return self.entry, self.bad, f"{self.error.__name__} naming `{self.names}`"


def _truncate(path: Path) -> None:
    shard = path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])


def _corrupt_header(path: Path) -> None:
    shard = path / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:24] = b"#" * 16  # inside the JSON header
    shard.write_bytes(bytes(data))


def _drop_from_shard(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    shard = path / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    del tensors[PREFIX + "experts.1.up_proj.weight"]
    save_file(tensors, shard)


def _edit_index(path: Path, text: str | None = None, **changes) -> None:
    index_file = path / "model.safetensors.index.json"
    if text is None:
        index = json.loads(index_file.read_text())
        index.update(changes)
        text = json.dumps(index)
    index_file.write_text(text)


def _then_load(damage: Callable[[Path], None]) -> Callable[[Env], None]:
    def run(env: Env) -> None:
        path = env.checkpoint()
        damage(path)
        env.load(path)

    return run


def _fp8_scales(env: Env) -> None:
    weights = env.weights()
    bad = [(n, t.to(torch.float8_e4m3fn) if n == "experts.2.down_proj.weight_scale_inv" else t) for n, t in weights]
    DeepseekV3MoE(env.config).load_weights(bad)


def _vllm_apply_standard(env: Env) -> None:
    from moe_backend_integrations.vllm._apply import apply_standard

    layer = env.layer
    x_fp8, x_scale = quantize_fp8_per_token_group(env.x(3))
    apply_standard(
        torch.empty(3, 256, dtype=torch.bfloat16),
        x_fp8,
        x_scale,
        layer.w13_fp8,
        layer.w13_scale_inv,
        layer.w2_fp8,
        layer.w2_scale_inv,
        torch.rand(3, 4),
        torch.zeros(3, 4, dtype=torch.float32),
        None,
        False,
        Policy(),
    )


def _vllm_apply_batched(env: Env) -> None:
    from moe_backend_integrations.vllm._apply import apply_batched

    layer = env.layer
    x_fp8, x_scale = quantize_fp8_per_token_group(torch.randn(16, 2, 256).bfloat16())
    apply_batched(
        torch.empty(16, 2, 256, dtype=torch.bfloat16),
        x_fp8,
        x_scale,
        layer.w13_fp8,
        layer.w13_scale_inv,
        layer.w2_fp8,
        layer.w2_scale_inv,
        torch.zeros(8, dtype=torch.int32),
        torch.empty(16 * 2 * 512, dtype=torch.bfloat16),
    )


def _sglang_quant_info(env: Env) -> None:
    from moe_backend_integrations.sglang.core import PhaseMoeQuantInfo

    layer = env.layer
    PhaseMoeQuantInfo(
        w13_fp8=layer.w13_fp8,
        w13_scale_inv=layer.w13_scale_inv.numpy(),
        w2_fp8=layer.w2_fp8,
        w2_scale_inv=layer.w2_scale_inv,
    )


def _policy_file(text: str) -> Callable[[Env], object]:
    def run(env: Env) -> object:
        path = env.tmp / "policy.json"
        path.write_text(text)
        return Policy.from_file(path)

    return run


def _bad_layer(**kwargs) -> Callable[[Env], object]:
    return lambda env: DeepseekV3MoE(env.config, **kwargs)


def _hf(**changes) -> Callable[[Env], object]:
    return lambda env: MoEConfig.from_hf_config(env.hf(**changes))


_NOT_ON_CPU = "meta"  # a device the CPU tensors are not on, without needing a GPU

CASES: list[Case] = [
    # ---- config ----
    Case(
        "MoEConfig.from_hf_config",
        '`n_shared_experts` is a string ("1")',
        TypeError,
        "n_shared_experts",
        _hf(n_shared_experts="1"),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "`n_shared_experts` is not an integer (1.5)",
        TypeError,
        "n_shared_experts",
        _hf(n_shared_experts=1.5),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "`n_group` == `n_routed_experts` (no top-2 per group)",
        ValueError,
        "n_group",
        _hf(n_group=16, topk_group=8),
    ),
    Case("MoEConfig.from_hf_config", "`topk_group` > `n_group`", ValueError, "topk_group", _hf(topk_group=5)),
    Case(
        "MoEConfig.from_hf_config",
        '`weight_block_size` not numeric (["128", "128"])',
        TypeError,
        "weight_block_size",
        _hf(**{"quantization_config.weight_block_size": ["128", "128"]}),
    ),
    Case(
        "MoEConfig.from_hf_config",
        '`routed_scaling_factor` a string ("2.5")',
        TypeError,
        "routed_scaling_factor",
        _hf(routed_scaling_factor="2.5"),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "`routed_scaling_factor` NaN",
        ValueError,
        "routed_scaling_factor",
        _hf(routed_scaling_factor=math.nan),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "`routed_scaling_factor` Infinity in config.json",
        ValueError,
        "routed_scaling_factor",
        lambda env: MoEConfig.from_hf_config(
            env.config_file(
                json.dumps(env.hf()).replace('"routed_scaling_factor": 2.5', '"routed_scaling_factor": Infinity')
            )
        ),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "a Qwen3-MoE config (`num_experts`, no `n_routed_experts`)",
        ValueError,
        "n_routed_experts",
        lambda env: MoEConfig.from_hf_config(
            {
                "model_type": "qwen3_moe",
                "hidden_size": 256,
                "moe_intermediate_size": 128,
                "num_experts": 16,
                "num_experts_per_tok": 4,
            }
        ),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "a bool where an int is expected (`hidden_size: true`)",
        TypeError,
        "hidden_size",
        _hf(hidden_size=True),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "`num_experts_per_tok` 0",
        ValueError,
        "num_experts_per_tok",
        _hf(num_experts_per_tok=0),
    ),
    Case(
        "MoEConfig.from_hf_config", "`norm_topk_prob` a string", TypeError, "norm_topk_prob", _hf(norm_topk_prob="yes")
    ),
    Case(
        "MoEConfig.from_hf_config",
        "malformed config JSON",
        ValueError,
        "config.json",
        lambda env: MoEConfig.from_hf_config(env.config_file('{"hidden_size": 256,')),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "config.json holds a list",
        ValueError,
        "config.json",
        lambda env: MoEConfig.from_hf_config(env.config_file("[1, 2]")),
    ),
    Case(
        "MoEConfig.from_hf_config",
        "`cfg` neither a dict nor a path (42)",
        TypeError,
        "cfg",
        lambda env: MoEConfig.from_hf_config(42),
    ),
    # ---- checkpoint loading ----
    Case(
        "DeepseekV3MoE.load_from_checkpoint",
        "truncated shard",
        ValueError,
        "model-00002-of-00002.safetensors",
        _then_load(_truncate),
    ),
    Case(
        "DeepseekV3MoE.load_from_checkpoint",
        "corrupt shard header",
        ValueError,
        "model-00001-of-00002.safetensors",
        _then_load(_corrupt_header),
    ),
    Case(
        "DeepseekV3MoE.load_from_checkpoint",
        "index names a tensor its shard lacks",
        ValueError,
        f"model-00001-of-00002.safetensors: the index maps 1 tensor(s) to this shard but it lacks them: "
        f"{PREFIX}experts.1.up_proj.weight",
        _then_load(_drop_from_shard),
    ),
    Case(
        "DeepseekV3MoE.load_from_checkpoint",
        "malformed index JSON",
        ValueError,
        "model.safetensors.index.json",
        _then_load(lambda p: _edit_index(p, text='{"weight_map": {')),
    ),
    Case(
        "DeepseekV3MoE.load_from_checkpoint",
        "index without a `weight_map` object",
        ValueError,
        "model.safetensors.index.json",
        _then_load(lambda p: _edit_index(p, weight_map=[1, 2])),
    ),
    Case(
        "DeepseekV3MoE.load_from_checkpoint",
        "index names a missing shard file",
        ValueError,
        "model-00002-of-00002.safetensors",
        _then_load(lambda p: (p / "model-00002-of-00002.safetensors").unlink()),
    ),
    Case(
        "DeepseekV3MoE.load_from_checkpoint",
        "`layer_idx` a string",
        TypeError,
        "layer_idx",
        lambda env: env.layer.load_from_checkpoint(env.tmp, "0"),
    ),
    # ---- the layer ----
    Case(
        "DeepseekV3MoE.load_weights",
        "a dict instead of (name, tensor) pairs",
        TypeError,
        "weights",
        lambda env: DeepseekV3MoE(env.config).load_weights(dict(env.weights())),
    ),
    Case(
        "DeepseekV3MoE.load_weights",
        "an item that is not a (name, tensor) pair",
        TypeError,
        "weights: item 1",
        lambda env: DeepseekV3MoE(env.config).load_weights([env.weights()[0], "gate.weight"]),
    ),
    Case(
        "DeepseekV3MoE.load_weights",
        "scales stored in fp8",
        ValueError,
        "experts.2.down_proj.weight_scale_inv",
        _fp8_scales,
    ),
    Case(
        "DeepseekV3MoE.load_weights",
        "a tensor of the wrong shape",
        ValueError,
        "experts.0.gate_proj.weight",
        lambda env: DeepseekV3MoE(env.config).load_weights(
            env.weights(**{"experts.0.gate_proj.weight": torch.zeros(128, 256, dtype=torch.float8_e4m3fn)})
        ),
    ),
    Case(
        "DeepseekV3MoE",
        "`policy` not a Policy (a dict)",
        TypeError,
        "policy",
        _bad_layer(policy={"decode_kernel": "masked"}),
    ),
    Case("DeepseekV3MoE", "`expert_range` with floats", TypeError, "expert_range", _bad_layer(expert_range=(0.0, 8.0))),
    Case(
        "DeepseekV3MoE",
        "`expert_range` with three elements",
        TypeError,
        "expert_range",
        _bad_layer(expert_range=(0, 4, 8)),
    ),
    Case(
        "DeepseekV3MoE",
        "`expert_range` empty or past the experts",
        ValueError,
        "expert_range",
        _bad_layer(expert_range=(8, 20)),
    ),
    Case(
        "DeepseekV3MoE",
        "`with_shared_experts` not a bool",
        TypeError,
        "with_shared_experts",
        _bad_layer(with_shared_experts=1),
    ),
    Case(
        "DeepseekV3MoE.forward",
        "NaN in `hidden_states`",
        ValueError,
        "hidden_states",
        lambda env: env.layer(env.x().index_fill_(1, torch.tensor([7]), math.nan)),
    ),
    Case(
        "DeepseekV3MoE.forward",
        "`hidden_states` ~1e20 (overflows inside the experts)",
        ValueError,
        "hidden_states",
        lambda env: env.layer(env.x() * 1e20),
    ),
    Case(
        "DeepseekV3MoE.forward",
        "`hidden_states` fp32",
        TypeError,
        "hidden_states",
        lambda env: env.layer(env.x().float()),
    ),
    Case(
        "DeepseekV3MoE.forward",
        "`phase` not prefill/decode",
        ValueError,
        "phase",
        lambda env: env.layer(env.x(), phase="warmup"),
    ),
    Case(
        "DeepseekV3MoE.forward",
        "called before loading weights",
        RuntimeError,
        "load_weights",
        lambda env: DeepseekV3MoE(env.config)(env.x()),
    ),
    # ---- router ----
    Case(
        "noaux_tc_route",
        "gate of the wrong shape",
        ValueError,
        "gate_weight",
        lambda env: env.route(gate_weight=torch.zeros(16, 128)),
    ),
    Case(
        "noaux_tc_route",
        "gate of an integer dtype",
        TypeError,
        "gate_weight",
        lambda env: env.route(gate_weight=torch.zeros(16, 256, dtype=torch.int32)),
    ),
    Case(
        "noaux_tc_route",
        "gate on another device",
        ValueError,
        "gate_weight",
        lambda env: env.route(gate_weight=torch.zeros(16, 256, device=_NOT_ON_CPU)),
    ),
    Case(
        "noaux_tc_route",
        "correction bias of the wrong shape",
        ValueError,
        "correction_bias",
        lambda env: env.route(correction_bias=torch.zeros(8)),
    ),
    Case("noaux_tc_route", "`config` not a MoEConfig", TypeError, "config", lambda env: env.route(config=TINY)),
    # ---- policy ----
    Case(
        "Policy.from_dict",
        "kernel name given as a list",
        TypeError,
        "decode_kernel",
        lambda env: Policy.from_dict({"decode_kernel": ["masked"]}),
    ),
    Case(
        "Policy.from_dict",
        "boolean for an integer (`decode_max_tokens: true`)",
        TypeError,
        "decode_max_tokens",
        lambda env: Policy.from_dict({"decode_max_tokens": True}),
    ),
    Case(
        "Policy.from_dict",
        "integer given as a string",
        TypeError,
        "decode_max_tokens",
        lambda env: Policy.from_dict({"decode_max_tokens": "256"}),
    ),
    Case(
        "Policy.from_dict",
        "negative `decode_max_tokens`",
        ValueError,
        "decode_max_tokens",
        lambda env: Policy.from_dict({"decode_max_tokens": -1}),
    ),
    Case(
        "Policy.from_dict",
        "a per-device value of the wrong type",
        TypeError,
        "devices.H100",
        lambda env: Policy.from_dict({"devices": {"H100": {"decode_max_tokens": [1]}}}),
    ),
    Case(
        "Policy.from_dict",
        "unknown key",
        ValueError,
        "decode_kernels",
        lambda env: Policy.from_dict({"decode_kernels": "masked"}),
    ),
    Case("Policy.from_file", "malformed policy JSON", ValueError, "policy.json", _policy_file("{decode")),
    # ---- ops ----
    Case("ops.grouped_gemm_contiguous", "`impl` not a string", TypeError, "impl", lambda env: env.gemm(impl=3)),
    Case("ops.grouped_gemm_contiguous", "unknown `impl`", ValueError, "impl", lambda env: env.gemm(impl="fast")),
    Case(
        "ops.grouped_gemm_contiguous",
        "`expected_m` a bool",
        TypeError,
        "expected_m",
        lambda env: env.gemm(expected_m=True),
    ),
    Case("ops.grouped_gemm_contiguous", "`a_fp8` in bf16", TypeError, "a_fp8", lambda env: env.gemm(a_fp8=env.x(8))),
    Case(
        "ops.grouped_gemm_contiguous",
        "`expert_ids` out of range",
        ValueError,
        "expert_ids",
        lambda env: env.gemm(expert_ids=torch.full((8,), 99, dtype=torch.int32)),
    ),
    Case(
        "ops.silu_mul_quant",
        "`group` a string",
        TypeError,
        "group",
        lambda env: ops.silu_mul_quant(torch.randn(2, 512), "128"),
    ),
    Case(
        "ops.per_token_group_quant",
        "`ue8m0` a string",
        TypeError,
        "ue8m0",
        lambda env: ops.per_token_group_quant(env.x(), 128, "yes"),
    ),
    Case("ops.per_token_group_quant", "`x` a list", TypeError, "x", lambda env: ops.per_token_group_quant([1.0])),
    Case(
        "ops.unpermute_combine",
        "`topk_weights` in bf16",
        TypeError,
        "topk_weights",
        lambda env: ops.unpermute_combine(
            torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(2, 2).long(), torch.zeros(2, 2, dtype=torch.bfloat16)
        ),
    ),
    Case(
        "quant.quantize_fp8_per_token_group",
        "`group` 0",
        ValueError,
        "group",
        lambda env: quantize_fp8_per_token_group(env.x(), 0),
    ),
    Case(
        "quant.quantize_fp8_blockwise",
        "`block` a float",
        TypeError,
        "block",
        lambda env: quantize_fp8_blockwise(torch.randn(128, 128), 128.0),
    ),
    # ---- experts and layouts ----
    Case(
        "experts.routed_experts",
        "negative `expert_start`",
        ValueError,
        "expert_start",
        lambda env: env.routed(expert_start=-1),
    ),
    Case("experts.routed_experts", "`policy` a string", TypeError, "policy", lambda env: env.routed(policy="masked")),
    Case(
        "experts.routed_experts",
        "Inf in `x` (CPU: checked)",
        ValueError,
        "x",
        lambda env: env.routed(x=env.x().index_fill_(1, torch.tensor([0]), math.inf)),
    ),
    Case(
        "experts.routed_experts",
        "`topk_ids` of floats",
        TypeError,
        "topk_ids",
        lambda env: env.routed(topk_ids=torch.zeros(4, 4)),
    ),
    Case("experts.routed_experts", "`phase` unknown", ValueError, "phase", lambda env: env.routed(phase="both")),
    Case(
        "experts.routed_experts",
        "NaN in an FP8 `x` (CPU: checked)",
        ValueError,
        "x",
        lambda env: env.routed(**_fp8_x(env, nan_row=1)),
    ),
    Case(
        "experts.routed_experts",
        "Inf in `x_scale` (CPU: checked)",
        ValueError,
        "x_scale",
        lambda env: env.routed(**_fp8_x(env, inf_scale_row=2)),
    ),
    Case(
        "experts.routed_experts",
        "NaN in a local slot's `topk_weights` (CPU: checked)",
        ValueError,
        "topk_weights",
        lambda env: env.routed(topk_weights=torch.rand(4, 4).index_fill_(0, torch.tensor([3]), math.nan)),
    ),
    Case(
        "experts.routed_experts",
        "a token's `topk_ids` repeating an expert (CPU: checked)",
        ValueError,
        "topk_ids",
        lambda env: env.routed(topk_ids=torch.tensor([[0, 1, 2, 3], [4, 5, 4, 6], [0, 1, 2, 3], [7, 8, 9, 10]]).int()),
    ),
    Case(
        "experts.routed_experts",
        "`w2_fp8` in bf16",
        TypeError,
        "w2_fp8",
        lambda env: env.routed(w2_fp8=env.layer.w2_fp8.to(torch.bfloat16)),
    ),
    Case(
        "experts.routed_experts",
        "`w13_fp8` with I not a multiple of 128",
        ValueError,
        "w13_fp8",
        lambda env: env.routed(
            w13_fp8=env.layer.w13_fp8[:, :128],
            w13_scale_inv=env.layer.w13_scale_inv[:, :1],
            w2_fp8=env.layer.w2_fp8[:, :, :64],
            w2_scale_inv=env.layer.w2_scale_inv[:, :, :1],
        ),
    ),
    Case(
        "experts.routed_experts",
        "unknown `kernel`, empty batch",
        ValueError,
        "kernel",
        lambda env: env.routed(
            x=env.x(0), topk_weights=torch.rand(0, 4), topk_ids=torch.zeros(0, 4).int(), kernel="nope"
        ),
    ),
    Case(
        "experts.masked_experts",
        "unknown `impl`",
        ValueError,
        "impl",
        lambda env: moe_experts.masked_experts(
            *quantize_fp8_per_token_group(torch.randn(16, 2, 256)),
            env.layer.w13_fp8,
            env.layer.w13_scale_inv,
            env.layer.w2_fp8,
            env.layer.w2_scale_inv,
            torch.zeros(16, dtype=torch.int32),
            impl="nope",
        ),
    ),
    Case(
        "experts.masked_experts",
        "`masked_m` with the wrong length",
        ValueError,
        "masked_m",
        lambda env: moe_experts.masked_experts(
            *quantize_fp8_per_token_group(torch.randn(16, 2, 256)),
            env.layer.w13_fp8,
            env.layer.w13_scale_inv,
            env.layer.w2_fp8,
            env.layer.w2_scale_inv,
            torch.zeros(3, dtype=torch.int32),
        ),
    ),
    Case(
        "reference.build_contiguous_layout",
        "`alignment` 0",
        ValueError,
        "alignment",
        lambda env: reference.build_contiguous_layout(torch.zeros(2, 2, dtype=torch.int32), 4, alignment=0),
    ),
    Case(
        "reference.build_masked_layout",
        "`max_m` below the busiest expert",
        ValueError,
        "max_m",
        lambda env: reference.build_masked_layout(torch.zeros(4, 1, dtype=torch.int32), 4, max_m=2),
    ),
    Case(
        "reference.build_contiguous_layout",
        "`num_local_experts` a float",
        TypeError,
        "num_local_experts",
        lambda env: reference.build_contiguous_layout(torch.zeros(2, 2, dtype=torch.int32), 4.0),
    ),
    Case(
        "reference.build_masked_layout",
        "`max_m` a float",
        TypeError,
        "max_m",
        lambda env: reference.build_masked_layout(torch.zeros(4, 1, dtype=torch.int32), 4, max_m=8.0),
    ),
    Case(
        "reference.silu_mul_quant",
        "`ue8m0` a string",
        TypeError,
        "ue8m0",
        lambda env: reference.silu_mul_quant(torch.randn(2, 256), 128, "false"),
    ),
    # ---- engine glue (run where the engine or its free-standing glue imports) ----
    Case("vllm apply_standard", "`topk_ids` of floats", TypeError, "topk_ids", _vllm_apply_standard),
    Case(
        "vllm apply_batched",
        "`expert_num_tokens` shorter than the local experts",
        ValueError,
        "expert_num_tokens",
        _vllm_apply_batched,
    ),
    Case(
        "sglang PhaseMoeQuantInfo",
        "a scale that is not a tensor",
        TypeError,
        "w13_scale_inv",
        _sglang_quant_info,
        needs="sglang",
    ),
]


def _case_id(case: Case) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{case.entry} {case.bad}").strip("-")[:80]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    config = MoEConfig(**TINY)
    path = tmp_path_factory.mktemp("reliability-ckpt")
    tensors = {PREFIX + n: t.contiguous() for n, t in random_moe_weights(config, seed=1)}
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, path / shard)
        weight_map.update({n: shard for n in shard_names})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(HF_TINY))
    return path


@pytest.fixture(scope="module")
def tiny_layer() -> DeepseekV3MoE:
    layer = DeepseekV3MoE(MoEConfig(**TINY))
    layer.load_weights(random_moe_weights(layer.config, seed=1))
    return layer


def test_tiny_checkpoint_loads(tiny_checkpoint, tiny_layer):
    """The undamaged checkpoint loads, so each damaged one fails for its damage alone."""
    layer = DeepseekV3MoE(tiny_layer.config)
    layer.load_from_checkpoint(tiny_checkpoint, LAYER)
    assert torch.equal(layer.w13_fp8.view(torch.uint8), tiny_layer.w13_fp8.view(torch.uint8))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_is_named(case: Case, tmp_path, tiny_layer, tiny_checkpoint):
    if case.needs and importlib.util.find_spec(case.needs) is None:
        pytest.skip(f"needs {case.needs}")
    with pytest.raises(case.error) as info:
        case.run(Env(tmp_path, tiny_layer, tiny_checkpoint))
    assert case.names in str(info.value), f"the message does not name {case.names!r}: {info.value}"


def markdown_table() -> str:
    lines = ["| entry point | bad input | error raised |", "|---|---|---|"]
    lines += [f"| `{e}` | {b} | {r} |" for e, b, r in (c.row for c in CASES)]
    return "\n".join(lines)


def _doc_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else None
        if cells and len(cells) == 3:
            rows.append((cells[0].strip("`"), cells[1], cells[2]))
    return rows


def test_doc_table_matches():
    """docs/reliability.md lists exactly these rows, in this order (regenerate with
    `python -m tests.test_reliability`)."""
    assert _doc_rows() == [c.row for c in CASES]


def test_cases_are_distinct():
    assert len({c.row for c in CASES}) == len(CASES)


if __name__ == "__main__":
    print(markdown_table())


# ------------------------------------------------------------------ transactional loading
def _buffers(layer: DeepseekV3MoE) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in layer.named_buffers()}


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


@pytest.mark.parametrize("damage", ["wrong_shape_last", "nan_scale_last", "read_error_midway", "fp8_scale_first"])
def test_failed_reload_leaves_the_layer_exactly_as_it_was(tiny_layer, damage):
    config = tiny_layer.config
    layer = DeepseekV3MoE(config)
    layer.load_weights(random_moe_weights(config, seed=1))
    before = _buffers(layer)
    x = torch.randn(9, config.hidden_size, dtype=torch.bfloat16)
    out_before = layer(x)

    new = list(random_moe_weights(config, seed=2))  # every tensor differs from seed 1
    if damage == "wrong_shape_last":
        name, t = new[-1]
        new[-1] = (name, t[:-1])
    elif damage == "nan_scale_last":
        idx = max(i for i, (n, _) in enumerate(new) if n.endswith("weight_scale_inv"))
        new[idx] = (new[idx][0], torch.full_like(new[idx][1], math.nan))
    elif damage == "fp8_scale_first":
        idx = min(i for i, (n, _) in enumerate(new) if n.endswith("weight_scale_inv"))
        new[idx] = (new[idx][0], new[idx][1].to(torch.float8_e4m3fn))

    def read_error_midway():
        yield from new[: len(new) // 2]
        raise OSError("shard read failed")  # a checkpoint read failing half-way

    source = read_error_midway() if damage == "read_error_midway" else new
    with pytest.raises((ValueError, OSError)):
        layer.load_weights(source)
    assert _bit_identical(_buffers(layer), before), "a failed load changed the layer's weights"
    assert torch.equal(layer(x), out_before), "forward after a failed load differs"

    layer.load_weights(random_moe_weights(config, seed=2))  # the repaired set loads and replaces all
    after = _buffers(layer)
    assert all(not torch.equal(after[n].view(torch.uint8), before[n].view(torch.uint8)) for n in before)


def test_failed_first_load_leaves_the_layer_unloaded(tiny_layer):
    layer = DeepseekV3MoE(tiny_layer.config)
    empty = _buffers(layer)
    weights = list(random_moe_weights(tiny_layer.config, seed=1))
    with pytest.raises(ValueError, match="the layer is unchanged"):
        layer.load_weights(weights[:-1])  # one tensor missing
    assert _bit_identical(_buffers(layer), empty)
    with pytest.raises(RuntimeError, match="load_weights"):
        layer(torch.randn(2, 256, dtype=torch.bfloat16))


def test_failed_checkpoint_reload_keeps_old_weights(tiny_layer, tiny_checkpoint, tmp_path):
    layer = DeepseekV3MoE(tiny_layer.config)
    layer.load_weights(random_moe_weights(tiny_layer.config, seed=5))
    before = _buffers(layer)
    damaged = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, damaged)
    _truncate(damaged)  # the second shard: the first one's tensors were read and validated
    with pytest.raises(ValueError, match="model-00002-of-00002"):
        layer.load_from_checkpoint(damaged, LAYER)
    assert _bit_identical(_buffers(layer), before)


# ------------------------------------------------------------------ non-finite / overflow policy
def _uncapped_quant(x: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantizer before the 2^119 cap, written out: what ordinary inputs must still get."""
    g = x.float().reshape(*x.shape[:-1], -1, 128)
    scale = g.abs().amax(-1).clamp_min(1e-10) / 448.0
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (g / scale.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(x.shape)
    return q, scale


@pytest.mark.parametrize("ue8m0", [False, True])
def test_scale_cap_keeps_ordinary_inputs_bit_identical(ue8m0):
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-30, 30, 61)  # per row: 1e-30 .. 1e30, all below the cap's reach
    x = (torch.randn(61, 512, generator=gen) * magnitudes[:, None]).bfloat16()
    q, s = quantize_fp8_per_token_group(x, 128, ue8m0)
    ref_q, ref_s = _uncapped_quant(x, ue8m0)
    assert torch.equal(s, ref_s) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_reference_silu_mul_quant_never_overflows_for_bf16_extremes():
    info = torch.finfo(torch.bfloat16)
    values = torch.tensor(
        [info.max, -info.max, info.tiny, -info.tiny, info.smallest_normal * 2**-7, 0.0, 1.0, -1e20, 1e20, 3e4]
    )
    pairs = torch.cartesian_prod(values, values)  # every (gate, up) pair, one pair per row
    h = pairs.repeat_interleave(128, dim=1).bfloat16()  # [100, 256]: gate group, then up group
    for ue8m0 in (False, True):
        q, s = reference.silu_mul_quant(h, 128, ue8m0)
        deq = q.float() * s
        assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(deq).all()
        # A product past fp32 saturates at +-448 * 2^119, with the product's sign.
        product = torch.nn.functional.silu(pairs[:, 0].double()) * pairs[:, 1].double()
        huge = product.abs() > 448 * 2.0**119
        assert huge.any() and torch.equal(deq[huge, 0].double(), 448 * 2.0**119 * product[huge].sign())


def test_overflowing_rows_do_not_touch_other_rows(tiny_layer):
    """Unchecked (the reference, as the GPU runs without MOE_BACKEND_CHECK_FINITE): a row that
    overflows changes no other row, and the quantizers give no NaN for it."""

    layer = tiny_layer
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    x_bad = x.clone()
    x_bad[2] *= 1e30
    ids = torch.randint(0, 16, (6, 4), dtype=torch.int32)
    weights = torch.rand(6, 4)
    args = (layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv, weights)
    ok = reference.routed_experts(x, *args, ids)
    mixed = reference.routed_experts(x_bad, *args, ids)
    keep = torch.arange(6) != 2
    assert torch.equal(mixed[keep], ok[keep])


def test_overflow_error_names_input_and_rows(tiny_layer):
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    x[3] *= 1e25
    with pytest.raises(ValueError, match=r"hidden_states: 1 row\(s\) \[3\] overflow"):
        tiny_layer(x)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    x[1, 4] = math.inf
    with pytest.raises(ValueError, match=r"hidden_states: holds NaN/Inf values in 1 row\(s\) \[1\]"):
        tiny_layer(x)


def test_scale_cap_is_one_value_everywhere():
    """The torch quantizer, the Triton core and the tests agree on the cap: 2^119, a power of two
    (UE8M0 holds it) whose 448 multiple is finite in fp32 while 2^120's is not."""
    from moe_backend import quant
    from tests.helpers.quant_extremes import SCALE_CEIL

    assert quant.SCALE_CEIL == SCALE_CEIL == 2.0**119
    f32_max = torch.finfo(torch.float32).max
    assert 448 * SCALE_CEIL < f32_max < 448 * 2 * SCALE_CEIL
    if importlib.util.find_spec("triton") is not None:
        from moe_backend.kernels import _group_quant_core

        assert float(_group_quant_core.SCALE_CEIL.value) == SCALE_CEIL


@pytest.mark.parametrize("kernel", ["contiguous", "masked"])
def test_an_absent_slots_weight_is_never_read(tiny_layer, kernel):
    """A slot routed elsewhere (-1, or another rank's expert) contributes nothing, its weight
    included: NaN there leaves the token's output as a zero weight does, as in the reference."""
    layer = tiny_layer
    args = (layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv)
    x = torch.randn(3, layer.config.hidden_size, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 5, -1, 9], [3, 4, 12, 1], [15, -1, 2, 8]], dtype=torch.int32)
    weights = torch.rand(3, 4)
    absent = (ids < 0) | (ids >= 8)  # the slice holds experts 0-7
    nan_weights = torch.where(absent, math.nan, weights)
    zero_weights = torch.where(absent, 0.0, weights)
    kwargs = dict(kernel=kernel, num_global_experts=16)
    sliced = [a[:8] for a in args]
    got = moe_experts.routed_experts(x, *sliced, nan_weights, ids, **kwargs)
    assert torch.equal(got, moe_experts.routed_experts(x, *sliced, zero_weights, ids, **kwargs))
    assert torch.isfinite(got.float()).all()
    assert torch.allclose(
        got.float(), reference.routed_experts(x, *sliced, nan_weights, ids).float(), atol=1e-2, rtol=1e-2
    )
