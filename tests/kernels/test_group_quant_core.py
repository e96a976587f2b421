"""The flat-item quant kernel behind per_token_group_quant and silu_mul_quant (`_group_quant_core`)
on CPU: its launch-config formula, the config's checks, and its sm_90a build (16-byte loads of the
bf16 rows, wide fp8 stores). Its numerics run under the interpreter (_interpret_cases.py: quant_*)
and on the GPU (test_group_quant_gpu.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

H, TP8_I, EP8_I = 7168, 256, 2048  # DeepSeek-V3: hidden, and the intermediate size of each slice


def _core():
    from moe_backend.kernels import _group_quant_core

    return _group_quant_core


@pytest.mark.parametrize(
    "rows,num_groups,expected",
    [
        (16384, H // 128, 16),  # prefill x
        (131072 + 256 * 127, TP8_I // 128, 16),  # TP8 SiLU*up
        (16384 + 32 * 127, EP8_I // 128, 16),
        (128, H // 128, 8),  # decode: smaller blocks, so the grid still covers the SMs
        (1, 1, 8),
    ],
)
def test_launch_config_formula(rows, num_groups, expected) -> None:
    core = _core()
    assert core.quant_launch_config(rows, num_groups) == core.QuantLaunchConfig(expected, core.DEFAULT_NUM_WARPS)


def test_launch_config_bounds() -> None:
    """Always a power of two within [MIN_ITEMS_PER_PROGRAM, ITEMS_PER_PROGRAM], and never a smaller
    block for a larger launch."""
    core = _core()
    previous = 0
    for rows in (1, 7, 64, 128, 1000, 4096, 16384, 163584):
        items = core.quant_launch_config(rows, 7).items_per_program
        assert core.MIN_ITEMS_PER_PROGRAM <= items <= core.ITEMS_PER_PROGRAM and items & (items - 1) == 0
        assert items >= previous
        previous = items


@pytest.mark.parametrize("items,warps", [(0, 4), (12, 4), (16, 3), (16, 32)])
def test_launch_config_is_checked(items: int, warps: int) -> None:
    with pytest.raises(ValueError, match="items_per_program|num_warps"):
        _core().QuantLaunchConfig(items, warps)


def test_launch_refuses_too_many_items() -> None:
    """Item indices are int32: a launch past MAX_LAUNCH_ITEMS refuses before touching memory (meta tensors)."""
    core = _core()
    x = torch.empty(2**22, 2**17, dtype=torch.bfloat16, device="meta")
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device="meta")
    s = torch.empty(2**22, 2**10, device="meta")
    with pytest.raises(ValueError, match="exceed one launch"):
        core.launch(x, q, s, cols=2**17, silu_mul=False, ue8m0=False, group=128)


SIGNATURE = {
    "x_ptr": "*bf16",
    "q_ptr": "*fp8e4nv",
    "s_ptr": "*fp32",
    "valid_ptr": "*i32",
    "used_rows_ptr": "*i32",
    "x_row_stride": "i32",
    "split_stride": "i32",
    "count_ptr": "*i32",
    "rows_per_expert": "i32",
    "num_rows": "i32",
}


@pytest.mark.parametrize(
    "cols,silu_mul,rows_valid_if,used_rows,items",
    [
        (H, False, "always", False, 32),  # x of a prefill
        (TP8_I, True, "expert_id", True, 16),  # GEMM1's output on the contiguous layout
        (EP8_I, True, "masked_m", False, 8),  # the masked layout
        (384, False, "always", True, 64),
    ],
)
def test_compiles_for_sm90a_with_wide_accesses(cols, silu_mul, rows_valid_if, used_rows, items) -> None:
    """Every bf16 load of the rows is a 16-byte vector and fp8 stores move at least 8 bytes a thread."""
    from tests.helpers.sm90_compile import assert_waits_first, compile_for_sm90, global_memory_ops, vector_bytes

    core = _core()
    consts = dict(
        C=cols,
        NUM_GROUPS=cols // 128,
        SILU_MUL=silu_mul,
        UE8M0=False,
        GROUP=128,
        ITEMS=items,
        ROWS_VALID_IF=rows_valid_if,
        USED_ROWS=used_rows,
        SPLITS=0,
        COUNT_ON_DEVICE=False,
        PDL=used_rows,  # the decode plans' launches are dependent ones
    )
    aligned = ["x_ptr", "q_ptr", "s_ptr", "valid_ptr", "used_rows_ptr", "x_row_stride"]
    try:
        compiled = compile_for_sm90(core._group_quant_kernel, SIGNATURE, consts, aligned)
    except ImportError as exc:  # a Triton build without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend: {exc}")
    assert_waits_first(compiled.asm["ptx"], dependent=used_rows)
    loads, stores = global_memory_ops(compiled.asm["ptx"])
    wide_loads = sum(n for op, n in loads.items() if vector_bytes(op) == 16)
    assert wide_loads * 16 * 128 == items * 128 * 2 * (2 if silu_mul else 1), loads  # 128 threads
    narrow_loads = {op: n for op, n in loads.items() if vector_bytes(op) < 16}
    assert sum(narrow_loads.values()) <= (0 if rows_valid_if == "always" and not used_rows else 4), narrow_loads
    fp8_stores = {op: n for op, n in stores.items() if vector_bytes(op) >= 8}
    assert sum(vector_bytes(op) * n for op, n in fp8_stores.items()) * 128 >= items * 128, stores
