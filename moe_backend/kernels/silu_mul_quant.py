"""SiLU(gate) * up, then per-token-group FP8 quantization: the GEMM1 -> GEMM2 hand-off in one pass.

Given a layout's row validity (`expert_ids` of a contiguous layout, or `masked_m` of a masked one)
only the rows that hold a token are computed; padding rows are neither read nor written. With
`used_rows` (a device-side count of rows in use, e.g. `expert_offsets[-1:]`) the rows past it are
not even visited (`_group_quant_core`).
"""

from __future__ import annotations

import torch

from moe_backend._checks import check_quant_out
from moe_backend.constants import QUANT_BLOCK
from moe_backend.kernels import _group_quant_core
from moe_backend.kernels._launch_utils import check_kernel_tensor, check_used_rows
from moe_backend.quant import FP8_DTYPE

__all__ = ["silu_mul_quant"]


def silu_mul_quant(
    h: torch.Tensor,
    group: int = QUANT_BLOCK,
    ue8m0: bool = False,
    *,
    expert_ids: torch.Tensor | None = None,
    masked_m: torch.Tensor | None = None,
    used_rows: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    partials: bool = False,
    num_partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h `[..., 2I]` (gate columns, then up; I % group == 0) -> (a_fp8 `[..., I]`, a_scale f32
    `[..., I/group]`), `a = silu(gate) * up` computed in fp32 (as `moe_backend.reference`),
    allocated or the pair `out`.

    Row validity (at most one): `expert_ids` int32 `[M]` with h `[M, 2I]` (row valid iff its id
    >= 0), or `masked_m` int32 `[E]` with h `[E, max_m, 2I]` (row r of expert e valid iff r <
    masked_m[e]). used_rows: optional int32 `[1]` on the device; flat rows at and past it must be
    padding and are not visited. Invalid rows are not written: their contents are unspecified.
    partials: h is f32 `[S, M, 2I]`, S partial sums of a GEMM split over K (`SPLIT_K`); they are
    added in order and rounded to bf16 (the unsplit GEMM's output) before the SiLU; results are
    `[M, I]`; `num_partials` (int32 `[1]` on the device, optional): only the first that many slabs
    hold slices (the GEMM chose the count on the device). Not with masked_m. No host sync.
    """
    splits = 0
    if partials:
        check_kernel_tensor("h", h, dtypes=(torch.float32,), ndim=3)
        if masked_m is not None:
            raise ValueError("masked_m: partial sums come from the contiguous layout only; give expert_ids")
        splits = h.shape[0]
        if splits < 1:
            raise ValueError("h: expected at least one partial-sum slab")
        h = h[0]
        if num_partials is not None:
            check_kernel_tensor("num_partials", num_partials, h.device, dtypes=(torch.int32,), shape=(1,))
    elif num_partials is not None:
        raise ValueError("num_partials: given without partials=True")
    check_kernel_tensor("h", h, dtypes=(torch.bfloat16, torch.float16, torch.float32), min_dim=1)
    if group not in (32, 64, 128, 256):
        raise ValueError(f"group: expected one of 32, 64, 128, 256, got {group}")
    two_i = h.shape[-1]
    if two_i % (2 * group):
        raise ValueError(f"h: last dim ({two_i}) must be 2*I with I a multiple of {group}")
    i = two_i // 2
    rows_per_expert = 1
    if expert_ids is not None and masked_m is not None:
        raise ValueError("expert_ids, masked_m: give at most one row validity")
    if expert_ids is not None:
        if h.dim() != 2:
            raise ValueError(f"h: expected [M, 2I] with expert_ids, got shape {list(h.shape)}")
        check_kernel_tensor("expert_ids", expert_ids, h.device, dtypes=(torch.int32,), shape=(h.shape[0],))
    if masked_m is not None:
        if h.dim() != 3:
            raise ValueError(f"h: expected [E, max_m, 2I] with masked_m, got shape {list(h.shape)}")
        check_kernel_tensor("masked_m", masked_m, h.device, dtypes=(torch.int32,), shape=(h.shape[0],))
        rows_per_expert = max(h.shape[1], 1)
    if used_rows is not None:
        check_used_rows(used_rows, h.device)
    q_shape, s_shape = (*h.shape[:-1], i), (*h.shape[:-1], i // group)
    if out is None:
        a_fp8 = torch.empty(q_shape, dtype=FP8_DTYPE, device=h.device)
        a_scale = torch.empty(s_shape, dtype=torch.float32, device=h.device)
    else:
        check_quant_out(out, q_shape, s_shape, h.device)
        a_fp8, a_scale = out
        check_kernel_tensor("out[0]", a_fp8, h.device)
        check_kernel_tensor("out[1]", a_scale, h.device)
    _group_quant_core.launch(
        h.reshape(-1, two_i),
        a_fp8.view(-1, i),
        a_scale.view(-1, i // group),
        cols=i,
        silu_mul=True,
        ue8m0=ue8m0,
        group=group,
        expert_ids=expert_ids,
        masked_m=masked_m,
        rows_per_expert=rows_per_expert,
        used_rows=used_rows,
        splits=splits,
        split_count=num_partials,
    )
    return a_fp8, a_scale
