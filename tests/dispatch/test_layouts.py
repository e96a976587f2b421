"""The layouts' data format (`moe_backend.dispatch.layouts`): the dataclasses' shape rules and the
shape-only row bound. The builders are tested in tests/reference (twins) and tests/kernels."""

import itertools

import pytest
import torch

from moe_backend.dispatch import ContiguousLayout, MaskedLayout, max_contiguous_rows


def _padded_rows(counts: tuple[int, ...], alignment: int) -> int:
    return sum(-(-c // alignment) * alignment for c in counts)


@pytest.mark.parametrize("alignment", [1, 4, 128])
def test_max_contiguous_rows_bounds_every_routing(alignment):
    """For every split of the slots over the experts the padded total fits the bound, and some split
    (as many non-empty experts as possible, each one row past a multiple) reaches it."""
    for num_slots, num_experts in [(0, 3), (1, 1), (5, 3), (7, 2), (4, 6)]:
        bound = max_contiguous_rows(num_slots, num_experts, alignment)
        totals = [
            _padded_rows(counts, alignment)
            for counts in itertools.product(range(num_slots + 1), repeat=num_experts)
            if sum(counts) == num_slots
        ]
        assert max(totals) <= bound, (num_slots, num_experts)
        if alignment == 1 or num_slots <= num_experts:
            assert max(totals) == bound, (num_slots, num_experts)


def test_contiguous_layout_checks_its_rows():
    rows = torch.tensor([0, 0, -1, 1], dtype=torch.int32)
    layout = ContiguousLayout(
        expert_ids=rows,
        expert_offsets=torch.tensor([0, 2, 4], dtype=torch.int32),
        src_token=torch.tensor([0, 1, -1, 0]),
        row_of_slot=torch.tensor([[0, 3], [1, -1]]),
        tokens_per_expert=torch.tensor([2, 1], dtype=torch.int32),
    )
    assert layout.num_rows == 4
    with pytest.raises(ValueError, match="expert_ids and src_token"):
        ContiguousLayout(rows, layout.expert_offsets, torch.zeros(3, dtype=torch.long), layout.row_of_slot, rows[:2])


def test_masked_layout_max_m_is_the_row_count():
    layout = MaskedLayout(
        masked_m=torch.tensor([1, 0], dtype=torch.int32),
        src_token=torch.tensor([[0, -1, -1], [-1, -1, -1]]),
        row_of_slot=torch.tensor([[0]]),
    )
    assert layout.max_m == 3
