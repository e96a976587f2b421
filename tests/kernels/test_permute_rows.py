"""permute_rows (fp8 token rows and their scales gathered into a layout's rows) on CPU: the ops
front door's torch path, the kernel's argument checks, its launch-config formula and its sm_90a
build (16-byte copies). The kernel's results run under the interpreter (_interpret_cases.py:
permute_rows*) and on the GPU (test_permute_rows_gpu.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moe_backend import ops
from moe_backend.reference import layouts

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
H = 7168  # DeepSeek-V3's hidden size: 7 KB of fp8 and 56 scales per row


def _inputs(num_tokens=5, hidden=256, num_scales=2):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 30).to(torch.float8_e4m3fn)
    return x, torch.rand(num_tokens, num_scales, generator=gen) + 0.5


def test_ops_cpu_path_is_torch_gather() -> None:
    """CPU: index_select of the rows (padding rows copy token 0, unspecified by the contract), in the
    layout's shape; used_rows is accepted (the rows past it are padding anyway)."""
    x, xs = _inputs()
    topk_ids = torch.tensor([[0, 3], [1, 3], [2, 0], [3, 1], [0, 2]])
    for layout in (
        layouts.build_contiguous_layout(topk_ids, 4, alignment=4),
        layouts.build_masked_layout(topk_ids, 4),
    ):
        src = layout.src_token
        q, s = ops.permute_rows(x, xs, src, used_rows=torch.tensor([src.numel()], dtype=torch.int32))
        assert q.shape == (*src.shape, 256) and s.shape == (*src.shape, 2)
        real = src >= 0
        assert torch.equal(q[real].view(torch.uint8), x[src[real]].view(torch.uint8))
        assert torch.equal(s[real], xs[src[real]])


def test_ops_checks_src_token() -> None:
    x, xs = _inputs()
    with pytest.raises(TypeError, match="src_token"):
        ops.permute_rows(x, xs, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="x_fp8"):
        ops.permute_rows(x.tolist(), xs, torch.tensor([0, 1]))


def _bad_cases():
    x, xs = _inputs()
    src = torch.tensor([0, 3, -1, 1])
    f8 = torch.float8_e4m3fn
    return [  # (id, x_fp8, x_scale, src_token, kwargs, error, match)
        ("x_bf16", x.float().bfloat16(), xs, src, {}, TypeError, "x_fp8: expected dtype"),
        ("x_3d", x.view(5, 2, 128), xs, src, {}, ValueError, "x_fp8"),
        ("x_list", x.tolist(), xs, src, {}, TypeError, "x_fp8"),
        ("x_strided", _inputs(hidden=512)[0][:, ::2], xs, src, {}, ValueError, "x_fp8: expected a contiguous"),
        ("scale_half", x, xs.half(), src, {}, TypeError, "x_scale: expected dtype"),
        ("scale_rows", x, xs[:4].contiguous(), src, {}, ValueError, r"x_scale: expected shape \[5, S\]"),
        ("scale_empty", x, xs[:, :0], src, {}, ValueError, "x_scale"),
        ("scale_1d", x, xs[:, 0].contiguous(), src, {}, ValueError, "x_scale"),
        ("src_int32", x, xs, src.int(), {}, TypeError, "src_token"),
        ("src_strided", x, xs, torch.arange(8)[::2], {}, ValueError, "src_token: expected a contiguous"),
        ("src_other_device", x, xs, src.to("meta"), {}, ValueError, "src_token: expected a tensor on cpu"),
        (
            "out_shape",
            x,
            xs,
            src,
            dict(out=(torch.empty(3, 256, dtype=f8), torch.empty(4, 2))),
            ValueError,
            r"out\[0\]: expected shape",
        ),
        (
            "out_dtype",
            x,
            xs,
            src,
            dict(out=(torch.empty(4, 256, dtype=f8), torch.empty(4, 2).half())),
            TypeError,
            r"out\[1\]: expected dtype",
        ),
        ("out_single", x, xs, src, dict(out=torch.empty(4, 256, dtype=f8)), TypeError, "out: expected a pair"),
        ("used_rows_int64", x, xs, src, dict(used_rows=torch.tensor([2])), TypeError, "used_rows: expected dtype"),
        (
            "used_rows_shape",
            x,
            xs,
            src,
            dict(used_rows=torch.tensor([2, 3], dtype=torch.int32)),
            ValueError,
            "used_rows: expected shape",
        ),
    ]


@needs_triton
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_kernel_bad_inputs(case, monkeypatch) -> None:
    """Each bad argument raises before any launch, naming the argument (the interpreter switch lets
    CPU tensors past the CUDA check, so the device-mismatch case runs here too)."""
    from moe_backend.kernels.permute_rows import permute_rows

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, x, xs, src, kwargs, error, match = case
    with pytest.raises(error, match=match):
        permute_rows(x, xs, src, **kwargs)


@needs_triton
def test_kernel_refuses_cpu_tensors(monkeypatch) -> None:
    from moe_backend.kernels.permute_rows import permute_rows

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="x_fp8: the Triton kernels need a CUDA tensor"):
        permute_rows(*_inputs(), torch.zeros(2, dtype=torch.int64))


@needs_triton
@pytest.mark.parametrize(
    "rows,row_bytes,expected",
    [
        (131072 + 256 * 127, H + 4 * 56, 4),  # TP8 prefill: 4 rows = 29 KB per program
        (16384 + 32 * 127, H + 4 * 56, 4),  # EP8 prefill
        (2048, H + 4 * 56, 2),  # fewer rows: smaller blocks so the grid covers the SMs
        (128, H + 4 * 56, 1),
        (100000, 256 + 8, 16),  # short rows: the most rows a program takes
    ],
)
def test_launch_config_formula(rows: int, row_bytes: int, expected: int) -> None:
    from moe_backend.kernels import permute_rows as mod

    assert mod.gather_launch_config(rows, row_bytes) == mod.GatherLaunchConfig(expected, mod.DEFAULT_NUM_WARPS)


@needs_triton
@pytest.mark.parametrize("rows,warps", [(0, 4), (3, 4), (4, 5)])
def test_launch_config_is_checked(rows: int, warps: int) -> None:
    from moe_backend.kernels.permute_rows import GatherLaunchConfig

    with pytest.raises(ValueError, match="rows_per_program|num_warps"):
        GatherLaunchConfig(rows, warps)


@needs_triton
def test_word_width_follows_length_and_alignment() -> None:
    from moe_backend.kernels.permute_rows import _word_bytes

    buffer = torch.empty(64, dtype=torch.uint8)
    assert _word_bytes(H, buffer) == 8
    assert _word_bytes(H, buffer[4:]) == 4 and _word_bytes(H, buffer[2:]) == 2 and _word_bytes(H, buffer[1:]) == 1
    assert _word_bytes(388, buffer) == 4 and _word_bytes(7, buffer) == 1


@needs_triton
@pytest.mark.parametrize("rows_per_program,used_rows", [(4, True), (4, False), (16, True)])
def test_compiles_for_sm90a_with_16_byte_copies(rows_per_program: int, used_rows: bool) -> None:
    """DeepSeek-V3 rows (896 int64 words): every fp8 word is copied in 16-byte vectors."""
    from moe_backend.kernels.permute_rows import _permute_rows_kernel
    from tests.helpers.sm90_compile import assert_waits_first, compile_for_sm90, global_memory_ops

    signature = {
        "x_ptr": "*i64",
        "xs_ptr": "*fp32",
        "src_ptr": "*i64",
        "q_ptr": "*i64",
        "s_ptr": "*fp32",
        "used_rows_ptr": "*i32",
        "num_rows": "i32",
    }
    consts = dict(
        ROW_WORDS=H // 8,
        CHUNK=128,
        NUM_SCALES=56,
        SCALES_PAD=64,
        ROWS=rows_per_program,
        EVEN_CHUNKS=True,
        USED_ROWS=used_rows,
        PDL=used_rows,  # the decode plans' launches are dependent ones
    )
    try:
        compiled = compile_for_sm90(_permute_rows_kernel, signature, consts, [n for n in signature if "ptr" in n])
    except ImportError as exc:  # a Triton build without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend: {exc}")
    assert_waits_first(compiled.asm["ptx"], dependent=used_rows)
    _, stores = global_memory_ops(compiled.asm["ptx"])
    row_stores = stores["st.global.v2.b64"]
    assert row_stores * 16 * 128 == rows_per_program * H, stores  # 128 threads, 16 bytes each
