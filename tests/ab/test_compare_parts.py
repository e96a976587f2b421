"""The pieces of `compare`: routing, slices, divergence, winners and the emitted policy."""

import json
import math

import pytest
import torch

from moe_backend.ab.divergence import divergence, divergence_sums, from_sums
from moe_backend.ab.routing import make_routing, parse_routing
from moe_backend.ab.slices import checkpoint_slice_weights, parse_slices, random_slice_weights
from moe_backend.ab.winners import cell_winners, policy_section
from moe_backend.config import MoEConfig
from moe_backend.dispatch.policy import KERNELS, Policy
from moe_backend.quant import dequantize_fp8_blockwise


def _max_over_mean(ids, num_experts):
    counts = torch.bincount(ids.reshape(-1).long(), minlength=num_experts).double()
    return float(counts.max() / counts.mean())


def test_routing_uniform_zipf_and_file(tmp_path):
    w, ids = make_routing(parse_routing("uniform"), 4096, 256, 8, seed=1)
    assert ids.dtype == torch.int32 and ids.shape == (4096, 8) and w.dtype == torch.float32
    assert torch.allclose(w.sum(-1), torch.ones(4096))
    assert all(len(set(row)) == 8 for row in ids.tolist()[:200])  # distinct experts per token
    _, zipf = make_routing(parse_routing("zipf:1.2"), 4096, 256, 8, seed=1)
    assert _max_over_mean(zipf, 256) > 3 * _max_over_mean(ids, 256)
    assert torch.equal(
        make_routing(parse_routing("zipf:1.2"), 64, 256, 8, seed=5)[1],
        make_routing(parse_routing("zipf:1.2"), 64, 256, 8, seed=5)[1],
    )
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([[0, 1], [2, 3], [4, 5]]))
    _, from_file = make_routing(parse_routing(str(path)), 7, 8, 2)
    assert from_file.tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5], [0, 1]]  # cycled
    torch.save(torch.tensor([[1, 2]]), tmp_path / "ids.pt")
    assert make_routing(parse_routing(str(tmp_path / "ids.pt")), 2, 8, 2)[1].tolist() == [[1, 2], [1, 2]]
    with pytest.raises(ValueError, match="top-2 ids, the layer is top-8$"):
        make_routing(parse_routing(str(path)), 4, 256, 8)
    with pytest.raises(ValueError, match=r"top-2 ids, the layer is top-1 \(--size small halves top-k"):
        make_routing(parse_routing(str(path)), 4, 256, 1)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\)"):
        make_routing(parse_routing(str(path)), 4, 4, 2)
    for bad in ("", "zipf:x", "zipf:-1", "gauss", str(tmp_path / "missing.pt")):
        with pytest.raises(ValueError, match="routing"):
            parse_routing(bad)


def test_slices_of_deepseek_v3():
    ep8, tp8 = parse_slices("ep8,tp8", MoEConfig())
    assert (ep8.local_experts, ep8.num_experts, ep8.intermediate, ep8.hidden, ep8.topk) == (32, 256, 2048, 7168, 8)
    assert (tp8.local_experts, tp8.num_experts, tp8.intermediate, tp8.tp) == (256, 256, 256, 8)
    small_ep8, small_tp8 = parse_slices("ep8,tp8", MoEConfig(), small=True)
    assert (small_ep8.local_experts, small_ep8.num_experts, small_ep8.intermediate, small_ep8.hidden) == (
        2,
        16,
        256,
        256,
    )
    assert (small_tp8.local_experts, small_tp8.intermediate, small_tp8.topk) == (16, 128, 4)
    assert parse_slices("full", MoEConfig())[0].local_experts == 256
    for bad, msg in (("ep3", "must divide"), ("tp3", "multiple of 128"), ("xx", "expected epN"), ("", "ep8,tp8")):
        with pytest.raises(ValueError, match=msg):
            parse_slices(bad, MoEConfig())


def test_config_json_slice(tmp_path):
    cfg = {
        "hidden_size": 256,
        "moe_intermediate_size": 128,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (s,) = parse_slices(str(tmp_path / "config.json"), MoEConfig())
    assert (s.hidden, s.intermediate, s.local_experts, s.topk) == (256, 128, 8, 2)


def test_tp_shard_of_checkpoint_weights():
    """Rank 0's TP2 shard: gate rows [0, I/2), up rows [I, I + I/2), w2 columns [0, I/2)."""
    full = parse_slices(
        "full",
        MoEConfig(
            hidden_size=256,
            moe_intermediate_size=256,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
        ),
    )[0]
    w13, w13_s, w2, w2_s = random_slice_weights(full, torch.device("cpu"), seed=3)
    tp2 = parse_slices(
        "tp2",
        MoEConfig(
            hidden_size=256,
            moe_intermediate_size=256,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
        ),
    )[0]
    s13, s13_s, s2, s2_s = checkpoint_slice_weights(tp2, w13, w13_s, w2, w2_s)
    assert s13.shape == (4, 256, 256) and s2.shape == (4, 256, 128)
    d13, ds13 = dequantize_fp8_blockwise(w13, w13_s), dequantize_fp8_blockwise(s13, s13_s)
    assert torch.equal(ds13[:, :128], d13[:, :128]) and torch.equal(ds13[:, 128:], d13[:, 256:384])
    assert torch.equal(dequantize_fp8_blockwise(s2, s2_s), dequantize_fp8_blockwise(w2, w2_s)[:, :, :128])


def test_divergence_metrics():
    ref = torch.randn(64, 256)
    same = divergence(ref.clone(), ref)
    assert float(same["rel_err"]) == 0 and float(same["max_abs"]) == 0 and float(same["argmax_agreement"]) == 1
    off = ref.clone()
    off[0] += 100.0 * torch.nn.functional.one_hot(ref[0].argmin(), 256)  # moves row 0's argmax
    d = divergence(off, ref)
    assert float(d["max_abs"]) == pytest.approx(100.0)
    assert float(d["argmax_agreement"]) == pytest.approx(63 / 64)
    assert float(d["rel_err"]) == pytest.approx(100.0 / float(ref.norm()), rel=1e-5)
    valid = torch.ones(64, dtype=torch.bool)
    valid[0] = False  # the only differing row is not an output row
    assert float(divergence(off, ref, valid)["rel_err"]) == 0
    zero = torch.zeros(3, 8)
    assert float(divergence(zero, zero)["rel_err"]) == 0  # no local tokens: agreement, not 0/0
    assert float(divergence(zero + 1, zero)["rel_err"]) == float("inf")
    # NaN out of a backend on a cell whose reference is zero (no local pairs) is flagged, not agreement;
    # the host-side metrics shadow mode computes from the sums say the same.
    nan = torch.full((3, 8), float("nan"))
    assert math.isnan(float(divergence(nan, zero)["rel_err"]))
    assert math.isnan(from_sums(divergence_sums(nan, zero))["rel_err"])
    assert math.isnan(float(divergence(nan, ref[:3, :8])["rel_err"]))
    with pytest.raises(ValueError, match="shape"):
        divergence(zero, torch.zeros(3, 9))


def _row(backend, kernel, tokens, us, rel=1e-3, slice_name="ep8"):
    return dict(
        slice=slice_name,
        tokens=tokens,
        phase="decode" if tokens <= 256 else "prefill",
        backend=backend,
        kernel=kernel,
        time_us=us,
        rel_err=rel,
        diverges=rel > 1e-2,
    )


def test_cells_without_routed_pairs_have_no_winner():
    rows = [dict(_row("phasemoe", "contiguous", 1, 90.0), pairs=0), dict(_row("triton", "triton", 1, 2.0), pairs=0)]
    rows += [
        dict(_row("phasemoe", "contiguous", 64, 90.0), pairs=12),
        dict(_row("triton", "triton", 64, 95.0), pairs=12),
    ]
    assert list(cell_winners(rows)) == [("ep8", 64)]
    assert cell_winners(rows)[("ep8", 64)]["backend"] == "phasemoe"


def test_policy_from_winners():
    rows = []
    for t in (1, 8, 128, 256):  # decode: the masked kernel best, static
        rows += [
            _row("masked", "masked", t, 10),
            _row("contiguous", "contiguous", t, 11),
            _row("triton", "triton", t, 12),
        ]
    for t in (2048, 8192):  # prefill: contiguous far ahead; the wrong kernel is fastest but diverges
        rows += [
            _row("masked", "masked", t, 200),
            _row("contiguous", "contiguous", t, 100),
            _row("wrong", "triton_contiguous", t, 50, rel=0.5),
            _row("custom", None, t, 1),
        ]
    section = policy_section(rows)
    assert section == {"prefill_kernel": "contiguous", "decode_kernel": "masked", "decode_max_tokens": 256}
    Policy.from_dict({"devices": {"X": section}}, "X")
    winners = cell_winners(rows)
    assert winners[("ep8", 8192)]["backend"] == "custom"  # registered backends win cells, not policies
    assert all(w["backend"] != "wrong" for w in winners.values())
    # The decode winner 9% behind from 128 tokens: it still wins the decode range, up to 8 tokens.
    slow = [
        dict(r, time_us=r["time_us"] * (1.2 if r["tokens"] >= 128 and r["kernel"] == "masked" else 1.0))
        for r in rows
        if r["kernel"]
    ]
    section = policy_section(slow)
    assert section["decode_max_tokens"] == 8 and section["decode_kernel"] == "masked"
    assert section["prefill_kernel"] == "contiguous"
    # Nothing valid: no section (a calibration is never overwritten without evidence).
    assert policy_section([_row("wrong", "masked", 8, 1, rel=1.0)]) is None
    assert policy_section([]) is None


def test_masked_layout_cells_that_outgrow_the_gpu_are_skipped(monkeypatch):
    from types import SimpleNamespace

    from moe_backend.ab.sweep import _masked_buffers_too_big

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=141 * 2**30))
    ep8, tp8 = parse_slices("ep8,tp8", MoEConfig())
    cuda = torch.device("cuda")
    masked, contiguous = KERNELS["masked"], KERNELS["contiguous"]
    assert _masked_buffers_too_big(masked, ep8, 16384, cuda) is None  # 32 x 16384 rows: ~15 GiB
    assert _masked_buffers_too_big(masked, tp8, 2048, cuda) is None
    assert "~89 GiB" in _masked_buffers_too_big(masked, tp8, 16384, cuda)  # 256 x 16384 rows
    assert _masked_buffers_too_big(contiguous, tp8, 16384, cuda) is None
    assert _masked_buffers_too_big(masked, tp8, 16384, torch.device("cpu")) is None


def test_small_cells_get_room_for_fp8_noise():
    from moe_backend.ab.divergence import cell_tolerance

    assert cell_tolerance(1e-2, 1) == pytest.approx(3e-2)  # one pair: the H200's 1.15e-2 passes
    assert cell_tolerance(1e-2, 10_000) == pytest.approx(1.02e-2)  # large cells: the tolerance itself
    assert cell_tolerance(1e-2, 1) < 0.05  # a 5% perturbation is still flagged in any cell


def test_fixed_kernel_backends_replay_graphs_up_to_a_prefill_chunk():
    """A/B backends (DeepGEMM's and the fixed kernels) replay graphs past the served policy's limit;
    `phasemoe` runs the served policy as it is."""
    from moe_backend.ab.backends import AB_GRAPH_MAX_TOKENS, get_backend
    from moe_backend.dispatch.policy import Policy

    served = Policy.from_env()
    assert get_backend("triton")._run_policy().graph_max_tokens == max(served.graph_max_tokens, AB_GRAPH_MAX_TOKENS)
    assert get_backend("triton")._run_policy().decode_kernel == served.decode_kernel  # only the graph limit moves
    assert get_backend("deepgemm")._run_policy().graph_max_tokens == AB_GRAPH_MAX_TOKENS
    assert get_backend("phasemoe")._run_policy() == served
