"""The Triton kernels on CPU under TRITON_INTERPRET=1, tiny shapes (cases in _interpret_cases.py).

The variable must be set before Triton and the kernel modules are imported, so the cases run in
one subprocess; each case is reported as its own test. Skipped when Triton is not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers.interpreter import run_interpreted

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (the interpreter tests need it)"
)

HERE = Path(__file__).resolve().parent

CASES = [
    "masked",
    "masked_swap_ab",
    "masked_wide_n",
    "masked_k_unroll",
    "masked_n_loop",
    "masked_hot_expert",
    "masked_all_idle",
    "masked_max_m_far_above_rows",
    "masked_single_row",
    "masked_many_experts",
    "masked_out_of_range_counts",
    "masked_n_loop_walk",
    "masked_narrow_m",
    "contiguous",
    "contiguous_one_expert",
    "contiguous_num_rows",
    "contiguous_gather_a",
    "contiguous_bm64",
    "contiguous_split_k",
    "split_k_refused",
    "split_k_consumers",
    "gemm_computes_silu_a",
    "per_token_group_quant",
    "silu_mul_quant",
    "quant_extremes",
    "combine",
    "direct_rows",
    "combine_skip_single",
    "bad_inputs",
    "permute_quant",
    "permute_quant_empty",
    "build_layout",
    "build_layout_shared_fill",
    "build_layout_both_plans",
    "silu_mul_quant_rows",
    "used_rows",
    "combine_kernel_layouts",
    "quant_flat_items",
    "quant_validity_modes",
    "quant_row_stride",
    "permute_rows",
    "permute_rows_used_rows",
    "permute_rows_edges",
    "persistent_walk",
]


@pytest.fixture(scope="module")
def results() -> dict:
    proc = run_interpreted("-m", "tests.kernels._interpret_cases", *CASES)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernel(results: dict, case: str) -> None:
    assert case in results, f"case {case} did not run"
    if results[case] is not None:
        pytest.fail(results[case], pytrace=False)


def test_cases_listed() -> None:
    """Every case in _interpret_cases.py is run here."""
    source = (HERE / "_interpret_cases.py").read_text()
    defined = {line[len("def case_") :].split("(")[0] for line in source.splitlines() if line.startswith("def case_")}
    assert defined == set(CASES)
