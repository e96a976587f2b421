"""Argument checks shared by every public entry point: each error names the argument and what
was expected, so a bad call fails at the boundary instead of deep inside a kernel."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def check_tensor(name: str, t: object, *, dtypes: Iterable[torch.dtype] | None = None,
                 shape: Sequence[int | None] | None = None, ndim: int | None = None,
                 min_dim: int | None = None, device: torch.device | str | None = None,
                 contiguous: bool = False) -> torch.Tensor:
    """Raises TypeError/ValueError naming `name` unless `t` is a tensor matching every constraint.

    `shape` entries of None match any size.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {list(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {list(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = ", ".join("*" if s is None else str(s) for s in shape)
            raise ValueError(f"{name}: expected shape [{want}], got {list(t.shape)}")
    if device is not None and t.device != torch.device(device) and not _same_device(t.device, device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides "
                         f"{list(t.stride())} for shape {list(t.shape)}")
    return t


def check_quant_out(out: object, q_shape: Sequence[int], s_shape: Sequence[int],
                    device: torch.device | str) -> None:
    """`out` of a quantizing op: a pair (fp8 e4m3 `q_shape`, f32 `s_shape`) on `device`."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"out: expected a pair (a_fp8, a_scale), got {type(out).__name__}")
    check_tensor("out[0]", out[0], dtypes=(torch.float8_e4m3fn,), shape=tuple(q_shape), device=device)
    check_tensor("out[1]", out[1], dtypes=(torch.float32,), shape=tuple(s_shape), device=device)


def _same_device(a: torch.device, b: torch.device | str) -> bool:
    b = torch.device(b)
    return a.type == b.type and (b.index is None or a.index == b.index)


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len({(d.type, d.index) for d in devices.values()}) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Host-syncing NaN/Inf check: use on load and in the reference, never on the decode path."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.float()).all()):
        bad = int((~torch.isfinite(t.float())).sum())
        raise ValueError(f"{name}: holds {bad} NaN/Inf values")
