"""Routing generators for the benchmarks: uniform and imbalanced (Zipf-like expert popularity).

Real routing is imbalanced: a few experts are hot, some idle. `zipf:A` draws each token's top-k
experts without replacement from a popularity that falls as 1 / rank^A over a random permutation
of the experts (A = 0 is uniform; BENCHMARKING.md asks for 0.6-1.2). The same seed gives the same
routing, so every contender of one cell sees the same per-expert row counts.
"""

from __future__ import annotations

import torch

__all__ = ["parse_routing", "popularity", "route", "expert_counts", "zipf_counts", "describe"]


def parse_routing(spec: str) -> float:
    """`uniform` -> 0.0, `zipf:A` -> A (0 <= A <= 4)."""
    if spec == "uniform":
        return 0.0
    if spec.startswith("zipf:"):
        try:
            a = float(spec[5:])
        except ValueError:
            a = -1.0
        if 0.0 <= a <= 4.0:
            return a
    raise ValueError(f"routing: expected 'uniform' or 'zipf:A' with 0 <= A <= 4, got {spec!r}")


def popularity(num_experts: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """f32 `[E]` summing to 1: 1 / rank^exponent, ranks assigned to experts by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(num_experts, generator=g).float() + 1.0
    p = ranks.pow(-exponent)
    return p / p.sum()


def route(num_tokens: int, num_experts: int, topk: int, exponent: float = 0.0, seed: int = 0,
          device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights f32 `[T, k]` summing to 1 per token, topk_ids int32 `[T, k]`, distinct per
    token), drawn on the CPU from `popularity` and moved to `device`."""
    g = torch.Generator().manual_seed(seed + 1)
    p = popularity(num_experts, exponent, seed)
    ids = torch.multinomial(p.expand(max(num_tokens, 1), -1), topk, replacement=False, generator=g)
    ids = ids[:num_tokens]
    w = torch.rand(num_tokens, topk, generator=g) + 0.1
    w = w / w.sum(-1, keepdim=True)
    return w.float().to(device), ids.to(torch.int32).to(device)


def expert_counts(topk_ids: torch.Tensor, num_experts: int, expert_start: int = 0) -> torch.Tensor:
    """int64 `[E]`: rows each of experts `[expert_start, expert_start + E)` receives."""
    local = topk_ids.reshape(-1).long().cpu() - expert_start
    local = local[(local >= 0) & (local < num_experts)]
    return torch.bincount(local, minlength=num_experts)


def zipf_counts(num_experts: int, total_rows: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """int64 `[E]` rows per expert summing to `total_rows`, proportional to `popularity` (largest
    remainders get the rounding), for GEMM benchmarks that take counts rather than tokens."""
    p = popularity(num_experts, exponent, seed).double() * total_rows
    counts = p.floor().long()
    rest = total_rows - int(counts.sum())
    if rest:
        counts[torch.argsort(p - counts, descending=True)[:rest]] += 1
    return counts


def describe(counts: torch.Tensor) -> str:
    """`max/mean 5.1x, idle 12` for a row-count vector."""
    counts = counts.double()
    mean = float(counts.mean()) if counts.numel() else 0.0
    peak = float(counts.max()) if counts.numel() else 0.0
    idle = int((counts == 0).sum())
    return f"max/mean {peak / mean if mean else 0.0:.1f}x, idle {idle}"
