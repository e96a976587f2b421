"""Shadow mode's engine-facing entry points: the process's `Shadow` from the environment, a
layer's checked `shadow=` argument, and the hooks the layer and the engine integrations call after
a served MoE call (each a no-op unless shadow mode is on). Callers look these up on this module
at each call, so a test or benchmark may replace one here."""

from __future__ import annotations

from functools import lru_cache

import torch

from moe_backend.ab.shadow import Shadow
from moe_backend.ab.shadow_spec import parse_shadow_spec
from moe_backend.env import ENV

__all__ = ["from_env", "shadow_arg", "observe_routed", "observe_layer", "observe_masked"]


@lru_cache(maxsize=8)
def _from_spec(spec: str, seed: int, log_path: str | None) -> Shadow:
    return Shadow(parse_shadow_spec(spec), seed=seed, log_path=log_path)


def from_env() -> Shadow | None:
    """The process's Shadow from MOE_BACKEND_SHADOW (None when unset), built once per setting."""
    spec = ENV.shadow
    if not spec:
        return None
    return _from_spec(spec, ENV.shadow_seed, ENV.shadow_log)


def shadow_arg(shadow) -> Shadow | None:
    """A layer's `shadow=` argument, checked: a Shadow, a 'backend:rate' spec (built now, so a bad
    one fails at construction), or None (MOE_BACKEND_SHADOW decides at each call)."""
    if shadow is None or isinstance(shadow, Shadow):
        return shadow
    if isinstance(shadow, str):
        try:
            parse_shadow_spec(shadow, "shadow")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return _from_spec(shadow, ENV.shadow_seed, ENV.shadow_log)
    raise TypeError(f"shadow: expected a Shadow, a 'backend:rate' spec or None, got {type(shadow).__name__}")


def _resolve(shadow) -> Shadow | None:
    return from_env() if shadow is None else shadow_arg(shadow)


def observe_routed(primary, *args, shadow=None, **kwargs) -> None:
    """The engine hook after a served `routed_experts` call (a no-op unless shadow mode is on).
    Engines reuse their buffers (vLLM's workspace, DeepEP's receive buffers), so a sampled call's
    tensors are copied for the side stream unless `copy_inputs=False`."""
    s = _resolve(shadow)
    if s is not None:
        kwargs.setdefault("copy_inputs", True)
        s.observe_routed(primary, *args, **kwargs)


def observe_layer(layer, out: torch.Tensor, x_fp8, x_scale, topk_weights, topk_ids, phase) -> None:
    """`DeepseekV3MoE.forward`'s hook, after its routed experts (the shared expert is the same
    computation on either backend, so it is left out of the comparison)."""
    s = layer.shadow
    if s is None:
        s = from_env()
        if s is None:
            return
    elif not isinstance(s, Shadow):
        s = shadow_arg(s)
    if s._skip(layer, x_fp8.shape[0], phase, None):
        return
    s._routed_due(
        out,
        x_fp8,
        layer,
        topk_weights,
        topk_ids,
        x_scale,
        layer.expert_start,
        layer.config.ue8m0_scales,
        phase,
        None,
        layer.config.n_routed_experts,
        None,
        False,  # the layer's tensors are its own, fresh per call: record_stream covers them
    )


def observe_masked(primary, *args, shadow=None, **kwargs) -> None:
    """The engine hook after a served `masked_experts` call (a no-op unless shadow mode is on);
    copies as `observe_routed`."""
    s = _resolve(shadow)
    if s is not None:
        kwargs.setdefault("copy_inputs", True)
        s.observe_masked(primary, *args, **kwargs)
