"""Shadow mode's targets: which backends re-run a sampled call, at which rate, parsed from a
`backend:rate[,backend:rate...]` spec (`MOE_BACKEND_SHADOW`, or a layer's `shadow=` argument)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_backend.ab.backends import get_backend

__all__ = ["ShadowTarget", "parse_shadow_spec"]


@dataclass(frozen=True)
class ShadowTarget:
    backend: str
    rate: float


def parse_shadow_spec(spec: str, where: str = "MOE_BACKEND_SHADOW") -> list[ShadowTarget]:
    """`backend:rate[,backend:rate...]` -> targets; ValueError naming `where` on bad input."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{where}: expected 'backend:rate', e.g. 'deepgemm:0.01', got {spec!r}")
    targets = []
    for item in (s.strip() for s in spec.split(",")):
        name, sep, rate_text = item.rpartition(":")
        if not sep or not name:
            raise ValueError(f"{where}: {item!r} is not 'backend:rate' (e.g. 'deepgemm:0.01')")
        try:
            rate = float(rate_text)
        except ValueError:
            rate = float("nan")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"{where}: the rate of {item!r} must be a number in (0, 1], got {rate_text!r}")
        try:
            get_backend(name)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if any(t.backend == name for t in targets):
            raise ValueError(f"{where}: backend {name!r} is given twice")
        targets.append(ShadowTarget(name, rate))
    return targets
