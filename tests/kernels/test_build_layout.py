"""The layout builders' front door (`ops.build_contiguous_layout` / `ops.build_masked_layout`): the
torch twins on CPU, the Triton kernel on CUDA, the same layout either way; the kernel's argument
checks; silu_mul_quant's row validity through ops. The kernel's layouts run under the interpreter
(_interpret_cases.py: build_layout*) and on the GPU (tests/kernels/test_build_layout_gpu.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moe_backend import ops, reference
from moe_backend.reference import layouts
from tests.helpers.layout_checks import (
    LAYOUT_CASES,
    assert_same_layout,
    check_contiguous_layout,
    check_masked_layout,
    make_topk_ids,
)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: c.name)
def test_ops_builders(case, device: str) -> None:
    """CPU: the twins on the static row bound (no sync); CUDA: the kernel, bit-identical to them."""
    topk_ids = make_topk_ids(case, seed=1, device=device)
    contiguous = ops.build_contiguous_layout(
        topk_ids, case.num_local, expert_start=case.expert_start, alignment=case.alignment
    )
    assert contiguous.src_token.device == topk_ids.device
    check_contiguous_layout(contiguous, topk_ids, case.num_local, case.expert_start, case.alignment)
    cpu_ids = topk_ids.cpu()
    assert_same_layout(
        contiguous,
        layouts.build_contiguous_layout(
            cpu_ids, case.num_local, expert_start=case.expert_start, alignment=case.alignment, exact_size=False
        ),
    )
    masked = ops.build_masked_layout(topk_ids, case.num_local, expert_start=case.expert_start, max_m=case.max_m)
    check_masked_layout(masked, topk_ids, case.num_local, case.expert_start, case.max_m or max(case.tokens, 1))
    assert_same_layout(
        masked,
        layouts.build_masked_layout(
            cpu_ids, case.num_local, expert_start=case.expert_start, max_m=case.max_m, drop_overflow=True
        ),
    )


def test_twin_exact_size_is_the_static_layout_cut() -> None:
    """exact_size=True (one host sync) is the static layout without its all-padding tail."""
    case = LAYOUT_CASES[2]
    topk_ids = make_topk_ids(case, seed=2)
    static = layouts.build_contiguous_layout(
        topk_ids, case.num_local, expert_start=case.expert_start, alignment=case.alignment, exact_size=False
    )
    exact = layouts.build_contiguous_layout(
        topk_ids, case.num_local, expert_start=case.expert_start, alignment=case.alignment
    )
    used = int(static.expert_offsets[-1])
    assert exact.num_rows == used < static.num_rows
    assert torch.equal(exact.expert_ids, static.expert_ids[:used])
    assert torch.equal(exact.src_token, static.src_token[:used])
    assert torch.equal(exact.row_of_slot, static.row_of_slot)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_silu_mul_quant_row_validity(device: str) -> None:
    """Only rows holding a token are computed; they equal the all-rows result. On CPU the twin
    zeroes the others; the kernel leaves them unwritten (checked with a poisoned out on CUDA)."""
    gen = torch.Generator().manual_seed(4)
    topk_ids = torch.randint(-1, 9, (11, 2), generator=gen, dtype=torch.int32).to(device)
    contiguous = ops.build_contiguous_layout(topk_ids, 5, expert_start=2, alignment=4)
    masked = ops.build_masked_layout(topk_ids, 5, expert_start=2, max_m=3)
    for kwargs, rows, valid in (
        (dict(expert_ids=contiguous.expert_ids), (contiguous.num_rows,), contiguous.src_token >= 0),
        (dict(masked_m=masked.masked_m), (5, 3), masked.src_token >= 0),
    ):
        assert valid.any() and not valid.all()
        h = (torch.randn(*rows, 512, generator=gen) * 3).bfloat16().to(device)
        out = (
            torch.full((*rows, 256), 0x7F, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn),
            torch.full((*rows, 2), float("nan"), device=device),
        )
        q, s = ops.silu_mul_quant(h, 128, False, out=out, **kwargs)
        assert q is out[0] and s is out[1]
        all_q, all_s = ops.silu_mul_quant(h, 128, False)
        assert torch.equal(q[valid].view(torch.uint8), all_q[valid].view(torch.uint8))
        assert torch.equal(s[valid], all_s[valid])
        if device == "cpu":
            assert not q[~valid].float().any() and not s[~valid].any()
        else:
            assert bool((q[~valid].view(torch.uint8) == 0x7F).all()) and bool(s[~valid].isnan().all())


def test_reference_silu_mul_quant_validity_checks() -> None:
    h = torch.randn(4, 512)
    with pytest.raises(ValueError, match="at most one"):
        reference.silu_mul_quant(
            h, expert_ids=torch.zeros(4, dtype=torch.int32), masked_m=torch.zeros(4, dtype=torch.int32)
        )
    with pytest.raises(ValueError, match=r"h: expected \[E, max_m, 2I\]"):
        reference.silu_mul_quant(h, masked_m=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_ids: expected shape"):
        reference.silu_mul_quant(h, expert_ids=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="masked_m: expected dtype"):
        reference.silu_mul_quant(h.view(2, 2, 512), masked_m=torch.zeros(2))
    with pytest.raises(ValueError, match="used_rows: expected shape"):
        reference.silu_mul_quant(h, used_rows=torch.zeros((), dtype=torch.int32))
    q, s = reference.silu_mul_quant(h, used_rows=torch.tensor([2], dtype=torch.int32))
    assert s[:2].all() and not s[2:].any()


def _bad_build_cases():
    ids = torch.zeros(4, 2, dtype=torch.int32)
    return [  # (id, builder, args, kwargs, error, match)
        ("ids_float", "contiguous", (ids.float(), 4), {}, TypeError, "topk_ids: expected dtype"),
        ("ids_1d", "masked", (ids.view(-1), 4), {}, ValueError, "topk_ids: expected 2 dims"),
        (
            "ids_strided",
            "contiguous",
            (torch.zeros(4, 4, dtype=torch.int32)[:, ::2], 4),
            {},
            ValueError,
            "topk_ids: expected a contiguous",
        ),
        ("experts_0", "contiguous", (ids, 0), {}, ValueError, "num_local_experts"),
        ("start_negative", "masked", (ids, 4), dict(expert_start=-1), ValueError, "expert_start"),
        ("alignment_0", "contiguous", (ids, 4), dict(alignment=0), ValueError, "alignment"),
        ("max_m_0", "masked", (ids, 4), dict(max_m=0), ValueError, "max_m"),
        ("slots_per_program_16", "contiguous", (ids, 4), dict(slots_per_program=16), ValueError, "slots_per_program"),
    ]


@needs_triton
@pytest.mark.parametrize("case", _bad_build_cases(), ids=lambda c: c[0])
def test_kernel_bad_inputs(case, monkeypatch) -> None:
    """Each bad argument raises before any launch, naming it (the interpreter switch lets CPU
    tensors past the CUDA check)."""
    from moe_backend.kernels import build_layout

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, kind, args, kwargs, error, match = case
    builder = build_layout.build_contiguous_layout if kind == "contiguous" else build_layout.build_masked_layout
    with pytest.raises(error, match=match):
        builder(*args, **kwargs)


@needs_triton
def test_kernel_refuses_cpu_tensors(monkeypatch) -> None:
    from moe_backend.kernels import build_layout

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="topk_ids: the Triton kernels need a CUDA tensor"):
        build_layout.build_contiguous_layout(torch.zeros(2, 2, dtype=torch.int32), 4)


@needs_triton
def test_plan_formula() -> None:
    """Decode-sized batches take one launch (slots padded to fill its 4 warps); prefill chunks,
    wider ones where 256 experts would give the scan too many counts; the override picks either."""
    from moe_backend.kernels.build_layout import (
        CHUNK_SLOTS,
        ONE_LAUNCH_MAX_SLOTS,
        WIDE_CHUNK_SLOTS,
        _one_launch_shape,
        _plan,
        _scan_block,
    )

    assert _plan(1, 32, None) == (True, 128)
    assert _plan(256 * 8, 256, None) == (True, 2048)
    assert _plan(ONE_LAUNCH_MAX_SLOTS + 1, 256, None) == (False, CHUNK_SLOTS)
    for tokens in (2048, 8192, 16384):  # EP8 prefill: 32 experts
        assert _plan(tokens * 8, 32, None) == (False, CHUNK_SLOTS)
    assert _plan(2048 * 8, 256, None) == (False, CHUNK_SLOTS)  # TP8 prefill: 256 experts
    assert _plan(8192 * 8, 256, None) == _plan(16384 * 8, 256, None) == (False, WIDE_CHUNK_SLOTS)
    assert _plan(8192 * 8, 256, 256) == (False, 256)  # the override wins
    # The scan's step: every chunk up to 128, its [chunks, experts] tile within 4096 counts.
    assert _scan_block(3, 32) == 16 and _scan_block(100, 32) == 128 and _scan_block(300, 32) == 128
    assert _scan_block(128, 256) == 16 and _scan_block(128, 64) == 64
    assert _plan(40, 8, 32) == (False, 32) and _plan(32, 8, 32) == (True, 128)
    assert _plan(40, 8, 64) == (True, 128)
    # One launch: fewer experts per program as the chunk grows (the running counts stay in registers).
    assert _one_launch_shape(128) == (8, 4) and _one_launch_shape(1024) == (4, 8)
    assert _one_launch_shape(2048) == (2, 8)


@needs_triton
def test_benchmark_script_imports_and_needs_a_gpu(monkeypatch) -> None:
    """benchmarks/bench_build_layout.py imports on CPU and refuses to run without CUDA (exit 2)."""
    from benchmarks import bench_build_layout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_build_layout.main(["--tokens", "8"]) == 2
