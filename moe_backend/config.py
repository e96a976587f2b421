"""`MoEConfig`: the DeepSeek-V3 MoE hyper-parameters the layer, router and kernels need.

Built from a Hugging Face `config.json` (dict or path). Anything the backend does not implement
is refused with a `ValueError` naming the field, so a model that would be served wrongly never
loads silently.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from moe_backend.constants import (
    DEEPSEEK_V3_EXPERTS,
    DEEPSEEK_V3_HIDDEN,
    DEEPSEEK_V3_INTERMEDIATE,
    DEEPSEEK_V3_TOPK,
    QUANT_BLOCK,
)

__all__ = ["MoEConfig", "QUANT_BLOCK"]


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int = DEEPSEEK_V3_HIDDEN  # H
    moe_intermediate_size: int = DEEPSEEK_V3_INTERMEDIATE  # I, per expert
    n_routed_experts: int = DEEPSEEK_V3_EXPERTS  # E
    num_experts_per_tok: int = DEEPSEEK_V3_TOPK  # top-k
    n_group: int = 8  # expert groups for group-limited routing
    topk_group: int = 4  # groups kept per token
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_shared_experts: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    weight_block_size: tuple[int, int] = (QUANT_BLOCK, QUANT_BLOCK)
    ue8m0_scales: bool = False  # DeepSeek-V3.1 `scale_fmt: "ue8m0"`: power-of-two scales

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "moe_intermediate_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("n_shared_experts", self.n_shared_experts, minimum=0)
        factor = self.routed_scaling_factor
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            raise TypeError(f"routed_scaling_factor must be a number, got {type(factor).__name__} {factor!r}")
        if not math.isfinite(factor) or factor <= 0:
            # A NaN/inf factor would turn every output NaN/inf without an error.
            raise ValueError(f"routed_scaling_factor must be finite and > 0, got {factor!r}")
        for name in ("norm_topk_prob", "ue8m0_scales"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("scoring_func", "topk_method"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        block = self.weight_block_size
        if (
            not isinstance(block, (tuple, list))
            or len(block) != 2
            or any(not isinstance(b, int) or isinstance(b, bool) for b in block)
        ):
            raise TypeError(
                f"quantization_config.weight_block_size must be two ints [{QUANT_BLOCK}, {QUANT_BLOCK}], got {block!r}"
            )
        if self.hidden_size % QUANT_BLOCK:
            raise ValueError(
                f"hidden_size must be a multiple of {QUANT_BLOCK} (FP8 1x128 groups), got {self.hidden_size}"
            )
        if self.moe_intermediate_size % QUANT_BLOCK:
            raise ValueError(
                f"moe_intermediate_size must be a multiple of {QUANT_BLOCK}, got {self.moe_intermediate_size}"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.n_routed_experts // self.n_group < 2:
            # A group's strength is the sum of its two best experts' scores.
            raise ValueError(
                f"n_group ({self.n_group}) must leave at least 2 experts per group "
                f"(n_routed_experts is {self.n_routed_experts}): the router ranks groups "
                f"by their top-2 scores"
            )
        experts_in_kept_groups = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > experts_in_kept_groups:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the "
                f"{experts_in_kept_groups} experts in topk_group kept groups"
            )
        if self.scoring_func != "sigmoid":
            raise ValueError(f"scoring_func must be 'sigmoid' (DeepSeek-V3), got {self.scoring_func!r}")
        if self.topk_method != "noaux_tc":
            raise ValueError(f"topk_method must be 'noaux_tc', got {self.topk_method!r}")
        if tuple(self.weight_block_size) != (QUANT_BLOCK, QUANT_BLOCK):
            raise ValueError(
                f"quantization_config.weight_block_size must be "
                f"[{QUANT_BLOCK}, {QUANT_BLOCK}], got {list(self.weight_block_size)}"
            )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | str | os.PathLike) -> "MoEConfig":
        """Reads a DeepSeek-V3 `config.json` (a dict, a path to the file, or a checkpoint folder)."""
        if isinstance(cfg, (str, os.PathLike)):
            path = os.fspath(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"cfg: no config file at {path!r}")
            try:
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"cfg: {path!r} is not valid JSON: {exc}") from None
            if not isinstance(cfg, Mapping):
                raise ValueError(f"cfg: {path!r} holds a JSON {type(cfg).__name__}, expected an object")
        if not isinstance(cfg, Mapping):
            raise TypeError(f"cfg must be a dict or a path to config.json, got {type(cfg).__name__}")

        # A config without DeepSeek-V3's routed-expert fields is another architecture (Qwen3-MoE names
        # them num_experts, moe_topk...): its defaults would silently describe a layer it is not.
        absent = [name for name in _REQUIRED_HF_FIELDS if cfg.get(name) is None]
        if absent:
            kind = f"model_type {cfg['model_type']!r}" if "model_type" in cfg else "no model_type"
            raise ValueError(
                f"{absent[0]}: absent from the config ({kind}); moe-backend serves DeepSeek-V3-style MoE "
                f"layers, whose config.json names {', '.join(_REQUIRED_HF_FIELDS)}"
            )
        known = {f.name for f in fields(cls)} - {"weight_block_size", "ue8m0_scales"}
        kwargs: dict[str, Any] = {name: cfg[name] for name in known if cfg.get(name) is not None}
        factor = kwargs.get("routed_scaling_factor")
        if isinstance(factor, int) and not isinstance(factor, bool):
            kwargs["routed_scaling_factor"] = float(factor)  # JSON writes 2.0 as 2
        kwargs.update(_read_quantization_config(cfg.get("quantization_config")))
        return cls(**kwargs)


# The routed experts' shapes: without them a config does not describe a DeepSeek-V3 MoE layer.
_REQUIRED_HF_FIELDS = ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    # bool is an int subclass: `true` in a config is a typo for a count, never a count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _read_quantization_config(qcfg: Any) -> dict[str, Any]:
    if qcfg is None:
        return {}  # an unquantized checkpoint: weights are quantized on load
    if not isinstance(qcfg, Mapping):
        raise ValueError(f"quantization_config must be an object, got {type(qcfg).__name__}")
    method = qcfg.get("quant_method", "fp8")
    if method != "fp8":
        raise ValueError(f"quantization_config.quant_method must be 'fp8', got {method!r}")
    fmt = qcfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt must be 'e4m3', got {fmt!r}")
    act = qcfg.get("activation_scheme", "dynamic")
    if act != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme must be 'dynamic', got {act!r}")
    scale_fmt = qcfg.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"quantization_config.scale_fmt must be absent or 'ue8m0', got {scale_fmt!r}")
    out: dict[str, Any] = {"ue8m0_scales": scale_fmt == "ue8m0"}
    if "weight_block_size" in qcfg:
        block = qcfg["weight_block_size"]
        if not isinstance(block, (list, tuple)) or len(block) != 2:
            raise ValueError(f"quantization_config.weight_block_size must be [128, 128], got {block!r}")
        out["weight_block_size"] = tuple(block)  # element types checked by MoEConfig
    return out
