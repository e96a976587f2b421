"""The grouped GEMM kernel compiles for sm_90a without a GPU (Triton ahead-of-time, as the GPU
would specialize it: 16-byte aligned pointers, N and K multiples of 16), in each walk (masked,
contiguous with a device row count, contiguous one program per tile) and with the H200 table's
configs: catches what the CPU interpreter does not see (typing of the persistent loop, TMA
descriptors passed through the tile helper, shared memory over the limit, local-memory spills)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

SMEM_LIMIT = 232448  # bytes a Hopper block may opt into


def _compile(mode: str, cfg: dict, num_experts: int = 256):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moe_backend.kernels._grouped_gemm_core import _fp8_grouped_gemm_kernel as kernel

    bm, bn, tma = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.get("TMA", False)
    n_loop = cfg.get("N_LOOP", 1)
    silu_a = mode.endswith("silu_a")  # A computed from GEMM1's output: bf16, or A_SPLITS f32 slabs
    a_splits = cfg.get("A_SPLITS", 0) if silu_a else 0
    signature = {
        "a_ptr": ("*fp32" if a_splits else "*bf16") if silu_a else "*fp8e4nv",
        "a_rows_ptr": "*i64",
        "a_scale_ptr": "*fp32",
        "b_ptr": "*fp8e4nv",
        "b_scale_ptr": "*fp32",
        "c_ptr": "*fp32" if cfg.get("SPLIT_K", 1) > 1 else "*bf16",
        "expert_ids_ptr": "*i32",
        "masked_m_ptr": "*i32",
        "num_rows_ptr": "*i32",
        "splits_ptr": "*i32",
        "act_count_ptr": "*i32",
        "a_desc": f"tensordesc<fp8e4nv[{bm}, 128]>" if tma else "constexpr",
        "b_desc": f"tensordesc<fp8e4nv[{bn}, 128]>" if tma else "constexpr",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "num_m_tiles": "i32",
        "num_n_tiles": "i32",
        "num_experts": "i32",
        "split_min_units": "i32",
        "act_slab": "i32",
    }
    consts = dict(
        MASKED=mode == "masked",
        ROW_BOUND=mode.startswith("row_bound"),
        E_PAD=max(16, triton.next_power_of_2(num_experts)),
        NARROW_M=cfg.get("NARROW_M", 0),
        WIDE_KEY=False,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=128,
        GROUP_M=cfg.get("GROUP_M", 1),
        SWAP_AB=cfg.get("SWAP_AB", False),
        K_UNROLL=cfg.get("K_UNROLL", 1),
        N_LOOP=n_loop,
        FULL_KB=2 if n_loop > 1 else 1,
        USE_TMA=tma,
        GATHER_A=mode.endswith("gather_a"),  # A's rows read through the layout's src_token
        SPLIT_K=cfg.get("SPLIT_K", 1),
        SILU_A=silu_a,
        A_SPLITS=a_splits,
        UE8M0=cfg.get("UE8M0", False),
        PDL=cfg.get("PDL", False),
    )
    if not tma:
        consts.update(a_desc=None, b_desc=None)
    signature.update({name: "constexpr" for name in consts})
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    aligned = [name for name, t in signature.items() if t.startswith("*")] + ["N", "K"]
    src = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(index[n],): v for n, v in consts.items()},
        attrs={(index[n],): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    )


def _h200_configs() -> list:
    from moe_backend.kernels import _gemm_config

    table = _gemm_config.load_table("grouped_gemm_masked", "NVIDIA H200")
    seen, out = set(), []
    for by_m in table.values():
        for cfg in by_m.values():
            key = tuple(sorted(cfg.items()))
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


CASES = [("masked", cfg) for cfg in _h200_configs()] + [
    # masked m-tiles at most 16 rows full run 16 wide, the others 32 or 64 wide (a hot expert)
    ("masked", dict(BLOCK_M=32, BLOCK_N=128, SWAP_AB=True, K_UNROLL=2, NARROW_M=16, num_warps=4, num_stages=3)),
    ("masked", dict(BLOCK_M=64, BLOCK_N=128, NARROW_M=16, num_warps=4, num_stages=3)),
    ("row_bound", dict(BLOCK_M=16, BLOCK_N=128, SWAP_AB=True, K_UNROLL=2, num_warps=4, num_stages=3)),
    ("row_bound", dict(BLOCK_M=64, BLOCK_N=128, N_LOOP=8, num_warps=4, num_stages=2)),
    ("tile", dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, K_UNROLL=2, num_warps=8, num_stages=3)),
    ("row_bound_gather_a", dict(BLOCK_M=16, BLOCK_N=128, SWAP_AB=True, K_UNROLL=2, num_warps=4, num_stages=3)),
    ("row_bound_gather_a", dict(BLOCK_M=64, BLOCK_N=128, K_UNROLL=2, num_warps=4, num_stages=3)),
    # decode at a few tokens: K split into slices, fp32 partial sums
    ("row_bound_gather_a", dict(BLOCK_M=16, BLOCK_N=128, SPLIT_K=4, num_warps=4, num_stages=4)),
    (
        "row_bound_gather_a",
        dict(BLOCK_M=16, BLOCK_N=128, SWAP_AB=True, K_UNROLL=2, SPLIT_K=2, num_warps=4, num_stages=3),
    ),
    # GEMM2 computing SiLU*up quant from GEMM1's partial sums (TP8 at 1-2 tokens) or bf16 output
    ("row_bound_silu_a", dict(BLOCK_M=16, BLOCK_N=128, A_SPLITS=4, num_warps=4, num_stages=4)),
    ("row_bound_silu_a", dict(BLOCK_M=16, BLOCK_N=64, SWAP_AB=True, A_SPLITS=8, UE8M0=True, num_warps=4, num_stages=3)),
    ("row_bound_silu_a", dict(BLOCK_M=64, BLOCK_N=128, N_LOOP=8, num_warps=4, num_stages=2)),
    # launched as a dependent of the kernel before it (decode plans on Hopper)
    ("row_bound_gather_a", dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=4, PDL=True, num_warps=4, num_stages=4)),
]


@pytest.mark.parametrize("mode,cfg", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_compiles_for_sm90a(mode: str, cfg: dict, tmp_path: Path) -> None:
    try:
        compiled = _compile(mode, cfg)
    except ImportError as exc:  # a Triton build without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend: {exc}")
    assert compiled.metadata.shared <= SMEM_LIMIT, compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx or "mma.sync" in ptx, "no tensor-core MMA in the kernel"
    from tests.helpers.sm90_compile import assert_waits_first

    assert_waits_first(ptx, cfg.get("PDL", False))
    from triton.backends.nvidia import compiler as nv

    cuobjdump = Path(nv.__file__).parent / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("no cuobjdump for the resource check")
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run(
        [str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"STACK:0\b", usage), f"local memory (spills): {usage}"
