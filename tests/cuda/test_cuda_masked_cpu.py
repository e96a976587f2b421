"""CPU side of the CUDA masked op: the row -> expert map it builds and its argument checks."""

from __future__ import annotations

import pytest
import torch

from moe_backend.quant import FP8_DTYPE

masked = pytest.importorskip("moe_backend.cuda.grouped_gemm_masked")


def test_expert_ids_mark_valid_rows_only() -> None:
    ids = masked.masked_expert_ids(torch.tensor([2, 0, 3], dtype=torch.int32), 4)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [0, 0, -1, -1, -1, -1, -1, -1, 2, 2, 2, -1]


@pytest.mark.parametrize("max_m", [0, 64, 100, 200])
def test_max_m_must_be_a_tile_multiple(max_m) -> None:
    assert not masked.supports_max_m(max_m)
    a = torch.zeros(2, max_m, 128).to(FP8_DTYPE)
    with pytest.raises(ValueError, match="max_m"):
        masked.grouped_gemm_masked(
            a,
            torch.ones(2, max_m, 1),
            torch.zeros(2, 128, 128).to(FP8_DTYPE),
            torch.ones(2, 1, 1),
            torch.zeros(2, dtype=torch.int32),
        )


def test_weights_are_checked_before_the_direct_launch() -> None:
    # The op launches the kernel itself (not through the contiguous op): B's K and scales are
    # checked here, each error naming its argument.
    a = torch.zeros(2, 128, 128).to(FP8_DTYPE)
    args = (a, torch.ones(2, 128, 1))
    masked_m = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="b_fp8"):
        masked.grouped_gemm_masked(*args, torch.zeros(2, 128, 256).to(FP8_DTYPE), torch.ones(2, 1, 2), masked_m)
    with pytest.raises(ValueError, match="b_scale"):
        masked.grouped_gemm_masked(*args, torch.zeros(2, 128, 128).to(FP8_DTYPE), torch.ones(2, 2, 1), masked_m)
    with pytest.raises(TypeError, match="b_scale"):
        masked.grouped_gemm_masked(
            *args, torch.zeros(2, 128, 128).to(FP8_DTYPE), torch.ones(2, 1, 1, dtype=torch.float64), masked_m
        )


def test_expert_count_is_bounded_by_the_live_tile_table() -> None:
    from moe_backend.cuda.config import MAX_MASKED_EXPERTS
    from moe_backend.dispatch import gemm_choice

    assert masked.supports_experts(MAX_MASKED_EXPERTS) and not masked.supports_experts(MAX_MASKED_EXPERTS + 1)
    e = MAX_MASKED_EXPERTS + 1
    with pytest.raises(ValueError, match=f"at most {MAX_MASKED_EXPERTS} experts"):
        masked.grouped_gemm_masked(
            torch.zeros(e, 128, 128).to(FP8_DTYPE),
            torch.ones(e, 128, 1),
            torch.zeros(e, 128, 128).to(FP8_DTYPE),
            torch.ones(e, 1, 1),
            torch.zeros(e, dtype=torch.int32),
        )
    # The plan's choice: past the table's size the masked layout runs on Triton.
    assert gemm_choice.cuda_masked_pays(7168, 256, 128, 128, num_experts=256)
    assert not gemm_choice.cuda_masked_pays(7168, 256, 128, 128, num_experts=e)


def test_masked_m_dtype_is_checked() -> None:
    a = torch.zeros(2, 128, 128).to(FP8_DTYPE)
    with pytest.raises(TypeError, match="masked_m"):
        masked.grouped_gemm_masked(
            a,
            torch.ones(2, 128, 1),
            torch.zeros(2, 128, 128).to(FP8_DTYPE),
            torch.ones(2, 1, 1),
            torch.zeros(2, dtype=torch.int64),
        )


def test_best_picks_cuda_only_where_measured_and_tiles_fit() -> None:
    from moe_backend.dispatch import gemm_choice

    assert gemm_choice.cuda_masked_pays(7168, 256, 128, 128)
    assert not gemm_choice.cuda_masked_pays(7168, 256, 128, 64)  # fewer rows: Triton measured faster
    assert not gemm_choice.cuda_masked_pays(7168, 256, 192, 192)  # max_m not a multiple of 128
    assert gemm_choice.cuda_masked_pays(4096, 7168, 256, 128)
    assert gemm_choice.cuda_masked_pays(512, 7168, 128, 128)
    assert not gemm_choice.cuda_masked_pays(1024, 7168, 128, 128)  # a shape not in the measured list
    # Contiguous: every GEMM from 64 rows per expert (the narrow TP8 ones measured at the layer).
    assert gemm_choice.cuda_contiguous_pays(7168, 256, 64) and not gemm_choice.cuda_contiguous_pays(7168, 256, 32)
    assert gemm_choice.cuda_contiguous_pays(4096, 7168, 64) and not gemm_choice.cuda_contiguous_pays(4096, 7168, 32)
