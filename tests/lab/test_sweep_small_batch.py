"""lab/sweep_small_batch.py's CPU side: `--list`, and the plan variants it times (only the Triton
GEMMs' configs change; a plan on other providers keeps the policy's alone)."""

from __future__ import annotations

import dataclasses

import torch

from lab import sweep_small_batch as sweep
from lab._plan_variants import slice_plan
from moe_backend.dispatch.gemm_choice import GemmPlan


def test_list_runs_without_gpu(capsys) -> None:
    assert sweep.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(sweep.VARIANTS) + len(sweep.PLAN_VARIANTS) and out[0].startswith("policy")


def test_variants_change_only_the_triton_configs() -> None:
    plan = slice_plan("tp8", 1, "decode", torch.device("cpu"))
    assert list(sweep.variants(plan)) == ["policy"]  # the reference path: nothing to vary
    cfg = {"BLOCK_M": 16, "BLOCK_N": 128, "N_LOOP": 4, "num_warps": 4, "num_stages": 3}
    triton_plan = dataclasses.replace(
        plan,
        gemm1=GemmPlan("triton", 512, 7168, tuple(sorted(cfg.items()))),
        gemm2=GemmPlan("triton", 7168, 256, tuple(sorted(cfg.items()))),
    )
    plans = sweep.variants(triton_plan)
    assert list(plans) == list(sweep.VARIANTS)  # the plan's GEMM2 takes the SiLU*up quant's output: no "act_apart"
    assert plans["policy"] is not triton_plan and plans["policy"].gemm1 == triton_plan.gemm1
    g1, g2 = dict(plans["g1s8"].gemm1.config), dict(plans["g1s8"].gemm2.config)
    assert g1 == cfg | {"SPLIT_K": 8, "SPLIT_MIN_UNITS": 0} and g2 == cfg | {"SPLIT_K": 1}
    assert dict(plans["g1n64s4"].gemm1.config) == cfg | {"BLOCK_N": 64, "SPLIT_K": 4, "SPLIT_MIN_UNITS": 0}
    assert all(p.graph_plan is None and p.num_rows == triton_plan.num_rows for p in plans.values())
    fused = sweep.variants(dataclasses.replace(triton_plan, silu_in_gemm2=True))
    assert fused["act_apart"].silu_in_gemm2 is False and fused["policy"].silu_in_gemm2 is True
    assert "launch_apart" not in fused
    dependent = sweep.variants(dataclasses.replace(triton_plan, dependent_launch=True))
    assert dependent["launch_apart"].dependent_launch is False and dependent["policy"].dependent_launch is True
