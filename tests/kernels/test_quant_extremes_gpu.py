"""The quantizers' fp32 paths on the GPU at the edges of bf16/fp16/fp32 (tests/helpers/quant_extremes.py):
no Inf/NaN anywhere, and the torch reference's values except where a subnormal input may be
flushed to zero. The same checks run on CPU under the Triton interpreter (case_quant_extremes)."""

from __future__ import annotations

import pytest
import torch

from moe_backend import reference
from moe_backend.quant import quantize_fp8_per_token_group
from moe_backend.reference import layouts
from tests.helpers.quant_extremes import SUBNORMAL_ROW, check_no_overflow, extreme_rows, gate_up_pairs

pytestmark = pytest.mark.gpu


def _as_reference(out, ref, rows) -> None:
    q, s = (t.cpu() for t in out)
    ref_q, ref_s = ref
    check_no_overflow(q, s)
    assert torch.allclose(s[rows], ref_s[rows], rtol=1e-6, atol=0)
    same = (q[rows].float() == ref_q[rows].float()).float().mean().item()
    assert same >= 0.999, f"only {same:.4f} of fp8 values match the reference"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantizers_never_overflow(dtype, ue8m0):
    from moe_backend.kernels.per_token_group_quant import per_token_group_quant
    from moe_backend.kernels.permute_quant import permute_quant
    from moe_backend.kernels.silu_mul_quant import silu_mul_quant

    h, normal_pairs = gate_up_pairs(dtype)
    _as_reference(silu_mul_quant(h.cuda(), 128, ue8m0), reference.silu_mul_quant(h, 128, ue8m0), normal_pairs)
    rows = extreme_rows(dtype, 128)
    normal_rows = torch.arange(len(rows)) != SUBNORMAL_ROW
    _as_reference(
        per_token_group_quant(rows.cuda(), 128, ue8m0), quantize_fp8_per_token_group(rows, 128, ue8m0), normal_rows
    )
    src = torch.arange(len(rows)).flip(0)
    _as_reference(
        permute_quant(rows.cuda(), src.cuda(), 128, ue8m0),
        layouts.permute_quant(rows, src, 128, ue8m0),
        normal_rows.flip(0),
    )
