"""The GPU a call runs on. Triton launches on the current CUDA device (our CUDA launcher already
makes the tensors' device current itself, `cuda.launch`); a call
whose tensors live on another GPU (a model spread over GPUs, as transformers' `device_map` does)
runs with that GPU made current for the call, so its kernels never launch on one device with
another's pointers."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, TypeVar

import torch

__all__ = ["on_device_of", "runs_on_first_tensor_device"]

F = TypeVar("F", bound=Callable)


def on_device_of(t: object) -> contextlib.AbstractContextManager:
    """`torch.cuda.device(t.device)` when `t` is a CUDA tensor off the current device, else nothing."""
    if isinstance(t, torch.Tensor) and t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def runs_on_first_tensor_device(fn: F) -> F:
    """`fn` run with its first argument's GPU current (`on_device_of`)."""

    @functools.wraps(fn)
    def on_first_tensor_device(*args, **kwargs):
        with on_device_of(args[0] if args else None):
            return fn(*args, **kwargs)

    return on_first_tensor_device  # type: ignore[return-value]
