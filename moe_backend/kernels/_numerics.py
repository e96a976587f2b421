"""Rounding helpers shared by the kernels.

The GPU's casts round to nearest even; Triton's CPU interpreter (3.9) does not (fp32 -> bf16
truncates; fp32 -> e4m3 rounds ties away and loses mantissa carries). Under the interpreter the
helpers round onto the target grid in fp32 first, so the cast that follows is exact and the CPU
tests check the real numerics; on the GPU they leave it to the hardware's cast, where the software
rounding of e4m3 had been a third of the quant kernels' instructions (those kernels run at the
issue rate).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._launch_utils import interpreting

# Triton decides interpreter or compiler when a kernel is decorated, from TRITON_INTERPRET: read
# once at import, so a kernel module and its rounding agree.
ROUND_IN_SOFTWARE = tl.constexpr(interpreting())


@triton.jit
def round_to_bf16_grid(x):
    """fp32 -> the nearest bf16 value (ties to even), still fp32; finite inputs."""
    if ROUND_IN_SOFTWARE:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def to_e4m3(x):
    """fp32 `x` (|x| <= 448) -> e4m3, round to nearest even: the GPU's cast (cvt.rn.satfinite), or
    under the interpreter the software rounding of `round_to_e4m3_grid` first."""
    if ROUND_IN_SOFTWARE:
        x = round_to_e4m3_grid(x)
    return x.to(tl.float8e4nv)


@triton.jit
def round_to_e4m3_grid(x):
    """Rounds fp32 `x` (|x| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    The cast that follows is then exact: `to_e4m3` calls it under the interpreter, which mis-rounds
    the cast (ties away, lost mantissa carries); the hardware cast rounds as this does.
    """
    bits = x.to(tl.int32, bitcast=True)
    # Normal range (|x| >= 2^-6): keep 3 mantissa bits, round half to even on the dropped 20.
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == 0xFFF00000
    normal = rounded.to(tl.float32, bitcast=True)
    # Subnormals step by 2^-9: adding 1.5 * 2^14 (ulp 2^-9) to the magnitude rounds it to that grid,
    # ties to even; the sign goes back on after, so values that round to zero keep theirs (-0), as
    # the hardware cast and torch's keep it.
    magic = 24576.0
    sub = (tl.abs(x) + magic) - magic
    sub = tl.where(bits < 0, -sub, sub)
    return tl.where(tl.abs(x) < 0.015625, sub, normal)
