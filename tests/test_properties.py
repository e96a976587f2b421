"""Property-based tests (hypothesis) of dispatch layouts, their round trip, routed_experts and the
layer against `moe_backend.reference`.

Drawn: token counts 0..4096, experts, top-k, expert-parallel slices, routing skew (uniform, every
token on one expert, a few experts only so the rest are empty, ids of -1), UE8M0 or fp32 scales,
the policy's kernel. Hidden sizes stay tiny so the CPU run takes seconds.

Profiles (`MOE_BACKEND_HYPOTHESIS_PROFILE`):
- `ci` (default): CPU, a bounded, derandomized example count and a deadline;
- `gpu`: the same properties on the CUDA device (our Triton/CUDA kernels against the torch
  reference), many more examples, no deadline:
  `MOE_BACKEND_HYPOTHESIS_PROFILE=gpu python -m pytest tests/test_properties.py -q -s`
At the end the run prints how many cases each property ran and that none diverged.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest
import torch

from moe_backend import experts as moe_experts
from moe_backend import reference
from moe_backend.dispatch import Policy
from moe_backend.layers import DeepseekV3MoE
from moe_backend.layers.router import noaux_tc_route
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from moe_backend.reference import layouts
from tests.helpers.layer_diagnosis import diagnose_layer_call
from tests.helpers.naive import rel_err
from tests.helpers.property_layers import property_layer
from tests.helpers.tolerances import LAYER_SAME_QUANT_ONE_GROUP, layer_same_quant

hypothesis = pytest.importorskip("hypothesis", reason="pip install 'moe-backend[test]' (hypothesis)")
st = pytest.importorskip("hypothesis.strategies")
HealthCheck, given, settings = hypothesis.HealthCheck, hypothesis.given, hypothesis.settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=20_000,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu",
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("MOE_BACKEND_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"MOE_BACKEND_HYPOTHESIS_PROFILE: expected 'ci' or 'gpu', got {PROFILE!r}")
settings.load_profile(PROFILE)
if PROFILE == "gpu" and not torch.cuda.is_available():
    pytest.skip("MOE_BACKEND_HYPOTHESIS_PROFILE=gpu needs a CUDA device", allow_module_level=True)
DEVICE = torch.device("cuda" if PROFILE == "gpu" else "cpu")
# Kernels the policy may pick; on CPU every one runs its layout on the reference GEMMs.
KERNELS = (
    ["contiguous", "triton_contiguous", "triton", "masked", "triton_masked"]
    if PROFILE == "gpu"
    else ["contiguous", "triton", "masked", "reference"]
)

CASES: Counter = Counter()  # property -> examples run (each one that returned passed)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    total = sum(CASES.values())
    # A diverging property fails its test (hypothesis stops at the first, shrunk, counterexample).
    failed = sum(
        getattr(item, "moe_backend_failed", False) for item in request.session.items if item.module is request.module
    )
    line = (
        f"hypothesis profile {PROFILE} on {DEVICE}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()))
        + f"; {total} cases passed, {failed} propert{'y' if failed == 1 else 'ies'} diverged"
    )
    print(line)  # shown with -s
    # and in the summary (tests/conftest.py prints these lines at the end of any run)
    request.config.moe_backend_summary = [*getattr(request.config, "moe_backend_summary", []), line]


# ------------------------------------------------------------------ routing draws
@dataclasses.dataclass(frozen=True)
class Routing:
    topk_ids: torch.Tensor  # [T, k] global ids (-1 = dropped)
    num_experts: int  # global
    expert_start: int  # this rank's slice
    num_local: int
    skew: str


@st.composite
def routings(draw, max_tokens: int = 4096, num_experts: int | None = None, topk: int | None = None) -> Routing:
    experts = num_experts or draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    k = topk or draw(st.integers(1, min(8, experts)))
    tokens = draw(st.one_of(st.integers(0, 8), st.integers(0, max_tokens), st.sampled_from([max_tokens])))
    skew = draw(st.sampled_from(["uniform", "one_expert", "few_experts", "with_dropped"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if skew == "one_expert" and k == 1:
        ids = torch.full((tokens, 1), draw(st.integers(0, experts - 1)))
    else:
        # Distinct experts per token (as top-k gives); "few": only the first k+1 experts exist
        # for the router, so every other expert gets no tokens; "one": expert 0 in every row.
        pool = {"few_experts": min(experts, k + 1)}.get(skew, experts)
        ids = torch.rand(tokens, pool, generator=gen).argsort(dim=1)[:, :k]
        if skew == "one_expert":
            ids = torch.where(ids == 0, ids[:, :1], ids)  # swap expert 0 into slot 0
            ids[:, 0] = 0
    if skew == "with_dropped" and tokens:
        ids = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, -1, ids)
    slices = draw(st.sampled_from([1, 2, 4, 8]).filter(lambda s: experts % s == 0))
    rank = draw(st.integers(0, slices - 1))
    local = experts // slices
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return Routing(ids.to(dtype), experts, rank * local, local, skew)


def _local_slots(r: Routing) -> torch.Tensor:
    ids = r.topk_ids.long()
    return (ids >= r.expert_start) & (ids < r.expert_start + r.num_local)


# ------------------------------------------------------------------ layouts
@given(r=routings(), alignment=st.sampled_from([1, 8, 128]), exact=st.booleans())
def test_contiguous_layout_invariants_and_round_trip(r: Routing, alignment: int, exact: bool):
    layout = layouts.build_contiguous_layout(
        r.topk_ids.to(DEVICE), r.num_local, expert_start=r.expert_start, alignment=alignment, exact_size=exact
    )
    ids, local = r.topk_ids.long(), _local_slots(r)
    row_of_slot = layout.row_of_slot.cpu()
    expert_ids, src_token = layout.expert_ids.cpu().long(), layout.src_token.cpu()
    offsets, counts = layout.expert_offsets.cpu().long(), layout.tokens_per_expert.cpu().long()

    want_counts = torch.bincount((ids[local] - r.expert_start), minlength=r.num_local)
    assert torch.equal(counts, want_counts)
    assert bool((offsets % alignment == 0).all()) and bool((offsets.diff() >= counts).all())
    padded_total = int(((counts + alignment - 1) // alignment * alignment).sum())
    assert layout.num_rows == (
        padded_total if exact else layouts.max_contiguous_rows(ids.numel(), r.num_local, alignment)
    )
    # Every local slot owns one row of its expert, holding its token; nothing else is used.
    assert bool((row_of_slot[~local] == -1).all())
    rows = row_of_slot[local]
    assert rows.unique().numel() == rows.numel()
    assert torch.equal(expert_ids[rows], ids[local] - r.expert_start)
    tokens = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    assert torch.equal(src_token[rows], tokens[local])
    assert bool((rows >= offsets[ids[local] - r.expert_start]).all())
    unused = torch.ones(layout.num_rows, dtype=torch.bool)
    unused[rows] = False
    assert bool((expert_ids[unused] == -1).all())
    _check_round_trip(r, layout)
    CASES["contiguous layout"] += 1


@given(r=routings(), tight=st.booleans())
def test_masked_layout_invariants_and_round_trip(r: Routing, tight: bool):
    ids, local = r.topk_ids.long(), _local_slots(r)
    counts = torch.bincount((ids[local] - r.expert_start), minlength=r.num_local)
    max_m = max(1, int(counts.max())) if tight and counts.numel() else None
    layout = layouts.build_masked_layout(r.topk_ids.to(DEVICE), r.num_local, expert_start=r.expert_start, max_m=max_m)
    assert torch.equal(layout.masked_m.cpu().long(), counts)
    row_of_slot = layout.row_of_slot.cpu()
    assert bool((row_of_slot[~local] == -1).all())
    rows = row_of_slot[local]
    expert, within = rows // layout.max_m, rows % layout.max_m
    assert rows.unique().numel() == rows.numel()
    assert torch.equal(expert, ids[local] - r.expert_start)
    assert bool((within < counts[expert]).all())
    tokens = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    assert torch.equal(layout.src_token.cpu().reshape(-1)[rows], tokens[local])
    _check_round_trip(r, layout)
    CASES["masked layout"] += 1


def _check_round_trip(r: Routing, layout) -> None:
    """permute -> combine is the weighted sum of each token's local slots (zero without any)."""
    tokens, k = r.topk_ids.shape
    gen = torch.Generator().manual_seed(tokens * 31 + k)
    x = torch.randn(tokens, 16, generator=gen).to(DEVICE)
    w = torch.rand(tokens, k, generator=gen).to(DEVICE)
    y = layouts.permute(x, layout)
    if isinstance(layout, layouts.MaskedLayout):
        # Rows past masked_m are never read back: poison them.
        past = torch.arange(layout.max_m, device=DEVICE)[None, :] >= layout.masked_m[:, None].long()
        y = torch.where(past.unsqueeze(-1), torch.full_like(y, float("nan")), y)
    out = layouts.combine(y, layout, w)
    local = _local_slots(r).to(DEVICE)
    want = torch.einsum("tk,tn->tn", w * local, x).bfloat16()
    assert torch.isfinite(out.float()).all()
    assert out.shape == want.shape
    if tokens:  # one bf16 rounding of an fp32 sum of at most k terms
        assert (out.float() - want.float()).abs().max().item() <= 2**-8 * want.float().abs().max().item()


# ------------------------------------------------------------------ routed experts vs reference
_WEIGHTS: dict = {}


def _expert_weights(num_local: int, hidden: int, inter: int, ue8m0: bool):
    key = (num_local, hidden, inter, ue8m0)
    if key not in _WEIGHTS:
        gen = torch.Generator().manual_seed(hash(key) % 2**31)
        w13 = torch.randn(num_local, 2 * inter, hidden, generator=gen) / hidden**0.5
        w2 = torch.randn(num_local, hidden, inter, generator=gen) / inter**0.5
        _WEIGHTS[key] = tuple(
            t.to(DEVICE) for t in (*quantize_fp8_blockwise(w13, 128, ue8m0), *quantize_fp8_blockwise(w2, 128, ue8m0))
        )
    return _WEIGHTS[key]


# On CPU the masked layout's [E, T, 2I] intermediate makes thousands of tokens slow; the GPU
# profile runs it at the full range.
MASKED_MAX_TOKENS = 4096 if PROFILE == "gpu" else 512


@settings(max_examples=max(10, settings().max_examples * 3 // 5))
@given(
    hidden=st.sampled_from([128, 256]),
    inter=st.sampled_from([128, 256]),
    ue8m0=st.booleans(),
    kernel=st.sampled_from(KERNELS),
    prequantized=st.booleans(),
    data=st.data(),
)
def test_routed_experts_match_reference(hidden: int, inter: int, ue8m0: bool, kernel: str, prequantized: bool, data):
    masked = kernel in ("masked", "triton_masked")
    r = data.draw(routings(max_tokens=MASKED_MAX_TOKENS if masked else 4096), label="routing")
    tokens, k = r.topk_ids.shape
    gen = torch.Generator().manual_seed(tokens * 7 + k)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16().to(DEVICE)
    w = torch.rand(tokens, k, generator=gen).to(DEVICE)
    weights = _expert_weights(r.num_local, hidden, inter, ue8m0)
    ids = r.topk_ids.to(DEVICE)
    x_in, x_scale = quantize_fp8_per_token_group(x, 128, ue8m0) if prequantized else (x, None)
    static = kernel in ("masked", "triton_masked", "triton")  # decode kernels: forced by decode_max_tokens
    policy = Policy(
        prefill_kernel="contiguous" if static else kernel,
        decode_kernel=kernel if static else "masked",
        decode_max_tokens=4096 if static else 0,
    )
    out = moe_experts.routed_experts(
        x_in, *weights, w, ids, x_scale=x_scale, expert_start=r.expert_start, ue8m0=ue8m0, policy=policy
    )
    # The reference numbers experts locally: shift the ids (non-local ones fall outside [0, E)).
    local_ids = torch.where(ids >= 0, ids.long() - r.expert_start, -1)
    ref = reference.routed_experts(
        x_in.cpu(),
        *(t.cpu() for t in weights),
        w.cpu(),
        local_ids.cpu(),
        x_scale=None if x_scale is None else x_scale.cpu(),
        ue8m0=ue8m0,
    )
    assert out.shape == (tokens, hidden) and out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    no_local = ~_local_slots(r).any(dim=1)
    assert not out.cpu()[no_local].any(), "a token without local experts got a nonzero row"
    if tokens and ref.float().norm() > 0:
        bound = layer_same_quant(int(_local_slots(r).sum()))
        if DEVICE.type == "cuda" and min(hidden, inter) == 128:
            bound = max(bound, LAYER_SAME_QUANT_ONE_GROUP)
        assert rel_err(out.cpu(), ref) < bound
    CASES["routed_experts vs reference"] += 1


# ------------------------------------------------------------------ the layer
_LAYERS: dict = {}


def _layer(num_experts: int, slices: int, rank: int, ue8m0: bool) -> DeepseekV3MoE:
    key = (num_experts, slices, rank, ue8m0)
    if key not in _LAYERS:
        _LAYERS[key] = property_layer(num_experts, slices, rank, ue8m0, DEVICE)
    return _LAYERS[key]


@settings(max_examples=max(8, settings().max_examples // 3))
@given(
    tokens=st.one_of(st.integers(0, 16), st.integers(0, 4096)),
    num_experts=st.sampled_from([8, 16]),
    slices=st.sampled_from([1, 2, 4]),
    ue8m0=st.booleans(),
    data=st.data(),
)
def test_layer_matches_reference(tokens: int, num_experts: int, slices: int, ue8m0: bool, data):
    rank = data.draw(st.integers(0, slices - 1))
    layer = _layer(num_experts, slices, rank, ue8m0)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 128, generator=gen).bfloat16().to(DEVICE)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    if not tokens:
        CASES["layer vs reference"] += 1
        return
    cpu = {n: b.cpu() for n, b in layer.named_buffers()}
    ids_w, ids = noaux_tc_route(x.cpu(), cpu["gate_weight"], cpu["e_score_correction_bias"], layer.config)
    local_ids = torch.where(
        (ids >= layer.expert_start) & (ids < layer.expert_stop), ids.long() - layer.expert_start, -1
    )
    ref = reference.routed_experts(
        x.cpu(), cpu["w13_fp8"], cpu["w13_scale_inv"], cpu["w2_fp8"], cpu["w2_scale_inv"], ids_w, local_ids, ue8m0=ue8m0
    ).float()
    if layer.with_shared_experts:
        ones = torch.ones(tokens, 1)
        ref += reference.routed_experts(
            x.cpu(),
            cpu["shared_w13_fp8"],
            cpu["shared_w13_scale_inv"],
            cpu["shared_w2_fp8"],
            cpu["shared_w2_scale_inv"],
            ones,
            torch.zeros(tokens, 1, dtype=torch.int64),
            ue8m0=ue8m0,
        ).float()
    if ref.norm() > 0:
        # Same quantized activations; bf16 roundings of the routed and shared parts, summed.
        pairs = (
            int(((ids >= layer.expert_start) & (ids < layer.expert_stop)).sum()) + tokens * layer.with_shared_experts
        )
        # hidden = 128: one scale group per row (tests/tolerances.py, LAYER_SAME_QUANT_ONE_GROUP)
        bound = max(layer_same_quant(pairs), LAYER_SAME_QUANT_ONE_GROUP if DEVICE.type == "cuda" else 0.0)
        err = rel_err(out.cpu(), ref)
        # On failure, which stage diverged (router, x quant, routed with and without graphs, shared), per row.
        assert err < bound, f"rel_err {err:.6f} >= {bound:.4f}; {diagnose_layer_call(layer, x, out)}"
    CASES["layer vs reference"] += 1
