"""The front door to the grouped-GEMM ops: one signature (the reference's), several providers.

`impl`:
- "auto": our Triton kernels for CUDA tensors, the torch reference otherwise;
- "best": like "auto", but the grouped GEMMs run our CUDA C++ kernel (`moe_backend/cuda/`)
  where it can (Hopper, nvcc and cuda-python present) and measured faster than the Triton one
  (`moe_backend.dispatch.plan.gemm_provider`, the one place that compares them);
- "triton": our kernels (`moe_backend/kernels/`); CPU tensors fall back to the reference, which
  computes the same function;
- "cuda": our CUDA C++ GEMM (JIT-compiled with nvcc; the masked layout needs max_m % 128 == 0),
  CUDA only;
- "deepgemm": DeepGEMM, the optional peer (`pip install -e '<moe-backend clone>[deepgemm]'`), CUDA only;
- "reference": plain torch.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Callable

import torch

from moe_backend._checks import check_gemm_args, check_quant_args, check_quant_out, check_tensor
from moe_backend._device import runs_on_first_tensor_device
from moe_backend.constants import LAYOUT_ALIGNMENT, QUANT_BLOCK
from moe_backend.providers import torch_reference

__all__ = [
    "grouped_gemm_contiguous",
    "grouped_gemm_masked",
    "silu_mul_quant",
    "per_token_group_quant",
    "permute_quant",
    "permute_rows",
    "unpermute_combine",
    "build_contiguous_layout",
    "build_masked_layout",
    "contiguous_alignment",
    "cuda_kernel_available",
    "IMPLS",
]

IMPLS = ("auto", "best", "triton", "cuda", "deepgemm", "reference")


@lru_cache(maxsize=None)
def _kernel(op: str, module: str | None = None) -> Callable:
    try:
        module = importlib.import_module(f"moe_backend.kernels.{module or op}")
    except ImportError as exc:
        if exc.name in ("triton", "triton.language"):
            raise ImportError(
                f"moe_backend: the GPU kernel {op!r} needs Triton; install it with "
                f"`pip install triton` (it ships with CUDA builds of torch)"
            ) from exc
        raise
    return getattr(module, op)


def _provider(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl in ("deepgemm", "cuda"):
        if device.type != "cuda":
            raise ValueError(f"impl={impl!r} runs on CUDA tensors only, got tensors on {device}")
        return impl
    if impl == "reference" or device.type != "cuda":
        return "reference"
    return "triton"


@lru_cache(maxsize=None)
def cuda_kernel_available(device_index: int = 0) -> bool:
    """Whether our CUDA C++ GEMM can build and run here: a Hopper GPU, nvcc, cuda-python."""
    import importlib.util

    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        return False
    from moe_backend.cuda import jit

    try:
        jit.find_nvcc()
    except jit.JITError:
        return False
    return True


@runs_on_first_tensor_device
def grouped_gemm_contiguous(
    a_fp8, a_scale, b_fp8, b_scale, expert_ids, out=None, *, impl: str = "auto", expected_m: int | None = None
):
    """See `moe_backend.reference.grouped_gemm_contiguous`; `expected_m` as in `grouped_gemm_masked`."""
    check_gemm_args(a_fp8, b_fp8, impl, expected_m, IMPLS)
    if impl == "best" and a_fp8.is_cuda:
        from moe_backend.dispatch.plan import gemm_provider

        rows = expected_m or max(1, a_fp8.shape[0] // max(b_fp8.shape[0], 1))
        impl = gemm_provider("best", "contiguous", b_fp8.shape[1], b_fp8.shape[2], rows, a_fp8.device)
    provider = _provider(impl, a_fp8.device)
    if provider == "cuda":
        from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous as cuda_gemm

        return cuda_gemm(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out)
    if provider == "triton":
        return _kernel("grouped_gemm_contiguous")(
            a_fp8, a_scale, b_fp8, b_scale, expert_ids, out, expected_m=expected_m
        )
    if provider == "deepgemm":
        from moe_backend.providers import deepgemm

        return deepgemm.grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out)
    return torch_reference.grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out)


@runs_on_first_tensor_device
def grouped_gemm_masked(
    a_fp8, a_scale, b_fp8, b_scale, masked_m, out=None, *, impl: str = "auto", expected_m: int | None = None
):
    """See `moe_backend.reference.grouped_gemm_masked`. `expected_m` (typical rows per expert, a
    host int the engine already knows) only steers the kernel's tile choice; no host sync.
    impl="best" runs our CUDA kernel on the cells where it measured faster."""
    check_gemm_args(a_fp8, b_fp8, impl, expected_m, IMPLS)
    if impl == "best" and a_fp8.is_cuda:
        from moe_backend.dispatch.plan import gemm_provider

        max_m = a_fp8.shape[1]
        impl = gemm_provider("best", "masked", b_fp8.shape[1], b_fp8.shape[2], expected_m or max_m, a_fp8.device, max_m)
    provider = _provider(impl, a_fp8.device)
    if provider == "cuda":
        from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked as cuda_gemm

        return cuda_gemm(a_fp8, a_scale, b_fp8, b_scale, masked_m, out)
    if provider == "triton":
        return _kernel("grouped_gemm_masked")(a_fp8, a_scale, b_fp8, b_scale, masked_m, out, expected_m=expected_m)
    if provider == "deepgemm":
        from moe_backend.providers import deepgemm

        return deepgemm.grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, masked_m, out, expected_m)
    return torch_reference.grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, masked_m, out)


@runs_on_first_tensor_device
def silu_mul_quant(
    h: torch.Tensor,
    group: int = QUANT_BLOCK,
    ue8m0: bool = False,
    *,
    expert_ids: torch.Tensor | None = None,
    masked_m: torch.Tensor | None = None,
    used_rows: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    partials: bool = False,
    num_partials: torch.Tensor | None = None,
):
    """See `moe_backend.reference.silu_mul_quant`: with `expert_ids` or `masked_m` only the rows
    holding a token are computed (the kernel leaves the others unwritten); with `used_rows` (int32
    `[1]` on the device, e.g. `layout.expert_offsets[-1:]`) the rows past it are not visited.
    `partials`: h is f32 `[S, M, 2I]`, a K-split GEMM1's partial sums, the first `num_partials`
    (int32 `[1]`, optional) of them in use (`reference.sum_partials`)."""
    validity = dict(expert_ids=expert_ids, masked_m=masked_m, used_rows=used_rows, out=out)
    check_quant_args("h", h, group, ue8m0)
    if _provider("auto", h.device) == "triton":
        return _kernel("silu_mul_quant")(h, group, ue8m0, partials=partials, num_partials=num_partials, **validity)
    if partials:
        h = torch_reference.sum_partials(h, num_partials)
    return torch_reference.silu_mul_quant(h, group, ue8m0, **validity)


@runs_on_first_tensor_device
def per_token_group_quant(
    x: torch.Tensor,
    group: int = QUANT_BLOCK,
    ue8m0: bool = False,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """See `moe_backend.quant.quantize_fp8_per_token_group`; written into the pair `out` when given."""
    check_quant_args("x", x, group, ue8m0)
    if _provider("auto", x.device) == "triton":
        return _kernel("per_token_group_quant")(x, group, ue8m0, out=out)
    from moe_backend.quant import quantize_fp8_per_token_group

    q, s = quantize_fp8_per_token_group(x, group, ue8m0)
    if out is None:
        return q, s
    check_quant_out(out, q.shape, s.shape, x.device)
    return out[0].copy_(q), out[1].copy_(s)


@runs_on_first_tensor_device
def permute_quant(
    x: torch.Tensor,
    src_token: torch.Tensor,
    group: int = QUANT_BLOCK,
    ue8m0: bool = False,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    used_rows: torch.Tensor | None = None,
):
    """Per-token-group quant fused with the permute into a layout's rows (`layout.src_token`):
    see `moe_backend.reference.permute_quant`, bit-identical to quant + `permute` on the
    rows holding a token; padding rows (src_token -1) are left unwritten by the kernel, and with
    `used_rows` (e.g. `layout.expert_offsets[-1:]`) the rows past it are not visited."""
    check_quant_args("x", x, group, ue8m0)
    check_tensor("src_token", src_token, dtypes=(torch.int64,), device=x.device)
    if _provider("auto", x.device) == "triton":
        return _kernel("permute_quant")(x, src_token, group, ue8m0, out=out, used_rows=used_rows)
    return torch_reference.permute_quant(x, src_token, group, ue8m0, out=out, used_rows=used_rows)


@runs_on_first_tensor_device
def permute_rows(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, src_token: torch.Tensor, *, used_rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized token rows copied into a layout's rows (`src_token`, -1 = padding: unspecified).
    CUDA tensors: one gather kernel (`moe_backend.kernels.permute_rows`) that leaves padding rows
    unwritten and, given `used_rows` (int32 `[1]` on the device, e.g. `layout.expert_offsets[-1:]`),
    does not visit the rows past it; CPU: a torch gather (padding rows copy token 0)."""
    check_tensor("x_fp8", x_fp8, min_dim=1)
    check_tensor("src_token", src_token, dtypes=(torch.int64,), device=x_fp8.device)
    if _provider("auto", x_fp8.device) == "triton":
        # An engine's pre-quantized x may arrive strided (e.g. column-major scales): copy it once.
        return _kernel("permute_rows")(x_fp8.contiguous(), x_scale.contiguous(), src_token, used_rows=used_rows)
    src = src_token.reshape(-1).clamp(min=0)
    shape = tuple(src_token.shape)
    return (
        x_fp8.index_select(0, src).view(*shape, x_fp8.shape[-1]),
        x_scale.index_select(0, src).view(*shape, x_scale.shape[-1]),
    )


@runs_on_first_tensor_device
def unpermute_combine(
    y: torch.Tensor,
    row_of_slot: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    partials: bool = False,
    num_partials: torch.Tensor | None = None,
    branch_on_slots: bool = False,
    skip_single: bool = False,
) -> torch.Tensor:
    """Un-permute + top-k weighted combine: `out[t] = sum_j topk_weights[t, j] * y[row_of_slot[t, j]]`
    (see `moe_backend.reference.unpermute_combine`; a gather: deterministic, fp32 sum).
    `partials`: y is f32 `[S, M, N]`, a K-split GEMM2's partial sums, the first `num_partials`
    (int32 `[1]`, optional) of them in use (`reference.sum_partials`). `branch_on_slots`: how the
    kernel skips absent slots (a plan's `combine_branch`); the result is the same. `skip_single`:
    tokens with exactly one local slot keep what `out` (required) holds: GEMM2 stored them there
    (a plan's `direct_rows`)."""
    if skip_single and out is None:
        raise ValueError("out: skip_single leaves single-slot tokens' rows to the caller's output; pass it")
    check_tensor("y", y, dtypes=(torch.bfloat16, torch.float16, torch.float32), min_dim=2)
    check_tensor("row_of_slot", row_of_slot, dtypes=(torch.int32, torch.int64), ndim=2, device=y.device)
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(row_of_slot.shape), device=y.device)
    if _provider("auto", y.device) == "triton":
        return _kernel("unpermute_combine")(
            y, row_of_slot, topk_weights, out, partials=partials, num_partials=num_partials,
            branch_on_slots=branch_on_slots, skip_single=skip_single,
        )  # fmt: skip
    if partials:
        y = torch_reference.sum_partials(y, num_partials)
    if not skip_single:
        return torch_reference.unpermute_combine(y, row_of_slot, topk_weights, out)
    combined = torch_reference.unpermute_combine(y, row_of_slot, topk_weights)
    keep = (row_of_slot >= 0).sum(dim=1) == 1
    return out.copy_(torch.where(keep.unsqueeze(1), out, combined))


def contiguous_alignment(impl: str = "auto", device: torch.device | str = "cpu") -> int:
    """Rows each expert's segment is padded to in the contiguous layout, for that provider."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a torch.device or a string, got {type(device).__name__}")
    provider = _provider(impl, torch.device(device))
    if provider == "cuda":
        from moe_backend.cuda.grouped_gemm_contiguous import CONTIGUOUS_ALIGNMENT

        return CONTIGUOUS_ALIGNMENT
    if provider == "triton":
        return importlib.import_module("moe_backend.kernels.grouped_gemm_contiguous").CONTIGUOUS_ALIGNMENT
    if provider == "deepgemm":
        from moe_backend.providers import deepgemm

        return deepgemm.contiguous_alignment()
    return LAYOUT_ALIGNMENT


# Layout builders: the Triton kernels on CUDA tensors, their torch twins (`moe_backend.reference`)
# otherwise (same layout).


@runs_on_first_tensor_device
def build_contiguous_layout(
    topk_ids: torch.Tensor, num_local_experts: int, *, expert_start: int = 0, alignment: int = LAYOUT_ALIGNMENT
):
    """topk_ids `[T, k]` -> `ContiguousLayout` on the static `max_contiguous_rows(T*k, E, alignment)`
    rows (padding and the unused tail: expert_ids = src_token = -1). No host sync: CUDA-graph
    capturable. See `moe_backend.kernels.build_layout`."""
    if _provider("auto", topk_ids.device) == "triton":
        return _kernel("build_contiguous_layout", module="build_layout")(
            topk_ids.contiguous(), num_local_experts, expert_start=expert_start, alignment=alignment
        )
    return torch_reference.build_contiguous_layout(
        topk_ids, num_local_experts, expert_start=expert_start, alignment=alignment, exact_size=False
    )


@runs_on_first_tensor_device
def build_masked_layout(
    topk_ids: torch.Tensor, num_local_experts: int, *, expert_start: int = 0, max_m: int | None = None
):
    """topk_ids `[T, k]` -> `MaskedLayout` with `max_m` rows per expert (default max(T, 1), which
    never overflows). No host sync: an expert's slots past max_m (in (token, slot) order) are
    dropped (row_of_slot -1, masked_m clamped). See `moe_backend.kernels.build_layout`."""
    if _provider("auto", topk_ids.device) == "triton":
        return _kernel("build_masked_layout", module="build_layout")(
            topk_ids.contiguous(), num_local_experts, expert_start=expert_start, max_m=max_m
        )
    return torch_reference.build_masked_layout(
        topk_ids, num_local_experts, expert_start=expert_start, max_m=max_m, drop_overflow=True
    )
