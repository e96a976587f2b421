"""Tiny-shape kernel checks run under TRITON_INTERPRET=1 (CPU). Run by test_kernels_interpret.py in a
subprocess, `TRITON_INTERPRET=1 python -m tests.kernels._interpret_cases [CASE ...]` from the
repository root, because the variable must be set before Triton and the kernel modules are
imported; prints one JSON line {case: null | "error text"}."""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import triton
import triton.language as tl

from moe_backend import reference
from moe_backend.kernels import _group_quant_core, _grouped_gemm_core, build_layout
from moe_backend.kernels._grouped_gemm_kernel import (
    BALANCED_WALK_MAX_ROUNDS,
    BALANCED_WALK_MAX_TAIL,
    BALANCED_WALK_MIN_K_BLOCKS,
    _walk,
)
from moe_backend.kernels.direct_rows import direct_rows
from moe_backend.kernels.grouped_gemm_contiguous import CONTIGUOUS_ALIGNMENT, grouped_gemm_contiguous
from moe_backend.kernels.grouped_gemm_masked import grouped_gemm_masked
from moe_backend.kernels.per_token_group_quant import per_token_group_quant
from moe_backend.kernels.permute_quant import permute_quant
from moe_backend.kernels.permute_rows import GatherLaunchConfig, permute_rows
from moe_backend.kernels.silu_mul_quant import silu_mul_quant
from moe_backend.kernels.unpermute_combine import unpermute_combine
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from moe_backend.reference import layouts
from tests.helpers.layout_checks import (
    LAYOUT_CASES,
    assert_same_layout,
    check_contiguous_layout,
    check_masked_layout,
    make_topk_ids,
)
from tests.helpers.quant_extremes import SUBNORMAL_ROW, check_no_overflow, extreme_rows, gate_up_pairs

GEMM_RTOL = 2e-3  # vs the fp32 dequantized reference (design.md)
# The interpreter runs the fp8 dot on CPU through numpy: same values, so the same bound holds.


def _rel(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _weights(e, n, k, gen):
    return quantize_fp8_blockwise(torch.randn(e, n, k, generator=gen) * 0.05)


def _acts(shape, gen):
    return quantize_fp8_per_token_group(torch.randn(*shape, generator=gen))


def case_masked(cfg=None):
    gen = torch.Generator().manual_seed(1)
    e, max_m, n, k = 4, 40, 200, 384  # N, K not multiples of the tiles
    b, bs = _weights(e, n, k, gen)
    a, a_s = _acts((e, max_m, k), gen)
    masked_m = torch.tensor([0, 1, 40, 17], dtype=torch.int32)  # empty, one row, full, ragged
    out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16)
    grouped_gemm_masked(a, a_s, b, bs, masked_m, out, config=cfg)
    ref = reference.grouped_gemm_masked(a, a_s, b, bs, masked_m)
    for i, m in enumerate(masked_m.tolist()):
        assert torch.isnan(out[i, m:]).all(), f"expert {i}: rows past masked_m were written"
        assert torch.isfinite(out[i, :m]).all(), f"expert {i}: valid rows not written"
    valid = torch.cat([out[i, :m] for i, m in enumerate(masked_m.tolist())])
    valid_ref = torch.cat([ref[i, :m] for i, m in enumerate(masked_m.tolist())])
    err = _rel(valid, valid_ref)
    assert err <= GEMM_RTOL, f"rel err {err:.2e}"


def _check_masked(counts, max_m, n, k, cfg, seed):
    """Poisoned output (NaN): rows past masked_m[e] must stay NaN, valid rows must be written,
    and each expert's rows must match the reference on their own (a unit written to the wrong
    expert or rows shows up there, not diluted among the right ones). Counts outside [0, max_m]
    are clamped by the kernel: the reference gets the clamped ones."""
    gen = torch.Generator().manual_seed(seed)
    e = len(counts)
    b, bs = _weights(e, n, k, gen)
    a, a_s = _acts((e, max_m, k), gen)
    masked_m = torch.tensor(counts, dtype=torch.int32)
    out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16)
    grouped_gemm_masked(a, a_s, b, bs, masked_m, out, config=cfg)
    clamped = masked_m.clamp(0, max_m)
    ref = reference.grouped_gemm_masked(a, a_s, b, bs, clamped)
    for i, m in enumerate(clamped.tolist()):
        assert torch.isnan(out[i, m:]).all(), f"expert {i}: rows past masked_m were written"
        assert torch.isfinite(out[i, :m]).all(), f"expert {i}: valid rows not written"
        if m:
            err = _rel(out[i, :m], ref[i, :m])
            assert err <= GEMM_RTOL, f"expert {i}: rel err {err:.2e}"


# The persistent walk: few programs (PROGRAMS) each take many units, across expert boundaries.
_WALK = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2)


def case_masked_hot_expert():
    # One hot expert (5 m-tiles of one weight tile) among idle and one-row experts, 2 programs.
    _check_masked((0, 70, 1, 3, 0, 17), 80, 136, 256, dict(_WALK, PROGRAMS=2), seed=11)


def case_masked_all_idle():
    _check_masked((0, 0, 0), 48, 64, 128, dict(_WALK, PROGRAMS=4), seed=12)


def case_masked_max_m_far_above_rows():
    # max_m 512 for at most 5 rows: the walk visits only the tiles that hold rows.
    _check_masked((2, 0, 5, 1), 512, 200, 128, dict(_WALK, PROGRAMS=3), seed=13)


def case_masked_single_row():
    _check_masked((0, 1, 0), 32, 72, 128, None, seed=14)


def case_masked_many_experts():
    # 37 experts: the prefix-sum vector spans 64 lanes; more programs than units (idle programs).
    counts = tuple((i * 7) % 5 if i % 3 else 0 for i in range(37))
    _check_masked(counts, 8, 64, 128, dict(_WALK, BLOCK_N=32, PROGRAMS=500), seed=15)


def case_masked_out_of_range_counts():
    # Clamped on the device: above max_m counts as max_m, negative as 0.
    _check_masked((40, -3, 7), 24, 64, 128, dict(_WALK, PROGRAMS=2), seed=16)


def case_masked_n_loop_walk():
    # Short K with N_LOOP n-tiles per unit, a hot expert, one program walking everything.
    _check_masked(
        (33, 0, 2), 40, 200, 256, dict(BLOCK_M=16, BLOCK_N=64, N_LOOP=2, num_warps=4, num_stages=2, PROGRAMS=1), seed=17
    )


_WIDE_NARROW = dict(BLOCK_M=32, BLOCK_N=64, SWAP_AB=True, K_UNROLL=2, NARROW_M=16, num_warps=4, num_stages=2)


def case_masked_narrow_m():
    """NARROW_M: m-tiles holding at most 16 rows run 16 wide, the others BLOCK_M wide, in one
    walk: experts of 1, 16 and 17 rows, a hot one whose last tile holds 6 rows, one whose second
    tile holds 17; swapped 32-row and unswapped 64-row tiles, 2 programs."""
    counts = (0, 1, 16, 17, 33, 49, 70)
    for cfg in (_WIDE_NARROW, dict(BLOCK_M=64, BLOCK_N=64, NARROW_M=16, num_warps=4, num_stages=2)):
        _check_masked(counts, 80, 136, 256, dict(cfg, PROGRAMS=2), seed=18)
    # Only the masked walk reads NARROW_M: the contiguous op says so instead of ignoring it.
    gen = torch.Generator().manual_seed(19)
    b, bs = _weights(2, 64, 128, gen)
    a, a_s = _acts((32, 128), gen)
    try:
        grouped_gemm_contiguous(a, a_s, b, bs, torch.zeros(32, dtype=torch.int32), config=_WIDE_NARROW)
    except ValueError as exc:
        assert "NARROW_M" in str(exc), exc
    else:
        raise AssertionError("NARROW_M accepted on the contiguous layout")


def case_masked_swap_ab():
    case_masked(dict(BLOCK_M=16, BLOCK_N=64, SWAP_AB=True, num_warps=4, num_stages=2))


def case_masked_wide_n():
    case_masked(dict(BLOCK_M=32, BLOCK_N=256, num_warps=4, num_stages=2))


def case_masked_k_unroll():
    case_masked(dict(BLOCK_M=16, BLOCK_N=64, SWAP_AB=True, K_UNROLL=2, num_warps=4, num_stages=2))


def case_masked_n_loop():
    gen = torch.Generator().manual_seed(6)
    e, max_m, n, k = 3, 20, 200, 256  # K = 256: the short-K path; N = 200: a ragged last n-tile
    b, bs = _weights(e, n, k, gen)
    a, a_s = _acts((e, max_m, k), gen)
    masked_m = torch.tensor([0, 20, 3], dtype=torch.int32)
    out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16)
    grouped_gemm_masked(
        a, a_s, b, bs, masked_m, out, config=dict(BLOCK_M=16, BLOCK_N=64, N_LOOP=2, num_warps=4, num_stages=2)
    )
    ref = reference.grouped_gemm_masked(a, a_s, b, bs, masked_m)
    for i, m in enumerate(masked_m.tolist()):
        assert torch.isnan(out[i, m:]).all() and torch.isfinite(out[i, :m]).all(), i
    err = _rel(torch.cat([out[1], out[2, :3]]), torch.cat([ref[1], ref[2, :3]]))
    assert err <= GEMM_RTOL, f"rel err {err:.2e}"


def case_contiguous(cfg=None, counts=(0, 1, 130, 5)):
    gen = torch.Generator().manual_seed(2)
    e, n, k = len(counts), 136, 256
    b, bs = _weights(e, n, k, gen)
    ids = []
    for i, c in enumerate(counts):
        pad = -c % CONTIGUOUS_ALIGNMENT
        ids += [i] * c + [-1] * pad
    expert_ids = torch.tensor(ids, dtype=torch.int32)
    m = expert_ids.numel()
    a, a_s = _acts((m, k), gen)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    grouped_gemm_contiguous(a, a_s, b, bs, expert_ids, out, config=cfg)
    ref = reference.grouped_gemm_contiguous(a, a_s, b, bs, expert_ids)
    pad = expert_ids < 0
    assert torch.isnan(out[pad]).all(), "padding rows were written"
    assert torch.isfinite(out[~pad]).all(), "valid rows not written"
    err = _rel(out[~pad], ref[~pad])
    assert err <= GEMM_RTOL, f"rel err {err:.2e}"


def case_contiguous_num_rows():
    """A layout sized for the worst case: segments padded to BLOCK_M, then a tail of padding
    whose ids are set to a real expert (stale data): with `num_rows` the walk must stop before it
    (rows there stay NaN); every row below is checked per expert."""
    gen = torch.Generator().manual_seed(8)
    counts, block_m, n, k = (3, 0, 40, 1, 16), 16, 96, 256
    e = len(counts)
    ids = []
    for i, c in enumerate(counts):
        ids += [i] * c + [-1] * (-c % block_m)
    used = len(ids)
    ids += [2] * (3 * block_m + 5)  # stale ids past the rows in use
    expert_ids = torch.tensor(ids, dtype=torch.int32)
    b, bs = _weights(e, n, k, gen)
    a, a_s = _acts((len(ids), k), gen)
    ref = reference.grouped_gemm_contiguous(a, a_s, b, bs, torch.where(torch.arange(len(ids)) < used, expert_ids, -1))
    for cfg in (
        dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2, num_warps=4, num_stages=2, PROGRAMS=3),
        dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    ):
        out = torch.full((len(ids), n), float("nan"), dtype=torch.bfloat16)
        grouped_gemm_contiguous(
            a, a_s, b, bs, expert_ids, out, config=cfg, num_rows=torch.tensor([used], dtype=torch.int32)
        )
        assert torch.isnan(out[used:]).all(), "rows past num_rows were written"
        pad = expert_ids[:used] < 0
        assert torch.isnan(out[:used][pad]).all(), "padding rows were written"
        start = 0
        for i, c in enumerate(counts):
            rows = slice(start, start + c)
            assert torch.isfinite(out[rows]).all(), f"expert {i}: valid rows not written"
            if c:
                err = _rel(out[rows], ref[rows])
                assert err <= GEMM_RTOL, f"expert {i}: rel err {err:.2e}"
            start += c + (-c % block_m)


def case_contiguous_gather_a():
    """A read through `a_rows` (the layout's src_token: tokens repeated, out of order, -1 on
    padding) gives bit for bit what the same kernel gives on A permuted beforehand, with and without
    a row count, plain and SWAP_AB tiles; padding rows and the tail past num_rows stay unwritten."""
    gen = torch.Generator().manual_seed(11)
    counts, block_m, n, k, tokens = (3, 0, 20, 1), 16, 80, 256, 9
    ids, src = [], []
    for i, c in enumerate(counts):
        ids += [i] * c + [-1] * (-c % block_m)
        src += torch.randint(0, tokens, (c,), generator=gen).tolist() + [-1] * (-c % block_m)
    used = len(ids)
    ids += [-1] * 7  # the static bound's tail
    src += [-1] * 7
    expert_ids = torch.tensor(ids, dtype=torch.int32)
    a_rows = torch.tensor(src, dtype=torch.int64)
    b, bs = _weights(len(counts), n, k, gen)
    x, x_s = _acts((tokens, k), gen)
    permuted, permuted_s = x[a_rows.clamp(min=0)], x_s[a_rows.clamp(min=0)]
    num_rows = torch.tensor([used], dtype=torch.int32)
    for cfg in (
        dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2, num_warps=4, num_stages=2, PROGRAMS=3),
        dict(BLOCK_M=16, BLOCK_N=64, SWAP_AB=True, K_UNROLL=2, num_warps=4, num_stages=2),
    ):
        for rows in (None, num_rows):
            want = torch.full((len(ids), n), float("nan"), dtype=torch.bfloat16)
            grouped_gemm_contiguous(permuted, permuted_s, b, bs, expert_ids, want, config=cfg, num_rows=rows)
            got = torch.full_like(want, float("nan"))
            grouped_gemm_contiguous(x, x_s, b, bs, expert_ids, got, config=cfg, num_rows=rows, a_rows=a_rows)
            assert torch.equal(got.isnan(), want.isnan()), f"{cfg}: other rows written"
            assert torch.isnan(got[expert_ids < 0]).all(), f"{cfg}: padding rows written"
            valid = ~want.isnan()
            assert valid.any() and torch.equal(got[valid], want[valid]), f"{cfg}: gathered A differs"


def case_contiguous_one_expert():
    case_contiguous(counts=(0, 0, 300))


def case_contiguous_bm64():
    case_contiguous(dict(BLOCK_M=64, BLOCK_N=32, GROUP_M=2, K_UNROLL=2, num_warps=4, num_stages=2))


def _check_quant(q, s, ref_q, ref_s):
    assert torch.allclose(s, ref_s, rtol=1e-6, atol=0), "scales differ"
    same = (q.float() == ref_q.float()).float().mean().item()
    assert same >= 0.999, f"only {same:.4f} of fp8 values match"


def case_per_token_group_quant():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 5, 384, generator=gen) * 3).bfloat16()
    x[0, 0, :128] = 0  # an all-zero group takes the 1e-10 floor
    for ue8m0 in (False, True):
        _check_quant(*per_token_group_quant(x, 128, ue8m0), *quantize_fp8_per_token_group(x, 128, ue8m0))


def case_silu_mul_quant():
    gen = torch.Generator().manual_seed(4)
    h = (torch.randn(7, 2 * 256, generator=gen) * 4).bfloat16()
    for ue8m0 in (False, True):
        _check_quant(*silu_mul_quant(h, 128, ue8m0), *reference.silu_mul_quant(h, 128, ue8m0))


def _check_no_overflow(q, s, ref_q, ref_s, exact_rows):
    check_no_overflow(q, s)
    # As the reference even at the extremes (both cap the scale at the same power of two), to the
    # ordinary tolerance (the kernel's SiLU may differ from torch's by an ulp); rows fed subnormals
    # are exempt: the GPU may flush them to zero (FTZ).
    _check_quant(q[exact_rows], s[exact_rows], ref_q[exact_rows], ref_s[exact_rows])


def case_quant_extremes():
    """Every value a bf16 / fp16 / fp32 tensor can hold: the fp32 paths never overflow to inf/NaN."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for ue8m0 in (False, True):
            h, normal_pairs = gate_up_pairs(dtype)  # [81, 256]: every (gate, up) pair of extremes
            _check_no_overflow(*silu_mul_quant(h, 128, ue8m0), *reference.silu_mul_quant(h, 128, ue8m0), normal_pairs)
            rows = extreme_rows(dtype, 128)
            normal_rows = torch.arange(len(rows)) != SUBNORMAL_ROW
            _check_no_overflow(
                *per_token_group_quant(rows, 128, ue8m0), *quantize_fp8_per_token_group(rows, 128, ue8m0), normal_rows
            )
            src = torch.arange(len(rows)).flip(0)  # permute_quant shares the rounding core
            _check_no_overflow(
                *permute_quant(rows, src, 128, ue8m0),
                *layouts.permute_quant(rows, src, 128, ue8m0),
                normal_rows.flip(0),
            )


def case_combine():
    gen = torch.Generator().manual_seed(5)
    t, topk, e, n = 6, 3, 4, 300
    topk_ids = torch.stack([torch.randperm(e + 2, generator=gen)[:topk] for _ in range(t)]) - 1
    weights = torch.rand(t, topk, generator=gen)
    layout = layouts.build_masked_layout(topk_ids, e, max_m=t)
    y = torch.randn(e, t, n, generator=gen).bfloat16()
    for i, m in enumerate(layout.masked_m.tolist()):
        y[i, m:] = float("nan")  # unwritten rows must never be read
    out = unpermute_combine(y, layout.row_of_slot, weights)
    ref = layouts.combine(y, layout, weights)
    assert torch.isfinite(out).all()
    err = _rel(out, ref)
    assert err <= 1e-2 and (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max(), err
    # skipping absent slots by a branch gives the same bytes (and reads no unwritten row either)
    assert torch.equal(unpermute_combine(y, layout.row_of_slot, weights, branch_on_slots=True), out)
    # an absent slot's weight is not part of the sum, in either form and in the torch combine: NaN there
    # changes nothing
    nan_weights = torch.where(layout.row_of_slot < 0, float("nan"), weights)
    assert bool((layout.row_of_slot < 0).any())
    for branch in (False, True):
        assert torch.equal(unpermute_combine(y, layout.row_of_slot, nan_weights, branch_on_slots=branch), out)
    assert torch.equal(layouts.combine(y, layout, nan_weights), ref)


def case_bad_inputs():
    a = torch.zeros(2, 4, 200, dtype=torch.float8_e4m3fn)
    try:
        grouped_gemm_masked(
            a,
            torch.zeros(2, 4, 2),
            torch.zeros(2, 8, 200, dtype=torch.float8_e4m3fn),
            torch.zeros(2, 1, 2),
            torch.zeros(2, dtype=torch.int32),
        )
    except ValueError as exc:
        assert "a_fp8" in str(exc), exc
    else:
        raise AssertionError("K=200 accepted")
    a = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    try:
        grouped_gemm_contiguous(
            a,
            torch.zeros(4, 1),
            torch.zeros(2, 8, 128, dtype=torch.float8_e4m3fn),
            torch.zeros(2, 1, 1),
            torch.zeros(4, dtype=torch.int64),
        )
    except TypeError as exc:
        assert "expert_ids" in str(exc), exc
    else:
        raise AssertionError("int64 expert_ids accepted")


POISON_BYTE = 0x7F  # e4m3 NaN: a padding row still holding it was never written


def _poisoned_quant_out(q_shape, s_shape):
    return (
        torch.full(q_shape, POISON_BYTE, dtype=torch.uint8).view(torch.float8_e4m3fn),
        torch.full(s_shape, float("nan")),
    )


def _check_permute_quant(x, src_token, group=128, ue8m0=False):
    shapes = (*src_token.shape, x.shape[1]), (*src_token.shape, x.shape[1] // group)
    out = _poisoned_quant_out(*shapes)
    q, s = permute_quant(x, src_token, group, ue8m0, out=out)
    assert q is out[0] and s is out[1] and q.shape == shapes[0] and s.shape == shapes[1]
    real = src_token >= 0
    assert bool((q[~real].view(torch.uint8) == POISON_BYTE).all()) and bool(s[~real].isnan().all()), (
        "padding rows were written"
    )
    rq, rs = layouts.permute_quant(x, src_token, group, ue8m0)
    assert torch.equal(s[real], rs[real]), "scales differ from the torch twin"
    # Bytes: the kernel's e4m3 rounding keeps the sign of values that round to zero, as torch's cast.
    assert torch.equal(q[real].view(torch.uint8), rq[real].view(torch.uint8)), "fp8 bytes differ from the torch twin"
    # Byte-exact against the unfused kernel path: same rounding code, rows copied.
    uq, us = per_token_group_quant(x, group, ue8m0)
    assert torch.equal(q[real].view(torch.uint8), uq.view(torch.uint8)[src_token[real]]), "differs from quant + permute"
    assert torch.equal(s[real], us[src_token[real]])


def case_permute_quant():
    gen = torch.Generator().manual_seed(7)
    t, topk, e, h = 9, 3, 5, 384
    x = torch.randn(t, h, generator=gen) * torch.logspace(-2, 2, t)[:, None]  # per-token magnitudes
    # Global ids -1..10, local experts 3..7: slots of other ranks and unrouted slots (-1) too.
    topk_ids = torch.stack([torch.randperm(12, generator=gen)[:topk] for _ in range(t)]) - 1
    contiguous = build_layout.build_contiguous_layout(topk_ids, e, expert_start=3, alignment=4)
    masked = build_layout.build_masked_layout(topk_ids, e, expert_start=3, max_m=t)
    assert (contiguous.expert_ids < 0).any(), "the case needs padding rows"
    assert (masked.masked_m < masked.max_m).any(), "the case needs rows past masked_m"
    real = contiguous.src_token[contiguous.src_token >= 0]
    assert real.unique().numel() < real.numel(), "the case needs repeated tokens"
    for dtype in (torch.bfloat16, torch.float32):
        for ue8m0 in (False, True):
            for layout in (contiguous, masked):
                _check_permute_quant(x.to(dtype), layout.src_token, 128, ue8m0)
    _check_permute_quant(x.half(), torch.tensor([[8, 0, -1], [3, 3, 1]]), group=64)


def case_permute_quant_empty():
    x = torch.randn(4, 256).bfloat16()
    q, s = permute_quant(x, torch.zeros(0, dtype=torch.int64))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    q, s = permute_quant(x, torch.zeros(3, 0, dtype=torch.int64))
    assert q.shape == (3, 0, 256) and s.shape == (3, 0, 2)
    # No tokens: the layout's rows are all padding (src_token -1): nothing is written.
    out = _poisoned_quant_out((2, 3, 256), (2, 3, 2))
    q, s = permute_quant(x[:0], torch.full((2, 3), -1), out=out)
    assert q.shape == (2, 3, 256) and bool((q.view(torch.uint8) == POISON_BYTE).all()) and s.isnan().all()


def _layout_pairs(case, seed=0):
    """(kernel, twin) for both layouts of a LayoutCase, checked against the invariants."""
    topk_ids = make_topk_ids(case, seed)
    args = (topk_ids, case.num_local)
    kernel = build_layout.build_contiguous_layout(
        *args, expert_start=case.expert_start, alignment=case.alignment, slots_per_program=case.slots_per_program
    )
    twin = layouts.build_contiguous_layout(
        *args, expert_start=case.expert_start, alignment=case.alignment, exact_size=False
    )
    check_contiguous_layout(kernel, topk_ids, case.num_local, case.expert_start, case.alignment)
    assert_same_layout(kernel, twin)
    max_m = case.max_m or max(case.tokens, 1)
    kernel = build_layout.build_masked_layout(
        *args, expert_start=case.expert_start, max_m=case.max_m, slots_per_program=case.slots_per_program
    )
    twin = layouts.build_masked_layout(*args, expert_start=case.expert_start, max_m=case.max_m, drop_overflow=True)
    check_masked_layout(kernel, topk_ids, case.num_local, case.expert_start, max_m)
    assert_same_layout(kernel, twin)


def case_build_layout():
    """Every LayoutCase, kernel == twin bit for bit and the invariants; errors name the case."""
    for case in LAYOUT_CASES:
        try:
            _layout_pairs(case)
        except AssertionError as exc:
            raise AssertionError(f"{case.name}: {exc}") from exc


def case_build_layout_shared_fill():
    """The one-launch plan with its experts split among several programs, the last one partly past
    the experts (as for 256 experts): every LayoutCase again, with 2 experts per program."""
    saved = build_layout.EXPERTS_PER_PROGRAM
    build_layout.EXPERTS_PER_PROGRAM = 2
    try:
        for case in LAYOUT_CASES:
            if case.slots_per_program is None:
                try:
                    _layout_pairs(case, seed=4)
                except AssertionError as exc:
                    raise AssertionError(f"{case.name}: {exc}") from exc
    finally:
        build_layout.EXPERTS_PER_PROGRAM = saved


def case_build_layout_both_plans():
    """One routing through the one-launch plan and chunked plans of 32 and 64 slots: same layouts."""
    topk_ids = make_topk_ids(LAYOUT_CASES[2], seed=3)  # EP slice with -1 and other ranks' ids
    for kwargs in (dict(alignment=8), dict(alignment=1)):
        built = [
            build_layout.build_contiguous_layout(topk_ids, 6, expert_start=3, slots_per_program=spp, **kwargs)
            for spp in (None, 32, 64)
        ]
        for other in built[1:]:
            assert_same_layout(other, built[0])
    built = [
        build_layout.build_masked_layout(topk_ids, 6, expert_start=3, max_m=5, slots_per_program=spp)
        for spp in (None, 32, 64)
    ]
    for other in built[1:]:
        assert_same_layout(other, built[0])


def case_silu_mul_quant_rows():
    """Row validity: only the rows a layout fills are computed and written (poisoned out), and they
    equal the reference's; without validity every row is (the existing behaviour)."""
    gen = torch.Generator().manual_seed(8)
    topk_ids = torch.randint(-1, 9, (7, 2), generator=gen, dtype=torch.int32)
    contiguous = build_layout.build_contiguous_layout(topk_ids, 5, expert_start=2, alignment=4)
    masked = build_layout.build_masked_layout(topk_ids, 5, expert_start=2, max_m=3)
    for layout, kwargs, rows in (
        (contiguous, dict(expert_ids=contiguous.expert_ids), (contiguous.num_rows,)),
        (masked, dict(masked_m=masked.masked_m), (5, 3)),
    ):
        valid = layout.src_token >= 0
        assert valid.any() and not valid.all(), "the case needs both kinds of rows"
        h = (torch.randn(*rows, 2 * 256, generator=gen) * 4).bfloat16()
        h[~valid] = float("nan")  # padding rows of GEMM1's output hold anything
        for ue8m0 in (False, True):
            out = _poisoned_quant_out((*rows, 256), (*rows, 2))
            q, s = silu_mul_quant(h, 128, ue8m0, out=out, **kwargs)
            assert q is out[0] and s is out[1]
            assert bool((q[~valid].view(torch.uint8) == POISON_BYTE).all()) and bool(s[~valid].isnan().all()), (
                "invalid rows were written"
            )
            rq, rs = reference.silu_mul_quant(h, 128, ue8m0, **kwargs)
            _check_quant(q[valid], s[valid], rq[valid], rs[valid])
            assert not rq[~valid].float().any() and not rs[~valid].any(), "the twin zeroes invalid rows"
            all_q, all_s = silu_mul_quant(h[valid], 128, ue8m0)  # no validity: every row
            _check_quant(all_q, all_s, rq[valid], rs[valid])


def case_used_rows():
    """permute_quant and silu_mul_quant given a device-side row count: programs loop over the rows
    below it (fewer programs than rows), every valid row below it is written, nothing at or past it
    (poisoned out), even real rows when the count is cut short on purpose."""
    gen = torch.Generator().manual_seed(10)
    topk_ids = torch.randint(-1, 12, (13, 3), generator=gen, dtype=torch.int32)
    layout = build_layout.build_contiguous_layout(topk_ids, 6, expert_start=3, alignment=4)
    used = int(layout.expert_offsets[-1])
    assert 0 < used < layout.num_rows, "the case needs an all-padding tail"
    x = torch.randn(13, 256, generator=gen).bfloat16()
    h = (torch.randn(layout.num_rows, 512, generator=gen) * 3).bfloat16()
    for bound in (used, used // 2):
        used_rows = torch.tensor([bound], dtype=torch.int32)
        below = torch.arange(layout.num_rows) < bound
        real = (layout.src_token >= 0) & below
        q, s = permute_quant(
            x,
            layout.src_token,
            out=_poisoned_quant_out((layout.num_rows, 256), (layout.num_rows, 2)),
            used_rows=used_rows,
        )
        rq, rs = layouts.permute_quant(x, layout.src_token, used_rows=used_rows)
        assert bool((q[~real].view(torch.uint8) == POISON_BYTE).all()) and bool(s[~real].isnan().all())
        assert torch.equal(q[real].float(), rq[real].float()) and torch.equal(s[real], rs[real])
        assert not rs[~real].any(), "the twin: rows past used_rows are padding"
        a, a_s = silu_mul_quant(
            h,
            expert_ids=layout.expert_ids,
            used_rows=used_rows,
            out=_poisoned_quant_out((layout.num_rows, 256), (layout.num_rows, 2)),
        )
        ra, ras = reference.silu_mul_quant(h, expert_ids=layout.expert_ids, used_rows=used_rows)
        assert bool((a[~real].view(torch.uint8) == POISON_BYTE).all()) and bool(a_s[~real].isnan().all())
        _check_quant(a[real], a_s[real], ra[real], ras[real])
        assert not ras[~real].any()


# The flat-item quant kernel (_group_quant_core): blocks of (row, group) items straddle rows.
QUANT_ITEM_CONFIGS = (
    _group_quant_core.QuantLaunchConfig(8, 2),
    _group_quant_core.QuantLaunchConfig(16, 4),
    _group_quant_core.QuantLaunchConfig(64, 4),
)


def _silu_mul_twin(h, group, ue8m0):
    """The kernel's SiLU formula, `g / (1 + exp(-g)) * up` in fp32, then the torch quantizer: under
    the interpreter (numpy fp32, correctly rounded) the kernel must match it bit for bit."""
    gate, up = h.float().chunk(2, dim=-1)
    return quantize_fp8_per_token_group(gate / (1 + torch.exp(-gate)) * up, group, ue8m0)


def _check_quant_exact(q, s, rq, rs, what):
    assert torch.equal(s, rs), f"{what}: scales differ"
    # Bytes: the kernel's e4m3 rounding keeps the sign of values that round to zero, as torch's cast.
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), f"{what}: fp8 bytes differ"


def _quant_launch(x2d, cols, silu_mul, ue8m0, cfg, out=None, **validity):
    rows = x2d.shape[0]
    q, s = out if out is not None else _poisoned_quant_out((rows, cols), (rows, cols // 128))
    _group_quant_core.launch(x2d, q, s, cols=cols, silu_mul=silu_mul, ue8m0=ue8m0, group=128, config=cfg, **validity)
    return q, s


def case_quant_flat_items():
    """Every row quantized (no validity) for 1, 2, 3, 7 and 56 groups per row, 13 rows (no block
    size divides the items), each launch config and the default: bit-identical to the torch
    quantizer (plain) and to the twin of the kernel's SiLU formula (SiLU*up)."""
    gen = torch.Generator().manual_seed(20)
    rows = 13
    for num_groups in (1, 2, 3, 7, 56):
        cols = 128 * num_groups
        x = (torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 3, rows)[:, None]).bfloat16()
        x[0, :128] = 0  # the 1e-10 scale floor
        h = (torch.randn(rows, 2 * cols, generator=gen) * 4).bfloat16()
        for ue8m0 in (False, True):
            ref = quantize_fp8_per_token_group(x, 128, ue8m0)
            silu_ref = _silu_mul_twin(h, 128, ue8m0)
            for cfg in (*QUANT_ITEM_CONFIGS, None):
                what = f"groups {num_groups}, ue8m0 {ue8m0}, {cfg}"
                _check_quant_exact(*_quant_launch(x, cols, False, ue8m0, cfg), *ref, what)
                _check_quant_exact(*_quant_launch(h, cols, True, ue8m0, cfg), *silu_ref, f"silu {what}")
            _check_quant_exact(*per_token_group_quant(x, 128, ue8m0), *ref, f"op, groups {num_groups}")
            _check_quant_exact(*silu_mul_quant(h, 128, ue8m0), *silu_ref, f"op silu, groups {num_groups}")


def case_quant_validity_modes():
    """Each row validity (always, expert_id, masked_m), with and without a device row count (the
    count cut short on purpose too), 2, 3 and 7 groups per row, blocks straddling rows: valid rows
    below the count bit-identical to the twin, every other row left poisoned (never written)."""
    gen = torch.Generator().manual_seed(21)
    num_experts, rows_per_expert = 4, 5
    rows = num_experts * rows_per_expert
    expert_ids = torch.tensor([i % 3 - (i % 4 == 1) for i in range(rows)], dtype=torch.int32)  # -1 on some
    masked_m = torch.tensor([0, 5, 2, 4], dtype=torch.int32)  # empty, full, ragged
    masked_valid = (torch.arange(rows) % rows_per_expert) < masked_m.repeat_interleave(rows_per_expert)
    modes = {
        "always": ({}, torch.ones(rows, dtype=torch.bool)),
        "expert_id": (dict(expert_ids=expert_ids), expert_ids >= 0),
        "masked_m": (dict(masked_m=masked_m, rows_per_expert=rows_per_expert), masked_valid),
    }
    for num_groups in (2, 3, 7):
        cols = 128 * num_groups
        h = (torch.randn(rows, 2 * cols, generator=gen) * 3).bfloat16()
        x = h[:, :cols].contiguous()
        for mode, (validity, valid) in modes.items():
            h_in = h.clone()
            h_in[~valid] = float("nan")  # invalid rows hold anything: never read into a valid one
            x_in = h_in[:, :cols].contiguous()
            for used in (None, rows - 3, 7, 0):
                used_rows = None if used is None else torch.tensor([used], dtype=torch.int32)
                kept = valid & (torch.arange(rows) < (rows if used is None else used))
                for cfg in QUANT_ITEM_CONFIGS[:2]:
                    for silu_mul, src, ref in (
                        (False, x_in, quantize_fp8_per_token_group(x, 128, False)),
                        (True, h_in, _silu_mul_twin(h, 128, False)),
                    ):
                        what = f"{mode}, used {used}, groups {num_groups}, silu {silu_mul}, {cfg}"
                        q, s = _quant_launch(src, cols, silu_mul, False, cfg, used_rows=used_rows, **validity)
                        assert bool((q[~kept].view(torch.uint8) == POISON_BYTE).all()), f"{what}: rows written"
                        assert bool(s[~kept].isnan().all()), f"{what}: scales of invalid rows written"
                        _check_quant_exact(q[kept], s[kept], ref[0][kept], ref[1][kept], what)


def case_quant_row_stride():
    """x rows further apart than their columns (a view into a wider buffer; SiLU*up's gate and up
    read from a [R, 2C] window of a wider row): the stride is honoured, output contiguous."""
    gen = torch.Generator().manual_seed(22)
    rows, cols = 9, 384
    wide = (torch.randn(rows, 2 * cols + 256, generator=gen) * 2).bfloat16()
    x, h = wide[:, 128 : 128 + cols], wide[:, : 2 * cols]
    assert x.stride(0) != cols and not h.is_contiguous()
    for cfg in (*QUANT_ITEM_CONFIGS, None):
        _check_quant_exact(
            *_quant_launch(x, cols, False, False, cfg),
            *quantize_fp8_per_token_group(x.contiguous(), 128, False),
            f"strided x, {cfg}",
        )
        _check_quant_exact(
            *_quant_launch(h, cols, True, True, cfg),
            *_silu_mul_twin(h.contiguous(), 128, True),
            f"strided h, {cfg}",
        )


def _gather_inputs(num_tokens, hidden, num_scales, gen):
    x = torch.randn(num_tokens, hidden, generator=gen) * 40
    return x.to(torch.float8_e4m3fn), torch.rand(num_tokens, num_scales, generator=gen) + 0.5


def _check_permute_rows(x_fp8, x_scale, src_token, used=None, cfg=None):
    """Poisoned out; rows holding a token (below `used`) == torch's gather byte for byte, all others untouched."""
    shapes = (*src_token.shape, x_fp8.shape[1]), (*src_token.shape, x_scale.shape[1])
    out = _poisoned_quant_out(*shapes)
    used_rows = None if used is None else torch.tensor([used], dtype=torch.int32)
    q, s = permute_rows(x_fp8, x_scale, src_token, out=out, used_rows=used_rows, config=cfg)
    assert q is out[0] and s is out[1] and q.shape == shapes[0] and s.shape == shapes[1]
    below = torch.arange(src_token.numel()).view(src_token.shape) < (src_token.numel() if used is None else used)
    real = (src_token >= 0) & below
    what = f"src {list(src_token.shape)}, used {used}, {cfg}"
    assert bool((q[~real].view(torch.uint8) == POISON_BYTE).all()), f"{what}: padding rows were written"
    assert bool(s[~real].isnan().all()), f"{what}: padding scales were written"
    src = src_token[real]
    assert torch.equal(q[real].view(torch.uint8), x_fp8.index_select(0, src).view(torch.uint8)), f"{what}: rows"
    assert torch.equal(s[real], x_scale.index_select(0, src)), f"{what}: scales"


GATHER_CONFIGS = (None, GatherLaunchConfig(1, 2), GatherLaunchConfig(4, 4), GatherLaunchConfig(16, 4))


def case_permute_rows():
    """Both layouts of a routing with repeated tokens, padding and other ranks' slots; rows moved as
    int64 (H % 8 == 0), int32 (a view 4 bytes off), int16 and bytes, and a row whose word count has
    no power-of-two divisor (masked chunks)."""
    gen = torch.Generator().manual_seed(23)
    t, topk = 9, 3
    topk_ids = torch.stack([torch.randperm(12, generator=gen)[:topk] for _ in range(t)]) - 1
    contiguous = build_layout.build_contiguous_layout(topk_ids, 5, expert_start=3, alignment=4)
    masked = build_layout.build_masked_layout(topk_ids, 5, expert_start=3, max_m=t)
    assert (contiguous.src_token < 0).any() and (masked.src_token < 0).any(), "the case needs padding rows"
    for hidden, num_scales in ((384, 3), (200, 2), (130, 1), (7, 1)):
        x_fp8, x_scale = _gather_inputs(t, hidden, num_scales, gen)
        for layout in (contiguous, masked):
            for cfg in GATHER_CONFIGS:
                _check_permute_rows(x_fp8, x_scale, layout.src_token, cfg=cfg)
    buffer, x_scale = _gather_inputs(t + 1, 388, 3, gen)
    x_fp8 = buffer.view(-1)[4 : 4 + t * 388].view(t, 388)  # 4-byte aligned only: int32 words
    _check_permute_rows(x_fp8, x_scale[:t].contiguous(), contiguous.src_token, cfg=GatherLaunchConfig(2, 4))


def case_permute_rows_used_rows():
    """A device row count: programs loop over the row blocks below it; nothing at or past it is
    written (the count at the rows in use, cut short, zero, past the end)."""
    gen = torch.Generator().manual_seed(24)
    topk_ids = torch.randint(-1, 12, (13, 3), generator=gen, dtype=torch.int32)
    layout = build_layout.build_contiguous_layout(topk_ids, 6, expert_start=3, alignment=4)
    used = int(layout.expert_offsets[-1])
    assert 0 < used < layout.num_rows, "the case needs an all-padding tail"
    x_fp8, x_scale = _gather_inputs(13, 256, 2, gen)
    for bound in (used, used // 2, 0, layout.num_rows + 5):
        for cfg in GATHER_CONFIGS:
            _check_permute_rows(x_fp8, x_scale, layout.src_token, used=bound, cfg=cfg)


def case_permute_rows_edges():
    """No valid row, a single row, no rows, no tokens."""
    gen = torch.Generator().manual_seed(25)
    x_fp8, x_scale = _gather_inputs(4, 256, 2, gen)
    _check_permute_rows(x_fp8, x_scale, torch.full((3, 5), -1))
    _check_permute_rows(x_fp8, x_scale, torch.full((6,), -1), used=6)
    _check_permute_rows(x_fp8, x_scale, torch.tensor([2]))
    _check_permute_rows(x_fp8, x_scale, torch.tensor([2]), used=1, cfg=GatherLaunchConfig(8, 2))
    q, s = permute_rows(x_fp8, x_scale, torch.zeros(0, dtype=torch.int64))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    out = _poisoned_quant_out((2, 256), (2, 2))
    q, s = permute_rows(x_fp8[:0], x_scale[:0], torch.full((2,), -1), out=out)
    assert bool((q.view(torch.uint8) == POISON_BYTE).all()) and bool(s.isnan().all())


def case_combine_kernel_layouts():
    """combine over kernel-built layouts whose padding rows hold NaN: never read into the sum."""
    gen = torch.Generator().manual_seed(9)
    t, topk, n = 9, 3, 200
    topk_ids = torch.randint(-1, 12, (t, topk), generator=gen)
    weights = torch.rand(t, topk, generator=gen)
    for layout in (
        build_layout.build_contiguous_layout(topk_ids, 6, expert_start=3, alignment=8),
        build_layout.build_masked_layout(topk_ids, 6, expert_start=3, max_m=2),
    ):  # some dropped
        y = torch.randn(*layout.src_token.shape, n, generator=gen).bfloat16()
        y[layout.src_token < 0] = float("nan")
        out = unpermute_combine(y, layout.row_of_slot, weights)
        ref = layouts.combine(y, layout, weights)
        assert torch.isfinite(out.float()).all(), "a padding row was read"
        assert _rel(out, ref) <= 1e-2
        assert torch.equal(unpermute_combine(y, layout.row_of_slot, weights, branch_on_slots=True), out)


def _direct_rows_twin(row_of_slot, weights):
    """{row: (token or -1, weight bits)} for every row a slot names (kernels/direct_rows.py)."""
    bits = weights.view(torch.int32)
    single = (row_of_slot >= 0).sum(dim=1) == 1
    return {
        int(r): (t if bool(single[t]) else -1, int(bits[t, j]))
        for t in range(row_of_slot.shape[0])
        for j, r in enumerate(row_of_slot[t].tolist())
        if r >= 0
    }


def case_direct_rows():
    """Each layout row's (destination token, weight bits) pair: the token when it is that token's only
    local slot, else -1; tokens with none, one and several local slots; top-k not a power of two."""
    gen = torch.Generator().manual_seed(12)
    t, topk = 40, 3
    topk_ids = torch.randint(0, 16, (t, topk), generator=gen)
    topk_ids[0] = torch.tensor([8, 9, 10])  # no local slot (experts 0-5 are local)
    topk_ids[1] = torch.tensor([1, 9, 10])  # one
    topk_ids[2] = torch.tensor([1, 2, 10])  # two
    weights = torch.rand(t, topk, generator=gen)
    layout = build_layout.build_contiguous_layout(topk_ids, 6, alignment=8)
    rows = layout.src_token.shape[0]
    pairs = direct_rows(layout.row_of_slot, weights, rows)
    want = _direct_rows_twin(layout.row_of_slot, weights)
    assert want and {d for d, _ in want.values()} > {-1}  # both kinds present
    for r, (dest, bits) in want.items():
        assert pairs[r].tolist() == [dest, bits], (r, pairs[r].tolist(), dest, bits)
    assert direct_rows(layout.row_of_slot[:0], weights[:0], 5).shape == (5, 2)  # no tokens: nothing to write


def case_combine_skip_single():
    """skip_single leaves single-slot tokens' output rows alone and combines the others as before;
    a single-slot row stored as GEMM2 stores it (bf16(fma(w, y, +0))) gives the combine's bytes."""
    gen = torch.Generator().manual_seed(13)
    t, topk, n = 24, 4, 160
    topk_ids = torch.randint(0, 16, (t, topk), generator=gen)
    weights = torch.rand(t, topk, generator=gen)
    layout = build_layout.build_contiguous_layout(topk_ids, 6, alignment=8)
    y = torch.randn(layout.src_token.shape[0], n, generator=gen).bfloat16()
    y[layout.src_token < 0] = float("nan")
    single = (layout.row_of_slot >= 0).sum(dim=1) == 1
    assert single.any() and (~single).any()
    for branch in (False, True):
        full = unpermute_combine(y, layout.row_of_slot, weights, branch_on_slots=branch)
        out = torch.full((t, n), 7.0, dtype=torch.bfloat16)
        unpermute_combine(y, layout.row_of_slot, weights, out, branch_on_slots=branch, skip_single=True)
        assert (out[single] == 7.0).all(), "a single-slot token's row was written"
        assert torch.equal(out[~single], full[~single])
        for tok in single.nonzero().flatten().tolist():
            j = int((layout.row_of_slot[tok] >= 0).nonzero())
            stored = torch.addcmul(torch.zeros(n), y[layout.row_of_slot[tok, j]].float(), weights[tok, j]).bfloat16()
            assert torch.equal(stored, full[tok]), tok
    try:
        unpermute_combine(y, layout.row_of_slot, weights, skip_single=True)
    except ValueError as e:
        assert "out" in str(e), e
    else:
        raise AssertionError("skip_single without out: no ValueError")


def _split_layout(counts, block_m, tail, gen, tokens):
    """A contiguous layout of `counts` rows per expert (segments padded to block_m, then `tail`
    rows of padding): (expert_ids, a_rows gathering random tokens, rows in use)."""
    ids, src = [], []
    for i, c in enumerate(counts):
        ids += [i] * c + [-1] * (-c % block_m)
        src += torch.randint(0, tokens, (c,), generator=gen).tolist() + [-1] * (-c % block_m)
    used = len(ids)
    ids += [-1] * tail
    src += [-1] * tail
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(src, dtype=torch.int64), used


def case_contiguous_split_k():
    """GEMM split over K (SPLIT_K 2, 4): each slab holds one K slice's fp32 partial sums; their
    ordered sum (reference.sum_partials) matches the fp32 reference within the GEMM bound and the
    unsplit kernel within one bf16 rounding; padding rows and the tail stay unwritten in every slab
    (poisoned), with and without a row count, with gathered A, plain, K-unrolled and SWAP_AB tiles.
    With a row count and SPLIT_MIN_UNITS the kernel cuts only the slices needed to reach that many
    units (the tiles holding rows read on the device), reports the count, and leaves the other slabs
    untouched."""
    gen = torch.Generator().manual_seed(31)
    counts, block_m, n, k, tokens = (3, 0, 20, 1), 16, 80, 512, 9
    ids, a_rows, used = _split_layout(counts, block_m, 7, gen, tokens)
    b, bs = _weights(len(counts), n, k, gen)
    x, x_s = _acts((tokens, k), gen)
    ref = reference.grouped_gemm_contiguous(x[a_rows.clamp(min=0)], x_s[a_rows.clamp(min=0)], b, bs, ids)
    valid = ids >= 0
    num_rows = torch.tensor([used], dtype=torch.int32)
    tiles = -(-used // block_m) * -(-n // 32)  # 4 m-tiles (one all padding) x 3 n-tiles
    cases = [(2, {}, 0, 2), (4, {}, 0, 4), (2, dict(K_UNROLL=2), 0, 2), (2, dict(SWAP_AB=True), 0, 2)]
    # min units -> slices cut: 12 tiles reach 13 at 2 slices, 30 at 4, 12 at 1
    cases += [(4, dict(PROGRAMS=3), 13, 2), (4, {}, 30, 4), (4, {}, tiles, 1)]
    for split, extra, min_units, cut in cases:
        cfg = _gemm_config_full(dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, **extra))
        for rows in (None, num_rows) if not min_units else (num_rows,):
            plain = torch.full((len(ids), n), float("nan"), dtype=torch.bfloat16)
            _grouped_gemm_core.launch(
                x, x_s, b, bs, plain, ids, None, masked=False, rows=len(ids), num_experts=len(counts),
                cfg=cfg, num_rows=rows, a_rows=a_rows,
            )  # fmt: skip
            parts = torch.full((split, len(ids), n), float("nan"))
            count = torch.full((1,), -5, dtype=torch.int32)
            _grouped_gemm_core.launch(
                x, x_s, b, bs, parts, ids, None, masked=False, rows=len(ids), num_experts=len(counts),
                cfg=cfg | {"SPLIT_K": split, "SPLIT_MIN_UNITS": min_units}, num_rows=rows, a_rows=a_rows,
                splits_out=count,
            )  # fmt: skip
            what = f"SPLIT_K={split} {extra} min_units={min_units} num_rows={rows is not None}"
            assert int(count) == cut, f"{what}: cut {int(count)} slices, want {cut}"
            assert parts[cut:].isnan().all(), f"{what}: slabs past the cut written"
            assert parts[:cut, ~valid].isnan().all(), f"{what}: padding rows written"
            assert torch.isfinite(parts[:cut, valid]).all(), f"{what}: valid rows not written in every slab"
            total = reference.sum_partials(parts, count)
            err = _rel(total[valid], ref[valid])
            assert err <= GEMM_RTOL, f"{what}: rel err {err:.2e}"
            # The slices' sum differs from the one-pass sum by fp32 rounding only: one bf16 step at most.
            step = plain[valid].float().abs() * 2**-7
            assert ((total[valid].float() - plain[valid].float()).abs() <= step).all(), f"{what}: off the unsplit"


def _gemm_config_full(cfg):
    from moe_backend.kernels._gemm_config import check_config

    return check_config(cfg)


def case_split_k_refused():
    """SPLIT_K where it cannot run: the masked layout, K/128 not divisible, the public bf16 op and
    values outside 1, 2, 4, 8 are refused with a ValueError naming the config."""
    gen = torch.Generator().manual_seed(32)
    b, bs = _weights(2, 32, 384, gen)
    a, a_s = _acts((2, 16, 384), gen)
    cfg = _gemm_config_full(dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2))
    calls = {
        "masked": lambda: _grouped_gemm_core.launch(
            a, a_s, b, bs, torch.empty(2, 2, 16, 32), None, torch.tensor([3, 0], dtype=torch.int32),
            masked=True, rows=16, num_experts=2, cfg=cfg | {"SPLIT_K": 2},
        ),
        "K/128 = 3 by 2": lambda: _grouped_gemm_core.launch(
            a[0], a_s[0], b, bs, torch.empty(2, 16, 32), torch.zeros(16, dtype=torch.int32), None,
            masked=False, rows=16, num_experts=2, cfg=cfg | {"SPLIT_K": 2},
        ),
        "public op": lambda: grouped_gemm_contiguous(
            a[0], a_s[0], b, bs, torch.zeros(16, dtype=torch.int32), config=dict(cfg, SPLIT_K=2)
        ),
        "SPLIT_K=3": lambda: _gemm_config_full(dict(cfg, SPLIT_K=3)),
        "no splits_out": lambda: _grouped_gemm_core.launch(
            a[0], a_s[0], b[:, :, :256], bs[:, :, :2].contiguous(), torch.empty(2, 16, 32),
            torch.zeros(16, dtype=torch.int32), None, masked=False, rows=16, num_experts=2, cfg=cfg | {"SPLIT_K": 2},
        ),
    }  # fmt: skip
    for what, call in calls.items():
        try:
            call()
        except ValueError as e:
            assert "SPLIT_K" in str(e), f"{what}: {e}"
        else:
            raise AssertionError(f"{what}: no ValueError")


def case_split_k_consumers():
    """silu_mul_quant and unpermute_combine reading K-split partial sums (partials=True) equal the
    same kernels on the bf16 sum (reference.sum_partials) bit for bit; padding rows (NaN in every
    slab) are neither read nor written, with and without a device row count; given a device slab
    count (num_partials), the slabs past it (NaN) are not read."""
    gen = torch.Generator().manual_seed(33)
    topk_ids = torch.randint(-1, 12, (13, 3), generator=gen, dtype=torch.int32)
    layout = build_layout.build_contiguous_layout(topk_ids, 6, expert_start=3, alignment=4)
    real = layout.src_token >= 0
    weights = torch.rand(13, 3, generator=gen)
    for splits, count in ((1, None), (2, None), (3, None), (4, 2), (4, 1), (2, 2)):
        num = None if count is None else torch.tensor([count], dtype=torch.int32)
        h = torch.randn(splits, layout.num_rows, 512, generator=gen) * 2
        h[:, ~real] = float("nan")
        h[count or splits :] = float("nan")  # slabs the GEMM did not cut
        for used_rows in (None, layout.expert_offsets[-1:]):
            shapes = ((layout.num_rows, 256), (layout.num_rows, 2))
            q, sc = silu_mul_quant(
                h, expert_ids=layout.expert_ids, used_rows=used_rows, out=_poisoned_quant_out(*shapes),
                partials=True, num_partials=num,
            )  # fmt: skip
            want_q, want_s = silu_mul_quant(
                reference.sum_partials(h, num), expert_ids=layout.expert_ids, used_rows=used_rows,
                out=_poisoned_quant_out(*shapes),
            )  # fmt: skip
            what = f"{splits} slabs, {count} counted"
            assert bool((q[~real].view(torch.uint8) == POISON_BYTE).all()) and bool(sc[~real].isnan().all()), what
            assert torch.equal(sc[real], want_s[real]), f"{what}: scales differ"
            assert torch.equal(q[real].float(), want_q[real].float()), f"{what}: SiLU*up quant differs"
        y = torch.randn(splits, layout.num_rows, 300, generator=gen)
        y[:, ~real] = float("nan")
        y[count or splits :] = float("nan")
        want = unpermute_combine(reference.sum_partials(y, num), layout.row_of_slot, weights)
        for branch in (False, True):
            out = unpermute_combine(
                y, layout.row_of_slot, weights, partials=True, num_partials=num, branch_on_slots=branch
            )
            assert torch.isfinite(out.float()).all(), f"{what}: a padding row or an uncut slab was read"
            assert torch.equal(out, want), f"{what}, branch {branch}: combine differs"


def case_gemm_computes_silu_a():
    """GEMM2 computing its A from GEMM1's output h (silu_a: SiLU*up and the per-128 quant per K block)
    equals silu_mul_quant followed by the GEMM bit for bit, for h in bf16 and as K-split partial sums
    (all slabs or a device count; uncut slabs NaN), plain, K-unrolled, SWAP_AB and short-K (N_LOOP)
    tiles, UE8M0 scales, with and without a row count; padding rows of h are NaN (not read into a
    stored row), padding rows and the tail of the output stay poisoned."""
    gen = torch.Generator().manual_seed(34)
    counts, block_m, n = (3, 0, 20, 1), 16, 80
    ids, _, used = _split_layout(counts, block_m, 7, gen, 1)
    valid = ids >= 0
    rows = len(ids)
    num_rows = torch.tensor([used], dtype=torch.int32)
    tiles = [({}, 512), (dict(K_UNROLL=2), 512), (dict(SWAP_AB=True), 512), (dict(N_LOOP=2), 256), ({}, 128)]
    forms = [(0, None), (2, None), (3, 2)]  # (slabs, device count)
    for (extra, k), (slabs, count), ue8m0 in zip(tiles * 2, forms * 4, (False, True) * 5):
        b, bs = _weights(len(counts), n, k, gen)
        h = torch.randn(max(slabs, 1), rows, 2 * k, generator=gen) * 3
        h[:, ~valid] = float("nan")
        h[count or max(slabs, 1) :] = float("nan")
        num = None if count is None else torch.tensor([count], dtype=torch.int32)
        h_in = h.to(torch.bfloat16)[0] if slabs == 0 else h
        h_sum = h_in if slabs == 0 else reference.sum_partials(h, num if num is not None else None)
        act, act_s = silu_mul_quant(h_sum, ue8m0=ue8m0, expert_ids=ids)
        cfg = _gemm_config_full(dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, **extra))
        for row_count in (None, num_rows):
            want = torch.full((rows, n), float("nan"), dtype=torch.bfloat16)
            _grouped_gemm_core.launch(
                act, act_s, b, bs, want, ids, None, masked=False, rows=rows, num_experts=len(counts), cfg=cfg,
                num_rows=row_count,
            )  # fmt: skip
            got = torch.full((rows, n), float("nan"), dtype=torch.bfloat16)
            a_count = num if num is not None else torch.tensor([slabs], dtype=torch.int32)
            _grouped_gemm_core.launch(
                h_in, h_in, b, bs, got, ids, None, masked=False, rows=rows, num_experts=len(counts), cfg=cfg,
                num_rows=row_count, silu_a=True, a_splits=slabs, a_count=a_count if slabs else None, ue8m0=ue8m0,
            )  # fmt: skip
            what = f"{extra} K={k} slabs={slabs} count={count} ue8m0={ue8m0} num_rows={row_count is not None}"
            assert got[~valid].isnan().all(), f"{what}: padding rows written"
            assert torch.isfinite(got[valid].float()).all(), f"{what}: valid rows not written"
            assert torch.equal(got[valid], want[valid]), f"{what}: differs from silu_mul_quant + GEMM"
    try:
        _grouped_gemm_core.launch(
            h, h, b, bs, torch.empty(rows, n), ids, None, masked=False, rows=rows, num_experts=len(counts),
            cfg=cfg, silu_a=True, a_splits=3,
        )  # fmt: skip
    except ValueError as e:
        assert "a_count" in str(e), e
    else:
        raise AssertionError("partial sums without their count: no ValueError")


@triton.jit
def _walk_visits(units_ptr, seen_ptr, taken_ptr, unit_k_blocks):
    """Counts, per unit and per program, the visits of `_walk` over *units_ptr units."""
    pid = tl.program_id(0)
    end, stride = _walk(tl.load(units_ptr), pid, tl.num_programs(0), unit_k_blocks)
    for u in range(pid, end, stride):
        tl.atomic_add(seen_ptr + u, 1)
        tl.atomic_add(taken_ptr + pid, 1)


def case_persistent_walk():
    """The GEMM's persistent walk (`_walk`): every unit taken exactly once and no program taking
    more units than the whole grid would (cdiv(units, programs)); where the grid's last of a few
    rounds would hold a few units of many K blocks, they are spread over the fewest programs that
    keep that (no sparse last round), else over the whole grid; nothing taken when no unit holds
    rows."""
    min_k_blocks, max_tail = BALANCED_WALK_MIN_K_BLOCKS.value, BALANCED_WALK_MAX_TAIL.value
    max_rounds = BALANCED_WALK_MAX_ROUNDS.value
    for k_blocks in (min_k_blocks, min_k_blocks - 1):
        for programs in (1, 3, 5, 8, max_tail + 36):
            units_cases = {0, 1, programs - 1, programs, programs + 1, 2 * programs + 1, 3 * programs - 1, 23}
            units_cases |= {programs + max_tail - 1, programs + max_tail, 2 * programs + max_tail + 7}
            units_cases |= {(max_rounds - 1) * programs + 1, max_rounds * programs + 1}
            for units in units_cases:
                seen = torch.zeros(max(units, 1), dtype=torch.int32)
                taken = torch.zeros(programs, dtype=torch.int32)
                _walk_visits[(programs,)](torch.tensor([units], dtype=torch.int32), seen, taken, k_blocks)
                what = f"{units} units of {k_blocks} K blocks over {programs} programs"
                assert bool((seen[:units] == 1).all()) and int(seen[units:].sum()) == 0, f"{what}: seen {seen.tolist()}"
                rounds = -(-units // programs)
                assert int(taken.max()) == rounds, f"{what}: shares {taken.tolist()}, expected at most {rounds}"
                last_round = units - max(rounds - 1, 0) * programs
                balanced = units and k_blocks >= min_k_blocks and rounds <= max_rounds and last_round < max_tail
                busy = -(-units // rounds) if balanced else min(units, programs)
                assert int((taken > 0).sum()) == busy, f"{what}: {int((taken > 0).sum())} busy, expected {busy}"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit(
            "run with TRITON_INTERPRET=1 (set before Triton is imported): "
            "TRITON_INTERPRET=1 python -m tests.kernels._interpret_cases [CASE ...]"
        )
    wanted = sys.argv[1:] or list(CASES)
    results = {}
    for name in wanted:
        try:
            CASES[name]()
            results[name] = None
        except Exception:  # reported per case by the test
            results[name] = traceback.format_exc(limit=4)
    print(json.dumps(results))
