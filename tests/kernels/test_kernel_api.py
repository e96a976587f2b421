"""Pins the kernels' public API: the names and signatures `moe_backend.ops` and the layer call."""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

API = {
    "grouped_gemm_contiguous": (
        "(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out=None, *, expected_m=None, config=None, num_rows=None, "
        "a_rows=None)"
    ),
    "grouped_gemm_masked": "(a_fp8, a_scale, b_fp8, b_scale, masked_m, out=None, *, expected_m=None, config=None)",
    "silu_mul_quant": (
        "(h, group=128, ue8m0=False, *, expert_ids=None, masked_m=None, used_rows=None, out=None, partials=False, "
        "num_partials=None)"
    ),
    "per_token_group_quant": "(x, group=128, ue8m0=False, *, out=None)",
    "permute_rows": "(x_fp8, x_scale, src_token, *, out=None, used_rows=None, config=None)",
    "unpermute_combine": (
        "(y, row_of_slot, topk_weights, out=None, *, partials=False, num_partials=None, branch_on_slots=False, "
        "skip_single=False)"
    ),
}


def _plain(sig: inspect.Signature) -> str:
    return str(
        sig.replace(
            parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
            return_annotation=inspect.Signature.empty,
        )
    )


@pytest.mark.parametrize("module", sorted(API))
def test_signature(module: str) -> None:
    mod = importlib.import_module(f"moe_backend.kernels.{module}")
    assert module in mod.__all__
    assert _plain(inspect.signature(getattr(mod, module))) == API[module]


def test_build_layout_signatures() -> None:
    mod = importlib.import_module("moe_backend.kernels.build_layout")
    assert {"build_contiguous_layout", "build_masked_layout"} <= set(mod.__all__)
    assert (
        _plain(inspect.signature(mod.build_contiguous_layout))
        == "(topk_ids, num_local_experts, *, expert_start=0, alignment=128, slots_per_program=None)"
    )
    assert (
        _plain(inspect.signature(mod.build_masked_layout))
        == "(topk_ids, num_local_experts, *, expert_start=0, max_m=None, slots_per_program=None)"
    )


def test_contiguous_alignment() -> None:
    mod = importlib.import_module("moe_backend.kernels.grouped_gemm_contiguous")
    assert mod.CONTIGUOUS_ALIGNMENT == 128 and "CONTIGUOUS_ALIGNMENT" in mod.__all__


def test_formula_and_override() -> None:
    from moe_backend.kernels import _gemm_config

    cfg = _gemm_config.get_config("grouped_gemm_masked", 4, 4096, 7168, "no-such-gpu", masked=True)
    assert cfg["BLOCK_M"] == 16
    with pytest.raises(ValueError, match="BLOCK_M"):
        _gemm_config.get_config(
            "grouped_gemm_masked",
            4,
            4096,
            7168,
            "x",
            masked=True,
            override=dict(BLOCK_M=24, BLOCK_N=128, num_warps=4, num_stages=3),
        )
    with pytest.raises(ValueError, match="unknown"):
        _gemm_config.check_config(dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, SPLIT=2))


def test_hopper_without_table_uses_the_h100_table(capsys, monkeypatch) -> None:
    """An H800 (no shipped table) gets the H100 entry, and says so; a non-Hopper GPU the formula."""
    from moe_backend.kernels import _gemm_config

    monkeypatch.setenv("MOE_BACKEND_PRINT_CONFIG", "1")
    h100 = _gemm_config.get_config(
        "grouped_gemm_masked", 128, 4096, 7168, _gemm_config.HOPPER_FALLBACK_DEVICE, masked=True
    )
    assert not _gemm_config.load_table("grouped_gemm_masked", "NVIDIA H800")
    h800 = _gemm_config.get_config("grouped_gemm_masked", 128, 4096, 7168, "NVIDIA H800", masked=True)
    assert h800 == h100
    assert "of NVIDIA H100 80GB HBM3" in capsys.readouterr().out
    other = _gemm_config.get_config("grouped_gemm_masked", 128, 4096, 7168, "NVIDIA A100-SXM4-80GB", masked=True)
    assert other == _gemm_config.check_config(_gemm_config.formula(128, 4096, 7168, masked=True))


def test_h200_uses_its_own_table(capsys, monkeypatch) -> None:
    """The H200 ships its own tuned tables (eighth session), for every DeepSeek-V3 shape of both
    slices, and a lookup says it read them."""
    from moe_backend.kernels import _gemm_config
    from moe_backend.tune import SHAPES

    monkeypatch.setenv("MOE_BACKEND_PRINT_CONFIG", "1")
    shapes = {f"N={n},K={k}" for _, _, _, n, k in SHAPES}  # the shapes `tune` covers
    for kernel in ("grouped_gemm_masked", "grouped_gemm_contiguous"):
        assert shapes <= set(_gemm_config.load_table(kernel, "NVIDIA H200")), kernel
    _gemm_config.get_config("grouped_gemm_masked", 64, 512, 7168, "NVIDIA H200", masked=True)
    out = capsys.readouterr().out
    assert "on NVIDIA H200: table m=64 ->" in out and "H100" not in out  # not the H100 fallback


def test_tables_load() -> None:
    """Shipped tables parse and every entry is a valid config."""
    from moe_backend.kernels import _gemm_config

    paths = sorted(_gemm_config.CONFIG_DIR.glob("grouped_gemm_*.json"))  # beside them: dispatch_thresholds.json
    assert paths, "no tuned tables shipped"
    for path in paths:
        kernel, device = path.stem.split("_NVIDIA", 1)[0], "NVIDIA" + path.stem.split("_NVIDIA", 1)[1]
        table = _gemm_config.load_table(kernel, device.replace("_", " "))
        assert table, path
        for by_m in table.values():
            for cfg in by_m.values():
                _gemm_config.check_config(cfg)


@pytest.mark.parametrize(
    "m,masked,k", [(1, True, 7168), (128, True, 7168), (64, True, 256), (512, False, 2048), (512, False, 256)]
)
def test_tune_candidates_are_valid(m: int, masked: bool, k: int) -> None:
    """Every candidate the tuner times passes the launcher's checks and fits shared memory."""
    from moe_backend.kernels import _gemm_config
    from moe_backend.tune import candidates

    cands = candidates(m, masked=masked, k=k)
    assert cands
    for cfg in cands:
        full = _gemm_config.check_config(cfg, max_block_m=None if masked else 128)
        per_stage = 128 * full["K_UNROLL"] * (full["BLOCK_M"] + full["BLOCK_N"])
        assert full["num_stages"] * per_stage <= 200 * 1024 or full["N_LOOP"] > 1


@pytest.mark.parametrize(
    "n_regs,shared,num_warps,expected",
    [
        (168, 55_000, 4, 132 * 3),  # registers bound: 3 x 4 warps x 5376 registers per warp
        (40, 0, 4, 132 * 12),  # registers bound again at 1280 per warp
        (32, 200_000, 8, 132 * 1),  # shared memory bound: one block of 200 KB
        (16, 1_000, 1, 132 * 32),  # the 32-blocks-per-SM bound
    ],
)
def test_resident_programs(monkeypatch, n_regs, shared, num_warps, expected) -> None:
    """The persistent grid's size: SMs x the blocks one SM holds (the occupancy calculator's
    bounds), from a compiled kernel's registers and shared memory."""
    from types import SimpleNamespace

    from moe_backend.kernels import _launch_utils as core

    monkeypatch.setattr(core, "_sm_limits", lambda index: (132, 65536, 228 * 1024, 2048))
    compiled = SimpleNamespace(n_regs=n_regs, metadata=SimpleNamespace(shared=shared), _init_handles=lambda: None)
    assert core.resident_programs(compiled, num_warps, 0) == expected


def test_resident_grid(monkeypatch) -> None:
    """A looping kernel's grid: the resident count of its compiled build (compiled once per
    constexprs and pointer alignment, not per row count), capped by the blocks; a few programs on CPU."""
    from types import SimpleNamespace

    import torch

    from moe_backend.kernels import _launch_utils as utils

    monkeypatch.setattr(utils, "_sm_limits", lambda index: (132, 65536, 228 * 1024, 2048))
    monkeypatch.setattr(utils, "_resident_grids", {})
    builds = []

    class Kernel:
        def warmup(self, *args, grid, **meta):
            builds.append(meta)
            return SimpleNamespace(n_regs=40, metadata=SimpleNamespace(shared=0), _init_handles=lambda: None)

    kernel, cuda = Kernel(), torch.device("cuda", 0)
    meta = dict(ROWS=4, num_warps=4)
    assert utils.resident_grid(kernel, (torch.empty(4), 7168, 100), meta, 10**6, cuda) == 132 * 12  # 40 regs
    assert utils.resident_grid(kernel, (torch.empty(4), 7168, 3), meta, 10**6, cuda) == 132 * 12
    assert utils.resident_grid(kernel, (torch.empty(4), 7168, 3), meta, 50, cuda) == 50
    assert len(builds) == 1, "one build per constexprs and specialization"
    utils.resident_grid(kernel, (torch.empty(4), 7169, 3), meta, 10**6, cuda)  # ints: not part of the key
    assert len(builds) == 1
    utils.resident_grid(kernel, (torch.empty(4), 7168, 3), dict(ROWS=8, num_warps=4), 10**6, cuda)
    utils.resident_grid(kernel, (torch.empty(5, dtype=torch.uint8)[1:], 7168, 3), meta, 10**6, cuda)  # misaligned
    assert len(builds) == 3
    assert utils.resident_grid(kernel, (), meta, 10**6, torch.device("cpu")) == utils.INTERPRETER_ROW_PROGRAMS


def test_programs_override_is_checked() -> None:
    from moe_backend.kernels import _gemm_config

    assert _gemm_config.check_config(dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3))["PROGRAMS"] == 0
    with pytest.raises(ValueError, match="PROGRAMS"):
        _gemm_config.check_config(dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, PROGRAMS=-1))


@pytest.mark.parametrize(
    "extra,match",
    [
        (dict(BLOCK_M=32, NARROW_M=32), "NARROW_M"),  # not below BLOCK_M
        (dict(BLOCK_M=64, NARROW_M=24), "NARROW_M"),  # not a power of two
        (dict(BLOCK_M=64, NARROW_M=8), "NARROW_M"),  # below an MMA's 16 rows
        (dict(BLOCK_M=32, NARROW_M=16.0), "NARROW_M"),
        (dict(BLOCK_M=32, NARROW_M=16, TMA=True), "TMA"),  # a TMA box holds BLOCK_M rows
    ],
)
def test_narrow_m_is_checked(extra: dict, match: str) -> None:
    from moe_backend.kernels import _gemm_config

    assert _gemm_config.check_config(dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3))["NARROW_M"] == 0
    with pytest.raises(ValueError, match=match):
        _gemm_config.check_config(dict(dict(BLOCK_N=128, num_warps=4, num_stages=3), **extra))
