"""DeepGEMM as an optional provider (the `sgl-deep-gemm` wheel, this package's `[deepgemm]` extra, which
installs under the import name `deep_gemm`). Same signatures as the torch reference (`moe_backend.reference`)."""

from __future__ import annotations

from functools import lru_cache

import torch

from moe_backend._checks import check_activations, check_grouped_gemm_weights

__all__ = ["grouped_gemm_contiguous", "grouped_gemm_masked", "contiguous_alignment"]

_MASKED_ROW_BLOCK = 64


@lru_cache(maxsize=None)
def _deep_gemm():
    try:
        import deep_gemm
    except ImportError as exc:
        raise ImportError(
            "moe_backend: impl='deepgemm' needs DeepGEMM; install it with "
            "`pip install sgl-deep-gemm==0.1.5` (this package's [deepgemm] extra) on a Hopper GPU machine"
        ) from exc
    return deep_gemm


def _api(*names: str):
    dg = _deep_gemm()
    for name in names:
        if hasattr(dg, name):
            return getattr(dg, name)
    raise ImportError(
        f"moe_backend: this DeepGEMM ({getattr(dg, '__version__', '?')}) has none of "
        f"{names}; tested with sgl-deep-gemm 0.1.5"
    )


def contiguous_alignment() -> int:
    return int(_api("get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout")())


def grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out=None):
    k = check_activations(a_fp8, a_scale, ndim=2)
    _, n = check_grouped_gemm_weights(b_fp8, b_scale, k)
    if out is None:
        out = torch.zeros(a_fp8.shape[0], n, dtype=torch.bfloat16, device=a_fp8.device)
    gemm = _api("m_grouped_fp8_gemm_nt_contiguous", "m_grouped_gemm_fp8_fp8_bf16_nt_contiguous")
    gemm((a_fp8, a_scale), (b_fp8, b_scale), out, expert_ids.to(torch.int32))
    return out


def grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, masked_m, out=None, expected_m: int | None = None):
    k = check_activations(a_fp8, a_scale, ndim=3)
    num_experts, n = check_grouped_gemm_weights(b_fp8, b_scale, k)
    if out is None:
        out = torch.zeros(num_experts, a_fp8.shape[1], n, dtype=torch.bfloat16, device=a_fp8.device)
    gemm = _api(
        "m_grouped_fp8_gemm_nt_masked", "m_grouped_fp8_fp4_gemm_nt_masked", "m_grouped_gemm_fp8_fp8_bf16_nt_masked"
    )
    max_m = a_fp8.shape[1]
    padded_m = -(-max_m // _MASKED_ROW_BLOCK) * _MASKED_ROW_BLOCK
    if padded_m != max_m:
        # sgl-deep-gemm 0.1.5 returns wrong rows when max_m is not a multiple of 64 (measured on
        # H100: relative error 0.5 and worse), so run it on row-padded copies.
        pad = (0, 0, 0, padded_m - max_m)
        a_fp8 = torch.nn.functional.pad(a_fp8.view(torch.uint8), pad).view(a_fp8.dtype)
        a_scale = torch.nn.functional.pad(a_scale, pad)
        full = torch.empty(num_experts, padded_m, n, dtype=torch.bfloat16, device=out.device)
    else:
        full = out
    # expected_m only steers DeepGEMM's block-shape heuristic; the row count is a safe default.
    gemm((a_fp8, a_scale), (b_fp8, b_scale), full, masked_m.to(torch.int32), expected_m or max_m)
    if full is not out:
        rows = torch.arange(max_m, device=out.device).view(1, max_m, 1) < masked_m.view(-1, 1, 1)
        out.copy_(torch.where(rows, full[:, :max_m], out))  # rows past masked_m stay untouched
    return out
