"""Named MoE backends: what `compare` times and what shadow mode runs beside the served one.

Built in: `phasemoe` (ours, by the active policy: `MOE_BACKEND_POLICY` or the defaults), every
policy kernel by its `KERNELS` name (`triton`, `masked`, `cuda_contiguous`, ...), `deepgemm` (the
optional peer: its contiguous kernel for prefill, its masked one for decode) and `reference`
(plain torch). `register_backend` adds others at run time, e.g. a candidate kernel under
evaluation, or a test's deliberately wrong one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import torch

from moe_backend import experts
from moe_backend._install import extra_install_command
from moe_backend.constants import BACKEND_NAME
from moe_backend.dispatch.plan import Plan
from moe_backend.dispatch.policy import KERNELS, KernelChoice, Policy

__all__ = ["Backend", "get_backend", "backend_names", "register_backend", "unregister_backend"]

# fn(x, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, topk_weights, topk_ids, *, x_scale,
#    expert_start, ue8m0, phase, expected_m) -> bf16 [T, H]: routed_experts' signature.
RoutedFn = Callable[..., torch.Tensor]
# masked_fn(a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, masked_m, *, ue8m0,
#           expected_m) -> bf16 [E, max_m, H]: masked_experts' signature.
MaskedFn = Callable[..., torch.Tensor]

# An eager prefill call's host time (about a millisecond for DeepGEMM's) is most of what a sampled
# shadow call costs (docs/benchmarks.md, 'A/B compare and shadow overhead'): DeepGEMM's and the
# fixed-kernel backends' calls replay graphs up to 8192 tokens (a prefill chunk). Memory: the
# shadow stream's pool holds one 8192-token call's intermediates (about 2.2 GB for the EP8
# slice). DeepGEMM's contiguous kernel runs on the rows in use, counted on the device and read on
# the host (`Plan.rows_on_host`; shadow mode reads the count without a sync, compare before
# timing), with one graph per bucket of them.
AB_GRAPH_MAX_TOKENS = 8192
DEEPGEMM_POLICY = Policy(
    prefill_kernel="deepgemm_contiguous", decode_kernel="deepgemm_masked", graph_max_tokens=AB_GRAPH_MAX_TOKENS
)
_INSTALL = {
    "deepgemm": f"DeepGEMM is not installed: {extra_install_command('deepgemm')} (a Hopper GPU machine)",
    "cuda": f"our CUDA C++ kernel needs a Hopper GPU, nvcc and cuda-python: {extra_install_command('cuda')}",
    "triton": "Triton is not installed: pip install triton",
}


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    kernel: KernelChoice | None = None  # a fixed policy kernel
    policy: Policy | None = None  # or a per-phase choice (None with kernel None: the active policy)
    fn: RoutedFn | None = None  # or a registered function
    masked_fn: MaskedFn | None = None  # a registered function's masked-layout twin (optional)

    @property
    def builtin(self) -> bool:
        return self.fn is None

    def _policy(self) -> Policy:
        return self.policy if self.policy is not None else Policy.from_env()

    def _run_policy(self) -> Policy:
        """The policy a call runs under: a fixed kernel's calls replay graphs up to
        `AB_GRAPH_MAX_TOKENS` (as DeepGEMM's do; an eager prefill call's host time is most of what
        a sampled shadow call costs), `phasemoe` runs the served policy as it is."""
        policy = self._policy()
        return _with_ab_graphs(policy) if self.kernel is not None else policy

    def choice(self, num_tokens: int, phase: str | None) -> KernelChoice | None:
        """The policy kernel this backend runs for a batch; None for registered functions."""
        if self.fn is not None:
            return None
        return self.kernel or self._policy().choose(num_tokens, phase)

    def impls(self) -> set[str]:
        if self.fn is not None:
            return set()
        if self.kernel is not None:
            return {self.kernel.impl}
        policy = self._policy()
        return {KERNELS[policy.prefill_kernel].impl, KERNELS[policy.decode_kernel].impl}

    def unavailable(self, device: torch.device | str) -> str | None:
        """Why this backend cannot run on `device` (with how to fix it), or None if it can."""
        device = torch.device(device)
        for impl in sorted(self.impls()):
            if impl in ("deepgemm", "cuda") and device.type != "cuda":
                return f"needs a CUDA GPU ({impl} kernels have no CPU path)"
            if impl == "deepgemm" and importlib.util.find_spec("deep_gemm") is None:
                return _INSTALL["deepgemm"]
            if impl == "cuda":
                from moe_backend.ops import cuda_kernel_available

                if not cuda_kernel_available(device.index or 0):
                    return _INSTALL["cuda"]
            if impl in ("triton", "best") and device.type == "cuda" and importlib.util.find_spec("triton") is None:
                return _INSTALL["triton"]
        return None

    def plan(
        self,
        x: torch.Tensor,
        w13_fp8: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        phase: str | None = None,
        num_global_experts: int | None = None,
        expected_m: int | None = None,
        quantized_input: bool = False,
    ) -> Plan | None:
        """The plan `routed` runs for these operands (None for a registered function)."""
        if self.fn is not None:
            return None
        return experts.routed_plan(
            x, w13_fp8, topk_ids, policy=self._run_policy(), phase=phase, kernel=self.kernel and self.kernel.name,
            expected_m=expected_m, num_global_experts=num_global_experts, quantized_input=quantized_input,
        )  # fmt: skip

    def rows_in_use(self, plan: Plan | None, topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor | None:
        """For a plan whose GEMMs need the rows in use on the host (`Plan.rows_on_host`): that
        count, int32 `[1]` queued on the current stream (read it on the host once it is there and
        pass it to `routed` as `used_rows`); None for every other plan."""
        if plan is None or not plan.rows_on_host:
            return None
        return experts.layout_rows_in_use(plan, topk_ids, expert_start)

    def routed(
        self,
        x,
        w13_fp8,
        w13_scale_inv,
        w2_fp8,
        w2_scale_inv,
        topk_weights,
        topk_ids,
        *,
        phase: str | None = None,
        num_global_experts: int | None = None,
        used_rows: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`routed_experts` on this backend (kwargs: x_scale, expert_start, ue8m0, expected_m).
        num_global_experts (the model's experts, for an expert-parallel slice) steers the tile
        hint as in the served call, used_rows is `rows_in_use` read on the host; registered
        functions keep routed_experts' documented keywords and get neither."""
        args = (x, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, topk_weights, topk_ids)
        if self.fn is not None:
            return self.fn(*args, phase=phase, **kwargs)
        common = dict(phase=phase, num_global_experts=num_global_experts, used_rows=used_rows)
        return experts.routed_experts(*args, kernel=self.kernel, policy=self._run_policy(), **common, **kwargs)

    def masked(
        self,
        a_fp8,
        a_scale,
        w13_fp8,
        w13_scale_inv,
        w2_fp8,
        w2_scale_inv,
        masked_m,
        *,
        ue8m0: bool = False,
        expected_m: int | None = None,
    ) -> torch.Tensor:
        """`masked_experts` on this backend (the batched / DeepEP low-latency format). Builtins run
        their decode kernel's provider; a registered backend needs a `masked_fn`."""
        args = (a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, masked_m)
        if self.fn is not None:
            if self.masked_fn is None:
                raise ValueError(
                    f"backend {self.name!r} was registered without masked_fn, so it "
                    f"cannot run the masked (batched) format"
                )
            return self.masked_fn(*args, ue8m0=ue8m0, expected_m=expected_m)
        if self.kernel is None:  # a policy: its masked_kernel, as the engine paths run it
            return experts.masked_experts(*args, policy=self._policy(), ue8m0=ue8m0, expected_m=expected_m)
        impl = self.kernel.name if self.kernel.layout == "masked" else self.kernel.impl
        return experts.masked_experts(*args, impl=impl, ue8m0=ue8m0, expected_m=expected_m)


@lru_cache(maxsize=16)
def _with_ab_graphs(policy: Policy) -> Policy:
    return replace(policy, graph_max_tokens=max(policy.graph_max_tokens, AB_GRAPH_MAX_TOKENS))


def _builtins() -> dict[str, Backend]:
    out = {
        BACKEND_NAME: Backend(BACKEND_NAME, "ours, by the active policy (MOE_BACKEND_POLICY or the defaults)"),
        "deepgemm": Backend(
            "deepgemm", "DeepGEMM: contiguous kernel for prefill, masked for decode", policy=DEEPGEMM_POLICY
        ),
    }
    for name, kernel in KERNELS.items():
        out[name] = Backend(name, f"policy kernel {name!r} ({kernel.layout} layout, {kernel.impl})", kernel=kernel)
    return out


_BUILTIN = _builtins()
_REGISTERED: dict[str, Backend] = {}


def backend_names() -> list[str]:
    return sorted(_BUILTIN) + sorted(_REGISTERED)


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a name (str), got {type(name).__name__}")
    backend = _REGISTERED.get(name) or _BUILTIN.get(name)
    if backend is None:
        raise ValueError(f"backend: unknown name {name!r}; choose one of {backend_names()}")
    return backend


def register_backend(
    name: str,
    fn: RoutedFn,
    *,
    masked_fn: MaskedFn | None = None,
    description: str = "registered at run time",
    replace: bool = False,
) -> Backend:
    """Adds a backend under `name`. `fn` has `moe_backend.experts.routed_experts`' signature
    (positional tensors; keyword x_scale, expert_start, ue8m0, phase, expected_m) and returns bf16
    `[T, H]`; `masked_fn` (optional) has `masked_experts`' and serves shadow mode's batched format."""
    if not isinstance(name, str) or not name or ":" in name or "," in name:
        raise ValueError(f"name: expected a non-empty str without ':' or ',', got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if masked_fn is not None and not callable(masked_fn):
        raise TypeError(f"masked_fn: expected a callable or None, got {type(masked_fn).__name__}")
    if name in _BUILTIN:
        raise ValueError(f"name: {name!r} is a built-in backend")
    if name in _REGISTERED and not replace:
        raise ValueError(f"name: {name!r} is already registered (pass replace=True)")
    _REGISTERED[name] = Backend(name, description, fn=fn, masked_fn=masked_fn)
    return _REGISTERED[name]


def unregister_backend(name: str) -> None:
    if name not in _REGISTERED:
        raise ValueError(f"name: {name!r} is not a registered backend (registered: {sorted(_REGISTERED)})")
    del _REGISTERED[name]
