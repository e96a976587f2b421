"""Routing for `compare`: `uniform`, `zipf:A` (imbalanced) or a file of recorded top-k ids.

`zipf:A` gives expert e (at a seeded random popularity rank r) a probability proportional to
1 / r^A and draws each token's k experts without replacement, as real routers concentrate
traffic on a few hot experts (A = 0 is uniform; 0.6-1.2 resembles served traffic). A file holds
int top-k ids `[T, k]` (`.pt` tensor, `.npy`, or JSON list of lists), e.g. dumped from a real run;
its rows are reused cyclically when more tokens are asked for. The same seed gives the same
routing, so every backend of one cell sees the same per-expert row counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

__all__ = ["RoutingSpec", "parse_routing", "make_routing"]

MAX_ZIPF = 4.0


@dataclass(frozen=True)
class RoutingSpec:
    kind: str  # "uniform" | "zipf" | "file" | "router" (the checkpoint's own gate)
    exponent: float = 0.0  # zipf only
    path: str | None = None  # file only

    def __str__(self) -> str:
        return {"uniform": "uniform", "zipf": f"zipf:{self.exponent:g}", "router": "router"}.get(
            self.kind, f"file:{self.path}"
        )


def parse_routing(spec: str) -> RoutingSpec:
    """`uniform`, `zipf:A` (0 <= A <= 4), `router` (a checkpoint's gate), or a path to a file."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"routing: expected 'uniform', 'zipf:A', 'router' or a file, got {spec!r}")
    if spec in ("uniform", "router"):
        return RoutingSpec(spec)
    if spec.startswith("zipf:"):
        try:
            exponent = float(spec[5:])
        except ValueError:
            exponent = -1.0
        if not 0.0 <= exponent <= MAX_ZIPF:
            raise ValueError(f"routing: expected zipf:A with 0 <= A <= {MAX_ZIPF:g}, got {spec!r}")
        return RoutingSpec("zipf", exponent=exponent)
    if spec.startswith("file:"):
        spec = spec[5:]
    if not os.path.isfile(spec):
        raise ValueError(f"routing: {spec!r} is not 'uniform', 'zipf:A', 'router' nor an existing file")
    return RoutingSpec("file", path=spec)


def _load_ids(path: str) -> torch.Tensor:
    if path.endswith(".pt"):
        ids = torch.load(path, map_location="cpu", weights_only=True)
    elif path.endswith(".npy"):
        import numpy as np

        ids = torch.from_numpy(np.load(path))
    else:
        with open(path) as f:
            try:
                ids = torch.tensor(json.load(f))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise ValueError(f"routing file {path!r}: expected a JSON list of lists of ints: {exc}") from None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] == 0 or ids.is_floating_point():
        raise ValueError(
            f"routing file {path!r}: expected int top-k ids of shape [T, k] with T > 0, got "
            f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}"
        )
    return ids.to(torch.int64)


def make_routing(
    spec: RoutingSpec,
    num_tokens: int,
    num_experts: int,
    topk: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights f32 `[T, k]`, each row summing to 1; topk_ids int32 `[T, k]`, global ids in
    `[0, num_experts)`, distinct per token), drawn on the CPU and moved to `device`."""
    if spec.kind == "router":
        raise ValueError("routing 'router' is computed from a checkpoint's gate, not drawn here")
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "file":
        ids = _load_ids(spec.path)
        if ids.shape[1] != topk:
            hint = " (--size small halves top-k: pass --size full for a model's recorded ids)"
            raise ValueError(
                f"routing file {spec.path!r}: holds top-{ids.shape[1]} ids, the layer is top-{topk}"
                + (hint if ids.shape[1] > topk else "")
            )
        if int(ids.min()) < 0 or int(ids.max()) >= num_experts:
            raise ValueError(
                f"routing file {spec.path!r}: ids must lie in [0, {num_experts}), got "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        ids = ids[torch.arange(num_tokens) % ids.shape[0]]
    else:
        ranks = torch.randperm(num_experts, generator=g).double() + 1.0
        popularity = ranks.pow(-spec.exponent)
        ids = torch.multinomial(popularity.expand(max(num_tokens, 1), -1), topk, replacement=False, generator=g)[
            :num_tokens
        ]
    weights = torch.rand(num_tokens, topk, generator=g) + 0.1
    weights = weights / weights.sum(-1, keepdim=True)
    return weights.float().to(device), ids.to(torch.int32).to(device)
