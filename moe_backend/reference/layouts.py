"""The layouts' plain-torch twins: what `moe_backend.kernels.build_layout`, `permute_quant` and
`unpermute_combine` compute, written for clarity (the kernels are tested against them).

- `build_contiguous_layout` / `build_masked_layout`: the layouts of `moe_backend.dispatch.layouts`
  from the router's top-k ids, bit-identical to the kernels' (a stable sort by local expert);
- `permute` / `permute_quant`: token rows (quantized or not) copied into a layout's rows, padding
  rows zeros (the kernel leaves them unwritten);
- `unpermute_combine` (and `combine`, the same over a layout): the weighted gather back to tokens.

Builders never sync with the host unless asked for an exactly sized contiguous layout (or a masked
one that must not drop overflow).
"""

from __future__ import annotations

import torch

from moe_backend._checks import check_int, check_quant_out, check_tensor
from moe_backend.constants import FP8_DTYPE, LAYOUT_ALIGNMENT, QUANT_BLOCK
from moe_backend.dispatch.layouts import ContiguousLayout, MaskedLayout, max_contiguous_rows
from moe_backend.quant import quantize_fp8_per_token_group

__all__ = [
    "build_contiguous_layout",
    "build_masked_layout",
    "permute",
    "permute_quant",
    "unpermute_combine",
    "combine",
]


def _check_ids(topk_ids: torch.Tensor, num_local_experts: int, expert_start: int) -> None:
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2)
    check_int("num_local_experts", num_local_experts)
    if num_local_experts <= 0:
        raise ValueError(f"num_local_experts must be positive, got {num_local_experts}")
    check_int("expert_start", expert_start, minimum=0)


def _sort_slots(topk_ids: torch.Tensor, num_local_experts: int, expert_start: int):
    """Sorts the flat (token, slot) pairs by local expert; non-local slots go last (key E)."""
    local = topk_ids.reshape(-1).long() - expert_start
    is_local = (local >= 0) & (local < num_local_experts) & (topk_ids.reshape(-1) >= 0)
    key = torch.where(is_local, local, torch.full_like(local, num_local_experts))
    order = torch.argsort(key, stable=True)  # flat slot index, grouped by expert
    # scatter_add, not bincount: CUDA bincount reads the max id back to the host (breaks graphs).
    counts = torch.zeros(num_local_experts + 1, dtype=torch.long, device=key.device).scatter_add_(
        0, key, torch.ones_like(key)
    )[:num_local_experts]
    first_of_expert = torch.cumsum(counts, 0) - counts
    sorted_key = key[order]
    in_range = sorted_key < num_local_experts
    safe_key = sorted_key.clamp(max=num_local_experts - 1)
    rank = torch.arange(order.numel(), device=order.device) - first_of_expert[safe_key]
    return order, safe_key, in_range, rank, counts


def build_contiguous_layout(
    topk_ids: torch.Tensor,
    num_local_experts: int,
    *,
    expert_start: int = 0,
    alignment: int = LAYOUT_ALIGNMENT,
    exact_size: bool = True,
) -> ContiguousLayout:
    """topk_ids `[T, k]` (global ids; experts `[expert_start, expert_start + E)` are local).

    exact_size=True sizes the layout to the padded total (one host sync: fine for prefill);
    False uses the shape-only bound `max_contiguous_rows` (no sync, CUDA-graph safe), with the
    unused tail marked as padding.
    """
    _check_ids(topk_ids, num_local_experts, expert_start)
    check_int("alignment", alignment)
    if alignment <= 0:
        raise ValueError(f"alignment must be positive, got {alignment}")
    num_tokens, topk = topk_ids.shape
    device = topk_ids.device
    order, safe_key, in_range, rank, counts = _sort_slots(topk_ids, num_local_experts, expert_start)
    padded = (counts + alignment - 1) // alignment * alignment
    seg_end = torch.cumsum(padded, 0)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), seg_end])
    num_rows = int(seg_end[-1]) if exact_size else max_contiguous_rows(order.numel(), num_local_experts, alignment)
    # Non-local slots scatter into one dump row past the end, dropped by the slice.
    row = torch.where(in_range, offsets[safe_key] + rank, torch.full_like(rank, num_rows))
    expert_ids = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=device)
    expert_ids.scatter_(0, row, safe_key.to(torch.int32))
    src_token = torch.full((num_rows + 1,), -1, dtype=torch.long, device=device)
    src_token.scatter_(0, row, order // topk)
    row_of_slot = torch.empty(order.numel(), dtype=torch.long, device=device)
    row_of_slot.scatter_(0, order, torch.where(in_range, row, torch.full_like(row, -1)))
    return ContiguousLayout(
        expert_ids=expert_ids[:num_rows],
        expert_offsets=offsets.to(torch.int32),
        src_token=src_token[:num_rows],
        row_of_slot=row_of_slot.view(num_tokens, topk),
        tokens_per_expert=counts.to(torch.int32),
    )


def build_masked_layout(
    topk_ids: torch.Tensor,
    num_local_experts: int,
    *,
    expert_start: int = 0,
    max_m: int | None = None,
    drop_overflow: bool = False,
) -> MaskedLayout:
    """topk_ids `[T, k]` -> masked layout with `max_m` rows per expert (default T: a token visits an
    expert at most once, so T rows never overflow; no host sync). A smaller `max_m` is checked
    (one host sync) and overflow raises rather than dropping tokens; with `drop_overflow=True`
    (no sync, what the kernel does) an expert keeps its first `max_m` slots in (token, slot) order,
    the others get `row_of_slot` -1 and contribute nothing."""
    _check_ids(topk_ids, num_local_experts, expert_start)
    check_int("max_m", max_m, optional=True)
    num_tokens, topk = topk_ids.shape
    device = topk_ids.device
    order, safe_key, in_range, rank, counts = _sort_slots(topk_ids, num_local_experts, expert_start)
    if max_m is None:
        max_m = max(num_tokens, 1)
    elif max_m <= 0:
        raise ValueError(f"max_m must be positive, got {max_m}")
    if not drop_overflow and max_m < num_tokens and int(counts.max()) > max_m:
        raise ValueError(
            f"max_m ({max_m}) is smaller than the {int(counts.max())} tokens routed to one expert; raise max_m"
        )
    dump = num_local_experts * max_m
    row = torch.where(in_range & (rank < max_m), safe_key * max_m + rank, torch.full_like(rank, dump))
    src_token = torch.full((dump + 1,), -1, dtype=torch.long, device=device)
    src_token.scatter_(0, row, order // topk)
    row_of_slot = torch.empty(order.numel(), dtype=torch.long, device=device)
    row_of_slot.scatter_(0, order, torch.where(row < dump, row, torch.full_like(row, -1)))
    return MaskedLayout(
        masked_m=counts.clamp(max=max_m).to(torch.int32),
        src_token=src_token[:dump].view(num_local_experts, max_m),
        row_of_slot=row_of_slot.view(num_tokens, topk),
    )


def permute(x: torch.Tensor, layout: ContiguousLayout | MaskedLayout) -> torch.Tensor:
    """Copies token rows `x [T, ...]` into the layout: `[M, ...]` (contiguous) or `[E, max_m, ...]`;
    padding rows (src_token -1) are zeros."""
    return _gather_rows(x, layout.src_token)


def permute_quant(
    x: torch.Tensor,
    src_token: torch.Tensor,
    group: int = QUANT_BLOCK,
    ue8m0: bool = False,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    used_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quant of x `[T, H]`, rows copied as `src_token` (int64, any shape S, -1 =
    padding) says: (a_fp8 `[*S, H]`, a_scale f32 `[*S, H/group]`), written into `out` when given.
    The torch twin of `moe_backend.kernels.permute_quant`: quantize, then `permute` each part
    (padding rows are zeros here; the kernel leaves them unwritten). `used_rows` (int32 `[1]`):
    flat rows at and past it count as padding too."""
    check_tensor("x", x, dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    check_tensor("src_token", src_token, dtypes=(torch.int64,), device=x.device)
    if used_rows is not None:
        check_tensor("used_rows", used_rows, dtypes=(torch.int32,), shape=(1,), device=x.device)
        beyond = torch.arange(src_token.numel(), device=x.device).view(src_token.shape) >= used_rows
        src_token = src_token.masked_fill(beyond, -1)
    x_fp8, x_scale = quantize_fp8_per_token_group(x, group, ue8m0)
    a_fp8, a_scale = _gather_rows(x_fp8, src_token), _gather_rows(x_scale, src_token)
    if out is None:
        return a_fp8, a_scale
    check_quant_out(out, a_fp8.shape, a_scale.shape, x.device)
    return out[0].copy_(a_fp8), out[1].copy_(a_scale)


def _gather_rows(x: torch.Tensor, src_token: torch.Tensor) -> torch.Tensor:
    """`x[src_token]` as `[*src_token.shape, ...]`, zeros where src_token is -1 (padding)."""
    src = src_token.reshape(-1)
    if x.shape[0]:
        rows = x.index_select(0, src.clamp(min=0))
        pad = (src < 0).view(-1, *([1] * (x.dim() - 1)))
        bits = rows.view(torch.uint8) if rows.dtype == FP8_DTYPE else rows  # `where` on fp8: not on every device
        rows = torch.where(pad, torch.zeros((), dtype=bits.dtype, device=x.device), bits).view(rows.dtype)
    else:
        rows = x.new_zeros((src.numel(), *x.shape[1:]))
    return rows.view(*src_token.shape, *x.shape[1:])


def unpermute_combine(
    y: torch.Tensor, row_of_slot: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Un-permute + weighted combine: `out[t] = sum_j topk_weights[t, j] * y[row_of_slot[t, j]]`,
    fp32 sum, one bf16 rounding; rows of -1 contribute nothing (their y rows are never used). y:
    `[M, N]` or `[E, max_m, N]` (flat rows); returns bf16 `[T, N]`. The torch twin of
    `moe_backend.kernels.unpermute_combine`."""
    rows = row_of_slot
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(rows.shape))
    flat = y.reshape(-1, y.shape[-1])
    if flat.shape[0] == 0:
        # No local rows at all (an EP rank none of whose tokens' experts are local): every slot is -1.
        flat = flat.new_zeros(1, flat.shape[-1])
    # The explicit width, not -1: with no tokens the view would be ambiguous.
    gathered = flat.index_select(0, rows.clamp(min=0).reshape(-1)).view(*rows.shape, flat.shape[-1]).float()
    # Mask the rows, not only the weights: an unwritten row may hold NaN, and 0 * NaN is NaN.
    gathered = torch.where((rows >= 0).unsqueeze(-1), gathered, 0.0)
    # And the weights of absent slots (-1, another rank's expert) too: they are not part of the sum.
    weights = torch.where(rows >= 0, topk_weights, 0.0)
    result = torch.einsum("tk,tkn->tn", weights, gathered)
    if out is None:
        return result.to(torch.bfloat16)
    check_tensor("out", out, dtypes=(torch.bfloat16,), shape=tuple(result.shape), device=y.device)
    return out.copy_(result)


def combine(
    y: torch.Tensor,
    layout: ContiguousLayout | MaskedLayout,
    topk_weights: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`unpermute_combine` over a layout's `row_of_slot`."""
    return unpermute_combine(y, layout.row_of_slot, topk_weights, out)
