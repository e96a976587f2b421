"""SiLU(gate) * up, quantized to FP8 per 1x128 group: the step between the two grouped GEMMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_backend._checks import check_bool, check_int, check_quant_out, check_tensor
from moe_backend.constants import QUANT_BLOCK
from moe_backend.quant import quantize_fp8_per_token_group

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """h `[..., 2I]` (gate columns, then up) -> FP8 of `silu(gate) * up` computed in fp32, `[..., I]`
    (written into the pair `out` when given).

    Optional row validity, as the kernel's: `expert_ids` int32 `[M]` with h `[M, 2I]` (valid iff
    >= 0) or `masked_m` int32 `[E]` with h `[E, max_m, 2I]` (row r of expert e valid iff r <
    masked_m[e]), and `used_rows` int32 `[1]` (flat rows at and past it invalid); invalid rows come
    out zero here (the kernel leaves them unwritten)."""
    check_tensor("h", h, dtypes=(torch.bfloat16, torch.float16, torch.float32), min_dim=1)
    check_int("group", group, minimum=1)
    check_bool("ue8m0", ue8m0)
    if h.shape[-1] % (2 * group):
        raise ValueError(f"h: last dim ({h.shape[-1]}) must be 2*I with I a multiple of {group}")
    gate, up = h.float().chunk(2, dim=-1)
    a_fp8, a_scale = quantize_fp8_per_token_group(F.silu(gate) * up, group, ue8m0)
    valid = _valid_rows(h, expert_ids, masked_m)
    if used_rows is not None:
        check_tensor("used_rows", used_rows, dtypes=(torch.int32,), shape=(1,), device=h.device)
        below = torch.arange(a_scale[..., 0].numel(), device=h.device).view(a_scale.shape[:-1]) < used_rows
        valid = below if valid is None else valid & below
    if valid is not None:
        a_fp8 = torch.where(valid[..., None], a_fp8.view(torch.uint8), 0).view(a_fp8.dtype)
        a_scale = torch.where(valid[..., None], a_scale, 0.0)
    if out is None:
        return a_fp8, a_scale
    check_quant_out(out, a_fp8.shape, a_scale.shape, h.device)
    return out[0].copy_(a_fp8), out[1].copy_(a_scale)


def _valid_rows(h: torch.Tensor, expert_ids: torch.Tensor | None, masked_m: torch.Tensor | None) -> torch.Tensor | None:
    """bool `h.shape[:-1]`: the rows a layout fills (None: all)."""
    if expert_ids is not None and masked_m is not None:
        raise ValueError("expert_ids, masked_m: give at most one row validity")
    if expert_ids is not None:
        if h.dim() != 2:
            raise ValueError(f"h: expected [M, 2I] with expert_ids, got shape {list(h.shape)}")
        check_tensor("expert_ids", expert_ids, dtypes=(torch.int32,), shape=(h.shape[0],), device=h.device)
        return expert_ids >= 0
    if masked_m is not None:
        if h.dim() != 3:
            raise ValueError(f"h: expected [E, max_m, 2I] with masked_m, got shape {list(h.shape)}")
        check_tensor("masked_m", masked_m, dtypes=(torch.int32,), shape=(h.shape[0],), device=h.device)
        return torch.arange(h.shape[1], device=h.device)[None, :] < masked_m[:, None]
    return None
