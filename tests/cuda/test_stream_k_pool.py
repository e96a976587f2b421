"""Stream-K's pool arithmetic (scheduler.cuh: StreamKPool, Segment), the very header the kernel
includes, built for the host by nvcc and run on the CPU (`stream_k_pool_check.cu`): over unit
counts around every multiple of the clusters, the clusters of a Hopper GPU in pairs and alone,
and K split in 1, 2 and 7 chunks (EP8 w13: K = 7168 in chunks of 8 K blocks), every K block of
every unit is computed exactly once, each cut unit has one owner finishing it last in its range
from the partial sums of exactly the clusters that hold its other pieces (each of them first in
its range), waits point only to later clusters, and the clusters' work differs by at most one
chunk. Skips without a toolkit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from moe_backend.cuda import jit

HERE = Path(__file__).parent
HEADERS = Path(jit.__file__).parent

try:
    NVCC = jit.find_nvcc()
except jit.JITError:
    NVCC = None


def _cases() -> str:
    lines = []
    for clusters in (1, 2, 5, 57, 66, 132):
        for chunks_per_unit in (1, 2, 7):
            units = [*range(0, 3 * clusters + 3), 640, 1040, 1152, 4004]
            lines += [f"{u} {clusters} {chunks_per_unit} 8" for u in units]
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit)")
def test_stream_k_pool_covers_every_k_block_once(tmp_path):
    exe = tmp_path / "stream_k_pool_check"
    build = subprocess.run(
        [str(NVCC), "-std=c++17", "--expt-relaxed-constexpr", "-I", str(HEADERS), "-o", str(exe),
         str(HERE / "stream_k_pool_check.cu")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    cases = _cases()
    run = subprocess.run([str(exe)], input=cases, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == f"ok {cases.count(chr(10))}", run.stdout + run.stderr
