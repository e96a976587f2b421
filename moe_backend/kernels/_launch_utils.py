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
        raise ValueError(
            f"{name}: the Triton kernels need a CUDA tensor, got one on {t.device} "
            f"(use moe_backend.ops, which falls back to the reference on CPU)"
        )
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


def check_used_rows(used_rows, device: torch.device) -> None:
    """A device-side row count: int32 `[1]` on `device` (read by the kernel, never by the host)."""
    check_kernel_tensor("used_rows", used_rows, device, dtypes=(torch.int32,), shape=(1,))


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Row-looping launches: about this many programs per SM (along both grid axes) keep every SM busy.
PROGRAMS_PER_SM = 16
INTERPRETER_ROW_PROGRAMS = 3  # few, so every program loops over several rows


def persistent_row_programs(device: torch.device, num_rows: int, programs_per_row: int) -> int:
    """Programs along the row axis for a kernel whose programs loop over rows (bounded by a
    device-side count): enough to fill the GPU, never more than the rows."""
    if device.type != "cuda":
        return max(1, min(num_rows, INTERPRETER_ROW_PROGRAMS))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(num_rows, _sm_count(index) * PROGRAMS_PER_SM // max(1, programs_per_row)))
