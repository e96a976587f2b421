"""The CUDA C++ contiguous grouped GEMM on a Hopper GPU against `moe_backend.reference`: fresh
random inputs, NaN-poisoned outputs (padding rows must stay NaN, real rows must be written),
DeepSeek-V3 shapes (K = 2048 / 7168), 1 and 256 experts, segments that are not multiples of the
tile, empty experts, every N tile and CTA pairing a config can name, and a µs / TFLOPS line for the EP8 cells.

First run on a new build: MOE_BACKEND_JIT_DEBUG=1 turns a pipeline hang into a trap after 5 s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from moe_backend import reference
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from tests.helpers.spread_weights import block_spread_weights

pytestmark = pytest.mark.gpu

# Relative Frobenius error vs the reference (fp32 from dequantized operands, bf16 out): bf16
# output rounding (~1e-3 norm-wise) plus the tensor core's fp8 accumulation inside a 128-K block.
# SiLU*up quant epilogue vs the separate kernel on the same bf16 gate/up: the epilogue's fast exp and
# division move a product by ~1e-7 relative, so a scale may differ in its last bits and an e4m3
# value on a rounding tie may flip (one e4m3 step is 6%; a handful per tile stays far below 1e-3).
TOL = {"gemm": 2e-3, "silu_scale": 1e-5, "silu_act": 1e-3}
ALIGN = 128


def _ggc():
    from moe_backend.cuda import grouped_gemm_contiguous as ggc

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUDA grouped GEMM is built for sm_90a (Hopper)")
    return ggc


def _rel(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _layout(counts, trailing_pad: int = ALIGN, pad_last: bool = True) -> torch.Tensor:
    """expert ids: segment e = counts[e] rows of e, padded with -1 to a multiple of 128."""
    ids = []
    for e, c in enumerate(counts):
        ids += [e] * c
        if pad_last or e < len(counts) - 1:
            ids += [-1] * (-c % ALIGN)
    ids += [-1] * trailing_pad
    return torch.tensor(ids, dtype=torch.int32, device="cuda")


def _operands(counts, n, k, spread_blocks: bool = False, **layout):
    expert_ids = _layout(counts, **layout)
    if spread_blocks:
        weights = block_spread_weights(len(counts), n, k)
    else:
        weights = torch.randn(len(counts), n, k, device="cuda") * 0.05
    b, b_scale = quantize_fp8_blockwise(weights)
    a, a_scale = quantize_fp8_per_token_group(torch.randn(expert_ids.numel(), k, device="cuda"))
    return a, a_scale, b, b_scale, expert_ids


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    k: int
    counts: tuple  # real rows per expert (each segment padded to 128)
    block_n: int | None = None  # force a config with this N tile (None: the heuristic)
    trailing_pad: int = ALIGN
    pad_last: bool = True  # False: M ends mid-tile (TMA zero-fills rows past M)
    cluster: int = 1  # with block_n: CTA pairs (2) or single CTAs (1)
    multicast: str = "b"  # with cluster 2: the operand the pair shares
    group_m: int = 8  # with block_n: M units walked together (1: M-unit-major)
    spread_blocks: bool = False  # B from block_spread_weights (block scales far apart)
    skip_halves: bool = False  # with block_n: warpgroups skip the MMAs of their all-padding halves
    split_halves: bool = False  # ... and split a tile whose rows lie in its first half by N (256 wide)
    num_stages: int = 0  # with block_n: the ring's depth (0: as many as fit)


def _skewed(num_experts: int, total: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(num_experts, generator=g) ** 3
    counts = (w / w.sum() * total).floor().long()
    counts[torch.randperm(num_experts, generator=g)[: num_experts // 8]] = 0  # empty experts
    return tuple(counts.tolist())


CASES = [
    Case("one_expert_w13", 4096, 7168, (300,)),
    Case("one_expert_exact_tiles", 7168, 2048, (512,)),
    Case("ep8_w13_ragged", 4096, 7168, _skewed(32, 32 * 96, 0)),
    Case("ep8_w2_ragged", 7168, 2048, _skewed(32, 32 * 96, 1)),
    Case("tp8_w13_256_experts", 512, 7168, _skewed(256, 256 * 24, 2)),
    Case("tp8_w2_256_experts_k256", 7168, 256, _skewed(256, 256 * 24, 3)),
    Case("m_ends_mid_tile", 1024, 2048, (130, 0, 77), pad_last=False, trailing_pad=0),
    Case("odd_n", 1001, 384, (5, 129, 0, 1)),
    Case("n_below_tile", 48, 256, (3, 200)),
    Case("all_padding", 256, 256, (0, 0), trailing_pad=3 * ALIGN),
    # a_scale chunks of 4 K blocks (K/128 = 4 and 12: one 16-byte copy per row and chunk)
    Case("scale_chunks_of_4_k512", 1024, 512, (257, 0, 128, 31)),
    Case("scale_chunks_of_4_k1536_pairs", 4096, 1536, _skewed(16, 16 * 96, 4)),
    # every N tile alone and in pairs sharing B: (0,1) one expert (B multicast), (2,3) two experts
    # (own loads), (4,5) a live tile beside a padding tile (the dead half stores nothing); odd and
    # even K-block counts, ragged N
    *[
        Case(f"block_n_{bn}_cluster{cl}_n{n}_k{k}", n, k, (257, 0, 128, 31), block_n=bn, cluster=cl)
        for bn in (64, 128, 192, 256)
        for cl in (1, 2)
        for n, k in ((7168, 2048), (1000, 384))
    ],
    # 192-wide tiles: odd N tiles start 64 columns into a scale block, so a tile's columns take
    # the scales of two blocks, split at column 128 or 64; N not a multiple of 192 (a partial last
    # tile); B's block scales far apart
    *[
        Case(f"block_n_192_{name}_n{n}", n, k, counts, block_n=192, cluster=cl, spread_blocks=True)
        for name, n, k, counts, cl in (
            ("ep8_w13_pairs", 4096, 7168, _skewed(32, 32 * 96, 9), 2),
            ("ep8_w2_single", 7168, 2048, (257, 0, 128, 31), 1),
            ("odd_n", 1001, 384, (5, 129, 0, 1), 1),
        )
    ],
    Case("block_n_192_share_a", 7168, 2048, (257, 0, 128, 31), block_n=192, cluster=2, multicast="a", group_m=1),
    # the H100's TP8 w2 config: 192-wide pairs sharing B, a 3-stage ring, each pair walking its own
    # M tiles (2 K blocks per tile, so a tile's stages wrap the ring at a different slot each time)
    Case(
        "block_n_192_k256_pairs_3_stages_m_major",
        7168,
        256,
        _skewed(256, 256 * 24, 15),
        block_n=192,
        cluster=2,
        group_m=1,
        num_stages=3,
        spread_blocks=True,
    ),
    Case("block_n_256_k7168_ep8_ragged_single", 4096, 7168, _skewed(32, 32 * 96, 0), block_n=256),
    *[
        Case(
            f"block_n_{bn}_pairs_m_ends_mid_tile",
            1024,
            2048,
            (130, 0, 77),
            block_n=bn,
            cluster=2,
            pad_last=False,
            trailing_pad=0,
        )
        for bn in (128, 192, 256)
    ],
    # the pair's own M tiles only (group_m = the cluster, the TP8 choice) and M-unit-major single CTAs
    Case("group_m_2_pairs_k256", 7168, 256, _skewed(64, 64 * 40, 6), block_n=128, cluster=2, group_m=2),
    Case("group_m_1_single", 512, 7168, _skewed(64, 64 * 40, 7), block_n=64, group_m=1),
    # CTA pairs on N tiles 2j, 2j+1 sharing A: an odd N-tile count (1001 / 128 -> 8 with a ragged
    # last tile, 384 / 128 -> 3: the last pair's second CTA is past N), padding tiles, M ending mid-tile
    *[
        Case(f"share_a_block_n_{bn}_n{n}", n, k, (257, 0, 128, 31), block_n=bn, cluster=2, multicast="a", group_m=1)
        for bn, n, k in ((128, 7168, 2048), (128, 1001, 384), (128, 384, 256), (64, 512, 7168))
    ],
    # segments ending at either side of a tile's row 64 (where the two consumer warpgroups'
    # halves meet): single CTAs, pairs sharing B, pairs sharing A
    *[
        Case(f"half_tiles_{name}", 1024, 2048, (64, 65, 63, 192, 193, 1, 0, 128), **kw)
        for name, kw in (
            ("single", dict(block_n=128)),
            ("pairs_b", dict(block_n=128, cluster=2)),
            ("pairs_a", dict(block_n=128, cluster=2, multicast="a", group_m=1)),
        )
    ],
    # warpgroups skipping their all-padding halves: segments ending either side of row 64, M
    # ending inside a tile's first half, ragged EP8 counts; single CTAs and both pairings
    *[
        Case(f"skip_halves_{name}", 1024, 2048, (64, 65, 63, 192, 193, 1, 0, 128), skip_halves=True, **kw)
        for name, kw in (
            ("single", dict(block_n=128)),
            ("pairs_b", dict(block_n=256, cluster=2)),
            ("pairs_a", dict(block_n=128, cluster=2, multicast="a", group_m=1)),
        )
    ],
    Case(
        "skip_halves_m_ends_in_first_half",
        1024,
        2048,
        (130, 0, 33),
        block_n=128,
        cluster=2,
        pad_last=False,
        trailing_pad=0,
        skip_halves=True,
    ),
    Case("skip_halves_ep8_w13_ragged", 4096, 7168, _skewed(32, 32 * 96, 0), block_n=256, cluster=2, skip_halves=True),
    # ... and split by N between the warpgroups (256-wide tiles): single CTAs, both pairings, N not
    # a multiple of the tile (the second part of the last tile past N), M ending in a first half
    *[
        Case(
            f"split_halves_{name}",
            n,
            2048,
            (64, 65, 63, 192, 193, 1, 0, 128),
            skip_halves=True,
            split_halves=True,
            **kw,
        )  # fmt: skip
        for name, n, kw in (
            ("single", 1024, dict(block_n=256)),
            ("pairs_b", 1024, dict(block_n=256, cluster=2)),
            ("pairs_a", 1024, dict(block_n=256, cluster=2, multicast="a", group_m=1)),
            ("odd_n", 1000, dict(block_n=256)),
        )
    ],
    Case(
        "split_halves_m_ends_in_first_half",
        1024,
        2048,
        (130, 0, 33),
        block_n=256,
        pad_last=False,
        trailing_pad=0,
        skip_halves=True,
        split_halves=True,
    ),
    Case(
        "share_a_m_ends_mid_tile",
        1024,
        2048,
        (130, 0, 77),
        block_n=128,
        cluster=2,
        multicast="a",
        pad_last=False,
        trailing_pad=0,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case: Case) -> None:
    ggc = _ggc()
    a, a_scale, b, b_scale, expert_ids = _operands(
        case.counts,
        case.n,
        case.k,
        spread_blocks=case.spread_blocks,
        trailing_pad=case.trailing_pad,
        pad_last=case.pad_last,
    )
    out = torch.full((expert_ids.numel(), case.n), float("nan"), dtype=torch.bfloat16, device="cuda")
    cfg = None
    if case.block_n is not None:
        cfg = ggc.ContiguousConfig(
            case.block_n,
            num_stages=case.num_stages,
            group_m=case.group_m,
            cluster=case.cluster,
            multicast=case.multicast,
            skip_padding_halves=case.skip_halves,
            split_padding_halves=case.split_halves,
        )
    ggc.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids, out, config=cfg)
    torch.cuda.synchronize()
    pad = expert_ids < 0
    assert torch.isnan(out[pad]).all(), "padding rows were written"
    assert torch.isfinite(out[~pad]).all(), "real rows left unwritten (or non-finite)"
    if (~pad).any():
        ref = reference.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids)
        assert _rel(out[~pad], ref[~pad]) <= TOL["gemm"]


def test_allocates_zeroed_out_and_accepts_int64_ids() -> None:
    ggc = _ggc()
    a, a_scale, b, b_scale, expert_ids = _operands((70, 0, 140), 512, 2048)
    out = ggc.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids.long())
    ref = reference.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids)
    pad = expert_ids < 0
    assert (out[pad] == 0).all()
    assert _rel(out[~pad], ref[~pad]) <= TOL["gemm"]


def test_empty_inputs() -> None:
    ggc = _ggc()
    a, a_scale, b, b_scale, _ = _operands((1,), 256, 256)
    ids = torch.empty(0, dtype=torch.int32, device="cuda")
    out = ggc.grouped_gemm_contiguous(a[:0], a_scale[:0], b, b_scale, ids)
    assert out.shape == (0, 256)


def test_cuda_graph_replay() -> None:
    """Captured once, replayed on new activations and a new routing of the same row count."""
    ggc = _ggc()
    counts = (100, 28, 256, 0)
    a, a_scale, b, b_scale, expert_ids = _operands(counts, 1024, 2048)
    out = torch.empty((expert_ids.numel(), 1024), dtype=torch.bfloat16, device="cuda")
    ggc.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids, out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ggc.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids, out)
    new_a, new_s, _, _, new_ids = _operands((128, 0, 250, 6), 1024, 2048)
    assert new_ids.numel() == expert_ids.numel()
    a.copy_(new_a)
    a_scale.copy_(new_s)
    expert_ids.copy_(new_ids)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    pad = expert_ids < 0
    assert torch.isnan(out[pad]).all()
    ref = reference.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids)
    assert _rel(out[~pad], ref[~pad]) <= TOL["gemm"]


@pytest.mark.parametrize("rows_per_expert", [512, 2048])
@pytest.mark.parametrize("which,n,k", [("w13", 4096, 7168), ("w2", 7168, 2048)])
def test_ep8_timing(rows_per_expert, which, n, k) -> None:
    """Correct on the EP8 slice (32 experts) and prints µs / TFLOPS (CUDA events, median of 5 x 10 launches)."""
    ggc = _ggc()
    counts = (rows_per_expert,) * 32
    a, a_scale, b, b_scale, expert_ids = _operands(counts, n, k, trailing_pad=0)
    out = torch.empty((expert_ids.numel(), n), dtype=torch.bfloat16, device="cuda")
    ggc.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids, out)
    times = []
    for _ in range(5):  # 10 back-to-back launches per sample: host-side launch cost stays hidden
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            ggc.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids, out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 10)
    us = sorted(times)[len(times) // 2]
    rows = sum(counts)
    cfg = ggc.select_config(expert_ids.numel(), n, torch.cuda.get_device_properties(0).multi_processor_count, k=k)
    print(
        f"\n[cuda contiguous] {torch.cuda.get_device_name()} EP8 {which} {rows_per_expert} rows/expert "
        f"{cfg}: {us:.0f} µs, {2 * rows * n * k / us / 1e6:.0f} TFLOPS"
    )
    ref_rows = slice(0, 2 * ALIGN)  # spot-check two tiles against the reference (full check is slow)
    ref = reference.grouped_gemm_contiguous(a[ref_rows], a_scale[ref_rows], b, b_scale, expert_ids[ref_rows])
    assert _rel(out[ref_rows], ref) <= TOL["gemm"]


GATHER_CASES = [
    # (name, n, k, counts, tokens, config kwargs or None for the heuristic)
    ("tp8_w13_many_slots_per_token", 512, 7168, _skewed(64, 64 * 40, 8), 333, None),
    ("ep8_w13_pairs_sharing_b", 4096, 7168, (257, 0, 128, 31), 200, dict(block_n=128, cluster=2)),
    ("bn256_single", 4096, 2048, (130, 0, 77, 1), 100, dict(block_n=256)),
    ("bn64_k256", 7168, 256, (5, 129, 0, 1), 60, dict(block_n=64)),
    ("share_a_runs_sharing_b", 1024, 2048, (257, 0, 128), 300, dict(block_n=128, cluster=2, multicast="a")),
    ("one_token", 512, 7168, (1, 0, 1, 1), 1, None),
    # stream-K: a piece starting mid-unit looks its token rows up at its own start
    ("tp8_w13_stream_k", 512, 7168, _skewed(64, 64 * 40, 17), 333, dict(block_n=256, cluster=2, stream_k=True)),
    # warpgroups skipping their all-padding halves while the producer gathers the rows
    (
        "tp8_w13_skip_halves",
        512,
        7168,
        _skewed(64, 64 * 40, 19),
        333,
        dict(block_n=256, cluster=2, skip_padding_halves=True),
    ),
]


@pytest.mark.parametrize("name,n,k,counts,tokens,cfg", GATHER_CASES, ids=[c[0] for c in GATHER_CASES])
def test_gathered_rows_match_the_gathered_copy(name, n, k, counts, tokens, cfg) -> None:
    """A_rows: layout row r reads token row src[r] (-1: padding, never written), as the prefill
    GEMM1 reads x through the layout's src_token; the reference runs on the copy of those rows.
    Tokens repeat across experts (several slots per token), the layout ends in padding."""
    ggc = _ggc()
    g = torch.Generator(device="cuda").manual_seed(len(counts) + tokens)
    expert_ids = _layout(counts)
    real = expert_ids >= 0
    src = torch.full(expert_ids.shape, -1, dtype=torch.int64, device="cuda")
    src[real] = torch.randint(0, tokens, (int(real.sum()),), generator=g, device="cuda")
    x, x_scale = quantize_fp8_per_token_group(torch.randn(tokens, k, device="cuda"))
    b, b_scale = quantize_fp8_blockwise(torch.randn(len(counts), n, k, device="cuda") * 0.05)
    out = torch.full((expert_ids.numel(), n), float("nan"), dtype=torch.bfloat16, device="cuda")
    config = None if cfg is None else ggc.ContiguousConfig(**cfg)  # the case's dict stays whole for reruns
    ggc.grouped_gemm_contiguous(x, x_scale, b, b_scale, expert_ids, out, config=config, a_rows=src)
    torch.cuda.synchronize()
    assert torch.isnan(out[~real]).all(), "padding rows were written"
    assert torch.isfinite(out[real]).all(), "real rows left unwritten (or non-finite)"
    rows = src.clamp_min(0)
    ref = reference.grouped_gemm_contiguous(x[rows], x_scale[rows], b, b_scale, expert_ids)
    assert _rel(out[real], ref[real]) <= TOL["gemm"]


def test_gathered_rows_in_a_graph_with_rows_in_use() -> None:
    """Captured once with a device-side count of rows in use; replayed on new tokens and routing."""
    _ggc()
    from moe_backend.cuda.grouped_gemm_contiguous import launch

    n, k, tokens = 512, 7168, 96
    expert_ids = _layout((200, 0, 300, 5))
    used = torch.tensor([expert_ids.numel() - ALIGN], dtype=torch.int32, device="cuda")  # the trailing pad
    src = torch.zeros(expert_ids.shape, dtype=torch.int64, device="cuda")
    x, x_scale = quantize_fp8_per_token_group(torch.randn(tokens, k, device="cuda"))
    b, b_scale = quantize_fp8_blockwise(torch.randn(4, n, k, device="cuda") * 0.05)
    out = torch.empty((expert_ids.numel(), n), dtype=torch.bfloat16, device="cuda")

    def call():
        launch(x, x_scale, b, b_scale, expert_ids, out, config=None, rows_in_use=used, a_rows=src)

    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        real = expert_ids >= 0
        src.fill_(-1)
        src[real] = torch.randint(0, tokens, (int(real.sum()),), generator=g, device="cuda")
        new_x, new_s = quantize_fp8_per_token_group(torch.randn(tokens, k, device="cuda"))
        x.copy_(new_x)
        x_scale.copy_(new_s)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isnan(out[~real]).all()
        rows = src.clamp_min(0)
        ref = reference.grouped_gemm_contiguous(x[rows], x_scale[rows], b, b_scale, expert_ids)
        assert _rel(out[real], ref[real]) <= TOL["gemm"]


SILU_CASES = [
    # (name, I, k, counts, config kwargs, gather tokens (0: rows in the layout), ue8m0)
    ("ep8_w13_pairs", 2048, 7168, (257, 0, 128, 31), dict(block_n=256, cluster=2), 0, False),
    ("ep8_w13_single_ue8m0", 2048, 2048, (130, 0, 77, 1), dict(block_n=256), 0, True),
    ("tp8_w13_gather", 256, 7168, _skewed(64, 64 * 40, 8), dict(block_n=256, cluster=2), 333, False),
    ("heuristic_bn128_replaced", 256, 2048, (5, 129, 0, 1), dict(block_n=128), 0, False),
    ("one_row", 256, 7168, (1, 0, 0), None, 1, False),
    # stream-K: cut units finished from partial sums before the epilogue; few units (cut in three)
    (
        "ep8_w13_pairs_stream_k",
        2048,
        7168,
        _skewed(32, 32 * 96, 16),
        dict(block_n=256, cluster=2, stream_k=True),
        0,
        False,
    ),
    ("few_units_stream_k_ue8m0", 2048, 7168, (300, 0, 5), dict(block_n=256, stream_k=True), 0, True),
    # warpgroups skipping their all-padding halves (the epilogue of a skipped half stores nothing)
    (
        "ep8_w13_pairs_skip_halves",
        2048,
        7168,
        (64, 65, 257, 0, 1, 128),
        dict(block_n=256, cluster=2, skip_padding_halves=True),
        0,
        False,
    ),
    (
        "tp8_w13_gather_skip_halves",
        256,
        7168,
        _skewed(64, 64 * 40, 20),
        dict(block_n=256, cluster=2, skip_padding_halves=True),
        333,
        False,
    ),
    (
        "tp8_w13_gather_stream_k",
        256,
        7168,
        _skewed(64, 64 * 40, 18),
        dict(block_n=256, cluster=2, stream_k=True),
        333,
        False,
    ),
]


def silu_case_operands(inter: int, k: int, counts, tokens: int) -> tuple:
    """A SILU_CASES case's operands (GEMM1 with N = 2 * inter): expert ids of the layout, the rows'
    tokens (tokens > 0: A holds that many token rows, gathered through them; else None and A holds
    the layout's rows), A and its scales, the experts' weights and their scales."""
    n = 2 * inter
    g = torch.Generator(device="cuda").manual_seed(len(counts) * 7 + n)
    expert_ids = _layout(counts)
    real = expert_ids >= 0
    src = None
    if tokens:
        src = torch.full(expert_ids.shape, -1, dtype=torch.int64, device="cuda")
        src[real] = torch.randint(0, tokens, (int(real.sum()),), generator=g, device="cuda")
        a, a_scale = quantize_fp8_per_token_group(torch.randn(tokens, k, device="cuda"))
    else:
        a, a_scale = quantize_fp8_per_token_group(torch.randn(expert_ids.numel(), k, device="cuda"))
    b, b_scale = quantize_fp8_blockwise(torch.randn(len(counts), n, k, device="cuda") * 0.05)
    return expert_ids, src, a, a_scale, b, b_scale


def gate_up_tiled(b: torch.Tensor, b_scale: torch.Tensor, inter: int) -> tuple:
    """GEMM1's weights `[E, 2I, K]` (and their `[E, 2I/128, K/128]` scales) with the N rows in the
    order the SiLU*up quant kernel tiles them: gate block j, then up block j (128 rows each), j = 0
    .. I/128 - 1; and `order`, the original row of each reordered one (h[:, order] = h_tiled). A bf16
    GEMM on these walks the same units over the same columns as the SiLU*up kernel, so stream-K cuts
    the same sums in both; in the plain order a unit covers other columns, and a sum cut in one
    kernel is whole in the other (last bits differ, enough to move a bf16 value a step)."""
    n = 2 * inter
    order = torch.arange(n, device=b.device).view(2, inter // 128, 128).transpose(0, 1).reshape(n)
    tiled = b.view(torch.uint8)[:, order].contiguous().view(b.dtype)  # fp8 indexing through its bytes
    return tiled, b_scale[:, order[::128] // 128].contiguous(), order


@pytest.mark.parametrize("name,inter,k,counts,cfg,tokens,ue8m0", SILU_CASES, ids=[c[0] for c in SILU_CASES])
def test_silu_quant_epilogue_matches_the_separate_kernel(name, inter, k, counts, cfg, tokens, ue8m0) -> None:
    """GEMM1 storing FP8 silu(gate) * up (`act_scale`): against the same GEMM's bf16 output put
    through the reference SiLU*up quant. The bf16 GEMM runs on the weights in the SiLU*up kernel's
    tile order (`gate_up_tiled`), so gate and up are the same bf16 values on both sides, stream-K
    included; the epilogue's exp and division are the fast approximate ones (TOL's silu_* entries
    say what that allows). Padding rows (NaN-poisoned) stay unwritten."""
    ggc = _ggc()
    from moe_backend.cuda.grouped_gemm_contiguous import launch

    n = 2 * inter
    expert_ids, src, a, a_scale, b, b_scale = silu_case_operands(inter, k, counts, tokens)
    real = expert_ids >= 0
    rows = expert_ids.numel()
    config = None if cfg is None else ggc.ContiguousConfig(**cfg)  # the case's dict stays whole for reruns
    b_tiled, b_scale_tiled, order = gate_up_tiled(b, b_scale, inter)
    h_tiled = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
    launch(a, a_scale, b_tiled, b_scale_tiled, expert_ids, h_tiled, config=config, a_rows=src)
    h = torch.empty_like(h_tiled)
    h[:, order] = h_tiled
    act = torch.full((rows, inter), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)  # NaN
    act_scale = torch.full((rows, inter // 128), float("nan"), device="cuda")
    launch(a, a_scale, b, b_scale, expert_ids, act, config=config, a_rows=src, act_scale=act_scale, ue8m0=ue8m0)
    torch.cuda.synchronize()
    assert torch.isnan(act_scale[~real]).all() and (act.view(torch.uint8)[~real] == 0x7F).all(), "padding written"
    assert torch.isfinite(act_scale[real]).all() and torch.isfinite(act[real].float()).all(), "rows left unwritten"
    ref_act, ref_scale = reference.silu_mul_quant(h[real], 128, ue8m0)
    assert float(((act_scale[real] - ref_scale).abs() / ref_scale).max()) <= TOL["silu_scale"]
    deq = act[real].float().view(-1, inter // 128, 128) * act_scale[real][..., None]
    ref_deq = ref_act.float().view(-1, inter // 128, 128) * ref_scale[..., None]
    assert _rel(deq, ref_deq) <= TOL["silu_act"]
    if ue8m0:
        assert torch.equal(act_scale[real], torch.exp2(torch.log2(act_scale[real]).round()))


def test_silu_quant_epilogue_rejects_what_it_cannot_tile() -> None:
    """N not a multiple of 256 (I not of 128): a clear error before anything launches."""
    ggc = _ggc()
    with pytest.raises(ValueError, match="silu_quant"):
        ggc.kernel_spec(384, 7168, ggc.ContiguousConfig(256), silu_quant=1)
    with pytest.raises(ValueError, match="silu_quant"):
        ggc.kernel_spec(512, 7168, ggc.ContiguousConfig(256, cluster=2, multicast="a"), silu_quant=1)


DIRECT_CASES = [
    # (name, config kwargs, tokens, local experts of 256, rows in use given)
    ("single", dict(block_n=256), 300, 32, True),
    ("pairs", dict(block_n=256, cluster=2), 517, 32, False),
    ("bn128", dict(block_n=128), 64, 32, True),
    ("bn192_pairs", dict(block_n=192, cluster=2), 517, 32, False),
    ("one_token", dict(block_n=256), 1, 32, True),
    # stream-K (both GEMMs of the comparison on it, so the sums agree bit for bit): the pairs'
    # slots alternate by the pieces a CTA stores, cut units finished from partial sums
    ("stream_k_pairs", dict(block_n=256, cluster=2, stream_k=True), 4096, 32, True),
    ("stream_k_few_units", dict(block_n=256, stream_k=True), 517, 32, False),
    # warpgroups skipping their all-padding halves: the direct rows' slots still alternate by tile
    ("pairs_skip_halves", dict(block_n=256, cluster=2, skip_padding_halves=True), 517, 32, True),
    ("single_skip_halves", dict(block_n=128, skip_padding_halves=True), 300, 32, False),
]


@pytest.mark.parametrize("name,cfg,tokens,local,used", DIRECT_CASES, ids=[c[0] for c in DIRECT_CASES])
def test_direct_rows_give_the_combine_bytes(name, cfg, tokens, local, used) -> None:
    """GEMM2 storing single-slot tokens' rows into the output (`direct`), then the combine skipping
    those tokens, gives the plain GEMM + combine output bit for bit; the rows it stored directly
    stay unwritten in y (NaN poison), as do the padding rows."""
    ggc = _ggc()
    from moe_backend import ops
    from moe_backend.kernels.direct_rows import direct_rows

    n, k, topk = 1024, 2048, 8
    g = torch.Generator(device="cuda").manual_seed(tokens)
    scores = torch.rand(tokens, 256, device="cuda", generator=g)
    w, ids = scores.topk(topk, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).float()
    layout = ops.build_contiguous_layout(ids, local, alignment=ALIGN)
    rows = layout.src_token.numel()
    rows_in_use = layout.expert_offsets[local:] if used else None
    a, a_scale = quantize_fp8_per_token_group(torch.randn(rows, k, device="cuda", generator=g))
    b, b_scale = quantize_fp8_blockwise(torch.randn(local, n, k, device="cuda", generator=g) * 0.05)
    config = ggc.ContiguousConfig(**cfg)
    y = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    ggc.launch(a, a_scale, b, b_scale, layout.expert_ids, y, config=config, rows_in_use=rows_in_use)
    full = ops.unpermute_combine(y, layout.row_of_slot, w, branch_on_slots=True)

    pairs = direct_rows(layout.row_of_slot, w, rows)
    y2 = torch.full_like(y, float("nan"))
    out = torch.full((tokens, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    ggc.launch(
        a, a_scale, b, b_scale, layout.expert_ids, y2, config=config, rows_in_use=rows_in_use, direct=(pairs, out)
    )
    ops.unpermute_combine(y2, layout.row_of_slot, w, out, branch_on_slots=True, skip_single=True)
    assert torch.equal(out.view(torch.int16), full.view(torch.int16)), name
    single_rows = layout.row_of_slot[(layout.row_of_slot >= 0).sum(dim=1) == 1].max(dim=1).values
    assert torch.isnan(y2[single_rows]).all() and torch.isnan(y2[layout.expert_ids < 0]).all()
    others = (layout.expert_ids >= 0).clone()
    others[single_rows] = False
    assert torch.equal(y2[others].view(torch.int16), y[others].view(torch.int16))
    if name != "one_token":
        assert len(single_rows) > 0 and others.any(), "both kinds of row present"


def _ep8_prefill_plan(tokens: int, hidden: int) -> tuple:
    """The policy's prefill plan for an EP8 slice (32 of 256 experts, I = 2048; eager, no graph
    bucket) and random FP8 weights for it: (plan, (w13, w13_s, w2, w2_s))."""
    from moe_backend.dispatch import Policy
    from moe_backend.dispatch.plan import make_plan

    e, inter = 32, 2048
    w13, w13_s = quantize_fp8_blockwise(torch.randn(e, 2 * inter, hidden, device="cuda") * 0.05)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(e, hidden, inter, device="cuda") * 0.05)
    plan = make_plan(
        Policy(graph_max_tokens=0), num_tokens=tokens, topk=8, num_experts=e, num_global_experts=256,
        hidden=hidden, intermediate=inter, device=torch.device("cuda"), phase="prefill",
    )  # fmt: skip
    return plan, (w13, w13_s, w2, w2_s)


def test_direct_rows_pipeline_in_a_graph_with_new_routing() -> None:
    """The prefill plan of an expert-parallel slice (`Plan.direct_rows`) against the same plan
    without it: equal bit for bit eagerly and over 10 graph replays with new routing and tokens."""
    _ggc()
    from moe_backend.dispatch.plan import thresholds
    from tests.helpers.plan_replays import assert_same_bits_over_replays

    e, e_global, hidden, topk = 32, 256, 1024, 8
    tokens = thresholds()["cuda_direct_rows"]["min_tokens"]
    plan, (w13, w13_s, w2, w2_s) = _ep8_prefill_plan(tokens, hidden)
    assert plan.direct_rows and plan.gemm2.provider == "cuda", plan.describe()
    plain = dataclasses.replace(plan, direct_rows=False)

    def routing(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        w, ids = torch.rand(tokens, e_global, device="cuda", generator=gen).topk(topk, dim=-1)
        return (w / w.sum(-1, keepdim=True)).float(), ids

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)

    def close_to_reference(out, w, ids):
        assert _rel(out, reference.routed_experts(x, w13, w13_s, w2, w2_s, w, torch.where(ids < e, ids, -1))) <= 1e-2

    assert_same_bits_over_replays(plan, plain, (w13, w13_s, w2, w2_s), x, routing, 10, close_to_reference)


STREAM_K_CASES = [
    # (name, n, k, counts, config kwargs, layout kwargs). Unit counts: a part-full last wave over
    # the GPU's CTAs (the pool), fewer units than CTAs (every unit cut, some in three), K in 7
    # chunks (EP8 w13) and in 2 (EP8 w2)
    ("ep8_w13_pairs_ragged", 4096, 7168, _skewed(32, 32 * 96, 11), dict(block_n=256, cluster=2), {}),
    ("few_units_single", 4096, 7168, (300, 0, 5), dict(block_n=256), {}),
    ("w2_bn128_pairs", 7168, 2048, (257, 0, 128, 31), dict(block_n=128, cluster=2), {}),
    ("w2_bn64_single_ragged", 7168, 2048, _skewed(32, 32 * 40, 12), dict(block_n=64), {}),
    ("w2_bn192_pairs", 7168, 2048, _skewed(16, 16 * 200, 13), dict(block_n=192, cluster=2), {}),
    ("m_ends_mid_tile_pairs", 1024, 2048, (130, 0, 77), dict(block_n=256, cluster=2), dict(pad_last=False)),
    ("k256_one_chunk", 7168, 256, _skewed(64, 64 * 24, 14), dict(block_n=192, cluster=2), {}),
]


@pytest.mark.parametrize("name,n,k,counts,cfg,layout", STREAM_K_CASES, ids=[c[0] for c in STREAM_K_CASES])
def test_stream_k_matches_reference_and_whole_units(name, n, k, counts, cfg, layout) -> None:
    """`stream_k`: the last part-full wave dealt by K chunks over every CTA, cut units finished
    from partial sums. Against the reference (TOL) and against the same config dealing whole units
    (only the order of the fp32 sums differs: a missed or doubled chunk is off by 1/7 or more);
    padding rows (NaN-poisoned) stay unwritten. B's block scales far apart, so a chunk promoted
    with the wrong K block's scales shows."""
    ggc = _ggc()
    expert_ids = _layout(counts, **layout)
    a, a_scale, b, b_scale, _ = _operands(counts, n, k, spread_blocks=True, **layout)
    whole = ggc.ContiguousConfig(cfg["block_n"], cluster=cfg.get("cluster", 1))
    outs = {}
    for sk in (False, True):
        out = torch.full((expert_ids.numel(), n), float("nan"), dtype=torch.bfloat16, device="cuda")
        config = dataclasses.replace(whole, stream_k=sk)
        ggc.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids, out, config=config)
        outs[sk] = out
    torch.cuda.synchronize()
    real = expert_ids >= 0
    assert torch.isnan(outs[True][~real]).all(), "padding rows were written"
    assert torch.isfinite(outs[True][real]).all(), "real rows left unwritten (or non-finite)"
    ref = reference.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids)
    assert _rel(outs[True][real], ref[real]) <= TOL["gemm"]
    assert _rel(outs[True][real], outs[False][real]) <= 1e-3


def test_stream_k_workspace_kept_across_launches_and_a_graph() -> None:
    """One workspace for every launch on a stream: eager launches, then a CUDA graph captured
    once and replayed on new activations, routing and rows in use; each result against the
    reference, and the flags back at zero after each (the owner lowers what helpers raised)."""
    ggc = _ggc()
    from moe_backend.cuda import launch as launch_mod

    n, k = 4096, 7168
    cfg = ggc.ContiguousConfig(256, cluster=2, stream_k=True)
    counts = _skewed(32, 32 * 60, 15)
    expert_ids = _layout(counts)
    a, a_scale, b, b_scale, _ = _operands(counts, n, k)
    workspace = launch_mod.stream_k_workspace(torch.device("cuda"))
    flags = workspace[: launch_mod.STREAM_K_FLAG_WORDS]
    used = torch.tensor([expert_ids.numel()], dtype=torch.int32, device="cuda")
    out = torch.empty((expert_ids.numel(), n), dtype=torch.bfloat16, device="cuda")

    def call():
        launch_mod.launch(
            a, a_scale, b, b_scale, expert_ids, out, config=cfg, rows_in_use=used, stream_k_workspace=workspace
        )

    def check():
        torch.cuda.synchronize()
        assert not flags.view(torch.int32).any(), "flags left raised"
        live = (expert_ids >= 0) & (torch.arange(expert_ids.numel(), device="cuda") < used)
        ref = reference.grouped_gemm_contiguous(a[live], a_scale[live], b, b_scale, expert_ids[live])
        assert _rel(out[live], ref) <= TOL["gemm"]

    for _ in range(3):
        out.fill_(float("nan"))
        call()
        check()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    # Without a workspace given, launch keeps one per stream: made once, flags left at zero.
    launch_mod.launch(a, a_scale, b, b_scale, expert_ids, out, config=cfg, rows_in_use=used)
    kept = launch_mod.kept_stream_k_workspace(torch.device("cuda"), torch.cuda.current_stream().cuda_stream)
    launch_mod.launch(a, a_scale, b, b_scale, expert_ids, out, config=cfg, rows_in_use=used)
    check()
    assert launch_mod.kept_stream_k_workspace(torch.device("cuda"), torch.cuda.current_stream().cuda_stream) is kept
    assert not kept[: launch_mod.STREAM_K_FLAG_WORDS].view(torch.int32).any()
    for seed in (21, 22, 23):
        new_counts = _skewed(32, 32 * 60, seed)
        new_ids = _layout(new_counts)[: expert_ids.numel()]
        expert_ids.fill_(-1)
        expert_ids[: new_ids.numel()] = new_ids
        used.fill_(min(new_ids.numel(), expert_ids.numel()) - 128 * (seed % 2))  # rows in use move too
        new_a, new_s = quantize_fp8_per_token_group(torch.randn(expert_ids.numel(), k, device="cuda"))
        a.copy_(new_a)
        a_scale.copy_(new_s)
        out.fill_(float("nan"))
        graph.replay()
        check()


def test_stream_k_plan_against_the_plain_plan() -> None:
    """The EP8 prefill plan with both GEMMs on stream-K (GEMM1 storing SiLU*up quant) against the
    same plan dealing whole units, and the reference: the layer's numerics bound."""
    _ggc()
    from moe_backend.plan_execution import run_plan

    e, e_global, hidden, topk, tokens = 32, 256, 7168, 8, 4096
    plan, (w13, w13_s, w2, w2_s) = _ep8_prefill_plan(tokens, hidden)
    assert plan.gemm1.provider == plan.gemm2.provider == "cuda" and not plan.direct_rows, plan.describe()

    def with_stream_k(g):
        return dataclasses.replace(g, config=dataclasses.replace(g.config, stream_k=True))

    sk = dataclasses.replace(plan, gemm1=with_stream_k(plan.gemm1), gemm2=with_stream_k(plan.gemm2))
    gen = torch.Generator(device="cuda").manual_seed(5)
    w, ids = torch.rand(tokens, e_global, device="cuda", generator=gen).topk(topk, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).float()
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    args = (x, None, w13, w13_s, w2, w2_s, w, ids, 0, False)
    out, plain = run_plan(sk, *args), run_plan(plan, *args)
    ref = reference.routed_experts(x, w13, w13_s, w2, w2_s, w, torch.where(ids < e, ids, -1))
    assert _rel(out, ref) <= 1e-2
    assert _rel(out, plain) <= 5e-3


A_REGS_CASES = [
    # (name, n, k, counts, config kwargs, kind, tokens). kind: "bf16" (plain output, against the
    # reference too), "silu" (GEMM1 storing SiLU*up quant; tokens > 0: gathering A), "direct"
    # (GEMM2 storing single-slot tokens' rows)
    ("single_odd_n_ragged", 1001, 1152, (5, 129, 0, 1, 300), dict(block_n=256), "bf16", 0),
    ("ep8_w13_pairs_ragged", 4096, 7168, _skewed(32, 32 * 96, 21), dict(block_n=256, cluster=2), "bf16", 0),
    ("m_ends_mid_tile_pairs", 1024, 2048, (130, 0, 77), dict(block_n=256, cluster=2), "bf16", 0),
    ("ep8_w13_silu_pairs", 2048, 7168, (64, 65, 257, 0, 1, 128), dict(block_n=256, cluster=2), "silu", 0),
    ("tp8_w13_silu_gather", 256, 7168, _skewed(64, 64 * 40, 22), dict(block_n=256, cluster=2), "silu", 333),
    ("silu_stream_k", 2048, 7168, (300, 0, 5), dict(block_n=256, stream_k=True), "silu", 0),
    ("ep8_w2_direct_pairs", 1024, 2048, (), dict(block_n=256, cluster=2), "direct", 517),
]


@pytest.mark.parametrize("name,n,k,counts,cfg,kind,tokens", A_REGS_CASES, ids=[c[0] for c in A_REGS_CASES])
def test_a_fragments_in_registers_match_a_from_shared_memory(name, n, k, counts, cfg, kind, tokens) -> None:
    """`a_regs`: each K block's A fragments read once by ldmatrix and both 128-wide parts' wgmmas
    taking A from registers. The same math as A from shared memory: the outputs agree within 1e-3
    (a fragment from the wrong rows or K bytes is off by the order of the values), bf16 outputs
    also against the reference (TOL), and padding rows stay NaN. Prints whether the bits match."""
    ggc = _ggc()
    from moe_backend.cuda.grouped_gemm_contiguous import launch

    base = ggc.ContiguousConfig(**cfg)
    outs = {}
    if kind == "bf16":
        mid = name.startswith("m_ends")  # M ends mid-tile: no padding after the last segment
        layout = dict(pad_last=not mid, trailing_pad=0 if mid else ALIGN)
        a, a_scale, b, b_scale, expert_ids = _operands(counts, n, k, spread_blocks=True, **layout)
        for regs in (False, True):
            out = torch.full((expert_ids.numel(), n), float("nan"), dtype=torch.bfloat16, device="cuda")
            ggc.grouped_gemm_contiguous(
                a, a_scale, b, b_scale, expert_ids, out, config=dataclasses.replace(base, a_regs=regs)
            )
            outs[regs] = (out,)
        real = expert_ids >= 0
        ref = reference.grouped_gemm_contiguous(a, a_scale, b, b_scale, expert_ids)
        assert _rel(outs[True][0][real], ref[real]) <= TOL["gemm"]
    elif kind == "silu":
        inter = n // 2
        expert_ids, src, a, a_scale, b, b_scale = silu_case_operands(inter, k, counts, tokens)
        real = expert_ids >= 0
        for regs in (False, True):
            act = torch.full((expert_ids.numel(), inter), 0x7F, dtype=torch.uint8, device="cuda")
            act_scale = torch.full((expert_ids.numel(), inter // 128), float("nan"), device="cuda")
            launch(
                a, a_scale, b, b_scale, expert_ids, act.view(torch.float8_e4m3fn),
                config=dataclasses.replace(base, a_regs=regs), a_rows=src, act_scale=act_scale,
            )  # fmt: skip
            outs[regs] = (act, act_scale)
        torch.cuda.synchronize()
        for act, act_scale in outs.values():
            assert (act[~real] == 0x7F).all() and torch.isnan(act_scale[~real]).all(), "padding written"
        deq = {
            r: act[real].view(torch.float8_e4m3fn).float().view(-1, inter // 128, 128) * s[real][..., None]
            for r, (act, s) in outs.items()
        }
        assert _rel(deq[True], deq[False]) <= TOL["silu_act"]
    else:  # direct rows: GEMM2 storing single-slot tokens' rows into the layer's output
        from moe_backend import ops
        from moe_backend.kernels.direct_rows import direct_rows

        local, topk = 32, 8
        g = torch.Generator(device="cuda").manual_seed(tokens)
        w, ids = torch.rand(tokens, 256, device="cuda", generator=g).topk(topk, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).float()
        layout = ops.build_contiguous_layout(ids, local, alignment=ALIGN)
        rows = layout.src_token.numel()
        a, a_scale = quantize_fp8_per_token_group(torch.randn(rows, k, device="cuda", generator=g))
        b, b_scale = quantize_fp8_blockwise(torch.randn(local, n, k, device="cuda", generator=g) * 0.05)
        pairs = direct_rows(layout.row_of_slot, w, rows)
        for regs in (False, True):
            y = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            out = torch.full((tokens, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            launch(
                a, a_scale, b, b_scale, layout.expert_ids, y,
                config=dataclasses.replace(base, a_regs=regs), direct=(pairs, out),
            )  # fmt: skip
            ops.unpermute_combine(y, layout.row_of_slot, w, out, branch_on_slots=True, skip_single=True)
            outs[regs] = (y, out)
        assert torch.isfinite(outs[True][1]).all(), "token rows left unwritten"
    torch.cuda.synchronize()
    same = all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(outs[False], outs[True]))
    if kind != "silu":
        for x, y in zip(outs[False], outs[True]):
            assert torch.equal(torch.isnan(x), torch.isnan(y)), "a different set of rows written"
            keep = ~torch.isnan(x)
            assert _rel(y[keep], x[keep]) <= 1e-3
    print(f"a_regs {name}: {'same bits' if same else 'bits differ'} as A from shared memory")
