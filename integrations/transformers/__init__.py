"""Hugging Face transformers integration: run a transformers DeepSeek-V3 (or Qwen3-MoE) model with
our MoE layers, or with the reference experts, and build such a model from an FP8 checkpoint.

    from moe_backend_integrations.transformers import load_model, swap_moe_blocks
    model = load_model("/path/to/checkpoint")            # FP8 experts dequantized: transformers' own
    with swap_moe_blocks(model, "/path/to/checkpoint") as swap:   # our DeepseekV3MoE in every MoE block
        model.generate(...)
    print(swap.calls)                                    # Counter({'decode': ..., 'prefill': ...})

Nothing is imported from transformers until a function runs.
"""

from __future__ import annotations

__all__ = [
    "load_model",
    "read_config",
    "tensors_under",
    "swap_moe_blocks",
    "use_backend_experts",
    "use_reference_experts",
    "moe_blocks",
    "MoESwap",
]


def __getattr__(name: str):
    if name in ("load_model", "read_config", "tensors_under"):
        from moe_backend_integrations.transformers import checkpoint

        return getattr(checkpoint, name)
    if name in ("swap_moe_blocks", "use_backend_experts", "use_reference_experts", "moe_blocks", "MoESwap"):
        from moe_backend_integrations.transformers import swap

        return getattr(swap, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
