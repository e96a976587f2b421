"""The CPU side of lab/prefill_pairing.py (its layouts) and lab/sweep_small_batch.py's tile variants
and candidate rule (the timings run on a GPU only)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lab import prefill_pairing, sweep_small_batch
from lab._plan_variants import slice_plan
from moe_backend.dispatch import gemm_choice


@pytest.mark.parametrize("counts", [[300, 129, 0, 256, 5], [1, 128, 383, 640], [0, 0, 7]])
def test_pairing_layouts_hold_every_row_once_in_128_row_tiles(counts) -> None:
    lays = prefill_pairing.layouts(counts)
    tile = prefill_pairing.TILE
    plan_ids = lays["plan"][0][0]
    real = [(e, r) for e, c in enumerate(counts) for r in range(c)]
    for name, launches in lays.items():
        seen = []
        for ids, rows in launches:
            assert len(ids) % tile == 0
            # A tile never holds two experts; padding only after an expert's rows.
            for t in range(0, len(ids), tile):
                experts = {e for e in ids[t : t + tile] if e >= 0}
                assert len(experts) <= 1, (name, t)
            for dst, src in rows:
                assert ids[dst] == plan_ids[src] >= 0
                seen.append(src)
        assert sorted(seen) == sorted(src for _, src in lays["plan"][0][1]) and len(seen) == len(real), name
    tiles = [-(-c // tile) for c in counts]
    even_ids = lays["even"][0][0]
    assert len(even_ids) == tile * sum(t + t % 2 for t in tiles)
    pairs, tails = lays["split"]
    assert len(pairs[0]) == tile * sum(t - t % 2 for t in tiles)
    assert len(tails[0]) == tile * sum(t % 2 for t in tiles)


def test_small_batch_tile_variants_change_only_their_gemm() -> None:
    plan = slice_plan("ep8", 8, "decode", torch.device("cpu"))
    cfg = (("BLOCK_M", 16), ("BLOCK_N", 128), ("K_UNROLL", 2), ("SPLIT_K", 1), ("num_stages", 3), ("num_warps", 4))
    triton_plan = dataclasses.replace(
        plan,
        gemm1=gemm_choice.GemmPlan("triton", 4096, 7168, cfg),
        gemm2=gemm_choice.GemmPlan("triton", 7168, 2048, cfg),
    )
    plain = sweep_small_batch.variants(triton_plan)
    tiles = sweep_small_batch.variants(triton_plan, tiles=True)
    assert set(sweep_small_batch.TILE_VARIANTS) <= set(tiles) and not set(sweep_small_batch.TILE_VARIANTS) & set(plain)
    assert dict(tiles["g1st5"].gemm1.config)["num_stages"] == 5 and tiles["g1st5"].gemm2 == triton_plan.gemm2
    assert dict(tiles["g2ku1"].gemm2.config)["K_UNROLL"] == 1 and tiles["g2ku1"].gemm1 == triton_plan.gemm1
    assert sweep_small_batch.main(["--list", "--tiles"]) == 0


def test_candidate_split_rule_is_applied_and_then_undone() -> None:
    shipped = gemm_choice.thresholds()["split_k"]
    seen = {}
    original = sweep_small_batch.slice_plan

    def spy(*args, **kwargs):
        seen.update(gemm_choice.thresholds()["split_k"])
        return original(*args, **kwargs)

    sweep_small_batch.slice_plan = spy
    try:
        plan = sweep_small_batch.candidate_plan("tp8", 4, torch.device("cpu"), {"min_units": 999})
    finally:
        sweep_small_batch.slice_plan = original
    assert plan.phase == "decode" and seen["min_units"] == 999 and seen["max_split"] == shipped["max_split"]
    assert gemm_choice.thresholds()["split_k"] == shipped
