"""The numbers the whole package agrees on, each defined once: the FP8 format and its block size,
DeepSeek-V3's MoE dimensions and the grouped-GEMM shapes of its parallel slices, the engine name.

Plain values, no imports: `import moe_backend` stays free of torch (engines load our plugins in
every process); `FP8_DTYPE`, the one torch object here, is built on first access.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "BACKEND_NAME",
    "QUANT_BLOCK",
    "LAYOUT_ALIGNMENT",
    "FP8_DTYPE",  # noqa: F822  (built on first access by __getattr__ below)
    "FP8_MAX",
    "SCALE_FLOOR",
    "SCALE_CEIL",
    "DEEPSEEK_V3_HIDDEN",
    "DEEPSEEK_V3_INTERMEDIATE",
    "DEEPSEEK_V3_EXPERTS",
    "DEEPSEEK_V3_TOPK",
    "PARALLEL_RANKS",
    "GemmShape",
    "DEEPSEEK_V3_GEMM_SHAPES",
]

# The name engines select us by (vLLM's and SGLang's MoE backend flag) and metrics/reports use.
BACKEND_NAME = "phasemoe"

# DeepSeek-V3's FP8 checkpoints scale weights per 128x128 block and activations per 1x128 group;
# every kernel here is built around it (one K block = one scale), other sizes need other kernels.
QUANT_BLOCK = 128

# Rows each expert's segment of the contiguous layout is padded to by default, and on the torch
# path (which needs none): the GPU GEMMs' row tile, so every path's layouts have one shape.
LAYOUT_ALIGNMENT = QUANT_BLOCK

# float8 e4m3fn (FP8_DTYPE below): its largest finite value, torch.finfo(FP8_DTYPE).max.
FP8_MAX = 448.0
# A group of zeros still needs a finite, non-zero scale; 1e-10 keeps 0 * scale == 0 exact.
SCALE_FLOOR = 1e-10
# The largest scale: a power of two (so UE8M0 holds it) with 448 * scale < fp32 max, so every
# dequantized value stays finite. Groups whose amax exceeds 448 * 2^119 (~3e38, or overflowed to
# inf inside SiLU*up) saturate at +-448 * SCALE_CEIL instead of turning into inf/NaN.
SCALE_CEIL = 2.0**119

# DeepSeek-V3 (and V3.1 / R1): hidden size, per-expert intermediate size, routed experts, top-k.
DEEPSEEK_V3_HIDDEN = 7168
DEEPSEEK_V3_INTERMEDIATE = 2048
DEEPSEEK_V3_EXPERTS = 256
DEEPSEEK_V3_TOPK = 8
# One 8-GPU node: EP8 holds 256/8 experts per rank whole, TP8 all 256 with I/8 columns each.
PARALLEL_RANKS = 8


class GemmShape(NamedTuple):
    """One grouped GEMM of a DeepSeek-V3 MoE layer on one rank: `[m, K] x [N, K]^T` per expert."""

    slice: str  # "ep8" (expert parallel) or "tp8" (tensor parallel)
    gemm: str  # "w13" (gate+up: N = 2I, K = H) or "w2" (down: N = H, K = I)
    experts: int  # local experts on the rank
    n: int
    k: int

    @property
    def intermediate(self) -> int:
        """The per-rank intermediate size I this GEMM belongs to (vLLM's config tables key on it)."""
        return self.n // 2 if self.gemm == "w13" else self.k


def _slice_shapes(slice_name: str, experts: int, intermediate: int) -> tuple[GemmShape, GemmShape]:
    return (
        GemmShape(slice_name, "w13", experts, 2 * intermediate, DEEPSEEK_V3_HIDDEN),
        GemmShape(slice_name, "w2", experts, DEEPSEEK_V3_HIDDEN, intermediate),
    )


# EP8: (32, 4096, 7168) and (32, 7168, 2048); TP8: (256, 512, 7168) and (256, 7168, 256).
DEEPSEEK_V3_GEMM_SHAPES: tuple[GemmShape, ...] = (
    *_slice_shapes("ep8", DEEPSEEK_V3_EXPERTS // PARALLEL_RANKS, DEEPSEEK_V3_INTERMEDIATE),
    *_slice_shapes("tp8", DEEPSEEK_V3_EXPERTS, DEEPSEEK_V3_INTERMEDIATE // PARALLEL_RANKS),
)


def __getattr__(name: str) -> Any:
    if name == "FP8_DTYPE":  # torch.float8_e4m3fn, imported only by whoever asks for it
        import torch

        return torch.float8_e4m3fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
