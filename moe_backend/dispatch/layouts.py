"""The two grouped layouts the kernels read and write: the data format alone.

- contiguous (prefill): rows sorted by local expert, each expert's segment padded to `alignment`
  rows, padding rows marked -1 in `expert_ids` and `src_token`;
- masked (decode): `[num_local_experts, max_m, K]` with `masked_m[e]` valid rows per expert
  (`src_token` -1 past it).

Padding rows copy no token: the kernels leave them unwritten and no later step reads them.

Both record `row_of_slot[t, j]`, the row that holds token t's j-th expert (-1 when that expert is
not local), so un-permute + combine is a gather: deterministic, no atomics.

Builders: `moe_backend.ops.build_contiguous_layout` / `build_masked_layout` (the Triton kernels in
`moe_backend.kernels.build_layout` on CUDA tensors); their plain-torch twins, which the kernels
are tested against, live in the reference (`moe_backend.reference.layouts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ContiguousLayout", "MaskedLayout", "max_contiguous_rows"]


@dataclass(frozen=True)
class ContiguousLayout:
    expert_ids: torch.Tensor  # [M] int32: local expert of each row, -1 = padding
    expert_offsets: torch.Tensor  # [E+1] int32: first row of each expert's padded segment
    src_token: torch.Tensor  # [M] int64: token each row copies, -1 = padding (copies nothing)
    row_of_slot: torch.Tensor  # [T, k] int64: row holding (token, slot), -1 = expert not local
    tokens_per_expert: torch.Tensor  # [E] int32: real rows per expert (before padding)

    def __post_init__(self) -> None:
        if self.expert_ids.shape != self.src_token.shape:
            raise ValueError("expert_ids and src_token must have one entry per row")

    @property
    def num_rows(self) -> int:
        return self.expert_ids.shape[0]


@dataclass(frozen=True)
class MaskedLayout:
    masked_m: torch.Tensor  # [E] int32: valid rows per expert (on the device)
    src_token: torch.Tensor  # [E, max_m] int64: token each row copies, -1 past masked_m
    row_of_slot: torch.Tensor  # [T, k] int64: flat row e*max_m + r holding (token, slot), -1 = not local

    @property
    def max_m(self) -> int:
        return self.src_token.shape[1]


def max_contiguous_rows(num_slots: int, num_local_experts: int, alignment: int) -> int:
    """Rows a contiguous layout can need, from shapes alone: each non-empty expert pads < alignment."""
    return num_slots + min(num_local_experts, num_slots) * (alignment - 1)
