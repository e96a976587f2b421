"""Un-permute + top-k weighted combine as a gather: `out[t] = sum_j w[t, j] * y[row_of_slot[t, j]]`.

Deterministic (a fixed j order, no atomics), fp32 sum, one bf16 rounding; rows of -1 (expert not
local) contribute nothing, and their y rows are never read (they may hold NaN). Works for both
layouts: y `[M, N]` (contiguous) or `[E, max_m, N]` (masked, flat row e*max_m + r). Its torch
twin: `moe_backend.reference.unpermute_combine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_backend.kernels._launch_utils import check_kernel_tensor, check_per_program
from moe_backend.kernels._numerics import round_to_bf16_grid

__all__ = ["CombineLaunchConfig", "combine_launch_config", "unpermute_combine"]


@dataclass(frozen=True)
class CombineLaunchConfig:
    tokens_per_program: int  # output rows one program sums: a power of two
    block_n: int  # columns per program: a power of two
    num_warps: int

    def __post_init__(self):
        check_per_program("tokens_per_program", self.tokens_per_program, self.num_warps)
        check_per_program("block_n", self.block_n, self.num_warps)


# One token and 1024 columns per program, 4 warps. With few local slots per token (EP8: one on
# average) a program moves little per chain of dependent loads (ids, then rows); more tokens or
# columns per program put more loads in flight (`lab/sweep_combine.py` times the candidates).
DEFAULT_CONFIG = CombineLaunchConfig(1, 1024, 4)


def combine_launch_config(num_tokens: int, n: int) -> CombineLaunchConfig:
    """The launch config for `num_tokens` output rows of `n` columns."""
    return DEFAULT_CONFIG


@triton.jit
def _combine_kernel(
    y_ptr, rows_ptr, w_ptr, out_ptr, num_tokens, N, TOPK: tl.constexpr, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    t_ok = t < num_tokens
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = t_ok[:, None] & (offs < N)[None, :]
    acc = tl.zeros((TOKENS, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        r = tl.load(rows_ptr + t * TOPK + j, mask=t_ok, other=-1).to(tl.int64)
        w = tl.load(w_ptr + t * TOPK + j, mask=t_ok, other=0.0)
        v = tl.load(y_ptr + r[:, None] * N + offs[None, :], mask=ok & (r >= 0)[:, None], other=0.0)
        acc += w[:, None] * v.to(tl.float32)
    out = round_to_bf16_grid(acc).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t[:, None] * N + offs[None, :], out, mask=ok)


def unpermute_combine(
    y: torch.Tensor,
    row_of_slot: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    config: CombineLaunchConfig | None = None,
) -> torch.Tensor:
    """y bf16 `[M, N]` or `[E, max_m, N]`; row_of_slot int32/int64 `[T, k]` (flat row of y holding
    token t's j-th expert, -1 = none); topk_weights f32 `[T, k]`; out bf16 `[T, N]`. `config`:
    tokens and columns per program and warps (default `combine_launch_config`); every config
    gives the same bytes."""
    check_kernel_tensor("y", y, dtypes=(torch.bfloat16,), min_dim=2)
    dev = y.device
    check_kernel_tensor("row_of_slot", row_of_slot, dev, dtypes=(torch.int32, torch.int64), ndim=2)
    num_tokens, topk = row_of_slot.shape
    check_kernel_tensor("topk_weights", topk_weights, dev, dtypes=(torch.float32,), shape=(num_tokens, topk))
    n = y.shape[-1]
    if out is None:
        out = torch.empty((num_tokens, n), dtype=torch.bfloat16, device=dev)
    else:
        check_kernel_tensor("out", out, dev, dtypes=(torch.bfloat16,), shape=(num_tokens, n))
    if config is not None and not isinstance(config, CombineLaunchConfig):
        raise TypeError(f"config: expected a CombineLaunchConfig, got {type(config).__name__}")
    if num_tokens == 0 or n == 0:
        return out
    if topk == 0:
        return out.zero_()
    cfg = config or combine_launch_config(num_tokens, n)
    grid = (triton.cdiv(num_tokens, cfg.tokens_per_program), triton.cdiv(n, cfg.block_n))
    _combine_kernel[grid](
        y,
        row_of_slot,
        topk_weights,
        out,
        num_tokens,
        n,
        TOPK=topk,
        TOKENS=cfg.tokens_per_program,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
    )
    return out
