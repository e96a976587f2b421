"""Experiment (not shipped): the routed experts of a few tokens in two launches, without a layout.

Measured slower than the shipped contiguous pipeline in every decode cell it was tried on
(docs/benchmarks.md, "Decode without a layout (lab/token_experts.py)"): each program walks its
K blocks one dependent load after another, so the weight stream is latency-bound. Kept here with
`lab/sweep_token_gemv.py` as the starting point for a split-K version.

At decode's smallest batches every launch costs more than its work, and a layout (sort tokens by
expert, pad, gather) is work nobody needs when each token's k experts are read once anyway. So:

- `_up_kernel`, one program per (slot, BLOCK_N columns of gate/up): `h[slot] = x[token] w13[e]^T`
  with x read straight from the token row (fp8 with its scales, or bf16 quantized per 128 columns
  in registers); a slot of no local expert (another rank's, or -1) is skipped.
- `_down_kernel`, one program per (token, BLOCK_N hidden columns): for each of the token's
  k slots with a local expert, SiLU(gate) * up of `h[slot]` quantized per 128 columns in
  registers (the same rounding as `silu_mul_quant`), times `w2[e]^T`, rounded to bf16 as a GEMM
  writes y, weighted and summed in fp32 in slot order: the combine, deterministic.

Each (token, expert) pair reads that expert's weights once, so this could pay only while few
tokens share an expert. Products are fp32 multiply-adds on the
dequantized fp8 values, one scale pair per 128-column group, as the grouped GEMMs accumulate.
Its torch twin: `moe_backend.reference.routed_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moe_backend.constants import FP8_DTYPE, QUANT_BLOCK
from moe_backend.kernels._group_quant_core import quantize_groups
from moe_backend.kernels._launch_utils import check_kernel_tensor
from moe_backend.kernels._numerics import round_to_bf16_grid

__all__ = ["token_experts", "TokenGemvConfig", "DEFAULT_CONFIG"]


@dataclass(frozen=True)
class TokenGemvConfig:
    up_block_n: int  # gate/up columns per program of the first launch (divides 128)
    down_block_n: int  # hidden columns per program of the second launch (divides 128)
    num_warps: int
    num_stages: int
    # Second launch: one flat loop over (slot, 128-column block) with masked loads, which the
    # software pipeliner overlaps across slots; False: a branch per slot around its own loop.
    flat_down: bool = True
    # First launch: K (hidden) split over this many programs per (slot, columns), each writing fp32
    # partial sums that the second launch adds in a fixed order (more loads in flight per weight row).
    up_split_k: int = 1

    def __post_init__(self):
        for name in ("up_block_n", "down_block_n"):
            v = getattr(self, name)
            if v < 16 or QUANT_BLOCK % v:
                raise ValueError(f"{name}: expected a power of two from 16 to {QUANT_BLOCK}, got {v}")


DEFAULT_CONFIG = TokenGemvConfig(up_block_n=32, down_block_n=32, num_warps=4, num_stages=4)


@triton.jit
def _local_expert(ids_ptr, slot, expert_start, num_experts):
    e = tl.load(ids_ptr + slot).to(tl.int64) - expert_start
    return e, (e >= 0) & (e < num_experts)


@triton.jit(do_not_specialize=["expert_start"])
def _up_kernel(
    x_ptr,  # [T, H] fp8 (X_SCALED) or bf16/fp16/fp32
    xs_ptr,  # [T, H/128] f32 (X_SCALED)
    w_ptr,  # [E, N, H] fp8
    ws_ptr,  # [E, ceil(N/128), H/128] f32
    ids_ptr,  # [T*k] global expert ids
    h_ptr,  # [T*k, SPLIT_K, N] f32 partial sums
    expert_start,
    num_experts,
    N,
    H: tl.constexpr,
    TOPK: tl.constexpr,
    X_SCALED: tl.constexpr,
    UE8M0: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    e, local = _local_expert(ids_ptr, slot, expert_start, num_experts)
    if local:
        token = slot // TOPK
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        cols = tl.arange(0, 128)
        KB: tl.constexpr = H // 128
        w_rows = w_ptr + e * N * H + n.to(tl.int64)[:, None] * H + cols[None, :]
        ws_row = ws_ptr + (e * tl.cdiv(N, 128) + tl.program_id(1) * BLOCK_N // 128) * KB
        KB_PER_SPLIT: tl.constexpr = (KB + SPLIT_K - 1) // SPLIT_K
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(KB_PER_SPLIT):
            kb = split * KB_PER_SPLIT + i
            kb_ok = (cols * 0 + kb) < KB  # a vector mask (scalar masks trip the interpreter)
            a = tl.load(x_ptr + token * H + kb * 128 + cols, mask=kb_ok, other=0.0).to(tl.float32)
            if X_SCALED:
                a_scale = tl.sum(tl.load(xs_ptr + token * KB + kb + cols * 0, mask=kb_ok & (cols == 0), other=0.0))
            else:
                q, s = quantize_groups(a[None, :], UE8M0)
                a = tl.reshape(q, (128,)).to(tl.float32)
                a_scale = tl.sum(s, axis=0)
            w = tl.load(w_rows + kb * 128, mask=n_ok[:, None] & kb_ok[None, :], other=0.0).to(tl.float32)
            b_scale = tl.sum(tl.load(ws_row + kb + cols * 0, mask=kb_ok & (cols == 0), other=0.0))
            acc += tl.sum(w * a[None, :], axis=1) * (a_scale * b_scale)
        tl.store(h_ptr + (slot * SPLIT_K + split) * N + n, acc, mask=n_ok)


@triton.jit
def _gemm1_output(ptr, mask, row_stride, SPLIT_K: tl.constexpr):
    """128 columns of GEMM1's output: its SPLIT_K fp32 partial sums added in a fixed order, rounded to
    bf16 as a GEMM writes its output."""
    acc = tl.load(ptr, mask=mask, other=0.0)
    for p in tl.static_range(1, SPLIT_K):
        acc += tl.load(ptr + p * row_stride, mask=mask, other=0.0)
    return round_to_bf16_grid(acc)


@triton.jit(do_not_specialize=["expert_start"])
def _down_kernel(
    h_ptr,  # [T*k, SPLIT_K, 2I] f32 partial sums: gate columns, then up
    w_ptr,  # [E, N, I] fp8 (N = H)
    ws_ptr,  # [E, ceil(N/128), I/128] f32
    ids_ptr,  # [T*k] global expert ids
    tw_ptr,  # [T*k] f32 top-k weights
    out_ptr,  # [T, N] bf16
    expert_start,
    num_experts,
    N,
    INTER: tl.constexpr,
    TOPK: tl.constexpr,
    UE8M0: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FLAT: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    cols = tl.arange(0, 128)
    KB: tl.constexpr = INTER // 128
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if FLAT:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for it in range(TOPK * KB):
            j = it // KB
            kb = it - j * KB
            slot = token * TOPK + j
            e, local = _local_expert(ids_ptr, slot, expert_start, num_experts)
            e = tl.where(local, e, 0)
            col_ok = (cols * 0 + local.to(tl.int32)) > 0  # vector masks (scalar masks trip the interpreter)
            h_row = h_ptr + slot * SPLIT_K * (2 * INTER) + kb * 128 + cols
            gate = _gemm1_output(h_row, col_ok, 2 * INTER, SPLIT_K)
            up = _gemm1_output(h_row + INTER, col_ok, 2 * INTER, SPLIT_K)
            q, s = quantize_groups((gate / (1.0 + tl.exp(-gate)) * up)[None, :], UE8M0)
            w_offs = e * N * INTER + n.to(tl.int64)[:, None] * INTER + kb * 128 + cols[None, :]
            w = tl.load(w_ptr + w_offs, mask=n_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            ws = tl.load(ws_ptr + (e * tl.cdiv(N, 128) + tl.program_id(1) * BLOCK_N // 128) * KB + kb)
            acc += tl.sum(w * q.to(tl.float32), axis=1) * (tl.sum(s, axis=0) * ws)
            # The slot's last block: its bf16 output row, weighted, joins the sum (0 for no local expert).
            last = (n * 0 + kb) == KB - 1
            weight = tl.load(tw_ptr + slot) * local.to(tl.float32)
            total += tl.where(last, weight * round_to_bf16_grid(acc), 0.0)
            acc = tl.where(last, 0.0, acc)
    else:
        for j in range(TOPK):
            slot = token * TOPK + j
            e, local = _local_expert(ids_ptr, slot, expert_start, num_experts)
            if local:
                w_rows = w_ptr + e * N * INTER + n.to(tl.int64)[:, None] * INTER + cols[None, :]
                ws_row = ws_ptr + (e * tl.cdiv(N, 128) + tl.program_id(1) * BLOCK_N // 128) * KB
                h_row = h_ptr + slot * SPLIT_K * (2 * INTER) + cols
                acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for kb in range(KB):
                    gate = _gemm1_output(h_row + kb * 128, cols >= 0, 2 * INTER, SPLIT_K)
                    up = _gemm1_output(h_row + INTER + kb * 128, cols >= 0, 2 * INTER, SPLIT_K)
                    q, s = quantize_groups((gate / (1.0 + tl.exp(-gate)) * up)[None, :], UE8M0)
                    w = tl.load(w_rows + kb * 128, mask=n_ok[:, None], other=0.0).to(tl.float32)
                    acc += tl.sum(w * q.to(tl.float32), axis=1) * (tl.sum(s, axis=0) * tl.load(ws_row + kb))
                total += tl.load(tw_ptr + slot) * round_to_bf16_grid(acc)
    tl.store(out_ptr + token * N + n, round_to_bf16_grid(total).to(out_ptr.dtype.element_ty), mask=n_ok)


def token_experts(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int = 0,
    ue8m0: bool = False,
    out: torch.Tensor | None = None,
    config: TokenGemvConfig | None = None,
) -> torch.Tensor:
    """x `[T, H]` (fp8 with x_scale f32 `[T, H/128]`, or bf16 and x_scale None); w13 fp8
    `[E, 2I, H]`, w2 fp8 `[E, H, I]` with their 128x128 block scales; topk_weights f32 `[T, k]`;
    topk_ids `[T, k]` global ids (local expert = id - expert_start, others skipped). Returns bf16
    `[T, H]` (into `out` when given): `sum_j w[t, j] * MLP_e(x[t])` over the local slots.
    config: None = DEFAULT_CONFIG."""
    dev = x.device
    scaled = x_scale is not None
    check_kernel_tensor("x", x, dtypes=(FP8_DTYPE,) if scaled else (torch.bfloat16,), ndim=2)
    num_tokens, hidden = x.shape
    if scaled:
        check_kernel_tensor("x_scale", x_scale, dev, dtypes=(torch.float32,), shape=(num_tokens, hidden // 128))
    num_experts, two_i, _ = w13_fp8.shape
    inter = two_i // 2
    check_kernel_tensor("w13_fp8", w13_fp8, dev, dtypes=(FP8_DTYPE,), shape=(num_experts, two_i, hidden))
    check_kernel_tensor("w2_fp8", w2_fp8, dev, dtypes=(FP8_DTYPE,), shape=(num_experts, hidden, inter))
    f32 = (torch.float32,)
    w13_blocks = (num_experts, triton.cdiv(two_i, 128), hidden // 128)
    check_kernel_tensor("w13_scale_inv", w13_scale_inv, dev, dtypes=f32, shape=w13_blocks)
    w2_blocks = (num_experts, triton.cdiv(hidden, 128), inter // 128)
    check_kernel_tensor("w2_scale_inv", w2_scale_inv, dev, dtypes=f32, shape=w2_blocks)
    check_kernel_tensor("topk_ids", topk_ids, dev, dtypes=(torch.int32, torch.int64), ndim=2)
    topk = topk_ids.shape[1]
    check_kernel_tensor("topk_weights", topk_weights, dev, dtypes=(torch.float32,), shape=(num_tokens, topk))
    if hidden % 128 or inter % 128:
        raise ValueError(f"x, w2_fp8: hidden ({hidden}) and intermediate ({inter}) must be multiples of 128")
    if out is None:
        out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=dev)
    else:
        check_kernel_tensor("out", out, dev, dtypes=(torch.bfloat16,), shape=(num_tokens, hidden))
    if num_tokens == 0:
        return out
    if topk == 0 or num_experts == 0:
        return out.zero_()
    if config is None:
        config = DEFAULT_CONFIG
    split_k = max(1, min(config.up_split_k, hidden // 128))
    h = torch.empty(num_tokens * topk, split_k, two_i, dtype=torch.float32, device=dev)
    meta = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    _up_kernel[(num_tokens * topk, triton.cdiv(two_i, config.up_block_n), split_k)](
        x,
        x_scale if scaled else x,
        w13_fp8,
        w13_scale_inv,
        topk_ids,
        h,
        expert_start,
        num_experts,
        two_i,
        H=hidden,
        TOPK=topk,
        X_SCALED=scaled,
        UE8M0=ue8m0,
        BLOCK_N=config.up_block_n,
        SPLIT_K=split_k,
        **meta,
    )
    _down_kernel[(num_tokens, triton.cdiv(hidden, config.down_block_n))](
        h,
        w2_fp8,
        w2_scale_inv,
        topk_ids,
        topk_weights,
        out,
        expert_start,
        num_experts,
        hidden,
        INTER=inter,
        TOPK=topk,
        UE8M0=ue8m0,
        BLOCK_N=config.down_block_n,
        FLAT=config.flat_down,
        SPLIT_K=split_k,
        **meta,
    )
    return out
