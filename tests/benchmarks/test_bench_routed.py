"""CPU smoke test of the routed benchmark (`benchmarks/bench_grouped_gemm.py --routings`): one
cell's logic (layouts, the padding checks, the reference check, the ratios, the table) on tiny
shapes, our kernels under the Triton interpreter, so a GPU run does not fail on the bench itself;
and vLLM's launcher fed per-expert counts (its id arrays, without the peer's kernel)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from benchmarks import _peers
from tests.helpers.interpreter import interpreted_json, run_interpreted

SCRIPT = r"""
import json, sys
import torch
from benchmarks import bench_grouped_gemm as bg
from moe_backend import testing
from moe_backend.quant import quantize_fp8_blockwise

bg.DEVICE = "cpu"
bg.bench = lambda fn: (fn(), 1.0)[1]  # one call, no timing on CPU
e, n, k = 6, 72, 256
b, bs = quantize_fp8_blockwise(torch.randn(e, n, k, generator=torch.Generator().manual_seed(0)) * 0.05)
counts = testing.zipf_counts(e, 8 * e, 1.2)
counts[int(torch.argmin(counts))] = 0  # an idle expert
counts[int(torch.argmax(counts))] += 8 * e - int(counts.sum())

class Args:
    vllm_configs = 2
    cuda_masked = False
    rounds = 1

res = bg.run_routed_cell("tp8", "w2", e, n, k, 256, 8, "zipf:1.2", counts, [16, 128, 1024], (b, bs),
                         bg.RefChecker(b, bs, experts=()), {}, Args, sys.stderr)
res["derived"] = bg.derive_routed(res)
res["table"] = bg.render_routed([res])
print(json.dumps(res))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_routed_cell_on_the_interpreter() -> None:
    res = interpreted_json(SCRIPT)
    assert not res.get("errors"), res.get("errors")
    top = res["max_rows"]
    assert res["max_ms"] == [m for m in (16, 128, 1024) if m >= top] and res["idle"] >= 1
    expected = {f"ours_masked@{m}" for m in res["max_ms"]} | {"ours_contig", "ours_contig_small"}
    assert set(res["us"]) == expected
    assert all(res["pad_ok"][name] for name in expected), res["pad_ok"]
    assert all(res["err"][name] <= 2e-3 for name in expected), res["err"]
    d = res["derived"]
    assert d["max_m_cost"] == 1.0 and d["pad_ok"] and d["best_peer"] is None  # no peers on CPU
    assert "zipf:1.2 (max/mean" in res["table"] and "| ok |" in res["table"]


MAIN_SCRIPT = r"""
import argparse, json, sys
import torch
from benchmarks import bench_grouped_gemm as bg
from moe_backend.quant import quantize_fp8_blockwise

bg.DEVICE = "cpu"
bg.bench = lambda fn: (fn(), 1.0)[1]
bg.SHAPES = {"tp8": [("w13", 8, 64, 128, 256), ("w2", 8, 72, 256, 256)]}
bg.random_fp8_weights = lambda e, n, k: quantize_fp8_blockwise(torch.randn(e, n, k) * 0.05)
out = sys.argv[1]
args = argparse.Namespace(slices="tp8", tp8_rows="4", ep8_rows="", routings="uniform,zipf:1.2", max_m="16,64",
                          gemms="w2", seed=0, vllm_configs=1, budget_s=0, cuda_masked=False, rounds=1,
                          json=out + ".json", md=out + ".md")
bg.main_routed(args, {"device": "cpu", "torch": "", "triton": "", "cuda": "", "deep_gemm": "-", "vllm_source": "-",
                      "date": ""}, {}, {}, sys.stderr)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_routed_main_writes_json_and_table(tmp_path: Path) -> None:
    """The routed run's loop: only the chosen GEMM, one cell per routing, JSON after each cell,
    the markdown table, the short table printed last."""
    proc = run_interpreted("-c", MAIN_SCRIPT, str(tmp_path / "routed"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "routed.json").read_text())
    assert [(c["gemm"], c["routing"]) for c in data["cells"]] == [("w2", "uniform"), ("w2", "zipf:1.2")]
    assert data["cells"][0]["max_ms"] == [16, 64] and data["cells"][0]["derived"]["max_m_cost"] == 1.0
    assert proc.stdout.strip().splitlines()[-1].startswith("| tp8 w2 | 4 | zipf:1.2")
    assert "| tp8 w2 | 4 | uniform" in (tmp_path / "routed.md").read_text()


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("gemm", ["w13", "w2"])
def test_vllm_launcher_per_expert_counts(block_m: int, gemm: str) -> None:
    """The id arrays vLLM's kernel reads, built from per-expert counts: each expert's slots in
    BLOCK_M blocks labelled with it, sentinels (= slot count) on the padding, every slot once,
    the grid bound total + E * (BLOCK_M - 1) rows, the padded row count on the device."""
    counts = [0, 37, 1, 0, 90, 16]
    moe = _peers.VllmMoE(None, counts, 8, gemm, device="cpu")
    assert moe.slots == 144 and moe.tokens == 18 and moe.a_rows() == (18 if gemm == "w13" else 144)
    ids, expert_ids, post = moe.alignment(block_m)
    assert ids.numel() == moe.slots + len(counts) * (block_m - 1)
    padded = sum(-(-c // block_m) * block_m for c in counts)
    assert int(post) == padded
    assert sorted(ids[ids < moe.slots].tolist()) == list(range(moe.slots))
    for e, c in enumerate(counts):
        rows = (torch.repeat_interleave(expert_ids, block_m)[: ids.numel()] == e).nonzero().flatten()
        assert rows.numel() == -(-c // block_m) * block_m
        got = ids[rows]
        assert torch.equal(got[got < moe.slots].long(), moe.slots_of(e)) and (got[c:] == moe.slots).all()
    assert (expert_ids[padded // block_m :] == -1).all()
    assert torch.equal(moe.a_row_of_slot(torch.tensor([17])), torch.tensor([2 if gemm == "w13" else 17]))
