"""Random DeepSeek-V3 MoE weights under Hugging Face names, for the demo, tests and the tiny checkpoint.

FP8 weights are drawn directly in FP8 with per-block scales that vary (a uniform scale would hide
scale-indexing bugs), sized so that activations keep unit-order magnitude through the block.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from moe_backend.config import QUANT_BLOCK, MoEConfig
from moe_backend.quant import FP8_DTYPE, FP8_MAX

__all__ = ["random_moe_weights"]

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _random_fp8_weight(rows: int, cols: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Values use about a quarter of the fp8 range; scales vary x0.5..x1.5 per 128x128 block.
    w_fp8 = (torch.randn(rows, cols, generator=gen, device=device) * (FP8_MAX / 4)).clamp(
        -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    nb, kb = -(-rows // QUANT_BLOCK), -(-cols // QUANT_BLOCK)
    base = 4.0 / (FP8_MAX * math.sqrt(cols))
    scale = base * (0.5 + torch.rand(nb, kb, generator=gen, device=device))
    return w_fp8, scale


def random_moe_weights(config: MoEConfig, *, seed: int = 0, fp8: bool = True,
                       experts: range | None = None, with_shared_experts: bool = True,
                       device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yields `(name, tensor)` with names relative to the MoE block (`gate.weight`, `experts.3.up_proj.weight`,
    ...). fp8=False yields bf16 weights instead (the layer quantizes them on load). `experts` limits
    the routed experts generated (an expert-parallel slice); each expert's values depend only on
    (seed, expert), so slices agree with the full set."""
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    gen = torch.Generator(device=device).manual_seed(seed)
    yield "gate.weight", (torch.randn(config.n_routed_experts, hidden, generator=gen, device=device)
                          / math.sqrt(hidden)).to(torch.bfloat16)
    yield "gate.e_score_correction_bias", 0.1 * torch.rand(config.n_routed_experts, generator=gen,
                                                           device=device)
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for i in experts if experts is not None else range(config.n_routed_experts):
        gen.manual_seed(seed * 1_000_003 + i + 1)
        for proj in _PROJECTIONS:
            yield from _projection(f"experts.{i}.{proj}", *shapes[proj], fp8, gen, device)
    if with_shared_experts and config.n_shared_experts:
        gen.manual_seed(seed * 1_000_003 + config.n_routed_experts + 1)
        shared = inter * config.n_shared_experts
        shared_shapes = {"gate_proj": (shared, hidden), "up_proj": (shared, hidden),
                         "down_proj": (hidden, shared)}
        for proj in _PROJECTIONS:
            yield from _projection(f"shared_experts.{proj}", *shared_shapes[proj], fp8, gen, device)


def _projection(name: str, rows: int, cols: int, fp8: bool, gen, device):
    if fp8:
        w_fp8, scale = _random_fp8_weight(rows, cols, gen, device)
        yield f"{name}.weight", w_fp8
        yield f"{name}.weight_scale_inv", scale
    else:
        yield f"{name}.weight", (torch.randn(rows, cols, generator=gen, device=device)
                                 / math.sqrt(cols)).to(torch.bfloat16)
