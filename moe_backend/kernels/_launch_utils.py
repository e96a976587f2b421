"""Launcher-side checks and device facts shared by the kernel files."""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from moe_backend._checks import check_tensor


def interpreting() -> bool:
    """Under `TRITON_INTERPRET=1` kernels run on CPU tensors (CI's tiny-shape tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_kernel_tensor(name: str, t, device: torch.device | None = None, **constraints) -> torch.Tensor:
    """`check_tensor` plus what a kernel needs: contiguous, on a CUDA device (or the interpreter's CPU),
    on the same device as the first operand."""
    check_tensor(name, t, contiguous=True, **constraints)
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name}: the Triton kernels need a CUDA tensor, got one on {t.device} "
                         f"(use moe_backend.ops, which falls back to the reference on CPU)")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (as the first operand), got {t.device}")
    return t


@lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpreter"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
