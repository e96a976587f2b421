"""The Triton kernels on the GPU against `moe_backend.reference`: fresh random inputs, poisoned
(NaN-filled) outputs, real DeepSeek-V3 dimensions plus odd sizes, empty and skewed experts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from moe_backend import reference
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from moe_backend.reference import layouts

pytestmark = pytest.mark.gpu

# One table of tolerances (relative Frobenius error vs the reference).
TOL = {"gemm": 2e-3, "combine": 1e-5, "dequant": 1e-6}


def _kernels():
    from moe_backend.kernels import (
        grouped_gemm_contiguous,
        grouped_gemm_masked,
        per_token_group_quant,
        silu_mul_quant,
        unpermute_combine,
    )

    return unpermute_combine, grouped_gemm_contiguous, grouped_gemm_masked, per_token_group_quant, silu_mul_quant


def _rel(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _weights(e, n, k):
    return quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda") * 0.05)


def _acts(shape):
    return quantize_fp8_per_token_group(torch.randn(*shape, device="cuda"))


def _zipf_counts(num_experts: int, total: int, exponent: float) -> tuple:
    """Skewed routing: rows proportional to 1 / rank^exponent over a fixed permutation of the
    experts (a hot expert several times the mean, a tail of idle ones)."""
    ranks = torch.randperm(num_experts, generator=torch.Generator().manual_seed(0)).double() + 1
    p = ranks.pow(-exponent)
    return tuple((p / p.sum() * total).floor().long().tolist())


@dataclass(frozen=True)
class GemmCase:
    name: str
    n: int
    k: int
    counts: tuple  # rows per expert
    max_m: int | None = None  # masked only; default max(counts)
    config: dict | None = None


GEMM_CASES = [
    GemmCase("ds_w13_decode", 4096, 7168, (0, 1, 4, 16, 3, 0, 7, 2)),
    GemmCase("ds_w2_decode", 7168, 2048, (1, 0, 5, 9)),
    GemmCase("tp8_w2_k256", 7168, 256, (3, 0, 1, 64)),
    GemmCase("odd_nk", 200, 384, (0, 1, 130, 17, 33), max_m=160),
    GemmCase("odd_727x577", 577, 896, (727, 0, 1)),
    GemmCase("one_expert", 512, 1024, (0, 0, 300, 0)),
    GemmCase(
        "swap_ab",
        320,
        512,
        (0, 1, 16, 5),
        config=dict(BLOCK_M=16, BLOCK_N=128, SWAP_AB=True, num_warps=4, num_stages=4),
    ),
    GemmCase("wide_n", 400, 512, (40, 0, 1, 70), config=dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3)),
    GemmCase(
        "k_unroll",
        640,
        2048,
        (0, 1, 70, 16),
        config=dict(BLOCK_M=64, BLOCK_N=128, K_UNROLL=2, num_warps=4, num_stages=3),
    ),
    GemmCase(
        "k_unroll_odd_kb",
        256,
        384,
        (5, 0, 1, 33),
        config=dict(BLOCK_M=32, BLOCK_N=64, K_UNROLL=2, SWAP_AB=True, num_warps=4, num_stages=2),
    ),
    GemmCase(
        "n_loop_k256",
        7168,
        256,
        (0, 1, 64, 17),
        config=dict(BLOCK_M=64, BLOCK_N=128, N_LOOP=8, num_warps=4, num_stages=3),
    ),
    GemmCase(
        "n_loop_k128_ragged_n",
        1000,
        128,
        (3, 0, 130, 1),
        config=dict(BLOCK_M=128, BLOCK_N=256, N_LOOP=4, num_warps=8, num_stages=2),
    ),
    GemmCase(
        "k_unroll4",
        384,
        1024,
        (0, 1, 100, 64),
        config=dict(BLOCK_M=64, BLOCK_N=128, K_UNROLL=4, num_warps=4, num_stages=2),
    ),
    GemmCase(
        "big_tiles",
        1024,
        2048,
        (300, 129, 0, 1),
        config=dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
    ),
    # TMA loads: tiles past an expert's rows read the next expert's (or zero-filled) rows.
    GemmCase(
        "tma_ragged",
        1000,
        2048,
        (300, 129, 0, 1),
        max_m=320,
        config=dict(BLOCK_M=128, BLOCK_N=128, K_UNROLL=2, TMA=True, num_warps=8, num_stages=3),
    ),
    GemmCase(
        "tma_swap_wide",
        577,
        896,
        (0, 1, 70, 64),
        config=dict(BLOCK_M=64, BLOCK_N=256, SWAP_AB=True, TMA=True, num_warps=8, num_stages=3),
    ),
    GemmCase(
        "tma_small_m",
        7168,
        256,
        (3, 0, 1, 16),
        config=dict(BLOCK_M=16, BLOCK_N=128, TMA=True, num_warps=4, num_stages=3),
    ),
    # Imbalanced routing on a layout sized for the worst case (the persistent walk, default grid).
    GemmCase("zipf_tp8_w2_max_m_1024", 7168, 256, _zipf_counts(256, 256 * 16, 1.1), max_m=1024),
    GemmCase("zipf_tp8_w13_max_m_512", 512, 7168, _zipf_counts(256, 256 * 4, 0.8), max_m=512),
    GemmCase("hot_expert_ep8_w13", 4096, 7168, (600, 0, 3, 1, 0, 20, 2, 0), max_m=1024),
    GemmCase(
        "hot_expert_tma",
        1000,
        2048,
        (0, 700, 1, 0, 129),
        max_m=768,
        config=dict(BLOCK_M=64, BLOCK_N=128, TMA=True, num_warps=4, num_stages=4),
    ),
    GemmCase(
        "hot_expert_n_loop",
        7168,
        256,
        (1, 0, 500, 16),
        max_m=1024,
        config=dict(BLOCK_M=64, BLOCK_N=128, N_LOOP=8, num_warps=4, num_stages=2),
    ),
    # m-tiles of at most 16 rows run 16 wide, the others 32 or 64 wide (the contiguous test runs
    # these cases without NARROW_M, which only the masked walk reads)
    GemmCase(
        "narrow_m_swap",
        4096,
        7168,
        _zipf_counts(32, 32 * 16, 0.9),
        max_m=256,
        config=dict(BLOCK_M=32, BLOCK_N=128, SWAP_AB=True, K_UNROLL=1, NARROW_M=16, num_warps=4, num_stages=4),
    ),
    GemmCase(
        "narrow_m_wide",
        7168,
        2048,
        (0, 1, 16, 17, 33, 49, 70, 200),
        max_m=256,
        config=dict(BLOCK_M=64, BLOCK_N=128, NARROW_M=16, num_warps=4, num_stages=3),
    ),
    GemmCase(
        "one_program",
        640,
        1024,
        (5, 0, 90, 1),
        max_m=256,
        config=dict(BLOCK_M=16, BLOCK_N=64, SWAP_AB=True, num_warps=4, num_stages=3, PROGRAMS=1),
    ),
]


@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: c.name)
def test_grouped_gemm_masked(case: GemmCase) -> None:
    _, _, masked_mod, _, _ = _kernels()
    e = len(case.counts)
    max_m = case.max_m or max(max(case.counts), 1)
    b, bs = _weights(e, case.n, case.k)
    a, a_s = _acts((e, max_m, case.k))
    masked_m = torch.tensor(case.counts, dtype=torch.int32, device="cuda")
    out = torch.full((e, max_m, case.n), float("nan"), dtype=torch.bfloat16, device="cuda")
    masked_mod.grouped_gemm_masked(a, a_s, b, bs, masked_m, out, config=case.config)
    ref = reference.grouped_gemm_masked(a, a_s, b, bs, masked_m)
    for i, m in enumerate(case.counts):
        assert torch.isnan(out[i, m:]).all(), f"expert {i}: rows past masked_m were written"
        assert torch.isfinite(out[i, :m]).all(), f"expert {i}: valid rows left unwritten"
    if sum(case.counts):
        valid = torch.cat([out[i, :m] for i, m in enumerate(case.counts)])
        valid_ref = torch.cat([ref[i, :m] for i, m in enumerate(case.counts)])
        assert _rel(valid, valid_ref) <= TOL["gemm"]


@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: c.name)
def test_grouped_gemm_contiguous(case: GemmCase) -> None:
    _, contig_mod, _, _, _ = _kernels()
    align = contig_mod.CONTIGUOUS_ALIGNMENT
    e = len(case.counts)
    ids = []
    for i, c in enumerate(case.counts):
        ids += [i] * c + [-1] * (-c % align)
    ids += [-1] * align  # a trailing all-padding segment, as the graph-safe builder leaves
    expert_ids = torch.tensor(ids, dtype=torch.int32, device="cuda")
    b, bs = _weights(e, case.n, case.k)
    a, a_s = _acts((len(ids), case.k))
    out = torch.full((len(ids), case.n), float("nan"), dtype=torch.bfloat16, device="cuda")
    cfg = case.config if case.config is None or case.config["BLOCK_M"] <= align else None
    if cfg is not None:
        cfg = {key: value for key, value in cfg.items() if key != "NARROW_M"}
    contig_mod.grouped_gemm_contiguous(a, a_s, b, bs, expert_ids, out, config=cfg)
    ref = reference.grouped_gemm_contiguous(a, a_s, b, bs, expert_ids)
    pad = expert_ids < 0
    assert torch.isnan(out[pad]).all(), "padding rows were written"
    assert torch.isfinite(out[~pad]).all(), "valid rows left unwritten"
    if (~pad).any():
        assert _rel(out[~pad], ref[~pad]) <= TOL["gemm"]


def test_masked_walk_under_graph_large_max_m() -> None:
    """One capture at max_m 512 replayed with all-idle, one-hot-expert (every row of the layout)
    and skewed counts: the walk is rebuilt from masked_m on the device at every replay."""
    _, _, masked_mod, _, _ = _kernels()
    e, max_m, n, k = 16, 512, 1024, 512
    b, bs = _weights(e, n, k)
    a, a_s = _acts((e, max_m, k))
    masked_m = torch.zeros(e, dtype=torch.int32, device="cuda")
    out = torch.empty((e, max_m, n), dtype=torch.bfloat16, device="cuda")
    masked_mod.grouped_gemm_masked(a, a_s, b, bs, masked_m, out, expected_m=16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        masked_mod.grouped_gemm_masked(a, a_s, b, bs, masked_m, out, expected_m=16)
    for counts in ([0] * e, [0] * 5 + [max_m] + [0] * 10, list(_zipf_counts(e, 300, 1.0))):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        ref = reference.grouped_gemm_masked(a, a_s, b, bs, masked_m)
        for i, m in enumerate(counts):
            assert torch.isnan(out[i, m:]).all(), f"{counts}: expert {i} rows past masked_m written"
            assert torch.isfinite(out[i, :m]).all(), f"{counts}: expert {i} rows left unwritten"
            if m:
                assert _rel(out[i, :m], ref[i, :m]) <= TOL["gemm"], f"{counts}: expert {i}"


def test_contiguous_num_rows_under_graph() -> None:
    """A contiguous layout on a static row bound (segments padded to 16 rows): the rows in use
    come from the device (`num_rows`), the stale ids past them are never visited."""
    _, contig_mod, _, _, _ = _kernels()
    e, n, k, block_m, bound = 32, 7168, 256, 16, 2048
    b, bs = _weights(e, n, k)
    a, a_s = _acts((bound, k))
    expert_ids = torch.zeros(bound, dtype=torch.int32, device="cuda")
    num_rows = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty((bound, n), dtype=torch.bfloat16, device="cuda")
    cfg = dict(BLOCK_M=16, BLOCK_N=128, SWAP_AB=True, num_warps=4, num_stages=3)
    call = lambda: contig_mod.grouped_gemm_contiguous(
        a,
        a_s,
        b,
        bs,
        expert_ids,
        out,
        config=cfg,  # noqa: E731
        num_rows=num_rows,
    )
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for counts in ((0,) * e, _zipf_counts(e, 500, 1.2), (3,) * e):
        ids = []
        for i, c in enumerate(counts):
            ids += [i] * c + [-1] * (-c % block_m)
        used = len(ids)
        stale = torch.arange(bound - used, dtype=torch.int32) % e  # ids a previous batch left
        expert_ids.copy_(torch.cat([torch.tensor(ids, dtype=torch.int32), stale]))
        num_rows.fill_(used)
        out.fill_(float("nan"))
        graph.replay()
        assert torch.isnan(out[used:]).all(), f"{counts}: rows past num_rows written"
        live = torch.arange(bound, device="cuda") < used
        ref = reference.grouped_gemm_contiguous(a, a_s, b, bs, torch.where(live, expert_ids, -1))
        valid = live & (expert_ids >= 0)
        assert torch.isnan(out[live & ~valid]).all(), f"{counts}: padding rows written"
        assert torch.isfinite(out[valid]).all(), f"{counts}: valid rows left unwritten"
        if valid.any():
            assert _rel(out[valid], ref[valid]) <= TOL["gemm"]


def test_masked_cuda_graph_replay() -> None:
    """Captured once, replayed with new masked_m values and new activations: no host sync inside."""
    _, _, masked_mod, _, _ = _kernels()
    e, max_m, n, k = 8, 64, 512, 1024
    b, bs = _weights(e, n, k)
    a, a_s = _acts((e, max_m, k))
    masked_m = torch.full((e,), max_m, dtype=torch.int32, device="cuda")
    out = torch.empty((e, max_m, n), dtype=torch.bfloat16, device="cuda")
    masked_mod.grouped_gemm_masked(a, a_s, b, bs, masked_m, out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        masked_mod.grouped_gemm_masked(a, a_s, b, bs, masked_m, out)
    for counts in ([0, 1, 64, 3, 17, 0, 40, 2], [5] * 8):
        new_a, new_s = _acts((e, max_m, k))
        a.copy_(new_a)
        a_s.copy_(new_s)
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        ref = reference.grouped_gemm_masked(a, a_s, b, bs, masked_m)
        for i, m in enumerate(counts):
            assert torch.isnan(out[i, m:]).all()
        valid = torch.cat([out[i, :m] for i, m in enumerate(counts)])
        valid_ref = torch.cat([ref[i, :m] for i, m in enumerate(counts)])
        assert _rel(valid, valid_ref) <= TOL["gemm"]


def _assert_quant_equal(got, want, *, scale_rtol: float = 0.0, max_mismatch: float = 0.0) -> None:
    (q, s), (rq, rs) = got, want
    assert torch.allclose(s, rs, rtol=scale_rtol, atol=0), f"scales differ: max {float((s - rs).abs().max()):.3g}"
    if not q.numel():
        return
    mismatch = (q.float() != rq.float()).float().mean().item()
    assert mismatch <= max_mismatch, f"{mismatch:.2e} of the fp8 values differ"


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(1, 7168), (37, 2048), (3, 5, 384), (0, 256)])
def test_per_token_group_quant(shape, ue8m0) -> None:
    *_, ptgq, _ = _kernels()
    x = (torch.randn(*shape, device="cuda") * 3).bfloat16()
    if x.numel():
        x.view(-1, shape[-1])[0, :128] = 0  # the 1e-10 scale floor
    _assert_quant_equal(ptgq.per_token_group_quant(x, 128, ue8m0), quantize_fp8_per_token_group(x, 128, ue8m0))


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(1, 4096), (129, 512), (4, 16, 4096), (0, 512)])
def test_silu_mul_quant(shape, ue8m0) -> None:
    *_, smq = _kernels()
    h = (torch.randn(*shape, device="cuda") * 4).bfloat16()
    # The GPU's exp differs from torch's sigmoid by an ulp: scales within 1e-6, and a value sitting
    # on an fp8 rounding boundary may round the other way (a step of 2^-3 relative, rare).
    _assert_quant_equal(
        smq.silu_mul_quant(h, 128, ue8m0), reference.silu_mul_quant(h, 128, ue8m0), scale_rtol=1e-6, max_mismatch=1e-3
    )


@pytest.mark.parametrize("num_tokens,topk,experts,n", [(1, 8, 32, 7168), (100, 8, 256, 7168), (7, 3, 5, 300)])
def test_unpermute_combine(num_tokens, topk, experts, n) -> None:
    combine_mod, *_ = _kernels()
    topk_ids = torch.stack([torch.randperm(experts + 4)[:topk] for _ in range(num_tokens)]).cuda() - 2
    weights = torch.rand(num_tokens, topk, device="cuda")
    layout = layouts.build_masked_layout(topk_ids, experts, max_m=num_tokens)
    y = torch.randn(experts, num_tokens, n, device="cuda").bfloat16()
    for i, m in enumerate(layout.masked_m.tolist()):
        y[i, m:] = float("nan")  # rows the GEMM never wrote must never be read
    out = combine_mod.unpermute_combine(y, layout.row_of_slot, weights)
    ref = layouts.combine(y, layout, weights)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= TOL["combine"] or (out != ref).float().mean() < 1e-3
    # the plans' other form (absent slots skipped by a branch, under expert parallelism): same bytes
    assert torch.equal(combine_mod.unpermute_combine(y, layout.row_of_slot, weights, branch_on_slots=True), out)
    # an absent slot's weight (NaN here) is not part of the sum in either form
    nan_weights = torch.where(layout.row_of_slot < 0, float("nan"), weights)
    for branch in (False, True):
        assert torch.equal(
            combine_mod.unpermute_combine(y, layout.row_of_slot, nan_weights, branch_on_slots=branch), out
        )


def test_bad_inputs() -> None:
    combine_mod, contig_mod, masked_mod, ptgq, smq = _kernels()
    f8 = torch.float8_e4m3fn
    a = torch.zeros(2, 4, 256, dtype=f8, device="cuda")
    b = torch.zeros(2, 8, 256, dtype=f8, device="cuda")
    ok = dict(
        a_scale=torch.ones(2, 4, 2, device="cuda"),
        b_scale=torch.ones(2, 1, 2, device="cuda"),
        masked_m=torch.zeros(2, dtype=torch.int32, device="cuda"),
    )
    with pytest.raises(ValueError, match="masked_m"):
        masked_mod.grouped_gemm_masked(a, ok["a_scale"], b, ok["b_scale"], ok["masked_m"][:1])
    with pytest.raises(TypeError, match="a_scale"):
        masked_mod.grouped_gemm_masked(a, ok["a_scale"].half(), b, ok["b_scale"], ok["masked_m"])
    with pytest.raises(ValueError, match="b_fp8"):
        masked_mod.grouped_gemm_masked(a, ok["a_scale"], b[:, :, :128], ok["b_scale"], ok["masked_m"])
    with pytest.raises(ValueError, match="a_fp8"):
        masked_mod.grouped_gemm_masked(a.cpu(), ok["a_scale"], b, ok["b_scale"], ok["masked_m"])
    with pytest.raises(ValueError, match="a_fp8"):
        contig_mod.grouped_gemm_contiguous(
            a[0, :, :200], ok["a_scale"][0], b, ok["b_scale"], torch.zeros(4, dtype=torch.int32, device="cuda")
        )
    with pytest.raises(ValueError, match="out"):
        contig_mod.grouped_gemm_contiguous(
            a[0],
            ok["a_scale"][0],
            b,
            ok["b_scale"],
            torch.zeros(4, dtype=torch.int32, device="cuda"),
            torch.empty(4, 9, dtype=torch.bfloat16, device="cuda"),
        )
    with pytest.raises(ValueError, match="h"):
        smq.silu_mul_quant(torch.zeros(3, 300, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(TypeError, match="x"):
        ptgq.per_token_group_quant(torch.zeros(3, 256, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="topk_weights"):
        combine_mod.unpermute_combine(
            torch.zeros(4, 8, dtype=torch.bfloat16, device="cuda"),
            torch.zeros(2, 2, dtype=torch.int64, device="cuda"),
            torch.zeros(2, 3, device="cuda"),
        )


def test_split_k_pipeline_at_few_tokens() -> None:
    """Decode at 1-3 tokens with few active experts: the plan lets both GEMMs split K (f32 partial
    sums added by SiLU*up quant and by the combine, the slices cut on the device from the tiles
    holding rows); the routed output matches the reference and the unsplit plan, and is the same
    bit for bit with GEMM2 computing SiLU*up quant itself (`Plan.silu_in_gemm2`) or not, eagerly and
    as a CUDA graph replayed with new routing (other local-slot counts, so other cuts)."""
    import dataclasses

    from moe_backend.dispatch import Policy
    from moe_backend.dispatch.plan import make_plan
    from moe_backend.plan_execution import run_plan

    # K = 3584 (28 blocks) cut in up to 4 slices, K = 2048 (16 blocks) in up to 2.
    e, e_global, hidden, inter, topk = 16, 128, 3584, 2048, 8
    w13, w13_s = _weights(e, 2 * inter, hidden)
    w2, w2_s = _weights(e, hidden, inter)

    def unsplit(g):
        return dataclasses.replace(g, config=tuple(sorted((dict(g.config) | {"SPLIT_K": 1}).items())))

    def routing(tokens, seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        scores = torch.rand(tokens, e_global, device="cuda", generator=gen)
        scores[:, :e] += 0.5 * torch.rand(tokens, e, device="cuda", generator=gen)  # some local slots
        w, ids = scores.topk(topk, dim=-1)
        return (w / w.sum(-1, keepdim=True)).float(), ids

    for tokens in (1, 2, 3):
        plan = make_plan(
            Policy(), num_tokens=tokens, topk=topk, num_experts=e, num_global_experts=e_global, hidden=hidden,
            intermediate=inter, device=torch.device("cuda"), phase="decode", kernel="triton",
        )  # fmt: skip
        assert plan.gemm1.split_k > 1 and plan.gemm2.split_k > 1, plan.describe()
        flat = dataclasses.replace(plan, gemm1=unsplit(plan.gemm1), gemm2=unsplit(plan.gemm2), graph_plan=None)
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        w, ids = routing(tokens, tokens)
        args = (x, None, w13, w13_s, w2, w2_s, w, ids, 0, False)
        out = run_plan(plan, *args)
        ref = reference.routed_experts(x, w13, w13_s, w2, w2_s, w, torch.where(ids < e, ids, -1))
        assert _rel(out, ref) <= 1e-2, tokens
        assert _rel(out, run_plan(flat, *args)) <= 1e-2, tokens
        # GEMM2 computing SiLU*up quant from the partial sums itself or the kernel between: same bits.
        other = dataclasses.replace(plan, silu_in_gemm2=not plan.silu_in_gemm2, graph_plan=None)
        assert torch.equal(out, run_plan(other, *args))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = run_plan(plan, *args)
        for seed in (10, 11, 12):
            new_w, new_ids = routing(tokens, seed)
            w.copy_(new_w)
            ids.copy_(new_ids)
            x.copy_(torch.randn_like(x))
            graph.replay()
            ref = reference.routed_experts(x, w13, w13_s, w2, w2_s, w, torch.where(ids < e, ids, -1))
            assert _rel(replayed, ref) <= 1e-2, (tokens, seed)


@pytest.mark.parametrize("kernel,tokens", [("triton", 1), ("triton", 3), ("triton", 40), ("triton_masked", 8)])
def test_dependent_launches_give_the_same_bits(kernel, tokens) -> None:
    """Decode plans launch their kernels as dependents of each other (`Plan.dependent_launch`): the
    output equals the same plan launched normally bit for bit, eagerly and from a CUDA graph
    replayed 20 times with new routing and tokens (a kernel reading before its predecessor finished
    would differ on some replay)."""
    import dataclasses

    from moe_backend.dispatch import Policy
    from moe_backend.dispatch.plan import make_plan
    from tests.helpers.plan_replays import assert_same_bits_over_replays

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    e, e_global, hidden, inter, topk = 32, 256, 1024, 256, 8
    w13, w13_s = _weights(e, 2 * inter, hidden)
    w2, w2_s = _weights(e, hidden, inter)
    plan = make_plan(
        Policy(), num_tokens=tokens, topk=topk, num_experts=e, num_global_experts=e_global, hidden=hidden,
        intermediate=inter, device=torch.device("cuda"), phase="decode", kernel=kernel,
    )  # fmt: skip
    assert plan.dependent_launch, plan.describe()
    plain = dataclasses.replace(plan, dependent_launch=False, graph_plan=None)

    def routing(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        scores = torch.rand(tokens, e_global, device="cuda", generator=gen)
        scores[:, :e] += 0.3 * torch.rand(tokens, e, device="cuda", generator=gen)  # local slots
        w, ids = scores.topk(topk, dim=-1)
        return (w / w.sum(-1, keepdim=True)).float(), ids

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)

    def close_to_reference(out, w, ids):
        assert _rel(out, reference.routed_experts(x, w13, w13_s, w2, w2_s, w, torch.where(ids < e, ids, -1))) <= 1e-2

    assert_same_bits_over_replays(plan, plain, (w13, w13_s, w2, w2_s), x, routing, 20, close_to_reference)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_gemm2_computing_its_activations_equals_the_kernel_pair(ue8m0) -> None:
    """The Triton GEMM computing its A from GEMM1's output h (SiLU*up and the per-128 quant per K
    block, `silu_a`) equals silu_mul_quant followed by the GEMM bit for bit, at both slices' GEMM2
    shapes (K = 2048; K = 256 with plain and short-K tiles), h bf16 and as K-split partial sums with
    a device count, decode tiles plain and SWAP_AB; padding rows (NaN in h) stay unwritten."""
    from moe_backend.kernels import _grouped_gemm_core
    from moe_backend.kernels._gemm_config import check_config
    from moe_backend.kernels.silu_mul_quant import silu_mul_quant

    counts, block_m, e, n = (1, 0, 3, 1, 17), 64, 5, 7168  # segments padded to the largest BLOCK_M
    ids = torch.tensor(sum(([i] * c + [-1] * (-c % block_m) for i, c in enumerate(counts)), []), dtype=torch.int32)
    ids = torch.cat([ids, torch.full((40,), -1, dtype=torch.int32)]).cuda()  # a static bound's tail
    rows, valid = ids.numel(), ids >= 0
    used = torch.tensor([int(valid.nonzero().max()) + 1], dtype=torch.int32, device="cuda")
    configs = {
        2048: [dict(BLOCK_M=16, BLOCK_N=128), dict(BLOCK_M=16, BLOCK_N=64, SWAP_AB=True, K_UNROLL=2)],
        256: [dict(BLOCK_M=16, BLOCK_N=128), dict(BLOCK_M=64, BLOCK_N=128, N_LOOP=8)],
    }
    for k, cfgs in configs.items():
        b, bs = _weights(e, n, k)
        for slabs in (0, 4):
            h = torch.randn(max(slabs, 1), rows, 2 * k, device="cuda") * 2
            h[:, ~valid] = float("nan")
            count = torch.tensor([3], dtype=torch.int32, device="cuda")
            h_in = h[0].to(torch.bfloat16) if slabs == 0 else h
            h_sum = h_in if slabs == 0 else reference.sum_partials(h, count)
            act, act_s = silu_mul_quant(h_sum, ue8m0=ue8m0, expert_ids=ids)
            for extra in cfgs:
                cfg = check_config(dict(num_warps=4, num_stages=3, **extra))
                common = dict(masked=False, rows=rows, num_experts=e, cfg=cfg, num_rows=used)
                want = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                _grouped_gemm_core.launch(act, act_s, b, bs, want, ids, None, **common)
                got = torch.full_like(want, float("nan"))
                _grouped_gemm_core.launch(
                    h_in, h_in, b, bs, got, ids, None, silu_a=True, a_splits=slabs,
                    a_count=count if slabs else None, ue8m0=ue8m0, **common,
                )  # fmt: skip
                what = (k, slabs, extra)
                assert got[~valid].isnan().all(), what
                assert torch.isfinite(got[valid].float()).all(), what
                assert torch.equal(got[valid], want[valid]), what
