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


def check_per_program(name: str, per_program: int, num_warps: int) -> None:
    """A row-looping launch config: `per_program` (rows or items per block) a power of two, and a
    warp count Triton launches."""
    if per_program < 1 or per_program & (per_program - 1):
        raise ValueError(f"{name}: expected a power of two, got {per_program}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {num_warps}")


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


@lru_cache(maxsize=None)
def _sm_limits(device_index: int) -> tuple:
    """(SMs, registers per SM, shared-memory bytes per SM, threads per SM) of a CUDA device."""
    p = torch.cuda.get_device_properties(device_index)
    return (
        p.multi_processor_count,
        getattr(p, "regs_per_multiprocessor", 65536),
        getattr(p, "shared_memory_per_multiprocessor", 228 * 1024),
        getattr(p, "max_threads_per_multi_processor", 2048),
    )


def resident_programs(compiled, num_warps: int, device_index: int) -> int:
    """Programs the whole GPU holds at once for a compiled kernel: SMs x per-SM occupancy, limited
    by registers (allocated per warp in units of 256), shared memory (1 KB reserved per block)
    and threads (the same bound the CUDA occupancy calculator applies)."""
    sms, regs, smem, threads = _sm_limits(device_index)
    compiled._init_handles()
    regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256
    by_regs = regs // (regs_per_warp * num_warps)
    by_smem = smem // (compiled.metadata.shared + 1024) if compiled.metadata.shared else 32
    by_threads = threads // (32 * num_warps)
    return sms * max(1, min(by_regs, by_smem, by_threads, 32))


_resident_grids: dict = {}


def resident_grid(kernel, args: tuple, meta: dict, num_blocks: int, device: torch.device) -> int:
    """Programs for a kernel whose programs loop over `num_blocks` blocks (bounded by a device-side
    count, blocks pid, pid + P, ...): as many as the GPU holds at once, from the compiled kernel's
    occupancy, so all run in one wave and their equal shares end together (a grid past the resident
    count would leave the late programs' shares running on a part-empty GPU); never more than the
    blocks. `args` and `meta` as for the launch (`meta` holds num_warps)."""
    if device.type != "cuda":
        return max(1, min(num_blocks, INTERPRETER_ROW_PROGRAMS))
    index = device.index if device.index is not None else torch.cuda.current_device()
    # Occupancy follows the compiled kernel: its constexprs and its pointers' alignment. Integer
    # arguments are left out (a row count would make a key per token count; their % 16
    # specialization barely moves registers, and a grid a little off costs time, never results).
    aligned = tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))
    key = (kernel, index, tuple(sorted(meta.items())), aligned)
    if key not in _resident_grids:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        _resident_grids[key] = resident_programs(compiled, meta["num_warps"], index)
    return max(1, min(num_blocks, _resident_grids[key]))


def persistent_row_programs(device: torch.device, num_rows: int, programs_per_row: int) -> int:
    """Programs along the row axis for a kernel whose programs loop over rows (bounded by a
    device-side count): enough to fill the GPU, never more than the rows."""
    if device.type != "cuda":
        return max(1, min(num_rows, INTERPRETER_ROW_PROGRAMS))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(num_rows, _sm_count(index) * PROGRAMS_PER_SM // max(1, programs_per_row)))
