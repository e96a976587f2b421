"""The layouts' torch twins (`moe_backend.reference.layouts`) against layouts written out by hand
from topk_ids: the rows each local slot lands on, padding, overflow, the permute -> combine round trip."""

import pytest
import torch

from moe_backend.dispatch import max_contiguous_rows
from moe_backend.reference import build_contiguous_layout, build_masked_layout, combine, permute

# (tokens, topk, global experts, local range): skewed, empty experts, EP slices, a single token
CASES = [
    (1, 4, 16, (0, 16)),
    (7, 2, 8, (0, 8)),
    (33, 4, 16, (4, 8)),
    (64, 8, 32, (24, 32)),
    (5, 3, 6, (0, 6)),
]


def _topk_ids(tokens, topk, experts, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # every token picks expert 0 plus random others
        rest = torch.stack([torch.randperm(experts - 1, generator=g)[: topk - 1] + 1 for _ in range(tokens)])
        return torch.cat([torch.zeros(tokens, 1, dtype=torch.long), rest], 1).int()
    return torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(tokens)]).int()


def _expected_rows(topk_ids, start, stop):
    """(token, slot) pairs per local expert, in token order."""
    rows = {e: [] for e in range(stop - start)}
    for t in range(topk_ids.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if start <= e < stop:
                rows[e - start].append((t, j))
    return rows


@pytest.mark.parametrize("tokens, topk, experts, local", CASES)
@pytest.mark.parametrize("exact_size", [True, False])
@pytest.mark.parametrize("skew", [False, True])
def test_contiguous_layout(tokens, topk, experts, local, exact_size, skew):
    topk_ids = _topk_ids(tokens, topk, experts, seed=tokens, skew=skew)
    start, stop = local
    alignment = 4
    layout = build_contiguous_layout(
        topk_ids, stop - start, expert_start=start, alignment=alignment, exact_size=exact_size
    )
    expected = _expected_rows(topk_ids, start, stop)
    offsets = layout.expert_offsets.tolist()
    for e, pairs in expected.items():
        seg = list(range(offsets[e], offsets[e] + len(pairs)))
        assert offsets[e] % alignment == 0
        assert offsets[e + 1] - offsets[e] == -(-len(pairs) // alignment) * alignment
        assert layout.expert_ids[seg].tolist() == [e] * len(pairs)
        assert layout.expert_ids[offsets[e] + len(pairs) : offsets[e + 1]].tolist() == [-1] * (
            offsets[e + 1] - offsets[e] - len(pairs)
        )
        assert layout.src_token[seg].tolist() == [t for t, _ in pairs]
        for r, (t, j) in zip(seg, pairs):
            assert int(layout.row_of_slot[t, j]) == r
        assert int(layout.tokens_per_expert[e]) == len(pairs)
    local_mask = (topk_ids >= start) & (topk_ids < stop)
    assert bool((layout.row_of_slot[~local_mask] == -1).all())
    # Padding rows (in segments and the tail) copy no token: src_token -1 exactly where expert_ids is.
    assert torch.equal(layout.src_token < 0, layout.expert_ids < 0)
    assert bool((layout.src_token[layout.src_token < 0] == -1).all())
    if exact_size:
        assert layout.num_rows == offsets[-1]
    else:
        assert layout.num_rows == max_contiguous_rows(tokens * topk, stop - start, alignment) >= offsets[-1]
        assert bool((layout.expert_ids[offsets[-1] :] == -1).all())


@pytest.mark.parametrize("tokens, topk, experts, local", CASES)
def test_masked_layout(tokens, topk, experts, local):
    topk_ids = _topk_ids(tokens, topk, experts, seed=tokens + 1)
    start, stop = local
    layout = build_masked_layout(topk_ids, stop - start, expert_start=start)
    assert layout.max_m == tokens
    for e, pairs in _expected_rows(topk_ids, start, stop).items():
        assert int(layout.masked_m[e]) == len(pairs)
        assert layout.src_token[e, : len(pairs)].tolist() == [t for t, _ in pairs]
        for r, (t, j) in enumerate(pairs):
            assert int(layout.row_of_slot[t, j]) == e * layout.max_m + r
        assert layout.src_token[e, len(pairs) :].tolist() == [-1] * (layout.max_m - len(pairs))


def test_masked_overflow_raises_instead_of_dropping():
    topk_ids = torch.zeros(6, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="max_m"):
        build_masked_layout(topk_ids, 2, max_m=4)
    assert build_masked_layout(topk_ids, 2, max_m=6).masked_m.tolist() == [6, 0]


def test_masked_overflow_dropped_on_request():
    """drop_overflow=True (no host sync, as the kernel): each expert keeps its first max_m slots in
    (token, slot) order; the rest map to no row and so contribute nothing to combine."""
    topk_ids = torch.tensor([[0, 1], [1, 0], [0, 2], [0, 1]], dtype=torch.int32)
    layout = build_masked_layout(topk_ids, 2, max_m=2, drop_overflow=True)
    assert layout.masked_m.tolist() == [2, 2]
    assert layout.src_token.tolist() == [[0, 1], [0, 1]]
    assert layout.row_of_slot.tolist() == [[0, 2], [3, 1], [-1, -1], [-1, -1]]


def test_permute_zeroes_padding_rows():
    topk_ids = torch.tensor([[0, 2], [2, 3]], dtype=torch.int32)
    x = torch.randn(2, 8)
    contiguous = build_contiguous_layout(topk_ids, 3, alignment=4, exact_size=False)
    y = permute(x, contiguous)
    pad = contiguous.src_token < 0
    assert pad.any() and not y[pad].any()
    assert torch.equal(y[~pad], x[contiguous.src_token[~pad]])
    masked = build_masked_layout(topk_ids, 3)
    assert masked.src_token.tolist() == [[0, -1], [-1, -1], [0, 1]]
    assert not permute(x, masked)[1].any() and torch.equal(permute(x, masked)[2], x)


@pytest.mark.parametrize("kind", ["contiguous", "masked"])
def test_permute_combine_round_trip(kind):
    """Identity experts: combine(permute(x)) == sum of the local slots' weights * x."""
    tokens, topk, experts = 9, 3, 8
    topk_ids = _topk_ids(tokens, topk, experts, seed=3)
    topk_ids[2] = torch.tensor([5, 6, 7])  # token 2: no local expert among [0, 4)
    weights = torch.rand(tokens, topk)
    x = torch.randn(tokens, 256, dtype=torch.bfloat16)
    if kind == "contiguous":
        layout = build_contiguous_layout(topk_ids, 4, alignment=8)
    else:
        layout = build_masked_layout(topk_ids, 4)
    y = permute(x, layout).clone()
    # poison rows that hold no token: combine must never read them
    if kind == "contiguous":
        y[layout.expert_ids < 0] = float("nan")
    else:
        for e, m in enumerate(layout.masked_m.tolist()):
            y[e, m:] = float("nan")
    out = combine(y, layout, weights)
    local = (topk_ids < 4).float()
    want = (weights * local).sum(1, keepdim=True) * x.float()
    assert torch.isfinite(out.float()).all()
    assert torch.allclose(out.float(), want, rtol=8e-3, atol=1e-6)
    assert torch.equal(out[2].float(), torch.zeros(256))


def test_bad_inputs():
    with pytest.raises(TypeError, match="topk_ids: expected dtype"):
        build_contiguous_layout(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="topk_ids: expected 2 dims"):
        build_masked_layout(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="num_local_experts"):
        build_masked_layout(torch.zeros(2, 2, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="expert_start"):
        build_contiguous_layout(torch.zeros(2, 2, dtype=torch.int32), 4, expert_start=-1)
