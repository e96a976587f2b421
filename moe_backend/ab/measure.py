"""Timing and ceilings for `compare`: one timer for every backend, and the GPU's measured peaks
from which each cell's floor (the fastest it could possibly run) is computed."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["time_us", "measure_ceilings", "moe_work"]


def time_us(fn: Callable[[], object], device: torch.device, *, reps: int = 3, warmup: bool = True) -> float:
    """Median µs of one call. CUDA: `triton.testing.do_bench` (L2 flushed between calls), or CUDA
    events when Triton is absent; CPU: wall clock over `reps` calls (after one warm-up call)."""
    if device.type == "cuda":
        try:
            import triton
        except ImportError:
            triton = None
        if triton is not None:
            return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        fn()
        samples = []
        for _ in range(max(reps, 5)):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(1e3 * start.elapsed_time(stop))
        return statistics.median(samples)
    if warmup:
        fn()
    samples = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        fn()
        samples.append(1e6 * (time.perf_counter() - start))
    return statistics.median(samples)


def measure_ceilings(device: torch.device) -> dict[str, float] | None:
    """{"copy_gbs": device-to-device copy, read + write bytes / s in GB/s; "fp8_tflops": a large
    FP8 `torch._scaled_mm`, if this GPU has one}. None on CPU (no floors reported there)."""
    if device.type != "cuda":
        return None
    out: dict[str, float] = {}
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device)
    out["copy_gbs"] = 2 * src.numel() / us / 1e3
    src = dst = None  # 2 GiB freed before the FP8 operands
    try:
        n = 8192
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        us = time_us(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device)
        out["fp8_tflops"] = 2 * n**3 / us / 1e6
    except (RuntimeError, TypeError, AttributeError) as exc:  # no FP8 tensor cores (pre-Ada)
        print(f"compare: no FP8 ceiling on this GPU ({type(exc).__name__}: {str(exc)[:80]})")
    return out


def moe_work(pairs: int, active_experts: int, num_tokens: int, hidden: int, intermediate: int) -> tuple[float, float]:
    """(FLOPs, bytes) that one routed-experts call must spend: two GEMMs per (token, local expert)
    pair, 2·pairs·(2I·H + H·I); fp8 activations read once, each active expert's fp8 weights read
    once (block scales are <1% and left out), the bf16 output written once."""
    flops = 2.0 * pairs * (2 * intermediate * hidden + hidden * intermediate)
    bytes_moved = num_tokens * hidden + active_experts * 3 * intermediate * hidden + 2 * num_tokens * hidden
    return flops, float(bytes_moved)
