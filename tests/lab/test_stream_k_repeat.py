"""lab.stream_k_repeat runs the stream-K cases of the CUDA GEMM's SiLU*up quant GPU test on that
test's operands (CPU: the cases only; the launches need a GPU)."""

from __future__ import annotations

from lab import stream_k_repeat
from tests.cuda import test_cuda_gemm_gpu as gemm_tests


def test_the_lab_runs_the_gpu_tests_stream_k_cases():
    cases = {c[0]: c for c in gemm_tests.SILU_CASES}
    assert set(stream_k_repeat.CASES) == {name for name, *_, cfg, _, _ in cases.values() if cfg and cfg.get("stream_k")}


def test_gate_up_tiled_orders_rows_as_the_silu_kernel_tiles_them():
    """Row blocks gate 0, up 0, gate 1, up 1 (128 rows each), scales alike, and `order` undoes it."""
    import torch

    inter, k = 256, 256
    b = torch.randn(2, 2 * inter, k).to(torch.float8_e4m3fn)
    b_scale = torch.rand(2, 2 * inter // 128, k // 128)
    tiled, tiled_scale, order = gemm_tests.gate_up_tiled(b, b_scale, inter)
    bytes_, tiled_bytes = b.view(torch.uint8), tiled.view(torch.uint8)
    for block, (part, j) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        first = part * inter + j * 128
        assert torch.equal(tiled_bytes[:, block * 128 : (block + 1) * 128], bytes_[:, first : first + 128])
        assert torch.equal(tiled_scale[:, block], b_scale[:, first // 128])
    h_tiled = tiled_bytes[0, :, 0].float()[None]  # one column of the GEMM output per reordered row
    h = torch.empty_like(h_tiled)
    h[:, order] = h_tiled
    assert torch.equal(h[0], bytes_[0, :, 0].float())
