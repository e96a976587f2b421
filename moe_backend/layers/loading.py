"""Loading `DeepseekV3MoE`'s weights: Hugging Face names (`experts.{i}.gate_proj.weight`, ...) ->
the layer's FP8 buffers, from (name, tensor) pairs or a safetensors checkpoint. Transactional:
everything is validated first, and the buffers change only once the whole set is valid."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Iterable, Mapping

import torch

from moe_backend._checks import check_int, fp8_nan
from moe_backend.constants import FP8_DTYPE, QUANT_BLOCK
from moe_backend.layers.checkpoint import read_checkpoint_layer
from moe_backend.quant import quantize_fp8_blockwise

__all__ = ["WeightLoading", "scale_blocks"]

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_NAME = re.compile(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_SHARED_NAME = re.compile(r"^shared_experts\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_FLOAT_WEIGHTS = (torch.bfloat16, torch.float16, torch.float32)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FP8_DTYPES = tuple(
    d
    for d in (
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        getattr(torch, "float8_e4m3fnuz", None),
        getattr(torch, "float8_e5m2fnuz", None),
    )
    if d is not None
)
_MAX_LISTED = 40  # a wrong prefix on a real layer would otherwise list ~1,500 names


def scale_blocks(n: int) -> int:
    """Block scales along a dimension of n: one per 128 (the last block may be partial)."""
    return -(-n // QUANT_BLOCK)


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class WeightLoading:
    """`load_weights` and `load_from_checkpoint` of `DeepseekV3MoE`, which holds what they fill:
    `config`, `expert_start`/`expert_stop`, `with_shared_experts`, the router and expert buffers,
    and `_loaded` (False until a whole set of weights has landed)."""

    def _expected_names(self) -> set[str]:
        names = {"gate.weight", "gate.e_score_correction_bias"}
        for i in range(self.expert_start, self.expert_stop):
            names.update(f"experts.{i}.{p}.weight" for p in _PROJECTIONS)
        if self.with_shared_experts:
            names.update(f"shared_experts.{p}.weight" for p in _PROJECTIONS)
        return names

    def _projection_shape(self, proj: str, shared: bool) -> tuple[int, int]:
        hidden = self.config.hidden_size
        inter = self.config.moe_intermediate_size * (self.config.n_shared_experts if shared else 1)
        return (hidden, inter) if proj == "down_proj" else (inter, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], prefix: str = "") -> None:
        """Loads Hugging Face-named tensors (relative to the MoE block, after `prefix`): FP8 weights
        with their `weight_scale_inv`, or bf16/fp32 weights (quantized here). Experts outside this
        slice are skipped. Raises ValueError listing every missing, extra or mis-shaped tensor.

        Transactional: every tensor is validated (and bf16 weights quantized) into a staging list
        first; the layer's buffers change only once the whole set is valid. A failed call leaves
        the layer exactly as it was (loaded or not); an error while copying leaves it unloaded."""
        if isinstance(weights, Mapping):
            raise TypeError(
                "weights: expected an iterable of (name, tensor) pairs, got a "
                f"{type(weights).__name__}; pass weights.items()"
            )
        if isinstance(weights, (str, bytes, torch.Tensor)) or not isinstance(weights, Iterable):
            raise TypeError(f"weights: expected an iterable of (name, tensor) pairs, got {type(weights).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a string, got {type(prefix).__name__}")
        expected = self._expected_names()
        loaded: set[str] = set()
        problems: list[str] = []
        staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer view, validated source)
        pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # projection -> weight/scale

        for position, item in enumerate(weights):
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
                raise TypeError(
                    f"weights: item {position} is {type(item).__name__} "
                    f"{_short_repr(item)}, expected a (name: str, tensor) pair"
                )
            full_name, tensor = item
            if prefix and not full_name.startswith(prefix):
                problems.append(f"extra: {full_name} (outside prefix {prefix!r})")
                continue
            name = full_name[len(prefix) :]
            if not isinstance(tensor, torch.Tensor):
                problems.append(f"bad value: {full_name} is a {type(tensor).__name__}, not a tensor")
                continue
            if name in ("gate.weight", "gate.e_score_correction_bias"):
                if name in loaded:
                    problems.append(f"extra: {full_name} (given twice)")
                    continue
                self._stage_router_tensor(name, tensor, problems, staged)
                loaded.add(name)
                continue
            match = _EXPERT_NAME.match(name) or _SHARED_NAME.match(name)
            if match is None:
                problems.append(f"extra: {full_name}")
                continue
            if match.re is _EXPERT_NAME:
                expert = int(match.group(1))
                if expert >= self.config.n_routed_experts:
                    problems.append(f"extra: {full_name} (the model has {self.config.n_routed_experts} experts)")
                    continue
                if not self.expert_start <= expert < self.expert_stop:
                    continue  # another expert-parallel slice's expert
            elif not self.with_shared_experts:
                continue
            key = name.rsplit(".", 1)[0]  # e.g. experts.3.up_proj
            if key + ".weight" in loaded or match.groups()[-1] in pending[key]:
                problems.append(f"extra: {full_name} (given twice, or a scale for a non-FP8 weight)")
                continue
            pending[key][match.groups()[-1]] = tensor
            entry = pending[key]
            if "weight" in entry and (entry["weight"].dtype != FP8_DTYPE or "weight_scale_inv" in entry):
                self._stage_projection(key, pending.pop(key), problems, staged)
                loaded.add(key + ".weight")

        for key, entry in pending.items():
            if "weight" in entry:
                problems.append(f"missing: {prefix}{key}.weight_scale_inv (the FP8 weight has no scales)")
            else:
                problems.append(f"missing: {prefix}{key}.weight (only its weight_scale_inv was given)")
                loaded.add(key + ".weight")  # reported once, here
        problems.extend(f"missing: {prefix}{n}" for n in sorted(expected - loaded))
        if problems:
            shown = problems[:_MAX_LISTED] + (
                [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
            )
            raise ValueError(
                f"load_weights: {len(problems)} problem(s), the layer is unchanged:\n  " + "\n  ".join(shown)
            )
        # Commit. Until every copy lands the layer is marked unloaded, so an error here (a device
        # fault) can never leave a mix of old and new weights that forward would use.
        self._loaded = False
        with torch.no_grad():
            for target, source in staged:
                target.copy_(source)
        self._loaded = True

    def _stage_router_tensor(
        self, name: str, tensor: torch.Tensor, problems: list[str], staged: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        target = self.gate_weight if name == "gate.weight" else self.e_score_correction_bias
        if tuple(tensor.shape) != tuple(target.shape):
            problems.append(f"shape: {name} is {list(tensor.shape)}, expected {list(target.shape)}")
        elif not tensor.is_floating_point() or tensor.dtype in _FP8_DTYPES:
            problems.append(f"dtype: {name} is {tensor.dtype}, expected a float tensor")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"nan: {name} holds NaN/Inf values")
        else:
            staged.append((target, tensor))

    def _stage_projection(
        self,
        key: str,
        entry: dict[str, torch.Tensor],
        problems: list[str],
        staged: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        shared = key.startswith("shared_experts.")
        proj = key.rsplit(".", 1)[1]
        shape = self._projection_shape(proj, shared)
        weight, scale = entry["weight"], entry.get("weight_scale_inv")
        if tuple(weight.shape) != shape:
            problems.append(f"shape: {key}.weight is {list(weight.shape)}, expected {list(shape)}")
            return
        if weight.dtype == FP8_DTYPE:
            scale_shape = (scale_blocks(shape[0]), scale_blocks(shape[1]))
            if tuple(scale.shape) != scale_shape:
                problems.append(f"shape: {key}.weight_scale_inv is {list(scale.shape)}, expected {list(scale_shape)}")
                return
            if scale.dtype not in _SCALE_DTYPES:
                # An fp8 or integer scale would be converted silently and lose the block's magnitude.
                problems.append(f"dtype: {key}.weight_scale_inv is {scale.dtype}, expected float32 (or bf16/fp16/fp64)")
                return
            if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                problems.append(f"nan: {key}.weight_scale_inv must hold finite positive scales")
                return
            if bad := int(fp8_nan(weight).sum()):
                problems.append(f"nan: {key}.weight holds {bad} NaN values")
                return
            scale = scale.float()
        elif weight.dtype in _FLOAT_WEIGHTS:
            if scale is not None:
                problems.append(f"extra: {key}.weight_scale_inv (its weight is {weight.dtype}, not FP8)")
                return
            if not bool(torch.isfinite(weight).all()):
                problems.append(f"nan: {key}.weight holds NaN/Inf values")
                return
            weight, scale = quantize_fp8_blockwise(weight, QUANT_BLOCK, self.config.ue8m0_scales)
        else:
            problems.append(f"dtype: {key}.weight is {weight.dtype}, expected float8_e4m3fn, bf16 or fp32")
            return

        if shared:
            w13, w13_s, w2, w2_s, index = (
                self.shared_w13_fp8,
                self.shared_w13_scale_inv,
                self.shared_w2_fp8,
                self.shared_w2_scale_inv,
                0,
            )
        else:
            w13, w13_s, w2, w2_s = self.w13_fp8, self.w13_scale_inv, self.w2_fp8, self.w2_scale_inv
            index = int(key.split(".")[1]) - self.expert_start
        if proj == "down_proj":
            staged += [(w2[index], weight), (w2_s[index], scale)]
        else:
            rows = shape[0]
            half = 0 if proj == "gate_proj" else 1  # w13 holds gate rows, then up rows
            staged += [
                (w13[index, half * rows : (half + 1) * rows], weight),
                (w13_s[index, half * rows // QUANT_BLOCK : (half + 1) * rows // QUANT_BLOCK], scale),
            ]

    def load_from_checkpoint(self, path: str | os.PathLike, layer_idx: int) -> None:
        """Reads only layer `layer_idx`'s MoE tensors (`model.layers.{L}.mlp.*`, local experts only)
        from a sharded safetensors checkpoint folder (`model.safetensors.index.json`). Errors name
        the index or shard file and the tensor; a failed load changes nothing (see load_weights)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a checkpoint folder path, got {type(path).__name__}")
        check_int("layer_idx", layer_idx, minimum=0)
        self.load_weights(
            read_checkpoint_layer(os.fspath(path), layer_idx, self._belongs_here),
            prefix=f"model.layers.{layer_idx}.mlp.",
        )

    def _belongs_here(self, name: str) -> bool:
        """Whether a tensor name (relative to the MoE block) belongs to this slice."""
        match = _EXPERT_NAME.match(name)
        if match:
            return self.expert_start <= int(match.group(1)) < self.expert_stop
        if _SHARED_NAME.match(name):
            return self.with_shared_experts
        return True  # router tensors, and anything unexpected (reported as extra)
