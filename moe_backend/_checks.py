"""Argument checks shared by every public entry point: each error names the argument and what
was expected, so a bad call fails at the boundary instead of deep inside a kernel."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from moe_backend.constants import FP8_DTYPE, QUANT_BLOCK
from moe_backend.env import ENV

_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    min_dim: int | None = None,
    device: torch.device | str | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
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
        raise ValueError(
            f"{name}: expected a contiguous tensor (call .contiguous()), got strides "
            f"{list(t.stride())} for shape {list(t.shape)}"
        )
    return t


def check_quant_out(out: object, q_shape: Sequence[int], s_shape: Sequence[int], device: torch.device | str) -> None:
    """`out` of a quantizing op: a pair (fp8 e4m3 `q_shape`, f32 `s_shape`) on `device`."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"out: expected a pair (a_fp8, a_scale), got {type(out).__name__}")
    check_tensor("out[0]", out[0], dtypes=(torch.float8_e4m3fn,), shape=tuple(q_shape), device=device)
    check_tensor("out[1]", out[1], dtypes=(torch.float32,), shape=tuple(s_shape), device=device)


def _same_device(a: torch.device, b: torch.device | str) -> bool:
    b = torch.device(b)
    return a.type == b.type and (b.index is None or a.index == b.index)


def check_same_device(**tensors: torch.Tensor) -> None:
    first = None
    for t in tensors.values():  # runs on every call: compare devices before building any message
        if t is None:
            continue
        if first is None:
            first = t.device
        elif t.device != first:
            listing = ", ".join(f"{n} on {v.device}" for n, v in tensors.items() if v is not None)
            raise ValueError(f"tensors must be on one device: {listing}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Host-syncing NaN/Inf check: use on load and in the reference, never on the decode path."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.float()).all()):
        bad = int((~torch.isfinite(t.float())).sum())
        raise ValueError(f"{name}: holds {bad} NaN/Inf values")


# The non-finite policy (docs/reliability.md): on the checked path -- CPU tensors, or any device
# with MOE_BACKEND_CHECK_FINITE=1 -- a NaN/Inf input, or a finite input whose result overflows,
# raises a ValueError naming the input. Unchecked (GPU, no host sync), rows stay independent: a bad
# row never changes another row, and the quantizers saturate instead of producing NaN.
def finite_checks_enabled(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or ENV.check_finite


def _row_summary(bad_rows: torch.Tensor) -> str:
    rows = bad_rows.nonzero().squeeze(1)
    shown = ", ".join(str(r) for r in rows[:8].tolist()) + (", ..." if rows.numel() > 8 else "")
    return f"{rows.numel()} row(s) [{shown}]"


def check_finite_rows(name: str, x: torch.Tensor) -> None:
    """ValueError naming `name` and its first bad rows when 2-D `x` holds NaN/Inf (a host sync)."""
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):
        raise ValueError(f"{name}: holds NaN/Inf values in {_row_summary(bad)}")


def fp8_nan(x: torch.Tensor) -> torch.Tensor:
    """Where e4m3fn `x` holds NaN, its only non-finite value (bits S.1111.111), read as bytes: no
    fp32 copy of a weight or an activation."""
    return (x.view(torch.uint8) & 0x7F) == 0x7F


def check_finite_fp8_rows(name: str, x: torch.Tensor) -> None:
    """check_finite_rows for 2-D e4m3fn `x` (a host sync)."""
    bad = fp8_nan(x).any(dim=-1)
    if bool(bad.any()):
        raise ValueError(f"{name}: holds NaN values in {_row_summary(bad)}")


def check_distinct_ids(name: str, ids: torch.Tensor) -> None:
    """ValueError naming `name` when a row of `[T, k]` ids repeats an id >= 0 (a host sync): a
    router picks k distinct experts, and a layout gives a token one row per expert, so a repeat
    would be summed by some layouts and dropped by others."""
    ordered = ids.sort(dim=-1).values
    bad = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(dim=-1)
    if bool(bad.any()):
        raise ValueError(f"{name}: a token's experts must be distinct; {_row_summary(bad)} repeat one")


def check_output_rows(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
    """ValueError naming input `name` when a row of `out` is NaN/Inf although that row of `x` was
    finite: its magnitude overflowed the FP8 experts' range (a host sync)."""
    bad = ~torch.isfinite(out.reshape(x.shape[0], -1)).all(dim=-1)
    if bool(bad.any()):
        amax = float(x[bad].abs().max())
        raise ValueError(
            f"{name}: {_row_summary(bad)} overflow inside the experts (max |{name}| in them = "
            f"{amax:.3g}): an intermediate exceeds fp32/bf16 range, so the output would be Inf/NaN; "
            f"the activations are far outside DeepSeek-V3's range (scale them down)"
        )


def check_int(name: str, value: object, *, minimum: int | None = None, optional: bool = False) -> None:
    """TypeError unless `value` is an int (bools refused: `True` for a count is a bug), ValueError
    below `minimum`; None passes when `optional`."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        want = "an int or None" if optional else "an int"
        raise TypeError(f"{name}: expected {want}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_gemm_args(a_fp8: object, b_fp8: object, impl: object, expected_m: object, impls: Sequence[str]) -> None:
    """The grouped GEMMs' front-door checks: types only (no host sync); each provider checks
    shapes and dtypes."""
    check_tensor("a_fp8", a_fp8)
    check_tensor("b_fp8", b_fp8)
    if not isinstance(impl, str):
        raise TypeError(f"impl: expected one of {tuple(impls)}, got {type(impl).__name__} {impl!r}")
    check_int("expected_m", expected_m, minimum=1, optional=True)


def check_quant_args(name: str, x: object, group: object, ue8m0: object) -> None:
    check_tensor(name, x)
    check_int("group", group, minimum=1)
    check_bool("ue8m0", ue8m0)


# The FP8 grouped-GEMM operands, as every provider (reference, Triton, DeepGEMM) and the experts take them.


def check_activations(a_fp8: object, a_scale: object, ndim: int, names: tuple[str, str] = ("a_fp8", "a_scale")) -> int:
    """A fp8 `[..., K]` (K a multiple of 128) + fp32 `[..., K/128]`; returns K. `names`: the two
    arguments as the caller's caller called them, for the errors."""
    name, scale_name = names
    check_tensor(name, a_fp8, dtypes=(FP8_DTYPE,), ndim=ndim)
    k = a_fp8.shape[-1]
    if k == 0 or k % QUANT_BLOCK:
        raise ValueError(f"{name}: K ({k}) must be a positive multiple of {QUANT_BLOCK}")
    check_tensor(scale_name, a_scale, dtypes=(torch.float32,), shape=(*a_fp8.shape[:-1], k // QUANT_BLOCK))
    return k


def check_grouped_gemm_weights(
    b_fp8: object, b_scale: object, k: int, names: tuple[str, str] = ("b_fp8", "b_scale")
) -> tuple[int, int]:
    """B fp8 `[E, N, K]` + fp32 `[E, ceil(N/128), K/128]`; returns (E, N)."""
    name, scale_name = names
    check_tensor(name, b_fp8, dtypes=(FP8_DTYPE,), ndim=3)
    num_experts, n, kb = b_fp8.shape
    if kb != k:
        raise ValueError(f"{name}: K ({kb}) must equal the activations' K ({k})")
    check_tensor(
        scale_name, b_scale, dtypes=(torch.float32,), shape=(num_experts, -(-n // QUANT_BLOCK), k // QUANT_BLOCK)
    )
    return num_experts, n


def check_expert_weights(
    w13_fp8: object, w13_scale_inv: object, w2_fp8: object, w2_scale_inv: object, hidden: int
) -> tuple[int, int]:
    """The experts' MLP: w13 fp8 `[E, 2I, H]` (gate rows, then up rows), w2 fp8 `[E, H, I]`, block
    scales beside them; returns (E, 2I), w13's (E, N)."""
    num_experts, two_i = check_grouped_gemm_weights(w13_fp8, w13_scale_inv, hidden, ("w13_fp8", "w13_scale_inv"))
    if two_i == 0 or two_i % (2 * QUANT_BLOCK):
        raise ValueError(
            f"w13_fp8: dim 1 is 2*I = {two_i}; I (the experts' intermediate size, w2's K) must be a "
            f"positive multiple of {QUANT_BLOCK}"
        )
    check_grouped_gemm_weights(w2_fp8, w2_scale_inv, two_i // 2, ("w2_fp8", "w2_scale_inv"))
    if w2_fp8.shape[:2] != (num_experts, hidden):
        raise ValueError(f"w2_fp8: expected shape [{num_experts}, {hidden}, {two_i // 2}], got {list(w2_fp8.shape)}")
    return num_experts, two_i


def check_token_activations(x: object, x_scale: object) -> int:
    """Token rows: bf16/fp16/fp32 x `[T, H]`, or fp8 x with fp32 `x_scale` `[T, H/128]` (already
    quantized); H a multiple of 128. Returns H."""
    if x_scale is None:
        check_tensor("x", x, dtypes=_FLOAT_DTYPES, ndim=2)
        if x.shape[-1] % QUANT_BLOCK:
            raise ValueError(f"x: hidden size ({x.shape[-1]}) must be a multiple of {QUANT_BLOCK}")
        return x.shape[-1]
    return check_activations(x, x_scale, ndim=2, names=("x", "x_scale"))


def check_topk(topk_ids: object, topk_weights: object, num_tokens: int) -> None:
    """topk_ids int32/int64 `[T, k]`, topk_weights fp32 `[T, k]`."""
    check_tensor("topk_ids", topk_ids, dtypes=_INDEX_DTYPES, ndim=2)
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids: expected {num_tokens} rows (tokens), got {topk_ids.shape[0]}")
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(topk_ids.shape))
