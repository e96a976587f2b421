"""Tiny-shape kernel checks run under TRITON_INTERPRET=1 (CPU). Run as a script by
test_kernels_interpret.py in a subprocess, because the variable must be set before Triton and the
kernel modules are imported; prints one JSON line {case: null | "error text"}."""

from __future__ import annotations

import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from moe_backend import reference  # noqa: E402
from moe_backend.dispatch import layouts  # noqa: E402
from moe_backend.kernels.combine import unpermute_combine  # noqa: E402
from moe_backend.kernels.grouped_gemm_contiguous import CONTIGUOUS_ALIGNMENT, grouped_gemm_contiguous  # noqa: E402
from moe_backend.kernels.grouped_gemm_masked import grouped_gemm_masked  # noqa: E402
from moe_backend.kernels.per_token_group_quant import per_token_group_quant  # noqa: E402
from moe_backend.kernels.permute_quant import permute_quant  # noqa: E402
from moe_backend.kernels.silu_mul_quant import silu_mul_quant  # noqa: E402
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from quant_extremes import SUBNORMAL_ROW, check_no_overflow, extreme_rows, gate_up_pairs  # noqa: E402

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
    grouped_gemm_masked(a, a_s, b, bs, masked_m, out,
                        config=dict(BLOCK_M=16, BLOCK_N=64, N_LOOP=2, num_warps=4, num_stages=2))
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
            _check_no_overflow(*silu_mul_quant(h, 128, ue8m0), *reference.silu_mul_quant(h, 128, ue8m0),
                               normal_pairs)
            rows = extreme_rows(dtype, 128)
            normal_rows = torch.arange(len(rows)) != SUBNORMAL_ROW
            _check_no_overflow(*per_token_group_quant(rows, 128, ue8m0),
                               *quantize_fp8_per_token_group(rows, 128, ue8m0), normal_rows)
            src = torch.arange(len(rows)).flip(0)  # permute_quant shares the rounding core
            _check_no_overflow(*permute_quant(rows, src, 128, ue8m0), *layouts.permute_quant(rows, src, 128, ue8m0),
                               normal_rows.flip(0))


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


def case_bad_inputs():
    a = torch.zeros(2, 4, 200, dtype=torch.float8_e4m3fn)
    try:
        grouped_gemm_masked(a, torch.zeros(2, 4, 2), torch.zeros(2, 8, 200, dtype=torch.float8_e4m3fn),
                            torch.zeros(2, 1, 2), torch.zeros(2, dtype=torch.int32))
    except ValueError as exc:
        assert "a_fp8" in str(exc), exc
    else:
        raise AssertionError("K=200 accepted")
    a = torch.zeros(4, 128, dtype=torch.float8_e4m3fn)
    try:
        grouped_gemm_contiguous(a, torch.zeros(4, 1), torch.zeros(2, 8, 128, dtype=torch.float8_e4m3fn),
                                torch.zeros(2, 1, 1), torch.zeros(4, dtype=torch.int64))
    except TypeError as exc:
        assert "expert_ids" in str(exc), exc
    else:
        raise AssertionError("int64 expert_ids accepted")


def _check_permute_quant(x, src_token, group=128, ue8m0=False):
    q, s = permute_quant(x, src_token, group, ue8m0)
    assert q.shape == (*src_token.shape, x.shape[1]) and s.shape == (*src_token.shape, x.shape[1] // group)
    rq, rs = layouts.permute_quant(x, src_token, group, ue8m0)
    assert torch.equal(s, rs), "scales differ from the torch twin"
    # Values, not bytes: the kernel's e4m3 rounding gives +0 where torch keeps -0 (equal values).
    assert torch.equal(q.float(), rq.float()), "fp8 values differ from the torch twin"
    # Byte-exact against the unfused kernel path: same rounding code, rows copied.
    uq, us = per_token_group_quant(x, group, ue8m0)
    assert torch.equal(q.view(torch.uint8), uq.view(torch.uint8)[src_token]), "differs from quant + permute"
    assert torch.equal(s, us[src_token])


def case_permute_quant():
    gen = torch.Generator().manual_seed(7)
    t, topk, e, h = 9, 3, 5, 384
    x = torch.randn(t, h, generator=gen) * torch.logspace(-2, 2, t)[:, None]  # per-token magnitudes
    # Global ids -1..10, local experts 3..7: slots of other ranks and unrouted slots (-1) too.
    topk_ids = torch.stack([torch.randperm(12, generator=gen)[:topk] for _ in range(t)]) - 1
    contiguous = layouts.build_contiguous_layout(topk_ids, e, expert_start=3, alignment=4)
    masked = layouts.build_masked_layout(topk_ids, e, expert_start=3, max_m=t)
    assert (contiguous.expert_ids < 0).any(), "the case needs padding rows"
    assert (masked.masked_m < masked.max_m).any(), "the case needs rows past masked_m"
    assert contiguous.src_token.unique().numel() < contiguous.num_rows, "the case needs repeated tokens"
    for dtype in (torch.bfloat16, torch.float32):
        for ue8m0 in (False, True):
            for layout in (contiguous, masked):
                _check_permute_quant(x.to(dtype), layout.src_token, 128, ue8m0)
    _check_permute_quant(x.half(), torch.tensor([[8, 0, 8], [3, 3, 1]]), group=64)


def case_permute_quant_empty():
    x = torch.randn(4, 256).bfloat16()
    q, s = permute_quant(x, torch.zeros(0, dtype=torch.int64))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    q, s = permute_quant(x, torch.zeros(3, 0, dtype=torch.int64))
    assert q.shape == (3, 0, 256) and s.shape == (3, 0, 2)
    # No tokens: the layout's rows are all padding (src_token 0) and come back zero, as `permute` gives.
    q, s = permute_quant(x[:0], torch.zeros(2, 3, dtype=torch.int64))
    rq, rs = layouts.permute_quant(x[:0], torch.zeros(2, 3, dtype=torch.int64))
    assert q.shape == (2, 3, 256) and not q.float().any() and not s.any()
    assert torch.equal(s, rs) and torch.equal(q.float(), rq.float())


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    wanted = sys.argv[1:] or list(CASES)
    results = {}
    for name in wanted:
        try:
            CASES[name]()
            results[name] = None
        except Exception:  # reported per case by the test
            results[name] = traceback.format_exc(limit=4)
    print(json.dumps(results))
