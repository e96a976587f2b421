"""lab.stream_k_repeat runs the stream-K cases of the CUDA GEMM's SiLU*up quant test on the same
expert counts (CPU: the counts only; the launches need a GPU)."""

from __future__ import annotations

from lab import stream_k_repeat
from tests.cuda import test_cuda_gemm_gpu as gemm_tests


def test_the_lab_draws_the_gpu_tests_counts():
    cases = {c[0]: c for c in gemm_tests.SILU_CASES}
    pairs = {
        "ep8_w13_pairs": "ep8_w13_pairs_stream_k",
        "few_units": "few_units_stream_k_ue8m0",
        "tp8_w13_gather": "tp8_w13_gather_stream_k",
    }
    for name, inter, k, counts, cfg, tokens in stream_k_repeat.CASES:
        want = cases[pairs[name]]
        assert (inter, k, tokens) == (want[1], want[2], want[5])
        assert stream_k_repeat._counts(counts) == list(want[3])
        assert {**cfg, "stream_k": True} == {x: v for x, v in want[4].items()}
