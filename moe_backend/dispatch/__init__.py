"""The layouts' data format (contiguous / masked) and the per-phase kernel policy.

Layouts are built by `moe_backend.ops.build_contiguous_layout` / `build_masked_layout`; their
plain-torch twins live in the reference (`moe_backend.reference`).
"""

from moe_backend.dispatch.layouts import ContiguousLayout, MaskedLayout, max_contiguous_rows
from moe_backend.dispatch.policy import KERNELS, KernelChoice, Policy

__all__ = [
    "ContiguousLayout",
    "MaskedLayout",
    "max_contiguous_rows",
    "Policy",
    "KernelChoice",
    "KERNELS",
]
