"""The torch reference as a provider: what `moe_backend.ops` runs for CPU tensors and for
impl="reference" (grouped GEMMs, SiLU*up quant, the layout builders, permute+quant, un-permute +
combine). Same signatures as `moe_backend.reference`.

The one production module that reaches the oracle, and only inside its functions: importing the
serving path never loads `moe_backend.reference`, and nothing but these calls depends on it
(tests/test_house.py holds both). Each call looks the function up on the reference package, so a
wrapper installed there (the demo's provider trace) sees the call.
"""

from __future__ import annotations

from moe_backend.constants import LAYOUT_ALIGNMENT, QUANT_BLOCK

__all__ = [
    "grouped_gemm_contiguous",
    "grouped_gemm_masked",
    "silu_mul_quant",
    "permute_quant",
    "unpermute_combine",
    "build_contiguous_layout",
    "build_masked_layout",
    "sum_partials",
]


def _oracle():
    from moe_backend import reference

    return reference


def grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out=None):
    return _oracle().grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out)


def grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, masked_m, out=None):
    return _oracle().grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, masked_m, out)


def sum_partials(partials, count=None):
    return _oracle().sum_partials(partials, count)


def silu_mul_quant(h, group, ue8m0, **validity):
    return _oracle().silu_mul_quant(h, group, ue8m0, **validity)


def permute_quant(x, src_token, group=QUANT_BLOCK, ue8m0=False, *, out=None, used_rows=None):
    return _oracle().permute_quant(x, src_token, group, ue8m0, out=out, used_rows=used_rows)


def unpermute_combine(y, row_of_slot, topk_weights, out=None):
    return _oracle().unpermute_combine(y, row_of_slot, topk_weights, out)


def build_contiguous_layout(
    topk_ids, num_local_experts, *, expert_start=0, alignment=LAYOUT_ALIGNMENT, exact_size=True
):
    return _oracle().build_contiguous_layout(
        topk_ids, num_local_experts, expert_start=expert_start, alignment=alignment, exact_size=exact_size
    )


def build_masked_layout(topk_ids, num_local_experts, *, expert_start=0, max_m=None, drop_overflow=False):
    return _oracle().build_masked_layout(
        topk_ids, num_local_experts, expert_start=expert_start, max_m=max_m, drop_overflow=drop_overflow
    )
