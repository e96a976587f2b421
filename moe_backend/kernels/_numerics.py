"""Rounding helpers shared by the kernels.

The GPU's casts round to nearest even; Triton's CPU interpreter (3.9) does not (fp32 -> bf16
truncates; fp32 -> e4m3 rounds ties away and loses mantissa carries). Rounding onto the target
grid in fp32 first makes the final cast exact on both, so the CPU interpreter tests check the real
numerics. On the GPU this is a handful of integer ops per stored element: epilogue only.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16_grid(x):
    """fp32 -> the nearest bf16 value (ties to even), still fp32; finite inputs."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3_grid(x):
    """Rounds fp32 `x` (|x| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    The cast that follows is then exact. The hardware cast rounds the same way, but Triton's CPU
    interpreter (3.9) mis-rounds (ties away, lost mantissa carries), so the kernel rounds first
    and the interpreter tests check the real numerics.
    """
    bits = x.to(tl.int32, bitcast=True)
    # Normal range (|x| >= 2^-6): keep 3 mantissa bits, round half to even on the dropped 20.
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormals step by 2^-9: adding 1.5 * 2^14 (ulp 2^-9) rounds to that grid, ties to even.
    magic = 24576.0
    sub = (x + magic) - magic
    return tl.where(tl.abs(x) < 0.015625, sub, normal)
