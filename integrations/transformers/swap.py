"""Swapping a transformers model's MoE computation for ours (or for the reference), and back.

- `swap_moe_blocks`: every DeepSeek-V3 MoE block (router, routed and shared experts) becomes a
  `moe_backend.layers.DeepseekV3MoE` loaded with the checkpoint's FP8 experts.
- `use_backend_experts`: only the routed experts of each block run on our pipeline
  (`moe_backend.experts.routed_experts`); transformers' router and shared experts stay. Serves
  routers our layer does not implement (Qwen3-MoE's softmax top-k).
- `use_reference_experts`: the same, with the experts computed by `moe_backend.reference` (the
  independent reference the engine end-to-end tests compare against).

Each returns a `MoESwap`: `restore()` (or leaving its `with` block) puts the original modules
back; `calls` counts the swapped modules' calls per phase. The phase is the transformers call's:
a sequence of several tokens is a prefill, one token per sequence (a KV-cached step) a decode.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from moe_backend import MoEConfig, reference
from moe_backend import experts as experts_path
from moe_backend.dispatch.policy import Policy
from moe_backend.layers import DeepseekV3MoE
from moe_backend.layers.fixed_dtypes import FixedDtypes
from moe_backend_integrations.transformers.checkpoint import (
    WeightSource,
    _check_source,
    stack_fp8_experts,
    tensors_under,
)

__all__ = [
    "MoESwap",
    "PhaseMoEBlock",
    "FP8Experts",
    "moe_blocks",
    "swap_moe_blocks",
    "use_backend_experts",
    "use_reference_experts",
]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.mlp$")
_SUPPORTED = ("deepseek_v3", "qwen3_moe")


def _phase_of(hidden_states: torch.Tensor) -> str:
    # [B, S, H]: a KV-cached step feeds one token per sequence.
    return "decode" if hidden_states.dim() == 3 and hidden_states.shape[1] == 1 else "prefill"


class PhaseMoEBlock(nn.Module):
    """Stands in for a transformers DeepSeek-V3 MoE block: `forward(hidden_states [B, S, H]) ->
    [B, S, H]` through our layer, in its dtype, with the phase given to the layer's policy.
    shared_experts: transformers' bf16 shared MLP where the checkpoint keeps it in bf16 (the layer
    then holds only the routed experts; quantizing it would add an error the checkpoint does not)."""

    def __init__(self, layer: DeepseekV3MoE, calls: Counter, shared_experts: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.shared_experts = shared_experts
        self.calls = calls

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        phase = _phase_of(hidden_states)
        self.calls[phase] += 1
        out = self.layer(hidden_states.to(torch.bfloat16), phase=phase).to(hidden_states.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class FP8Experts(FixedDtypes):
    """Stands in for transformers' routed experts (`forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]`) over the checkpoint's FP8 weights. impl: "backend" (our
    pipeline, plan by the policy) or "reference" (`moe_backend.reference`)."""

    def __init__(
        self,
        w13_fp8: torch.Tensor,
        w13_scale_inv: torch.Tensor,
        w2_fp8: torch.Tensor,
        w2_scale_inv: torch.Tensor,
        impl: str,
        calls: Counter,
        policy: Policy | None = None,
    ) -> None:
        super().__init__()
        if impl not in ("backend", "reference"):
            raise ValueError(f"impl: expected 'backend' or 'reference', got {impl!r}")
        self.impl, self.calls, self.policy = impl, calls, policy
        self.phase = "prefill"  # set by the block's pre-hook: these inputs are already flattened
        self.register_buffer("w13_fp8", w13_fp8)  # [E, 2I, H]
        self.register_buffer("w13_scale_inv", w13_scale_inv)
        self.register_buffer("w2_fp8", w2_fp8)  # [E, H, I]
        self.register_buffer("w2_scale_inv", w2_scale_inv)

    def extra_repr(self) -> str:
        e, two_i, h = self.w13_fp8.shape
        return f"impl={self.impl}, experts={e}, hidden={h}, intermediate={two_i // 2}"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        self.calls[self.phase] += 1
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(torch.bfloat16)
        ids = top_k_index.reshape(x.shape[0], -1)
        weights = top_k_weights.reshape(ids.shape).float()  # Qwen3-MoE's router rounds them to bf16
        if self.impl == "reference":
            out = reference.routed_experts(
                x, self.w13_fp8, self.w13_scale_inv, self.w2_fp8, self.w2_scale_inv, weights, ids
            )
        else:
            out = experts_path.routed_experts(
                x,
                self.w13_fp8,
                self.w13_scale_inv,
                self.w2_fp8,
                self.w2_scale_inv,
                weights,
                ids,
                policy=self.policy,
                phase=self.phase,
            )
        return out.to(hidden_states.dtype).view(hidden_states.shape)


class MoESwap:
    """The swapped modules of one model: `restore()` puts the originals back (idempotent); a
    context manager that restores on exit. `calls`: calls of the swapped modules per phase
    ("prefill", "decode"); `modules`: {block name: the new module}."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        self.model, self.kind = model, kind
        self.calls: Counter = Counter()
        self.modules: dict[str, nn.Module] = {}
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []
        self._hooks: list[Any] = []

    def _replace(self, parent: nn.Module, attr: str, new: nn.Module, name: str) -> None:
        self._originals.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, new)
        self.modules[name] = new

    def restore(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for parent, attr, original in reversed(self._originals):
            setattr(parent, attr, original)
        self._hooks, self._originals = [], []
        _swapped(self.model).discard(id(self))

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def __enter__(self) -> "MoESwap":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"MoESwap({self.kind}, {len(self.modules)} blocks, active={self.active}, calls={dict(self.calls)})"


def _swapped(model: nn.Module) -> set:
    # One swap at a time: a second would wrap a swapped module and restore out of order.
    if not hasattr(model, "_moe_backend_swaps"):
        model._moe_backend_swaps = set()
    return model._moe_backend_swaps


def moe_blocks(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer index, module name, block) of every MoE block of a transformers DeepSeek-V3 or
    Qwen3-MoE causal LM (a decoder layer's `mlp` holding a router `gate` and `experts`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers model (nn.Module), got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _SUPPORTED:
        raise ValueError(f"model: expected a transformers model of type {_SUPPORTED}, got {model_type!r}")
    blocks = []
    for name, module in model.named_modules():
        match = _LAYER.match(name)
        if match and hasattr(module, "gate") and hasattr(module, "experts"):
            blocks.append((int(match[1]), name, module))
    if not blocks:
        raise ValueError("model: no MoE block found (model.layers.{i}.mlp with gate and experts)")
    return blocks


def _start(model: nn.Module, source: WeightSource, kind: str) -> tuple[MoESwap, list]:
    _check_source("weights", source)
    if isinstance(model, nn.Module) and _swapped(model):
        raise RuntimeError("model: its MoE blocks are already swapped; restore() that swap first")
    blocks = moe_blocks(model)
    return MoESwap(model, kind), blocks


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def swap_moe_blocks(model: nn.Module, weights: WeightSource, *, policy: Policy | None = None) -> MoESwap:
    """Every MoE block of a transformers DeepSeek-V3 model becomes our `DeepseekV3MoE` with the
    weights' FP8 routed experts and router. FP8 shared experts (the released checkpoints') run in
    our layer too; bf16 ones (the tiny checkpoints') stay transformers' bf16 MLP, as engines run
    them. weights: the checkpoint folder or a source callable (see `checkpoint`). policy: the
    layers' Policy (None: MOE_BACKEND_POLICY)."""
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy: expected a moe_backend.dispatch.Policy or None, got {type(policy).__name__}")
    swap, blocks = _start(model, weights, "deepseek_v3_moe")
    if model.config.model_type != "deepseek_v3":
        raise ValueError(
            f"model: swap_moe_blocks needs a DeepSeek-V3 model (our layer implements its sigmoid, "
            f"group-limited router), got {model.config.model_type!r}; use use_backend_experts "
            f"for other routers"
        )
    config = MoEConfig.from_hf_config(model.config.to_dict())
    parents = dict(model.named_modules())
    try:
        for _, name, block in blocks:
            prefix = name + "."
            tensors = list(tensors_under(weights, prefix))
            shared_fp8 = any(
                n.startswith(prefix + "shared_experts.") and n.endswith("weight_scale_inv") for n, _ in tensors
            )
            keep_shared = config.n_shared_experts > 0 and not shared_fp8
            if keep_shared:
                tensors = [(n, t) for n, t in tensors if not n.startswith(prefix + "shared_experts.")]
            layer = DeepseekV3MoE(config, policy, device=_device_of(block), with_shared_experts=not keep_shared)
            layer.load_weights(tensors, prefix=prefix)
            del tensors
            parent_name, attr = name.rsplit(".", 1)
            new = PhaseMoEBlock(layer, swap.calls, block.shared_experts if keep_shared else None)
            swap._replace(parents[parent_name], attr, new, name)
    except BaseException:
        swap.restore()
        raise
    _swapped(model).add(id(swap))
    return swap


def use_backend_experts(model: nn.Module, weights: WeightSource, *, policy: Policy | None = None) -> MoESwap:
    """The routed experts of every MoE block run on our pipeline from the weights' FP8 tensors;
    transformers' router and shared experts stay (DeepSeek-V3 or Qwen3-MoE)."""
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy: expected a moe_backend.dispatch.Policy or None, got {type(policy).__name__}")
    return _swap_experts(model, weights, "backend", policy)


def use_reference_experts(model: nn.Module, weights: WeightSource) -> MoESwap:
    """The routed experts of every MoE block are computed by `moe_backend.reference` from the
    weights' FP8 tensors; transformers' router and shared experts stay (DeepSeek-V3 or Qwen3-MoE)."""
    return _swap_experts(model, weights, "reference", None)


def _swap_experts(model: nn.Module, weights: WeightSource, impl: str, policy: Policy | None) -> MoESwap:
    swap, blocks = _start(model, weights, f"{impl}_experts")
    try:
        for _, name, block in blocks:
            prefix = name + "."
            tensors = {n[len(prefix) :]: t for n, t in tensors_under(weights, prefix + "experts.")}
            num_experts = _num_experts(block.experts)
            device = _device_of(block)
            experts = FP8Experts(*stack_fp8_experts(tensors, num_experts, device), impl, swap.calls, policy)
            swap._replace(block, "experts", experts, name)
            swap._hooks.append(block.register_forward_pre_hook(_phase_hook(experts)))
    except BaseException:
        swap.restore()
        raise
    _swapped(model).add(id(swap))
    return swap


def _phase_hook(experts: FP8Experts):
    def hook(_block, args):
        if args:
            experts.phase = _phase_of(args[0])

    return hook


def _num_experts(experts: nn.Module) -> int:
    # transformers 5's fused experts module is called as experts(x, top_k_index, top_k_weights);
    # 4.x's ModuleList is walked expert by expert by the block, which leaves nothing to swap.
    if not hasattr(experts, "gate_up_proj"):
        raise ValueError(
            f"model: the routed experts are a {type(experts).__name__}, expected transformers "
            f"5's fused experts module (gate_up_proj [E, 2I, H]); swap_moe_blocks swaps whole "
            f"blocks on older versions"
        )
    return experts.gate_up_proj.shape[0]
