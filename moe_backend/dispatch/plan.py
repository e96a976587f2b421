"""One plan per batch shape: every decision about which kernel runs, made once and cached.

`make_plan` resolves (tokens, top-k, experts, hidden, intermediate, phase, device, policy) into a
`Plan`: the layout (contiguous or masked) and its static row count, each GEMM's provider and
launch config, the fused steps and the tile-choice hint. The routed-expert pipeline
(`moe_backend.experts`) and the engine glue only execute plans: no provider is chosen, no
environment variable read and no config table looked up per call.

Everything a plan holds follows from shapes alone, so executing it needs no host sync: the
contiguous layout is sized from the bound T*k + E*(alignment - 1) rows, padding rows are
marked on the device and skipped by every kernel. The one exception is a peer's GEMM that walks
every row it is given (`Plan.rows_on_host`: DeepGEMM's contiguous kernel on Hopper), whose
layout is cut to the rows in use, a count the host must know.

The measured crossovers (our CUDA GEMM vs the Triton one, the fused permute+quant) are data:
`kernels/configs/dispatch_thresholds.json`, which names the benchmark table each came from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from moe_backend.dispatch.gemm_choice import (
    GemmPlan,
    branch_on_absent_slots,
    cuda_direct_rows,
    cuda_gathers_rows,
    cuda_silu_in_gemm1,
    dependent_launch_pays,
    fused_permute_quant_pays,
    gemm_plan,
    gemm_provider,
    segment_alignment,
    silu_in_gemm2_pays,
    thresholds,
    with_padding_halves,
    with_split_k,
    with_stream_k,
)
from moe_backend.dispatch.layouts import max_contiguous_rows
from moe_backend.dispatch.policy import CUDA_ONLY_IMPLS, KERNELS, Policy

__all__ = [
    "GemmPlan",
    "Plan",
    "make_plan",
    "make_masked_plan",
    "thresholds",
    "gemm_provider",
    "fused_permute_quant_pays",
    "clear_plan_cache",
    "token_bucket",
    "rows_bucket",
]


@dataclass(frozen=True)
class Plan:
    kernel: str  # the policy's name for the choice (a KERNELS key)
    phase: str  # "prefill" | "decode"
    layout: str  # "contiguous" | "masked"
    num_tokens: int
    topk: int
    num_experts: int  # local experts
    hidden: int
    intermediate: int
    expected_m: int  # typical rows per local expert: the tile-choice hint
    alignment: int  # contiguous: rows each expert's segment is padded to (a multiple of every BLOCK_M)
    num_rows: int  # contiguous: the static row bound; masked: max_m (rows per expert)
    gemm1: GemmPlan  # [rows, H] x w13 [E, 2I, H]^T
    gemm2: GemmPlan  # [rows, I] x w2 [E, H, I]^T
    fused_permute_quant: bool  # bf16 tokens quantized straight into the layout's rows
    device: str
    gather_a: bool = False  # GEMM1 reads token rows through src_token: no permuted copy of them
    # GEMM2 computes its A from GEMM1's output (SiLU*up and the quant per K block): no SiLU*up
    # quant kernel between the GEMMs (contiguous layout, decode-sized batches).
    silu_in_gemm2: bool = False
    # GEMM1 (our CUDA contiguous kernel) stores SiLU*up quantized to FP8 from its epilogue, not
    # its bf16 product: no SiLU*up quant kernel and no bf16 h between the GEMMs.
    silu_in_gemm1: bool = False
    # Each kernel launched as a dependent of the one before it (programmatic dependent launch):
    # its launch and prologue overlap the previous kernel's tail (`kernels/_dependent_launch`).
    dependent_launch: bool = False
    # A GEMM walks every block of the rows it is given: DeepGEMM's SM90 contiguous kernel loads A
    # and B for padding blocks too and skips only their math, so over the static bound (several
    # times the rows in use in an expert-parallel slice) it costs several times more
    # (docs/benchmarks.md, 'DeepGEMM's contiguous GEMM over the static bound'). Its GEMMs run on
    # the rows in use: a count the caller read earlier (`used_rows`) or one host read per call.
    # Its graphs (`graph_plan`) are captured per `rows_bucket` of that count.
    rows_on_host: bool = False
    # The combine skips each absent slot by a branch rather than a masked load: where most of a
    # token's slots are not local (expert parallel).
    combine_branch: bool = False
    # GEMM2 (our CUDA contiguous kernel) stores the rows of tokens with one local slot, weighted,
    # into the output itself, and the combine skips those tokens (expert parallel).
    direct_rows: bool = False
    # An eager call replays this plan (tokens rounded up to a bucket) as a CUDA graph
    # (`moe_backend.eager_graphs`); None: launched kernel by kernel.
    graph_plan: "Plan | None" = None

    def describe(self) -> str:
        def gemm(g: GemmPlan) -> str:
            cfg = ""
            if g.provider == "triton" and g.config:
                c = dict(g.config)
                cfg = f" {c['BLOCK_M']}x{c['BLOCK_N']}" + (f" split_k={g.split_k}" if g.split_k > 1 else "")
            elif g.provider == "cuda" and g.config is not None:
                c = g.config
                cfg = f" n{c.block_n}" + (" pairs" if c.cluster > 1 else "") + (" stream_k" if c.stream_k else "")
                cfg += " skip_padding_halves" if c.skip_padding_halves else ""
            return f"{g.provider}{cfg}"

        return (
            f"{self.phase} T={self.num_tokens} k={self.topk} E={self.num_experts} -> {self.kernel}: "
            f"{self.layout} rows={self.num_rows} align={self.alignment} expected_m={self.expected_m} "
            f"gemm1={gemm(self.gemm1)} gemm2={gemm(self.gemm2)} "
            f"fused_permute_quant={self.fused_permute_quant} gather_a={self.gather_a}"
            + (" silu_in_gemm2=True" if self.silu_in_gemm2 else "")
            + (" silu_in_gemm1=True" if self.silu_in_gemm1 else "")
            + (" dependent_launch=True" if self.dependent_launch else "")
            + (" rows_on_host=True" if self.rows_on_host else "")
            + (" combine_branch=True" if self.combine_branch else "")
            + (" direct_rows=True" if self.direct_rows else "")
            + f" on {self.device}"
            + (f"; eager calls replay the graph of T={self.graph_plan.num_tokens}" if self.graph_plan else "")
        )


def _device_key(device: torch.device) -> tuple[str, int | None]:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device.type, device.index


# Graph buckets: powers of two up to the decode range, then multiples of this many tokens.
GRAPH_BUCKET_STEP = 256
# Capture-safe providers (no host sync; JIT runs in the warm-up call before the capture): ours
# and DeepGEMM's (its contiguous kernel's graphs are captured per bucket of rows in use), so the
# A/B backends and a DeepGEMM shadow replay graphs as the served path does.
_GRAPHABLE_PROVIDERS = frozenset({"triton", "cuda", "deepgemm"})
# Providers whose contiguous GEMM walks every row of the layout, padding included.
_WALKS_EVERY_ROW = frozenset({"deepgemm"})


def token_bucket(num_tokens: int, max_tokens: int) -> int:
    """The token count an eager call's graph is captured at (>= num_tokens), or 0 (no graph):
    few buckets bound the graphs per layer; the padding tokens route nowhere."""
    if num_tokens <= 0 or num_tokens > max_tokens:
        return 0
    if num_tokens <= GRAPH_BUCKET_STEP:
        bucket = 1 << (num_tokens - 1).bit_length()
    else:
        bucket = -(-num_tokens // GRAPH_BUCKET_STEP) * GRAPH_BUCKET_STEP
    return min(bucket, max_tokens)


def rows_bucket(rows: int, plan: Plan) -> int:
    """The rows a graph of a `rows_on_host` plan walks for `rows` in use: rounded up to a step of
    1/16 to 1/32 of their power of two (at least the plan's alignment, so a multiple of it) and
    capped at the static bound (which need not be one; the rows in use, a multiple, never exceed
    it); a batch size's spread of routings then shares a few graphs, each walking at most
    one step past the rows in use."""
    step = plan.alignment * max(1, (1 << max(0, rows.bit_length() - 5)) // plan.alignment)
    return min(-(-max(rows, 1) // step) * step, plan.num_rows)


def make_plan(
    policy: Policy,
    *,
    num_tokens: int,
    topk: int,
    num_experts: int,
    num_global_experts: int,
    hidden: int,
    intermediate: int,
    device: torch.device,
    phase: str | None = None,
    quantized_input: bool = False,
    expected_m: int | None = None,
    kernel: str | None = None,
) -> Plan:
    """The plan for tokens in the standard format ([T, H] + top-k ids). `kernel` (a KERNELS name)
    overrides the policy's choice. Cached per distinct arguments."""
    phase = policy.phase_of(num_tokens, phase)
    key = "decode_kernel" if phase == "decode" else "prefill_kernel"
    name = kernel or getattr(policy, key)
    _check_runs_on(device, name, f"kernel={name!r}" if kernel else f"policy key {key!r} ({name!r})")
    graph_tokens = token_bucket(num_tokens, policy.graph_max_tokens) if device.type == "cuda" else 0
    # 0 global experts: the count is unknown, the local experts stand for it (as for `slots`)
    spread_over = num_global_experts or max(num_experts, 1)
    graph_expected_m = expected_m or max(1, -(-graph_tokens * topk // spread_over))
    if expected_m is None:
        expected_m = max(1, -(-num_tokens * topk // spread_over))
    return _make_plan(
        policy.print_plan,
        name,
        phase,
        num_tokens,
        topk,
        num_experts,
        hidden,
        intermediate,
        _device_key(device),
        quantized_input,
        expected_m,
        0,
        graph_tokens,
        graph_expected_m,
        num_global_experts,
    )


def make_masked_plan(
    policy: Policy,
    *,
    num_experts: int,
    max_m: int,
    hidden: int,
    intermediate: int,
    device: torch.device,
    expected_m: int | None = None,
) -> Plan:
    """The plan for an engine's masked input (`[E, max_m, H]` + per-expert counts on the device:
    DeepEP low-latency, vLLM's batched format): the policy's `masked_kernel`."""
    expected_m = max(1, min(max_m, expected_m or max_m))
    _check_runs_on(device, policy.masked_kernel, f"policy key 'masked_kernel' ({policy.masked_kernel!r})")
    return _make_plan(
        policy.print_plan,
        policy.masked_kernel,
        "decode",
        num_experts * max_m,
        0,
        num_experts,
        hidden,
        intermediate,
        _device_key(device),
        True,
        expected_m,
        max_m,
    )


def _check_runs_on(device: torch.device, name: str, source: str) -> None:
    """Refuse CPU tensors for a kernel with no CPU fallback, naming where the choice came from."""
    if device.type != "cuda" and name in KERNELS and KERNELS[name].impl in CUDA_ONLY_IMPLS:
        raise ValueError(
            f"{source} runs on CUDA tensors only, got tensors on {device}; on CPU choose a kernel "
            f"with a reference fallback (e.g. 'contiguous' or 'masked'), or leave MOE_BACKEND_POLICY unset"
        )


@lru_cache(maxsize=4096)
def _make_plan(
    print_plan: bool,
    name: str,
    phase: str,
    num_tokens: int,
    topk: int,
    num_experts: int,
    hidden: int,
    intermediate: int,
    device_key: tuple[str, int | None],
    quantized_input: bool,
    expected_m: int,
    masked_max_m: int = 0,
    graph_tokens: int = 0,
    graph_expected_m: int = 0,
    num_global_experts: int = 0,
) -> Plan:
    device = torch.device(*device_key) if device_key[1] is not None else torch.device(device_key[0])
    choice = KERNELS[name]
    layout = "masked" if masked_max_m else choice.layout
    if masked_max_m and choice.layout != "masked":
        raise ValueError(
            f"policy key 'masked_kernel': {name!r} does not run the masked layout; choose one of "
            f"{sorted(k for k, c in KERNELS.items() if c.layout == 'masked')}"
        )
    two_i = 2 * intermediate
    if layout == "masked":
        max_m = masked_max_m or max(num_tokens, 1)
        rows_hint = max_m
    else:
        max_m = 0
        rows_hint = expected_m * num_experts
    shapes = ((two_i, hidden), (hidden, intermediate))
    # Our CUDA kernel tiles the masked layout in 128-row blocks: a layout we build can be sized so,
    # so the providers are chosen for the rounded rows (an engine's layout keeps its max_m).
    cuda_max_m = max_m
    if layout == "masked" and not masked_max_m:
        from moe_backend.cuda.config import BLOCK_M as CUDA_BLOCK_M

        cuda_max_m = -(-max_m // CUDA_BLOCK_M) * CUDA_BLOCK_M
    providers = [
        gemm_provider(choice.impl, layout, n, k, expected_m, device, cuda_max_m, num_experts) for n, k in shapes
    ]
    gemm1 = gemm_plan(providers[0], layout, expected_m, rows_hint, two_i, hidden, device)
    gemm2 = gemm_plan(providers[1], layout, expected_m, rows_hint, hidden, intermediate, device)
    if "cuda" in (gemm1.provider, gemm2.provider):
        max_m = cuda_max_m
    if layout == "masked":
        alignment, num_rows = 1, max_m
    else:
        # Few experts with rows (T*k slots spread over the global experts, this rank's share of
        # them): K is split so that the GEMMs' units fill the GPU (decode).
        slots = -(-num_tokens * topk * num_experts // num_global_experts) if num_global_experts else num_experts
        active_experts = max(1, min(num_experts, slots))
        gemm1 = with_split_k(gemm1, active_experts, expected_m)
        gemm2 = with_split_k(gemm2, active_experts, expected_m)
        alignment = segment_alignment((gemm1, gemm2))
        num_rows = max_contiguous_rows(num_tokens * topk, num_experts, alignment)
    real_rows = min(num_tokens * topk, expected_m * num_experts) if topk else num_rows
    # Our Triton GEMM loads A row by row (so through src_token) unless its config uses TMA; our
    # CUDA one copies token rows itself where the layout holds several rows per token.
    gather_a = layout == "contiguous" and (
        (gemm1.provider == "triton" and not gemm1.triton_config.get("TMA"))
        or (gemm1.provider == "cuda" and cuda_gathers_rows(num_tokens, real_rows))
    )
    fused = not (quantized_input or gather_a) and fused_permute_quant_pays(num_tokens, real_rows)
    dependent = dependent_launch_pays(phase, device)
    # GEMM2 computing its activations saves one kernel's launch gap, which dependent launch
    # already hides (and there the separate kernel was faster).
    silu_in_gemm1 = layout == "contiguous" and cuda_silu_in_gemm1(gemm1)
    silu_in_gemm2 = (
        layout == "contiguous"
        and phase == "decode"
        and not (dependent or silu_in_gemm1)
        and silu_in_gemm2_pays(num_tokens, gemm2)
    )
    direct_rows = layout == "contiguous" and cuda_direct_rows(gemm2, num_tokens, num_experts, num_global_experts)
    if layout == "contiguous":
        gemm1 = with_stream_k(gemm1, "gemm1", num_tokens)
        gemm2 = with_stream_k(gemm2, "gemm2", num_tokens, direct_rows=direct_rows)
        gemm1, gemm2 = with_padding_halves(gemm1), with_padding_halves(gemm2)
    rows_on_host = layout == "contiguous" and bool({gemm1.provider, gemm2.provider} & _WALKS_EVERY_ROW)
    plan = Plan(
        kernel=name,
        phase=phase,
        layout=layout,
        num_tokens=num_tokens,
        topk=topk,
        num_experts=num_experts,
        hidden=hidden,
        intermediate=intermediate,
        expected_m=expected_m,
        alignment=alignment,
        num_rows=num_rows,
        gemm1=gemm1,
        gemm2=gemm2,
        fused_permute_quant=fused,
        device=str(device),
        gather_a=gather_a,
        silu_in_gemm2=silu_in_gemm2,
        silu_in_gemm1=silu_in_gemm1,
        dependent_launch=dependent,
        rows_on_host=rows_on_host,
        combine_branch=branch_on_absent_slots(num_experts, num_global_experts),
        direct_rows=direct_rows,
    )
    if graph_tokens and {gemm1.provider, gemm2.provider} <= _GRAPHABLE_PROVIDERS:
        graph_plan = _make_plan(
            print_plan,
            name,
            phase,
            graph_tokens,
            topk,
            num_experts,
            hidden,
            intermediate,
            device_key,
            quantized_input,
            graph_expected_m,
            0,
            0,
            0,
            num_global_experts,
        )
        plan = replace(plan, graph_plan=graph_plan)
    if print_plan:
        print(f"[moe_backend] plan: {plan.describe()}", flush=True)
    return plan


def clear_plan_cache() -> None:
    _make_plan.cache_clear()
