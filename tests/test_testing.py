"""moe_backend.testing on CPU: the input builders' layouts, the routing generators' guarantees."""

from __future__ import annotations

import pytest
import torch

from moe_backend import testing
from moe_backend.quant import FP8_DTYPE


def test_random_fp8_weights_shapes_and_block_scales():
    b, bs = testing.random_fp8_weights(3, 200, 256, device="cpu")
    assert b.shape == (3, 200, 256) and b.dtype == FP8_DTYPE
    assert bs.shape == (3, 2, 2) and bs.dtype == torch.float32 and (bs > 0).all()
    assert not torch.equal(b[0].float(), b[1].float())  # each expert drawn on its own


def test_masked_inputs_every_expert_holds_m_rows():
    a, a_s, b, bs, masked_m = testing.make_masked_inputs(2, 5, 128, 256, device="cpu")
    assert a.shape == (2, 5, 256) and a_s.shape == (2, 5, 2) and b.shape == (2, 128, 256)
    assert masked_m.tolist() == [5, 5] and masked_m.dtype == torch.int32


def test_contiguous_inputs_pad_each_segment_with_minus_one():
    weights = testing.random_fp8_weights(3, 128, 128, device="cpu")
    a, a_s, b, bs, ids = testing.make_contiguous_inputs(3, 5, 128, 128, 16, weights, device="cpu")
    assert b is weights[0] and a.shape == (48, 128) and ids.shape == (48,)
    assert ids.view(3, 16)[:, :5].tolist() == [[0] * 5, [1] * 5, [2] * 5]
    assert (ids.view(3, 16)[:, 5:] == -1).all()


def test_random_fp8_activations_every_expert_drawn():
    """Drawn a few experts at a time (5 experts, 2 per draw: a last partial draw), every group
    quantized with its own scale, no expert left at the empty buffer's values."""
    a, a_s = testing.random_fp8_activations(5, 3, 256, "cpu", experts_per_draw=2)
    assert a.shape == (5, 3, 256) and a.dtype == FP8_DTYPE
    assert a_s.shape == (5, 3, 2) and a_s.dtype == torch.float32
    assert bool((a_s > 0).all()) and bool(torch.isfinite(a.float()).all())
    assert bool((a.float().abs().reshape(5, 3, 2, 128).amax(dim=-1) == 448).all())  # each group at its scale
    assert not torch.equal(a[3].float(), a[4].float())


@pytest.mark.parametrize("spec, exponent", [("uniform", 0.0), ("zipf:0", 0.0), ("zipf:1.2", 1.2), ("zipf:4", 4.0)])
def test_parse_routing_exponent(spec, exponent):
    assert testing.parse_routing_exponent(spec) == exponent


@pytest.mark.parametrize("spec", ["zipf:", "zipf:-1", "zipf:5", "zipf:x", "normal", ""])
def test_parse_routing_exponent_rejects(spec):
    with pytest.raises(ValueError, match="uniform"):
        testing.parse_routing_exponent(spec)


@pytest.mark.parametrize("exponent", [0.0, 1.2])
def test_random_topk_distinct_per_token_and_seeded(exponent):
    w, ids = testing.random_topk(37, 16, 4, exponent, seed=3)
    assert ids.shape == (37, 4) and ids.dtype == torch.int32 and w.dtype == torch.float32
    assert all(len(set(row)) == 4 for row in ids.tolist())
    assert torch.allclose(w.sum(-1), torch.ones(37))
    assert torch.equal(ids, testing.random_topk(37, 16, 4, exponent, seed=3)[1])
    assert testing.random_topk(0, 16, 4, exponent)[1].shape == (0, 4)


def test_zipf_skews_and_counts_sum():
    flat, skewed = testing.zipf_counts(64, 6400, 0.0), testing.zipf_counts(64, 6400, 1.2)
    assert int(flat.sum()) == int(skewed.sum()) == 6400
    assert int(flat.max()) - int(flat.min()) <= 1 and int(skewed.max()) > 4 * 100
    assert testing.describe_counts(torch.tensor([0, 2, 4, 2])) == "max/mean 2.0x, idle 1"


def test_expert_counts_of_a_slice():
    ids = torch.tensor([[0, 5], [5, 7], [-1, 6]])
    assert testing.expert_counts(ids, 3, expert_start=5).tolist() == [2, 1, 1]


@pytest.mark.parametrize("exponent", [0.0, 0.9, 1.2])
def test_cap_counts(exponent: float) -> None:
    """One row per token at most: the hot experts are cut to the token count, the total is kept,
    nobody ends above the cap, the order of popularity survives."""
    counts = testing.zipf_counts(256, 16 * 256, exponent)
    capped = testing.cap_counts(counts, 512)
    assert int(capped.sum()) == 16 * 256 and int(capped.max()) <= 512
    assert torch.equal(capped, counts) == (int(counts.max()) <= 512)
    hot = int(torch.argmax(counts))
    assert int(capped[hot]) == min(int(counts[hot]), 512)
    with pytest.raises(ValueError, match="cap"):
        testing.cap_counts(counts, 15)


@pytest.mark.parametrize("routing", ["uniform", "zipf:0.6", "zipf:1.2"])
def test_routed_counts_average_the_mean_and_fit_the_tokens(routing):
    counts = testing.routed_counts(32, 16, routing)
    assert counts.shape == (32,) and counts.dtype == torch.int64 and int(counts.sum()) == 32 * 16
    assert int(counts.max()) <= 16 * 256 // 8  # one row per token: tokens = 16 * 256 / 8
    if routing == "uniform":
        assert (counts == 16).all()
    else:
        assert int(counts.max()) > 16 and torch.equal(counts, testing.routed_counts(32, 16, routing))
    capped = testing.routed_counts(256, 2, "zipf:4")  # tokens = 64: the hottest experts hit the cap
    assert int(capped.max()) == 64 and int(capped.sum()) == 512


def test_inputs_from_per_expert_counts():
    counts = torch.tensor([3, 0, 5])
    a, a_s, b, bs, masked_m = testing.make_masked_inputs(3, counts, 128, 256, device="cpu")
    assert a.shape == (3, 5, 256) and masked_m.tolist() == [3, 0, 5] and masked_m.dtype == torch.int32
    a, a_s, b, bs, ids = testing.make_contiguous_inputs(3, counts, 128, 128, 4, device="cpu")
    assert a.shape == (12, 128) and ids.tolist() == [0, 0, 0, -1, 2, 2, 2, 2, 2, -1, -1, -1]
    with pytest.raises(ValueError, match="m: expected"):
        testing.make_masked_inputs(2, counts, 128, 256, device="cpu")
