"""The torch reference as a provider: what `moe_backend.ops` runs for CPU tensors and for
impl="reference" (grouped GEMMs, SiLU*up quant). Same signatures as `moe_backend.reference`.

The one production module that reaches the oracle, and only inside its functions: importing the
serving path never loads `moe_backend.reference`, and nothing but these calls depends on it
(tests/test_house.py holds both). Each call looks the function up on the reference package, so a
wrapper installed there (the demo's provider trace) sees the call.
"""

from __future__ import annotations

__all__ = ["grouped_gemm_contiguous", "grouped_gemm_masked", "silu_mul_quant"]


def _oracle():
    from moe_backend import reference

    return reference


def grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out=None):
    return _oracle().grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out)


def grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, masked_m, out=None):
    return _oracle().grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, masked_m, out)


def silu_mul_quant(h, group, ue8m0, **validity):
    return _oracle().silu_mul_quant(h, group, ue8m0, **validity)
