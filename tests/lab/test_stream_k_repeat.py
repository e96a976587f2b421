"""lab.stream_k_repeat runs the stream-K cases of the CUDA GEMM's SiLU*up quant GPU test on that
test's operands (CPU: the cases only; the launches need a GPU)."""

from __future__ import annotations

from lab import stream_k_repeat
from tests.cuda import test_cuda_gemm_gpu as gemm_tests


def test_the_lab_runs_the_gpu_tests_stream_k_cases():
    cases = {c[0]: c for c in gemm_tests.SILU_CASES}
    assert set(stream_k_repeat.CASES) == {name for name, *_, cfg, _, _ in cases.values() if cfg and cfg.get("stream_k")}
