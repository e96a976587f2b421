"""How far one backend's MoE output is from another's, per batch, computed on the device.

- relative error: ||out - ref||_F / ||ref||_F over the valid rows (the project's tolerance for a
  layer against the reference is 1e-2; FP8 rounding differences between correct kernels are ~1e-3);
- max abs: the largest element-wise |out - ref|;
- argmax agreement: the fraction of rows whose largest element sits at the same hidden index, a
  coarse check that does not depend on the output's scale.
"""

from __future__ import annotations

import torch

__all__ = ["cell_tolerance", "divergence", "divergence_sums", "from_sums", "as_floats", "METRICS", "SUMS"]

METRICS = ("rel_err", "max_abs", "argmax_agreement")
SUMS = ("diff_norm", "ref_norm", "max_abs", "argmax_same", "rows")


def divergence_sums(out: torch.Tensor, ref: torch.Tensor, valid_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The sums behind `divergence`, as one fp32 `[5]` tensor on the device: ||out - ref||,
    ||ref||, max |out - ref|, rows whose argmax agree, valid rows (all over the valid rows only).
    A dozen small kernels and no host sync: shadow mode copies these five numbers back and turns
    them into the metrics on the host (`from_sums`), off the serving stream."""
    if out.shape != ref.shape:
        raise ValueError(f"out: shape {list(out.shape)} differs from ref's {list(ref.shape)}")
    hidden = out.shape[-1]
    a, b = out.reshape(-1, hidden), ref.reshape(-1, hidden)
    if a.shape[0] == 0 or hidden == 0:
        return torch.zeros(len(SUMS), dtype=torch.float32, device=a.device)
    diff = a.float() - b
    same = a.argmax(-1) == b.argmax(-1)
    if valid_rows is None:
        rows = diff.new_full((), a.shape[0])
    else:
        valid = valid_rows.reshape(-1).to(device=a.device, dtype=torch.bool)
        if valid.numel() != a.shape[0]:
            raise ValueError(f"valid_rows: expected {a.shape[0]} entries, got {valid.numel()}")
        # where, not a product: rows that are not outputs may hold NaN (uninitialized buffers).
        diff = torch.where(valid[:, None], diff, 0.0)
        b = torch.where(valid[:, None], b, 0.0)
        same = same & valid
        rows = valid.sum()
    return torch.stack(
        [
            torch.linalg.vector_norm(diff),
            torch.linalg.vector_norm(b, dtype=torch.float32),
            torch.linalg.vector_norm(diff, ord=float("inf")),
            same.sum(),
            rows,
        ]
    ).float()


def from_sums(sums) -> dict[str, float]:
    """`divergence`'s metrics as floats from `divergence_sums`' five values, read back to the host."""
    diff_norm, ref_norm, max_abs, same, rows = (float(v) for v in sums)
    if ref_norm > 0:
        rel = diff_norm / ref_norm
    elif diff_norm == 0:  # both zero (no local tokens) is agreement, not 0/0
        rel = 0.0
    else:  # a zero reference: any difference is infinitely far; NaN stays NaN
        rel = float("inf") if diff_norm > 0 else float("nan")
    agree = same / rows if rows > 0 else 1.0
    return {"rel_err": rel, "max_abs": max_abs, "argmax_agreement": agree}


def divergence(out: torch.Tensor, ref: torch.Tensor, valid_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """out, ref `[..., H]` of one shape; valid_rows bool over the leading dims (None: all rows).
    Returns 0-dim fp32 tensors on the device (no host sync: the caller reads them when ready)."""
    diff_norm, ref_norm, max_abs, same, rows = divergence_sums(out, ref, valid_rows).unbind()
    # As from_sums: both zero (no local tokens) is agreement, not 0/0; a zero reference with any
    # difference is infinitely far; NaN (in out or ref) stays NaN, so the cell is flagged.
    off_zero_ref = torch.where(diff_norm == 0, 0.0, torch.where(diff_norm > 0, float("inf"), float("nan"))).to(
        diff_norm.dtype
    )
    rel = torch.where(ref_norm > 0, diff_norm / ref_norm.clamp_min(1e-30), off_zero_ref)
    agree = torch.where(rows > 0, same / rows.clamp_min(1), 1.0)
    return {"rel_err": rel, "max_abs": max_abs, "argmax_agreement": agree}


def as_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def cell_tolerance(tolerance: float, pairs: int) -> float:
    """The relative-error bound a cell with `pairs` routed (token, expert) pairs is held to. The
    error is FP8 re-quantization noise averaged over the pairs' outputs: with a handful of pairs
    it spreads by ~1/sqrt(pairs) around its level (every correct kernel, DeepGEMM's included,
    exceeds 1e-2 on single-pair cells: docs/ab-testing.md), so small cells get more room."""
    return tolerance * (1.0 + 2.0 / max(pairs, 1) ** 0.5)
