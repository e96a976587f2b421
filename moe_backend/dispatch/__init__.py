"""Layouts (contiguous / masked), their inverse, and the per-phase kernel policy."""

from moe_backend.dispatch.layouts import (
    ContiguousLayout,
    MaskedLayout,
    build_contiguous_layout,
    build_masked_layout,
    combine,
    permute,
)
from moe_backend.dispatch.policy import KERNELS, KernelChoice, Policy

__all__ = [
    "ContiguousLayout",
    "MaskedLayout",
    "build_contiguous_layout",
    "build_masked_layout",
    "permute",
    "combine",
    "Policy",
    "KernelChoice",
    "KERNELS",
]
