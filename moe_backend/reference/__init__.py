"""The oracle: plain-torch FP8 grouped GEMMs, SiLU*up quant, the layouts' builders, permutes and
combine, and the routed-expert MLP (GEMMs in fp32 from dequantized operands). Every kernel is tested
against these functions. Written for clarity; they host-sync freely (never on a hot path).

A layer of its own: it builds on the package's base (`constants`, `_checks`, `quant`: the FP8
format itself; `dispatch.layouts`: the layouts' data format) and on nothing that executes a layer,
and no production module imports it (tests/test_house.py) except
`moe_backend.providers.torch_reference`, the one door through which `moe_backend.ops` runs it for
CPU tensors and impl="reference".

- `gemm`: `grouped_gemm_contiguous`, `grouped_gemm_masked` (and `expert_gemm`, one expert;
  `sum_partials`, the product a GEMM split over K stands for);
- `activation`: `silu_mul_quant`;
- `layouts`: the twins of the layout kernels: `build_contiguous_layout`, `build_masked_layout`,
  `permute`, `permute_quant`, `unpermute_combine` (and `combine`, the same over a layout);
- `experts`: `routed_experts`, the whole layer's expert sum without any layout.
"""

from moe_backend.reference.activation import silu_mul_quant
from moe_backend.reference.experts import routed_experts
from moe_backend.reference.gemm import expert_gemm, grouped_gemm_contiguous, grouped_gemm_masked, sum_partials
from moe_backend.reference.layouts import (
    build_contiguous_layout,
    build_masked_layout,
    combine,
    permute,
    permute_quant,
    unpermute_combine,
)

# The older private name of `expert_gemm`, still used by benchmarks and tests.
_expert_gemm = expert_gemm

__all__ = [
    "grouped_gemm_contiguous",
    "grouped_gemm_masked",
    "silu_mul_quant",
    "routed_experts",
    "expert_gemm",
    "sum_partials",
    "build_contiguous_layout",
    "build_masked_layout",
    "permute",
    "permute_quant",
    "unpermute_combine",
    "combine",
]
