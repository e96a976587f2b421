"""How far one backend's MoE output is from another's, per batch, computed on the device.

- relative error: ||out - ref||_F / ||ref||_F over the valid rows (the project's tolerance for a
  layer against the reference is 1e-2; FP8 rounding differences between correct kernels are ~1e-3);
- max abs: the largest element-wise |out - ref|;
- argmax agreement: the fraction of rows whose largest element sits at the same hidden index, a
  coarse check that does not depend on the output's scale.
"""

from __future__ import annotations

import torch

__all__ = ["cell_tolerance", "divergence", "as_floats", "METRICS"]

METRICS = ("rel_err", "max_abs", "argmax_agreement")


def divergence(out: torch.Tensor, ref: torch.Tensor, valid_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """out, ref `[..., H]` of one shape; valid_rows bool over the leading dims (None: all rows).
    Returns 0-dim fp32 tensors on the device (no host sync: the caller reads them when ready)."""
    if out.shape != ref.shape:
        raise ValueError(f"out: shape {list(out.shape)} differs from ref's {list(ref.shape)}")
    hidden = out.shape[-1]
    a, b = out.reshape(-1, hidden).float(), ref.reshape(-1, hidden).float()
    if valid_rows is None:
        valid = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    else:
        valid = valid_rows.reshape(-1).to(device=a.device, dtype=torch.bool)
        if valid.numel() != a.shape[0]:
            raise ValueError(f"valid_rows: expected {a.shape[0]} entries, got {valid.numel()}")
    diff = torch.where(valid[:, None], a - b, 0.0)
    ref_norm = torch.where(valid[:, None], b, 0.0).norm()
    diff_norm = diff.norm()
    # Both zero (no local tokens) is agreement, not 0/0.
    rel = torch.where(
        ref_norm > 0,
        diff_norm / ref_norm.clamp_min(1e-30),
        torch.where(diff_norm > 0, torch.full_like(diff_norm, float("inf")), 0.0),
    )
    if a.shape[0] == 0:
        agree = torch.ones((), device=a.device)
        max_abs = torch.zeros((), device=a.device)
    else:
        same = (a.argmax(-1) == b.argmax(-1)) & valid
        agree = same.sum().float() / valid.sum().clamp_min(1).float()
        agree = torch.where(valid.any(), agree, 1.0)
        max_abs = diff.abs().max()
    return {"rel_err": rel, "max_abs": max_abs, "argmax_agreement": agree}


def as_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def cell_tolerance(tolerance: float, pairs: int) -> float:
    """The relative-error bound a cell with `pairs` routed (token, expert) pairs is held to. The
    error is FP8 re-quantization noise averaged over the pairs' outputs: with a handful of pairs
    it spreads by ~1/sqrt(pairs) around its level (every correct kernel, DeepGEMM's included,
    exceeds 1e-2 on single-pair cells: docs/ab-testing.md), so small cells get more room."""
    return tolerance * (1.0 + 2.0 / max(pairs, 1) ** 0.5)
