"""`DeepseekV3MoE`: the DeepSeek-V3 MoE block (router, routed experts, shared experts) over FP8
block-quantized weights, loadable from Hugging Face names or a sharded safetensors checkpoint."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from moe_backend import experts as experts_path
from moe_backend import ops
from moe_backend._checks import check_finite_rows, check_int, check_output_rows, check_tensor, finite_checks_enabled
from moe_backend._progress import progress
from moe_backend.ab import shadow as ab_shadow
from moe_backend.config import QUANT_BLOCK, MoEConfig
from moe_backend.dispatch.policy import PHASES, Policy
from moe_backend.layers.router import noaux_tc_route
from moe_backend.quant import FP8_DTYPE, quantize_fp8_blockwise

__all__ = ["DeepseekV3MoE"]

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_NAME = re.compile(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_SHARED_NAME = re.compile(r"^shared_experts\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_FLOAT_WEIGHTS = (torch.bfloat16, torch.float16, torch.float32)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FP8_DTYPES = tuple(d for d in (torch.float8_e4m3fn, torch.float8_e5m2, getattr(torch, "float8_e4m3fnuz", None),
                                getattr(torch, "float8_e5m2fnuz", None)) if d is not None)
_MAX_LISTED = 40  # a wrong prefix on a real layer would otherwise list ~1,500 names


def _fp8_nan_count(w: torch.Tensor) -> int:
    # e4m3fn encodes NaN as S.1111.111; checking the bits avoids an fp32 copy of every weight.
    return int(((w.view(torch.uint8) & 0x7F) == 0x7F).sum())


class DeepseekV3MoE(nn.Module):
    """DeepSeek-V3 MoE block: `forward(hidden_states [..., H] bf16) -> [..., H] bf16`.

    expert_range: `(start, stop)` of the routed experts held here (an expert-parallel slice);
    tokens routed elsewhere contribute nothing. with_shared_experts: whether this slice adds the
    shared expert (exactly one slice of an EP group should). shadow: a `moe_backend.ab.shadow.Shadow`
    or a 'backend:rate' spec that also runs a sampled fraction of calls on another backend and
    records the divergence (docs/ab-testing.md); None leaves it to MOE_BACKEND_SHADOW.
    """

    def __init__(self, config: MoEConfig, policy: Policy | None = None, *,
                 expert_range: tuple[int, int] | None = None, with_shared_experts: bool = True,
                 device: torch.device | str | None = None, shadow=None) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy: expected a moe_backend.dispatch.Policy or None, got "
                            f"{type(policy).__name__} (build one with Policy.from_dict)")
        if not isinstance(with_shared_experts, bool):
            raise TypeError(f"with_shared_experts: expected a bool, got {with_shared_experts!r}")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device: expected a torch.device, a string or None, got {type(device).__name__}")
        if expert_range is not None:
            if not isinstance(expert_range, (tuple, list)) or len(expert_range) != 2:
                raise TypeError(f"expert_range: expected a (start, stop) pair of ints, got {expert_range!r}")
            if any(not isinstance(v, int) or isinstance(v, bool) for v in expert_range):
                raise TypeError(f"expert_range: start and stop must be ints, got {expert_range!r}")
        start, stop = expert_range if expert_range is not None else (0, config.n_routed_experts)
        if not 0 <= start < stop <= config.n_routed_experts:
            raise ValueError(f"expert_range: expected 0 <= start < stop <= {config.n_routed_experts}, "
                             f"got {expert_range}")
        self.config = config
        self.policy = policy
        self.expert_start, self.expert_stop = start, stop
        self.with_shared_experts = with_shared_experts and config.n_shared_experts > 0
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        shared_inter = inter * config.n_shared_experts
        local = stop - start
        f32 = dict(dtype=torch.float32, device=device)
        fp8 = dict(dtype=FP8_DTYPE, device=device)
        # The router stays fp32: near-tied logits decide which experts run.
        self.register_buffer("gate_weight", torch.empty(config.n_routed_experts, hidden, **f32))
        self.register_buffer("e_score_correction_bias", torch.empty(config.n_routed_experts, **f32))
        self.register_buffer("w13_fp8", torch.empty(local, 2 * inter, hidden, **fp8))  # [E, 2I, H]
        self.register_buffer("w13_scale_inv", torch.empty(local, _blocks(2 * inter), _blocks(hidden), **f32))
        self.register_buffer("w2_fp8", torch.empty(local, hidden, inter, **fp8))  # [E, H, I]
        self.register_buffer("w2_scale_inv", torch.empty(local, _blocks(hidden), _blocks(inter), **f32))
        if self.with_shared_experts:
            self.register_buffer("shared_w13_fp8", torch.empty(1, 2 * shared_inter, hidden, **fp8))
            self.register_buffer("shared_w13_scale_inv",
                                 torch.empty(1, _blocks(2 * shared_inter), _blocks(hidden), **f32))
            self.register_buffer("shared_w2_fp8", torch.empty(1, hidden, shared_inter, **fp8))
            self.register_buffer("shared_w2_scale_inv",
                                 torch.empty(1, _blocks(hidden), _blocks(shared_inter), **f32))
        self._loaded = False
        self.shadow = ab_shadow.shadow_arg(shadow)  # None: MOE_BACKEND_SHADOW decides per call

    @property
    def num_local_experts(self) -> int:
        return self.expert_stop - self.expert_start

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={c.hidden_size}, intermediate={c.moe_intermediate_size}, "
                f"experts=[{self.expert_start}, {self.expert_stop}) of {c.n_routed_experts}, "
                f"top{c.num_experts_per_tok}, shared={self.with_shared_experts}")

    # ------------------------------------------------------------------ loading
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
            raise TypeError("weights: expected an iterable of (name, tensor) pairs, got a "
                            f"{type(weights).__name__}; pass weights.items()")
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
                raise TypeError(f"weights: item {position} is {type(item).__name__} "
                                f"{_short_repr(item)}, expected a (name: str, tensor) pair")
            full_name, tensor = item
            if prefix and not full_name.startswith(prefix):
                problems.append(f"extra: {full_name} (outside prefix {prefix!r})")
                continue
            name = full_name[len(prefix):]
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
            shown = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                              if len(problems) > _MAX_LISTED else [])
            raise ValueError(f"load_weights: {len(problems)} problem(s), the layer is unchanged:\n  "
                             + "\n  ".join(shown))
        # Commit. Until every copy lands the layer is marked unloaded, so an error here (a device
        # fault) can never leave a mix of old and new weights that forward would use.
        self._loaded = False
        with torch.no_grad():
            for target, source in staged:
                target.copy_(source)
        self._loaded = True

    def _stage_router_tensor(self, name: str, tensor: torch.Tensor, problems: list[str],
                             staged: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        target = self.gate_weight if name == "gate.weight" else self.e_score_correction_bias
        if tuple(tensor.shape) != tuple(target.shape):
            problems.append(f"shape: {name} is {list(tensor.shape)}, expected {list(target.shape)}")
        elif not tensor.is_floating_point() or tensor.dtype in _FP8_DTYPES:
            problems.append(f"dtype: {name} is {tensor.dtype}, expected a float tensor")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"nan: {name} holds NaN/Inf values")
        else:
            staged.append((target, tensor))

    def _stage_projection(self, key: str, entry: dict[str, torch.Tensor], problems: list[str],
                          staged: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        shared = key.startswith("shared_experts.")
        proj = key.rsplit(".", 1)[1]
        shape = self._projection_shape(proj, shared)
        weight, scale = entry["weight"], entry.get("weight_scale_inv")
        if tuple(weight.shape) != shape:
            problems.append(f"shape: {key}.weight is {list(weight.shape)}, expected {list(shape)}")
            return
        if weight.dtype == FP8_DTYPE:
            scale_shape = (_blocks(shape[0]), _blocks(shape[1]))
            if tuple(scale.shape) != scale_shape:
                problems.append(f"shape: {key}.weight_scale_inv is {list(scale.shape)}, "
                                f"expected {list(scale_shape)}")
                return
            if scale.dtype not in _SCALE_DTYPES:
                # An fp8 or integer scale would be converted silently and lose the block's magnitude.
                problems.append(f"dtype: {key}.weight_scale_inv is {scale.dtype}, expected float32 "
                                f"(or bf16/fp16/fp64)")
                return
            if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                problems.append(f"nan: {key}.weight_scale_inv must hold finite positive scales")
                return
            if (bad := _fp8_nan_count(weight)):
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
            w13, w13_s, w2, w2_s, index = (self.shared_w13_fp8, self.shared_w13_scale_inv,
                                           self.shared_w2_fp8, self.shared_w2_scale_inv, 0)
        else:
            w13, w13_s, w2, w2_s = self.w13_fp8, self.w13_scale_inv, self.w2_fp8, self.w2_scale_inv
            index = int(key.split(".")[1]) - self.expert_start
        if proj == "down_proj":
            staged += [(w2[index], weight), (w2_s[index], scale)]
        else:
            rows = shape[0]
            half = 0 if proj == "gate_proj" else 1  # w13 holds gate rows, then up rows
            staged += [(w13[index, half * rows:(half + 1) * rows], weight),
                       (w13_s[index, half * rows // QUANT_BLOCK:(half + 1) * rows // QUANT_BLOCK], scale)]

    def load_from_checkpoint(self, path: str | os.PathLike, layer_idx: int) -> None:
        """Reads only layer `layer_idx`'s MoE tensors (`model.layers.{L}.mlp.*`, local experts only)
        from a sharded safetensors checkpoint folder (`model.safetensors.index.json`). Errors name
        the index or shard file and the tensor; a failed load changes nothing (see load_weights)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a checkpoint folder path, got {type(path).__name__}")
        check_int("layer_idx", layer_idx, minimum=0)
        self.load_weights(_read_checkpoint_layer(os.fspath(path), layer_idx, self._belongs_here),
                          prefix=f"model.layers.{layer_idx}.mlp.")

    def _belongs_here(self, name: str) -> bool:
        """Whether a tensor name (relative to the MoE block) belongs to this slice."""
        match = _EXPERT_NAME.match(name)
        if match:
            return self.expert_start <= int(match.group(1)) < self.expert_stop
        if _SHARED_NAME.match(name):
            return self.with_shared_experts
        return True  # router tensors, and anything unexpected (reported as extra)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, phase: str | None = None) -> torch.Tensor:
        if not self._loaded:
            raise RuntimeError("DeepseekV3MoE: call load_weights() or load_from_checkpoint() first")
        hidden = self.config.hidden_size
        check_tensor("hidden_states", hidden_states, dtypes=(torch.bfloat16,), min_dim=1,
                     device=self.w13_fp8.device)
        if hidden_states.shape[-1] != hidden:
            raise ValueError(f"hidden_states: last dim must be hidden_size {hidden}, "
                             f"got shape {list(hidden_states.shape)}")
        if phase is not None and phase not in PHASES:
            raise ValueError(f"phase: expected one of {PHASES} or None, got {phase!r}")
        x = hidden_states.reshape(-1, hidden)
        if x.shape[0] == 0:
            return hidden_states.new_empty(hidden_states.shape)
        checked = finite_checks_enabled(x)
        if checked:
            check_finite_rows("hidden_states", x)

        topk_weights, topk_ids = noaux_tc_route(x, self.gate_weight, self.e_score_correction_bias,
                                                self.config)
        policy = self.policy if self.policy is not None else Policy.from_env()
        # Quantize once: the routed and the shared experts read the same FP8 activations.
        x_fp8, x_scale = ops.per_token_group_quant(x, QUANT_BLOCK, self.config.ue8m0_scales)
        out = experts_path.routed_experts(
            x_fp8, self.w13_fp8, self.w13_scale_inv, self.w2_fp8, self.w2_scale_inv, topk_weights, topk_ids,
            x_scale=x_scale, expert_start=self.expert_start, ue8m0=self.config.ue8m0_scales, policy=policy,
            phase=phase, num_global_experts=self.config.n_routed_experts)
        ab_shadow.observe_layer(self, out, x_fp8, x_scale, topk_weights, topk_ids, phase)
        if self.with_shared_experts:
            out = out + self.shared_expert(x_fp8, x_scale)
        if checked:
            check_output_rows("hidden_states", x, out)
        return out.view(hidden_states.shape)

    def shared_expert(self, x: torch.Tensor, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The shared expert(s) on every token: one dense FP8 MLP, run as a one-expert grouped GEMM.
        x: bf16 `[T, H]`, or fp8 with `x_scale` `[T, H/128]` (already quantized)."""
        ue8m0 = self.config.ue8m0_scales
        if x_scale is None:
            x_fp8, x_scale = ops.per_token_group_quant(x, QUANT_BLOCK, ue8m0)
        else:
            x_fp8 = x
        one_expert = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        h = ops.grouped_gemm_contiguous(x_fp8, x_scale, self.shared_w13_fp8, self.shared_w13_scale_inv,
                                        one_expert)
        a_fp8, a_scale = ops.silu_mul_quant(h, QUANT_BLOCK, ue8m0)
        return ops.grouped_gemm_contiguous(a_fp8, a_scale, self.shared_w2_fp8, self.shared_w2_scale_inv,
                                           one_expert)


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _blocks(n: int) -> int:
    return -(-n // QUANT_BLOCK)


def _read_checkpoint_layer(path: str, layer_idx: int, wanted) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ImportError("load_from_checkpoint needs safetensors: pip install safetensors") from exc
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a checkpoint folder")
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        weight_map = _read_weight_map(index_file)
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        with _open_shard(safe_open, path, "model.safetensors") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
        raise ValueError(f"path: {path!r} has neither model.safetensors.index.json nor model.safetensors")
    prefix = f"model.layers.{layer_idx}.mlp."
    if prefix + "gate.weight" not in weight_map:
        raise ValueError(f"layer_idx: the checkpoint has no MoE router {prefix}gate.weight "
                         f"(layer {layer_idx} is dense, or out of range)")
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name, shard in weight_map.items():
        if name.startswith(prefix) and wanted(name[len(prefix):]):
            by_shard[shard].append(name)
    total = sum(len(v) for v in by_shard.values())
    with progress(total=total, desc=f"loading layer {layer_idx}", unit="tensor") as bar:
        for shard, names in sorted(by_shard.items()):
            shard_path = os.path.join(path, shard)
            with _open_shard(safe_open, path, shard) as f:
                present = set(f.keys())
                absent = [n for n in names if n not in present]
                if absent:
                    raise ValueError(f"{shard_path}: the index maps {len(absent)} tensor(s) to this shard "
                                     f"but it lacks them: {', '.join(absent[:5])}"
                                     f"{', ...' if len(absent) > 5 else ''}")
                for name in names:
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as exc:  # safetensors raises its own error type for bad data
                        raise ValueError(f"{shard_path}: tensor {name} cannot be read (truncated or "
                                         f"corrupt shard?): {exc}") from exc
                    yield name, tensor
                    bar.update(1)


def _read_weight_map(index_file: str) -> dict[str, str]:
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{index_file}: not valid JSON: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index_file}: expected an object with a \"weight_map\" of tensor name -> "
                         f"shard file name")
    for shard in set(weight_map.values()):
        # A shard name is a file inside the checkpoint folder, never a path out of it.
        if os.path.isabs(shard) or os.path.normpath(shard).startswith(".."):
            raise ValueError(f"{index_file}: shard {shard!r} is not a file name inside the checkpoint")
    return weight_map


@contextmanager
def _open_shard(safe_open, folder: str, shard: str):
    shard_path = os.path.join(folder, shard)
    if not os.path.isfile(shard_path):
        raise ValueError(f"{shard_path}: shard file is missing (named by the checkpoint index)")
    try:
        handle = safe_open(shard_path, framework="pt")
    except Exception as exc:  # a corrupt or truncated header: safetensors' own error type
        raise ValueError(f"{shard_path}: not a readable safetensors file (truncated or corrupt "
                         f"header?): {exc}") from exc
    with handle as f:
        yield f
