"""The CUDA kernel on the masked layout (`moe_backend.cuda.grouped_gemm_masked`) against
`moe_backend.reference.grouped_gemm_masked`: NaN-poisoned outputs (rows at or past masked_m[e]
must stay NaN), experts with 0, 1, some and all max_m rows, max_m 128 and 256, DeepSeek-V3 K,
and CUDA-graph replay with new row counts (the decode use)."""

from __future__ import annotations

import pytest
import torch

from moe_backend import reference
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from tests.helpers.spread_weights import block_spread_weights

pytestmark = pytest.mark.gpu
TOL = 2e-3  # as the contiguous kernel's tests: bf16 output rounding + fp8 sums inside a K block


def _op():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUDA grouped GEMM is built for sm_90a (Hopper)")
    from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked

    return grouped_gemm_masked


def _check(out, ref, masked_m) -> None:
    for e, m in enumerate(masked_m.tolist()):
        assert torch.isnan(out[e, m:].float()).all(), f"expert {e}: rows past masked_m were written"
        if m:
            got, want = out[e, :m].float(), ref[e, :m].float()
            assert not torch.isnan(got).any(), f"expert {e}: a valid row was left unwritten"
            assert float((got - want).norm() / want.norm()) <= TOL, f"expert {e}"


@pytest.mark.parametrize(
    "max_m,n,k,counts",
    [
        (128, 4096, 7168, [128, 0, 1, 77, 128, 5]),
        (256, 7168, 2048, [256, 129, 0, 255]),
        (128, 7168, 256, [3, 128, 0, 64, 127, 1, 1, 100]),
        (128, 1000, 384, [50, 128]),  # N not a multiple of any tile
        # max_m far above the rows (the dead M tiles of an expert are skipped): single CTAs (K = 256)
        # and A-sharing pairs, hot experts across several M tiles, idle ones, rows ending on a tile edge
        (1024, 7168, 256, [0, 1000, 3, 0, 0, 128, 129, 1, 0, 17, 256, 0, 0, 0, 5, 1024]),
        (1024, 4096, 7168, [0, 2, 700, 0, 1, 0, 0, 384]),
        (512, 512, 7168, [0] * 30 + [300, 1]),
        # hot experts over 11 and 12 live M tiles (Zipf-like decode counts at a large max_m) beside
        # experts of one tile and none
        (1536, 4096, 7168, [1300, 0, 129, 1536]),
        (1536, 7168, 256, [1300, 2, 0, 1100, 1]),
        # an expert's rows ending at either side of a tile's row 64 (where the two consumer
        # warpgroups' halves meet): K = 256 single CTAs and K = 7168 A-sharing pairs
        (384, 7168, 256, [64, 65, 63, 192, 193, 320, 1, 0]),
        (384, 4096, 7168, [64, 65, 63, 192, 193, 320, 1, 0]),
    ],
)
def test_matches_reference(max_m, n, k, counts) -> None:
    op = _op()
    torch.manual_seed(max_m + n + k)
    e = len(counts)
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda") * 0.05)
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    op(a, a_s, b, bs, masked_m, out)
    _check(out, reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)


@pytest.mark.parametrize(
    "max_m,n,k,num_experts",
    [
        (128, 512, 256, 300),  # single CTAs; more experts than one CTA's threads and the scan's 32
        (256, 512, 1024, 70),  # A-sharing pairs
    ],
)
def test_many_experts_and_counts_out_of_range(max_m, n, k, num_experts) -> None:
    """Each CTA counts every expert's live tiles itself (scheduler.cuh, LiveTiles): experts past
    the first scan chunks, and masked_m outside [0, max_m] read as clamped (it is not checked on
    the host: that would sync)."""
    op = _op()
    gen = torch.Generator().manual_seed(num_experts)
    counts = torch.randint(-3, max_m + 40, (num_experts,), generator=gen, dtype=torch.int32)
    counts[::7] = 0
    a, a_s = quantize_fp8_per_token_group(torch.randn(num_experts, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(torch.randn(num_experts, n, k, device="cuda") * 0.05)
    out = torch.full((num_experts, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    op(a, a_s, b, bs, counts.cuda(), out)
    clamped = counts.clamp(0, max_m).cuda()
    _check(out, reference.grouped_gemm_masked(a, a_s, b, bs, clamped), clamped)


@pytest.mark.parametrize("max_m", [128, 384])
def test_graph_replay_with_new_counts(max_m) -> None:
    """The live tiles are counted on the device at every replay: counts that grow, shrink and
    vanish between replays of one graph."""
    op = _op()
    e, n, k = 8, 512, 7168
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda") * 0.05)
    masked_m = torch.full((e,), max_m, dtype=torch.int32, device="cuda")
    out = torch.empty(e, max_m, n, dtype=torch.bfloat16, device="cuda")
    op(a, a_s, b, bs, masked_m, out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(a, a_s, b, bs, masked_m, out)
    for counts in ([1, 0, max_m, 7, 64, 0, 0, max_m - 1], [max_m] * 8, [0] * 8, [0, 0, 0, 0, 0, 0, 0, min(130, max_m)]):
        new_a, new_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
        a.copy_(new_a)
        a_s.copy_(new_s)
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        _check(out, reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)


@pytest.mark.parametrize(
    "cfg",
    [dict(cluster=1, group_m=1), dict(cluster=2, multicast="a", group_m=1)],
    ids=["single", "pairs_sharing_a"],
)
def test_192_wide_tiles_on_the_masked_layout(cfg) -> None:
    """A 192-wide tile named by `config=` on the masked layout: odd N tiles start 64 columns into a
    scale block (each 64-column band takes its own block's scale), N = 4096 ends in a partial
    tile, and B's 128-row blocks lie at magnitudes 1/8 to 8 so a band on its neighbour's scale
    fails the tolerance."""
    op = _op()
    from moe_backend.cuda.config import ContiguousConfig

    torch.manual_seed(192)
    max_m, n, k, counts = 256, 4096, 2048, [256, 0, 1, 129, 64]
    e = len(counts)
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(block_spread_weights(e, n, k))
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    op(a, a_s, b, bs, masked_m, out, config=ContiguousConfig(192, **cfg))
    _check(out, reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)


@pytest.mark.parametrize(
    "max_m,n,k,counts",
    [
        (2048, 4096, 7168, [1900, 0, 129, 40, 1, 300, 0, 77] * 4),  # a hot expert: Zipf-like decode counts
        (256, 7168, 2048, [200, 1, 0, 256, 129, 64, 3, 0] * 4),  # K in 2 chunks
        (128, 4096, 7168, [128, 1, 0, 77]),  # fewer units than CTAs: every unit cut
    ],
)
@pytest.mark.parametrize(
    "family",
    [
        dict(block_n=128, cluster=2, multicast="a"),
        dict(block_n=128, cluster=1),
        # the mixed pairs EP8's masked GEMMs run: B-shared pairs of a hot expert's M tiles and
        # A-shared N tile pairs of an odd last tile, both cut by the pool
        dict(block_n=256, num_stages=3, cluster=2, multicast="mixed"),
        dict(block_n=192, cluster=2, multicast="mixed"),
    ],
    ids=["pairs_sharing_a", "single", "mixed_256_s3", "mixed_192"],
)
def test_stream_k_on_the_masked_layout(max_m, n, k, counts, family) -> None:
    """Stream-K over the dense walk of live tiles (`ContiguousConfig.stream_k`): against the
    reference and against the same config dealing whole units (only the order of the fp32 sums
    differs); rows past each count stay NaN."""
    op = _op()
    from moe_backend.cuda.config import ContiguousConfig

    torch.manual_seed(max_m + n + len(counts))
    e = len(counts)
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(block_spread_weights(e, n, k))
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    outs = []
    for sk in (False, True):
        out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        op(a, a_s, b, bs, masked_m, out, config=ContiguousConfig(group_m=1, stream_k=sk, **family))
        outs.append(out)
    _check(outs[1], reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)
    for ex, m in enumerate(counts):
        if m:
            got, whole = outs[1][ex, :m].float(), outs[0][ex, :m].float()
            assert float((got - whole).norm() / whole.norm()) <= 1e-3, f"expert {ex}"


@pytest.mark.parametrize(
    "max_m,n,k,counts",
    [
        # The walk over pairs of consecutive live M tiles: a hot expert with an odd number of live
        # tiles (its last tile paired with the next expert's first), one with an even number, one
        # filling max_m, rows ending on either side of row 64 and of a tile edge, idle experts
        (2048, 4096, 7168, [1300, 0, 129, 2048, 1, 256, 257, 64, 65, 0, 1536, 383]),
        (512, 7168, 2048, [512, 0, 1, 255, 256, 257, 384, 511] * 3),
        # max_m 128 and 384: most pairs straddle two experts (each CTA loads its own B)
        (128, 4096, 7168, [128, 1, 0, 77, 65]),
        (384, 7168, 256, [64, 65, 63, 192, 193, 320, 1, 0]),
        # an odd number of N tiles (5 at 128 wide, 3 at 192 and 256): an A-sharing unit's second
        # CTA past N computes on its partner's B and stores nothing
        (640, 640, 256, [640, 1, 0, 129, 385, 64]),
        # 40 experts (the live table's scan carries over 32-expert chunks), 2 N tiles at 256 wide
        (256, 512, 2048, [256, 0, 1, 129, 255, 128, 0, 0, 77, 256] * 4),
    ],
)
@pytest.mark.parametrize("block_n,multicast", [(128, "b"), (192, "b"), (128, "mixed"), (192, "mixed"), (256, "mixed")])
def test_pairs_sharing_b_on_the_masked_layout(max_m, n, k, counts, block_n, multicast) -> None:
    """CTA pairs on consecutive live M tiles sharing B where both hold one expert (DeepGEMM's
    choice for hot experts), 128 and 192 wide, and the mixed pairs (an expert's M tiles in pairs
    sharing B, its odd last tile in pairs of N tiles sharing A), 128, 192 and 256 wide: against
    the reference; rows past each count stay NaN (a dead second tile computes on its partner's rows
    and stores nothing). Stream-K is refused with these pairs (tests/cuda/test_launch.py)."""
    op = _op()
    from moe_backend.cuda.config import ContiguousConfig

    torch.manual_seed(max_m + n + block_n)
    e = len(counts)
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(block_spread_weights(e, n, k))
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    cfg = ContiguousConfig(block_n, group_m=1, cluster=2, multicast=multicast)
    op(a, a_s, b, bs, masked_m, out, config=cfg)
    _check(out, reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)


@pytest.mark.parametrize("multicast", ["b", "mixed"])
def test_pairs_sharing_b_graph_replay_with_new_counts(multicast) -> None:
    """The dense walk over live pairs (and the mixed pairs' walk), counted on the device at every
    replay: counts that grow, shrink and vanish, odd and even live tile counts."""
    op = _op()
    from moe_backend.cuda.config import ContiguousConfig

    e, max_m, n, k = 6, 768, 4096, 2048
    cfg = ContiguousConfig(128, group_m=1, cluster=2, multicast=multicast)
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, device="cuda") * 0.05)
    masked_m = torch.full((e,), max_m, dtype=torch.int32, device="cuda")
    out = torch.empty(e, max_m, n, dtype=torch.bfloat16, device="cuda")
    op(a, a_s, b, bs, masked_m, out, config=cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(a, a_s, b, bs, masked_m, out, config=cfg)
    for counts in ([1, 0, 768, 300, 129, 0], [768] * 6, [0] * 6, [0, 0, 0, 0, 0, 640], [257, 256, 255, 128, 127, 1]):
        new_a, new_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
        a.copy_(new_a)
        a_s.copy_(new_s)
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        _check(out, reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)


@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)])
def test_unaligned_views_run_the_default_config_on_row_ids(n, k) -> None:
    """Operands at an offset that is not a multiple of 16 bytes take the contiguous op on per-row
    ids with the masked config; the default config of EP8's shapes (mixed pairs, which walk only
    the masked layout) then runs as A-sharing pairs: against the reference, rows past each count
    untouched."""
    op = _op()
    torch.manual_seed(n + k)
    counts = [256, 0, 1, 129]
    e, max_m = len(counts), 256
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(block_spread_weights(e, n, k))
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    storage = torch.full((e * max_m * n + 1,), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = storage[1:].view(e, max_m, n)  # 2 bytes past an aligned start
    assert out.data_ptr() % 16
    op(a, a_s, b, bs, masked_m, out)
    _check(out, reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)


# counts whose last live tile ends in its first half (1-64 rows), in its second half, on a tile edge,
# at row 64 exactly; one-tile experts, hot experts over several tiles (odd and even live tile
# counts: the mixed walk's A-shared last tile and B-shared pairs), idle experts
_HALF_COUNTS = [64, 65, 1, 0, 129, 192, 193, 320, 384, 577, 63, 0, 448, 704, 768, 33]
_SKIP_HALVES_CONFIGS = {
    "mixed_256_s3": (4096, 7168, dict(block_n=256, num_stages=3, group_m=1, cluster=2, multicast="mixed")),
    "mixed_192": (7168, 2048, dict(block_n=192, group_m=1, cluster=2, multicast="mixed")),
    "share_a_256": (512, 7168, dict(block_n=256, group_m=1, cluster=2, multicast="a")),
    "pairs_b_128": (4096, 2048, dict(block_n=128, group_m=1, cluster=2)),
    "single_64": (7168, 256, dict(block_n=64, group_m=1)),
    # ... and a tile whose rows lie in its first half split by N between the warpgroups (256 wide)
    "mixed_256_s3_split": (4096, 7168, dict(block_n=256, num_stages=3, group_m=1, cluster=2, multicast="mixed")),
    "share_a_256_split": (512, 7168, dict(block_n=256, group_m=1, cluster=2, multicast="a")),
}


@pytest.mark.parametrize("name", list(_SKIP_HALVES_CONFIGS))
def test_skipped_padding_halves_on_the_masked_layout(name) -> None:
    """Warpgroups skipping the MMAs of their all-padding halves, on every masked config family:
    against the reference, rows past each count untouched, and the same bytes as the config that
    computes every half (the skipped MMAs only ever fed rows that are not stored); then a graph
    replay with new counts, whose halves switch between skipped and computed."""
    op = _op()
    from moe_backend.cuda.config import ContiguousConfig

    n, k, kw = _SKIP_HALVES_CONFIGS[name]
    cfg = ContiguousConfig(skip_padding_halves=True, split_padding_halves=name.endswith("_split"), **kw)
    plain = ContiguousConfig(**kw)
    torch.manual_seed(n + k)
    e, max_m = len(_HALF_COUNTS), 768
    a, a_s = quantize_fp8_per_token_group(torch.randn(e, max_m, k, device="cuda"))
    b, bs = quantize_fp8_blockwise(block_spread_weights(e, n, k))
    masked_m = torch.tensor(_HALF_COUNTS, dtype=torch.int32, device="cuda")
    outs = []
    for c in (cfg, plain):
        out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        op(a, a_s, b, bs, masked_m, out, config=c)
        outs.append(out)
    _check(outs[0], reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)), "skipped halves changed a stored row"
    out = outs[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(a, a_s, b, bs, masked_m, out, config=cfg)
    for counts in (_HALF_COUNTS[::-1], [1] * e, [768] * e, [0] * (e - 1) + [65]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        _check(out, reference.grouped_gemm_masked(a, a_s, b, bs, masked_m), masked_m)
