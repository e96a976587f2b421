"""The layer benchmark's CPU logic: the peers' layouts hold the routing's per-expert rows (and,
fed to the reference GEMMs, give every routed slot its product), the layer floor, the EP8 rank
relabelling, the targets, the docs section, and one whole cell at toy size with emulated peers.
The GPU numbers come from `python -m benchmarks.bench_layer` on the device."""

import argparse
import io
import itertools
import math

import pytest
import torch

from benchmarks import _peer_layer, bench_layer
from moe_backend import reference, testing
from moe_backend.quant import (
    dequantize_fp8_blockwise,
    dequantize_fp8_per_token_group,
    quantize_fp8_blockwise,
    quantize_fp8_per_token_group,
)

ROUTINGS = [(0.0, 0), (1.2, 1), (0.6, 2)]  # (Zipf exponent, seed): uniform and hot experts
# The same fp32 products summed in another order (GEMMs of other row counts): a few bf16 roundings
# flip by one step (2^-8); a row in the wrong place is an O(1) error.
SAME_PRODUCTS = 1e-3


def _rel(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _routed(tokens, num_experts, topk, exponent, seed):
    return testing.random_topk(tokens, num_experts, topk, exponent, seed)[1]


@pytest.mark.parametrize("exponent,seed", ROUTINGS)
@pytest.mark.parametrize("expert_start", [0, 8])
def test_local_slots_are_the_routing_grouped_by_expert(exponent, seed, expert_start):
    ids = _routed(50, 32, 4, exponent, seed)
    slot, expert = _peer_layer.local_slots(ids, 8, expert_start)
    counts = testing.expert_counts(ids, 8, expert_start)
    assert torch.equal(torch.bincount(expert, minlength=8), counts)
    assert torch.equal(ids.reshape(-1)[slot].long() - expert_start, expert)
    assert bool((expert[1:] >= expert[:-1]).all())  # grouped by expert
    same = expert[1:] == expert[:-1]
    assert bool((slot[1:][same] > slot[:-1][same]).all())  # slot order within an expert


@pytest.mark.parametrize("exponent,seed", ROUTINGS)
@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_vllm_alignment_holds_each_experts_slots_padded(exponent, seed, block_m):
    num_experts, topk, tokens = 16, 4, 37
    ids = _routed(tokens, 64, topk, exponent, seed)  # 64 global ids: 16 local, the rest dropped
    slot, expert = _peer_layer.local_slots(ids, num_experts)
    num_slots = tokens * topk
    sorted_ids, block_expert, total = _peer_layer.vllm_alignment(slot, expert, num_experts, num_slots, block_m)
    assert sorted_ids.numel() == total == block_expert.numel() * block_m
    counts = testing.expert_counts(ids, num_experts)
    blocks = sorted_ids.view(-1, block_m)
    for e in range(num_experts):
        mine = blocks[block_expert == e].reshape(-1)
        valid = mine[mine < num_slots].long()
        assert valid.numel() == counts[e]  # the same rows as the layer sees
        assert bool((mine[valid.numel() :] == num_slots).all())  # padding after the rows
        assert bool((ids.reshape(-1)[valid] == e).all())
        assert mine.numel() == -(-int(counts[e]) // block_m) * block_m  # empty experts: no block


@pytest.mark.parametrize("exponent,seed", ROUTINGS)
def test_contiguous_and_masked_layouts_hold_the_routed_rows(exponent, seed):
    num_experts, k, n = 8, 256, 128
    torch.manual_seed(seed)
    ids = _routed(40, 32, 4, exponent, seed)
    slot, expert = _peer_layer.local_slots(ids, num_experts)
    counts = testing.expert_counts(ids, num_experts)
    a = torch.randn(slot.numel(), k)
    a_fp8, a_s = quantize_fp8_per_token_group(a)
    b_fp8, b_s = quantize_fp8_blockwise(torch.randn(num_experts * n, k).view(num_experts, n, k))
    want = (
        torch.cat(
            [
                reference._expert_gemm(a_fp8[i : i + 1], a_s[i : i + 1], b_fp8[e], b_s[e])
                for i, e in enumerate(expert.tolist())
            ]
        )
        if slot.numel()
        else torch.zeros(0, n)
    )

    row, grouped_layout = _peer_layer.contiguous_rows(expert, num_experts, 128)
    assert grouped_layout.numel() % 128 == 0
    assert torch.equal(torch.bincount(grouped_layout[grouped_layout >= 0].long(), minlength=num_experts), counts)
    a_c, s_c = _peer_layer._scatter_rows(grouped_layout.numel(), row, a_fp8, a_s)
    got = reference.grouped_gemm_contiguous(a_c, s_c, b_fp8, b_s, grouped_layout)[row]
    assert _rel(got, want) <= SAME_PRODUCTS

    rank, masked_m, max_m = _peer_layer.masked_rows(expert, num_experts)
    assert torch.equal(masked_m.long(), counts) and max_m % 64 == 0 and max_m >= int(counts.max())
    a_m, s_m = _peer_layer._scatter_rows(num_experts * max_m, expert * max_m + rank, a_fp8, a_s)
    got = reference.grouped_gemm_masked(
        a_m.view(num_experts, max_m, k), s_m.view(num_experts, max_m, -1), b_fp8, b_s, masked_m
    )[expert, rank]
    assert _rel(got, want) <= SAME_PRODUCTS


def test_layer_floor_counts_touched_experts_activations_and_intermediate():
    counts = torch.tensor([0, 2, 5, 0])
    hidden, inter, tokens, topk = 256, 128, 3, 4
    f = _peer_layer.layer_floor(counts, tokens, topk, hidden, inter, read_tbs=2.0, fp8_tflops=1000.0)
    w13 = 256 * 256 + 4 * 2 * 2  # [2I, H] fp8 + [2, 2] f32 block scales
    w2 = 256 * 128 + 4 * 2 * 1
    want = 2 * (w13 + w2) + 2 * tokens * hidden * 2 + tokens * topk * 8 + 2 * 7 * (128 + 4)
    assert f["bytes"] == want and f["touched_experts"] == 2 and f["rows"] == 7
    assert f["flops"] == 6 * 7 * hidden * inter
    assert f["bound"] == "memory" and math.isclose(f["us"], want / 2e12 * 1e6)
    compute = _peer_layer.layer_floor(counts, tokens, topk, hidden, inter, read_tbs=2.0, fp8_tflops=1e-6)
    assert compute["bound"] == "compute" and math.isclose(compute["us"], f["flops"] / 1e6 * 1e6)
    idle = _peer_layer.layer_floor(torch.zeros(4, dtype=torch.long), tokens, topk, hidden, inter, 2.0, 1000.0)
    assert idle["weight_bytes"] == 0 and idle["bytes"] == 2 * tokens * hidden * 2 + tokens * topk * 8


def test_prefill_bound_counts_token_quant_and_combine_bytes():
    counts = torch.tensor([0, 2, 5, 0])
    hidden, tokens = 256, 3
    b = _peer_layer.prefill_bound(counts, tokens, 4, hidden, copy_tbs=2.0)
    quant = tokens * hidden * 3 + 4 * tokens * 2  # bf16 read, FP8 written, two 1x128 scales per token
    combine = 7 * hidden * 2 + 7 * 8 + tokens * hidden * 2  # the GEMM2 rows, their slots, the output
    assert b["quant_bytes"] == quant and b["combine_bytes"] == combine and b["bytes"] == quant + combine
    assert math.isclose(b["us"], (quant + combine) / 2e12 * 1e6)


def test_prefill_miss_says_when_the_bound_is_out_of_reach():
    cell = _cell("prefill", 16384, 3000.0, 1800.0, 1800.0, 1100.0, 3050.0, 3000.0)
    cell["prefill_bound"] = {"us": 600.0}
    d = bench_layer.derive(cell)
    assert math.isclose(d["bound_us"], 2400.0) and math.isclose(d["bound_ratio"], 4 / 3)
    assert math.isclose(d["pct_bound"], 80.0)
    assert d["misses"] == ["1.67x DG contig > 1.2 (bound 1.33x)"]
    cell["prefill_bound"] = {"us": 100.0, "bytes": 4.0e8}  # within reach: the plain miss
    assert bench_layer.derive(cell)["misses"] == ["1.67x DG contig > 1.2"]
    cell["derived"] = bench_layer.derive(cell)
    cell.update(slice="tp8", routing="uniform")
    table = bench_layer.prefill_bound_table([cell])
    assert len(table) == 3 and "| 400 | 100.0 | 1900.0 | 1.06 | 1.67 | – | 63% |" in table[2]
    # Rounds of the layer and DeepGEMM's pair: the ratio per round, lowest to highest.
    cell["round_us"] = {"layer": [3000.0, 2700.0, 3300.0], "dg_contig w13": [1000.0, 1000.0, 900.0],
                        "dg_contig w2": [800.0, 800.0, 600.0]}  # fmt: skip
    assert bench_layer.round_ratios(cell) == [3000 / 1800, 2700 / 1800, 3300 / 1500]
    assert "| 1.67 | 1.50-2.20 | 63% |" in bench_layer.prefill_bound_table([cell])[2]
    cell["round_us"]["dg_contig w2"] = [800.0]  # not timed in every round: no spread
    assert bench_layer.round_ratios(cell) is None


def test_ep8_relabel_keeps_every_count_and_picks_the_busiest_rank():
    ids = _routed(64, 256, 8, 1.2, 3)
    per_rank = testing.expert_counts(ids, 256).view(8, 32).sum(1)
    assert torch.equal(bench_layer.rank_rows(ids, 32, 8), per_rank)
    rank = int(per_rank.argmax())
    moved = bench_layer.relabel_to_rank(ids, rank, 32, 256)
    assert moved.dtype == ids.dtype
    assert torch.equal(testing.expert_counts(moved, 32), testing.expert_counts(ids, 32, 32 * rank))
    assert torch.equal(
        torch.sort(testing.expert_counts(moved, 256)).values, torch.sort(testing.expert_counts(ids, 256)).values
    )


def _cell(phase, tokens, us, best, dgc, floor_us, wall, gpu, relerr=None):
    return dict(
        phase=phase,
        tokens=tokens,
        layer_us=us,
        best_peer_us=best,
        dg_contig_us=dgc,
        floor={"us": floor_us},
        eager_wall_us=wall,
        eager_gpu_us=gpu,
        relerr=relerr,
    )


def test_targets_follow_the_issue():
    ok = bench_layer.derive(_cell("decode", 128, 300.0, 280.0, None, 250.0, 350.0, 300.0, 5e-3))
    assert ok["misses"] == [] and math.isclose(ok["ratio"], 300 / 280) and math.isclose(ok["host_us"], 50.0)
    slow = bench_layer.derive(_cell("decode", 128, 320.0, 280.0, None, 250.0, 500.0, 300.0))
    assert len(slow["misses"]) == 3  # ratio 1.14, floor 78%, host 200 µs
    near = bench_layer.derive(_cell("decode", 32, 222.0, 215.2, None, 176.5, 235.0, 427.0))
    assert near["misses"] == ["floor 79.5% < 80%"]  # not "80% < 80%"
    edge = bench_layer.derive(_cell("decode", 1, 64.0, 58.0, None, 31.6, 100.0, 100.0))
    assert edge["misses"] == ["1.103x peer > 1.1"]  # not "1.10x peer > 1.1"
    far = bench_layer.derive(_cell("decode", 32, 300.0, 250.0, None, 200.0, 100.0, 100.0))
    assert far["misses"] == ["1.20x peer > 1.1", "floor 67% < 80%"]
    small = bench_layer.derive(_cell("decode", 8, 100.0, 95.0, None, 10.0, 120.0, 100.0))
    assert small["misses"] == []  # the floor target starts at 32 tokens
    prefill = bench_layer.derive(_cell("prefill", 2048, 1300.0, 1000.0, 1100.0, 500.0, 1350.0, 1300.0))
    assert prefill["misses"] == []  # 1.18x DeepGEMM contiguous
    no_peer = bench_layer.derive(_cell("prefill", 2048, 1300.0, None, None, 500.0, None, None, 2e-2))
    assert len(no_peer["misses"]) == 3  # no DeepGEMM figure, no host figure, rel err


def test_docs_section_is_replaced_not_duplicated():
    doc = "# Benchmarks\n\nintro\n\n## Other\n\nx\n\n## Notes\n\n- n\n"
    sec = "## Layer (H200)\n\nrun 1\n"
    once = bench_layer.replace_section(doc, sec)
    assert once.index("## Layer (H200)") < once.index("## Notes") and once.count("## Other") == 1
    twice = bench_layer.replace_section(once, "## Layer (H200)\n\nrun 2\n")
    assert "run 1" not in twice and twice.count("## Layer (H200)") == 1 and twice.endswith("## Notes\n\n- n\n")
    other = bench_layer.replace_section(twice, "## Layer (H100)\n\nrun 3\n")
    assert "run 2" in other and "run 3" in other
    assert bench_layer.replace_section("", sec) == sec
    assert bench_layer.replace_section("# T\n", sec) == "# T\n\n" + sec
    # a subsection written under the table outlives the table's next run
    kept = bench_layer.replace_section(
        "## Layer (H200)\n\nrun 1\n\n### Why\n\nnotes\n\n## Notes\n", "## Layer (H200)\n\nrun 2\n"
    )
    assert kept == "## Layer (H200)\n\nrun 2\n\n### Why\n\nnotes\n\n## Notes\n"


# -- one cell end to end at toy size, the peers emulated in torch --------------------------------


class _FusedMoeEmulation:
    """The contract of vLLM's fused_moe_kernel as the launcher drives it: block b of sorted_token_ids
    multiplies expert expert_ids[b]; C row = slot, A row = slot // top_k; slots >= num_valid skipped."""

    def __getitem__(self, grid):
        return self._run

    @staticmethod
    def _run(
        a_ptr,
        b_ptr,
        c_ptr,
        a_scale_ptr,
        b_scale_ptr,
        sorted_token_ids_ptr,
        expert_ids_ptr,
        num_tokens_post_padded_ptr,
        num_valid_tokens,
        EM,
        BLOCK_SIZE_M,
        top_k,
        **_,
    ):
        a = dequantize_fp8_per_token_group(a_ptr, a_scale_ptr)
        b = dequantize_fp8_blockwise(b_ptr, b_scale_ptr)
        blocks = min(EM, int(num_tokens_post_padded_ptr[0])) // BLOCK_SIZE_M
        for blk in range(blocks):
            ids = sorted_token_ids_ptr[blk * BLOCK_SIZE_M : (blk + 1) * BLOCK_SIZE_M].long()
            ids = ids[ids < num_valid_tokens]
            c_ptr[ids] = (a[ids // top_k] @ b[int(expert_ids_ptr[blk])].t()).to(c_ptr.dtype)


class _DeepGemmEmulation:
    def __init__(self, masked_garbage=False):
        self.masked_garbage = masked_garbage

    def get_mk_alignment_for_contiguous_layout(self):
        return 128

    def transform_sf_into_required_layout(self, sf, mn, k, recipe, num_groups, is_sfa):
        return sf

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, out, grouped_layout):
        reference.grouped_gemm_contiguous(a[0], a[1], b[0], b[1], grouped_layout, out)

    def m_grouped_fp8_fp4_gemm_nt_masked(self, a, b, out, masked_m, expected_m):
        reference.grouped_gemm_masked(a[0], a[1], b[0], b[1], masked_m, out)
        if self.masked_garbage:
            out.mul_(1.5)


@pytest.fixture
def toy_bench(monkeypatch):
    """bench_layer at toy size on the CPU: 32 global experts, 8 ranks of 4, hidden 256, I 128, top-4;
    the peers emulated in torch, every timing a fixed number."""
    monkeypatch.setattr(bench_layer, "DEVICE", "cpu")
    monkeypatch.setattr(bench_layer, "HIDDEN", 256)
    monkeypatch.setattr(bench_layer, "GLOBAL_EXPERTS", 32)
    monkeypatch.setattr(bench_layer, "TOPK", 4)
    monkeypatch.setattr(bench_layer, "SLICES", {"ep8": (4, 128), "tp8": (32, 128)})
    monkeypatch.setattr(bench_layer, "DECODE_MAX_TOKENS", 16)  # prefill from 17 tokens

    # Fixed "timings" per contender, so the best-peer choice is known.
    def graph_us(fn, warmup_ms=10, rep_ms=50, on_output=None):
        out = fn()
        if on_output is not None:
            on_output(out)
        return 200.0

    monkeypatch.setattr(bench_layer, "graph_us", graph_us)
    monkeypatch.setattr(bench_layer, "eager_us", lambda fn: (fn(), 300.0)[1])
    # Rounds of wall and GPU timing: one round of each is off (a hiccup); the medians are not.
    walls, gpus = itertools.cycle((380.0, 1000.0, 370.0)), itertools.cycle(((290.0, 12.0), (90.0, 12.0), (295.0, 12.0)))
    monkeypatch.setattr(bench_layer, "wall_us", lambda fn, calls: next(walls))
    monkeypatch.setattr(bench_layer, "gpu_kernel_us", lambda fn, calls: next(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    return bench_layer


def _toy_weights(num_experts, inter, hidden=256):
    torch.manual_seed(0)
    w = {}
    for gemm, (n, k) in {"w13": (2 * inter, hidden), "w2": (hidden, inter)}.items():
        q = [quantize_fp8_blockwise(torch.randn(n, k) * 0.05) for _ in range(num_experts)]
        w[gemm] = (torch.stack([t[0] for t in q]), torch.stack([t[1] for t in q]))
    return w


@pytest.mark.parametrize("sl,spec,tokens", [("ep8", "zipf:1.2", 12), ("tp8", "uniform", 40)])
def test_one_cell_end_to_end_with_emulated_peers(toy_bench, sl, spec, tokens):
    weights = _toy_weights(*toy_bench.SLICES[sl])
    cfgs = [
        dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=3),
        dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=3),
    ]
    peers = dict(
        vllm=_FusedMoeEmulation(),
        vllm_cfgs=cfgs,
        dg=_DeepGemmEmulation(masked_garbage=True),
        dg_sfb={g: bs for g, (_, bs) in weights.items()},
    )
    args = argparse.Namespace(
        seed=0,
        ep8_rank="busiest",
        check_tokens={tokens},
        graph_prefill=False,
        eager_calls=2,
        profile_calls=1,
        host_rounds=3,
        masked_budget_gib=1.0,
    )
    ceil = dict(read_tbs=4.0, fp8_tflops=1000.0, copy_tbs=4.0)
    cell = toy_bench.run_cell(sl, spec, tokens, weights, peers, ceil, args, io.StringIO())

    assert cell["phase"] == ("decode" if tokens <= 16 else "prefill")
    assert cell["relerr"] is not None and cell["relerr"] < bench_layer.LAYER_RELERR_MAX
    if cell["phase"] == "decode":
        assert cell["relerr_graph"] < bench_layer.LAYER_RELERR_MAX
    assert cell["layer_us"] == (200.0 if cell["phase"] == "decode" else 300.0)
    counts = torch.tensor(cell["counts"])
    assert int(counts.sum()) == cell["floor"]["rows"] > 0
    if sl == "ep8":  # the local experts are the busiest rank's
        _, ids = testing.random_topk(tokens, 32, 4, testing.parse_routing_exponent(spec), 0)
        assert int(counts.sum()) == int(bench_layer.rank_rows(ids, 4, 8).max())
    for peer in ("vllm", "dg_contig"):
        for gemm in _peer_layer.GEMMS:
            t = cell["peers"][peer][gemm]
            assert t["us"] == 200.0 and t["relerr"] < _peer_layer.PEER_RELERR_MAX, (peer, gemm, t)
    assert len(cell["peers"]["vllm"]["w13"]["screened"]) == len(cfgs)
    # A peer whose output fails the check is shown but never the best.
    assert all(cell["peers"]["dg_masked"][g]["relerr"] > 0.1 for g in _peer_layer.GEMMS)
    assert cell["best_peer_us"] == 400.0 and "dg_masked" not in cell["best_peer_which"]
    assert cell["rows_desc"].endswith(f"{int((counts == 0).sum())} idle")
    assert cell["dg_contig_us"] == 400.0
    d = cell["derived"]
    assert math.isclose(d["host_us"], 90.0) and math.isclose(d["ratio"], cell["layer_us"] / 400.0)
    lines = bench_layer.summary_table([cell]) + bench_layer.peer_table([cell])
    assert all(line.count("|") == lines[0].count("|") for line in lines[:3])
    assert all(line.count("|") == lines[3].count("|") for line in lines[3:])


def test_retime_interleaved_alternates_and_takes_medians(monkeypatch):
    """The layer and the peer GEMMs its targets compare with are timed again in alternating rounds;
    each figure becomes the median over all its rounds (the first pass counted), the others stay."""
    PT = _peer_layer.PeerTime
    times = {
        "vllm": {"w13": PT(100.0, 1e-3), "w2": PT(80.0, 1e-3)},
        "dg_contig": {"w13": PT(120.0, 1e-3), "w2": PT(60.0, 1e-3)},
        "dg_masked": {"w13": PT(500.0, 1e-3), "w2": PT(90.0, 1e-3)},
    }
    later = {  # rounds 2 and 3 of each contender
        "layer": iter([300.0, 150.0]),
        "vllm w13": iter([130.0, 110.0]),
        "dg_contig w13": iter([125.0, 100.0]),
        "dg_contig w2": iter([70.0, 50.0]),
    }
    order = []

    def timed(tag):
        order.append(tag)
        return next(later[tag])

    monkeypatch.setattr(bench_layer, "graph_us", lambda fn, *a, **k: timed(fn()))
    monkeypatch.setattr(bench_layer, "eager_us", lambda fn: timed(fn()))
    final = {(p, g): (lambda tag=f"{p} {g}": tag) for p in times for g in _peer_layer.GEMMS}
    cell = dict(layer_us=200.0, layer_graphed=False)
    bench_layer.retime_interleaved(cell, lambda: "layer", times, final, rounds=3)
    assert order == ["layer", "vllm w13", "dg_contig w2", "dg_contig w13"] * 2
    assert cell["layer_us"] == 200.0 and cell["first_pass"]["layer_us"] == 200.0 and cell["rounds"] == 3
    assert cell["round_us"]["layer"] == [200.0, 300.0, 150.0] and cell["round_us"]["vllm w13"] == [100.0, 130.0, 110.0]
    assert times["vllm"]["w13"].us == 110.0 and times["dg_contig"]["w13"].us == 120.0
    assert times["dg_contig"]["w2"].us == 60.0 and cell["first_pass"]["dg_contig w2"] == 60.0
    assert times["vllm"]["w2"].us == 80.0 and times["dg_masked"]["w13"].us == 500.0  # not compared: as timed


def test_docs_section_from_a_runs_json(toy_bench, tmp_path, capsys):
    import json

    weights = _toy_weights(*toy_bench.SLICES["tp8"])
    peers = dict(dg=_DeepGemmEmulation(), dg_sfb={g: bs for g, (_, bs) in weights.items()})
    args = argparse.Namespace(
        seed=0,
        ep8_rank="busiest",
        check_tokens=set(),
        graph_prefill=False,
        eager_calls=2,
        profile_calls=1,
        host_rounds=3,
        masked_budget_gib=1.0,
    )
    ceil = dict(read_tbs=4.0, fp8_tflops=1000.0, copy_tbs=4.0)
    cells = [
        toy_bench.run_cell("tp8", spec, 16, weights, peers, ceil, args, io.StringIO())
        for spec in ("uniform", "zipf:1.2")
    ]
    env = dict(
        device="Toy GPU", torch="t", triton="tr", cuda="c", date="today", deep_gemm="emulated", vllm_source="not loaded"
    )
    run = tmp_path / "layer.json"
    run.write_text(
        json.dumps(
            dict(env=env, ceilings=ceil, selection="--slices tp8", cells=cells, skipped=["tp8 uniform 2048"]),
            default=float,
        )
    )
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Notes\n\n- n\n")
    for _ in range(2):  # the second run replaces the section
        assert bench_layer.main(["--from-json", str(run), "--md", str(doc)]) == 0
    text = doc.read_text()
    assert text.count(f"{bench_layer.MD_HEADING} (Toy GPU)") == 1 and text.index("(Toy GPU)") < text.index("## Notes")
    assert "| tp8 | zipf:1.2 | 16 |" in text and "tp8 uniform 2048" in text
    assert "| tp8 | uniform | 16 |" in capsys.readouterr().out


def test_main_writes_json_docs_and_the_table_last(toy_bench, monkeypatch, tmp_path, capsys):
    import json

    import moe_backend.testing

    def toy_random_weights(e, n, k):
        q = [quantize_fp8_blockwise(torch.randn(n, k) * 0.05) for _ in range(e)]
        return torch.stack([t[0] for t in q]), torch.stack([t[1] for t in q])

    monkeypatch.setattr(moe_backend.testing, "random_fp8_weights", toy_random_weights)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Toy GPU")
    monkeypatch.setattr(bench_layer, "measure_ceilings", lambda: dict(read_tbs=4.0, copy_tbs=4.0, fp8_tflops=1000.0))
    monkeypatch.setattr(
        bench_layer,
        "load_peers",
        lambda log: (dict(dg=_DeepGemmEmulation()), dict(deep_gemm="emulated", vllm_source="–")),
    )
    doc, run = tmp_path / "benchmarks.md", tmp_path / "layer.json"
    assert (
        bench_layer.main(
            [
                "--slices",
                "tp8,ep8",
                "--tokens",
                "8,40",
                "--routing",
                "zipf:1.2",
                "--check-tokens",
                "8",
                "--json",
                str(run),
                "--md",
                str(doc),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("| ep8 | zipf:1.2 | 40 |") and out[-6].startswith("| slice |")
    saved = json.loads(run.read_text())
    assert [(c["slice"], c["tokens"]) for c in saved["cells"]] == [("tp8", 8), ("tp8", 40), ("ep8", 8), ("ep8", 40)]
    assert all(c["peers"]["dg_contig"]["w13"]["us"] == 200.0 for c in saved["cells"])
    assert saved["cells"][0]["relerr"] < bench_layer.LAYER_RELERR_MAX and saved["skipped"] == []
    assert "(Toy GPU)" in doc.read_text() and "--slices tp8,ep8" in doc.read_text()
