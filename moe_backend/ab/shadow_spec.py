"""Shadow mode's targets: which backends re-run a sampled call, at which rate, parsed from a
`backend:rate[,backend:rate...]` spec (`MOE_BACKEND_SHADOW`, or a layer's `shadow=` argument)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_backend.ab.backends import get_backend

__all__ = ["ShadowTarget", "parse_shadow_spec", "check_shadow_targets"]


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
        targets.append(ShadowTarget(name, rate))
    return check_shadow_targets(targets, where)


def check_shadow_targets(targets, where: str = "targets") -> list[ShadowTarget]:
    """A list of ShadowTarget checked as a spec is: known backends, each once, rates in (0, 1]."""
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise TypeError(f"{where}: expected a list of ShadowTarget, got {type(targets).__name__}")
    targets = list(targets)
    if not targets:
        raise ValueError(f"{where}: expected at least one ShadowTarget, got an empty list")
    seen: set[str] = set()
    for t in targets:
        if not isinstance(t, ShadowTarget):
            raise TypeError(f"{where}: expected ShadowTarget items, got {type(t).__name__}")
        if isinstance(t.rate, bool) or not isinstance(t.rate, (int, float)) or not 0.0 < t.rate <= 1.0:
            raise ValueError(f"{where}: the rate of backend {t.backend!r} must be a number in (0, 1], got {t.rate!r}")
        try:
            get_backend(t.backend)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if t.backend in seen:
            raise ValueError(f"{where}: backend {t.backend!r} is given twice")
        seen.add(t.backend)
    return targets
