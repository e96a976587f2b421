"""SGLang's own MoeRunner / Fp8MoEMethod with `phasemoe`, on CPU, against moe_backend.reference.

Runs in the SGLang venv (.ci/engine_sglang.sh); skipped where sglang is not installed. Same
quantized inputs on both sides, so only summation order and bf16 rounding differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

import moe_backend_integrations.sglang as plugin
from moe_backend import reference
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from tests.helpers.tolerances import LAYER_SAME_QUANT

pytest.importorskip("sglang")

HIDDEN, INTER, TOP_K = 256, 256, 2
ROUTED_SCALING_FACTOR = 2.5
EMPTY_EXPERT = 1  # never routed to: every case has an expert with zero tokens


@dataclass(frozen=True)
class Case:
    num_tokens: int
    num_experts: int  # local experts (with the fused shared expert, if any)
    fused_shared: bool = False  # TP only: the last local expert is the shared one, in every token's top-k

    def __str__(self):
        return f"T{self.num_tokens}-E{self.num_experts}{'-shared' if self.fused_shared else ''}"


CASES = [Case(t, e) for t in (1, 7, 33) for e in (4, 5)] + [
    Case(7, 5, fused_shared=True),
    Case(33, 5, fused_shared=True),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugin.register()
    import sglang.srt.layers.moe.moe_runner.runner  # noqa: F401  (fires the lazy registrations)
    import sglang.srt.layers.quantization.fp8  # noqa: F401

    plugin.check()


@pytest.fixture
def moe_flags():
    """Sets SGLang's process-wide MoE flags (as the scheduler does from server args); restores them."""
    from sglang.srt.layers.moe.utils import MoeA2ABackend, resolve_moe_runner_backend
    from sglang.srt.runtime_context import get_flags

    moe = get_flags().moe
    saved = (moe.runner_backend, moe.a2a_backend)

    def set_flags(runner: str = plugin.BACKEND_NAME, a2a: str = "none"):
        moe.runner_backend = resolve_moe_runner_backend(runner)
        moe.a2a_backend = MoeA2ABackend(a2a)

    yield set_flags
    moe.runner_backend, moe.a2a_backend = saved


def make_experts(num_experts: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=g) / INTER**0.5
    w13_fp8, w13_scale_inv = quantize_fp8_blockwise(w13)
    w2_fp8, w2_scale_inv = quantize_fp8_blockwise(w2)
    return w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv


def make_routing(case: Case, seed: int = 1, drop: bool = True):
    """topk ids [T, k] over the routed experts minus EMPTY_EXPERT, f32 weights; some slots -1."""
    g = torch.Generator().manual_seed(seed)
    routed = case.num_experts - (1 if case.fused_shared else 0)
    pool = torch.tensor([e for e in range(routed) if e != EMPTY_EXPERT])
    ids = (
        torch.stack([pool[torch.randperm(len(pool), generator=g)[:TOP_K]] for _ in range(case.num_tokens)])
        if case.num_tokens
        else torch.empty(0, TOP_K, dtype=torch.long)
    )
    weights = torch.rand(case.num_tokens, TOP_K, generator=g) + 0.1
    if drop and case.num_tokens > 1:
        ids[1, 0] = -1  # dropped slot / expert on another rank
    if case.fused_shared:
        # SGLang appends the shared expert (local id = routed count) with weight 1 / scaling factor.
        ids = torch.cat([ids, torch.full((case.num_tokens, 1), routed)], dim=1)
        weights = torch.cat([weights, torch.full((case.num_tokens, 1), 1 / ROUTED_SCALING_FACTOR)], 1)
    return ids, weights.float()


def make_x(num_tokens: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, HIDDEN, generator=g).to(torch.bfloat16)


def quant_info(weights):
    from moe_backend_integrations.sglang.core import PhaseMoeQuantInfo

    return PhaseMoeQuantInfo(*weights)


def make_config(case: Case):
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    return MoeRunnerConfig(
        num_experts=case.num_experts,
        num_local_experts=case.num_experts,
        hidden_size=HIDDEN,
        intermediate_size_per_partition=INTER,
        top_k=TOP_K + int(case.fused_shared),
        num_fused_shared_experts=int(case.fused_shared),
        params_dtype=torch.bfloat16,
        routed_scaling_factor=ROUTED_SCALING_FACTOR,
    )


def make_runner(case: Case):
    from sglang.srt.layers.moe.moe_runner.runner import MoeRunner
    from sglang.srt.layers.moe.utils import resolve_moe_runner_backend

    return MoeRunner(resolve_moe_runner_backend(plugin.BACKEND_NAME), make_config(case))


def standard_dispatch(x, ids, weights, x_scale=None):
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatchOutput
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    topk = StandardTopKOutput(
        topk_weights=weights, topk_ids=ids.to(torch.int32), router_logits=torch.zeros(x.shape[0], 8)
    )
    return StandardDispatchOutput(hidden_states=x, hidden_states_scale=x_scale, topk_output=topk)


# ---------------------------------------------------------------------------------------------
def test_runner_uses_our_core():
    from moe_backend_integrations.sglang.core import PhaseMoeRunnerCore

    runner = make_runner(Case(1, 4))
    assert isinstance(runner.runner_core, PhaseMoeRunnerCore)
    assert runner.fused_func is None
    assert runner.runner_core.runner_backend.value == "phasemoe"


@pytest.fixture
def on_cuda(monkeypatch):
    """SGLang's platform as CUDA (the runner carries routed_scaling_factor there)."""
    import moe_backend_integrations.sglang.core as core

    monkeypatch.setattr(core, "is_cuda", lambda: True)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_standard_dispatch_matches_reference(case, on_cuda):
    weights = make_experts(case.num_experts)
    ids, topk_weights = make_routing(case)
    x = make_x(case.num_tokens)
    combine = make_runner(case).run(standard_dispatch(x, ids, topk_weights), quant_info(weights))

    assert combine.format.value == "standard"
    out = combine.hidden_states
    assert out.shape == (case.num_tokens, HIDDEN) and out.dtype == torch.bfloat16
    # Standard combine = weighted sum x routed_scaling_factor (the fused shared expert's weight
    # 1/scale then comes out as exactly its MLP).
    ref = reference.routed_experts(x, *weights, topk_weights, ids).float() * ROUTED_SCALING_FACTOR
    assert rel_err(out, ref) <= LAYER_SAME_QUANT


@pytest.mark.parametrize("extend, phase", [(True, "prefill"), (False, "decode")])
def test_standard_dispatch_phase_comes_from_the_batch(monkeypatch, capsys, extend, phase):
    """docs/sglang.md: the policy's phase is SGLang's `is_extend_in_batch`, not the token count."""
    from sglang.srt.runtime_context import get_forward

    from moe_backend.dispatch.plan import clear_plan_cache

    monkeypatch.setenv("MOE_BACKEND_PRINT_POLICY", "1")
    clear_plan_cache()  # each new plan is printed once: resolve it afresh here
    case = Case(7, 4)
    ids, topk_weights = make_routing(case)
    with get_forward().scoped(is_extend_in_batch=extend):
        make_runner(case).run(standard_dispatch(make_x(7), ids, topk_weights), quant_info(make_experts(4)))
    assert f"[moe_backend] plan: {phase} T=7 " in capsys.readouterr().out


@pytest.mark.parametrize("case", [Case(0, 4)] + [c for c in CASES if not c.fused_shared], ids=str)
def test_deepep_normal_matches_reference(case):
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPNormalDispatchOutput

    weights = make_experts(case.num_experts)
    ids, topk_weights = make_routing(case)
    ids = ids.to(torch.int64)
    x_fp8, x_scale = quantize_fp8_per_token_group(make_x(case.num_tokens))
    counts = [int((ids == e).sum()) for e in range(case.num_experts)]
    dispatch = DeepEPNormalDispatchOutput(x_fp8, x_scale, ids, topk_weights, counts)
    combine = make_runner(case).run(dispatch, quant_info(weights))

    assert combine.format.value == "deepep_normal"
    assert combine.topk_ids is ids and combine.topk_weights is topk_weights
    out = combine.hidden_states
    assert out.shape == (case.num_tokens, HIDDEN) and out.dtype == torch.bfloat16
    # DeepEP normal combine = weighted sum over local experts, no scaling factor.
    ref = reference.routed_experts(x_fp8, *weights, topk_weights, ids, x_scale=x_scale)
    if case.num_tokens:
        assert rel_err(out, ref) <= LAYER_SAME_QUANT


def masked_dispatch(case: Case, ids, fp8: bool = True, max_m: int = 48):
    """DeepEP LL layout: [E, M, H] rows per expert + column-major scales; garbage past masked_m."""
    x = make_x(case.num_tokens)
    x_fp8, x_scale = quantize_fp8_per_token_group(x)
    g = torch.Generator().manual_seed(3)
    junk = torch.randn(case.num_experts, max_m, HIDDEN, generator=g) * 100
    a = junk.to(torch.bfloat16)
    a_fp8, a_scale = quantize_fp8_per_token_group(a)
    masked_m = torch.zeros(case.num_experts, dtype=torch.int32)
    for e in range(case.num_experts):
        tokens = (ids == e).any(dim=1).nonzero().squeeze(1)
        m = len(tokens)
        masked_m[e] = m
        a[e, :m] = x[tokens]
        a_fp8[e, :m], a_scale[e, :m] = x_fp8[tokens], x_scale[tokens]
    scale_cm = torch.empty(case.num_experts, HIDDEN // 128, max_m).transpose(1, 2)
    scale_cm.copy_(a_scale)  # column-major in the last two dims, as DeepEP LL sends them
    if fp8:
        return a_fp8, scale_cm, masked_m
    return a, None, masked_m


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("case", [c for c in CASES if not c.fused_shared], ids=str)
def test_deepep_ll_matches_reference(case, fp8):
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLDispatchOutput

    weights = make_experts(case.num_experts)
    ids, topk_weights = make_routing(case)
    hidden, scale, masked_m = masked_dispatch(case, ids, fp8)
    dispatch = DeepEPLLDispatchOutput(
        hidden, scale, ids, topk_weights, masked_m, max(1, case.num_tokens * TOP_K // case.num_experts)
    )
    combine = make_runner(case).run(dispatch, quant_info(weights))

    assert combine.format.value == "deepep_ll"
    out = combine.hidden_states
    assert out.shape == (case.num_experts, hidden.shape[1], HIDDEN) and out.dtype == torch.bfloat16
    assert int(masked_m[EMPTY_EXPERT]) == 0
    # DeepEP LL combine input = unweighted per-expert rows; DeepEP weights and sums them.
    for e in range(case.num_experts):
        m = int(masked_m[e])
        if m == 0:
            continue
        if fp8:
            a_fp8, a_scale = hidden[e, :m], scale[e, :m].contiguous()
        else:
            a_fp8, a_scale = quantize_fp8_per_token_group(hidden[e, :m])
        ones = torch.ones(m, 1, dtype=torch.float32)
        ref = reference.routed_experts(a_fp8, *weights, ones, torch.full((m, 1), e), x_scale=a_scale)
        assert rel_err(out[e, :m], ref) <= LAYER_SAME_QUANT, f"expert {e}"


# ---- errors ------------------------------------------------------------------------------------
def test_ue8m0_packed_scales_are_refused():
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLDispatchOutput

    case = Case(7, 4)
    ids, topk_weights = make_routing(case)
    hidden, _, masked_m = masked_dispatch(case, ids)
    packed = torch.zeros(case.num_experts, hidden.shape[1], 1, dtype=torch.int32)
    dispatch = DeepEPLLDispatchOutput(hidden, packed, ids, topk_weights, masked_m, 4)
    with pytest.raises(TypeError, match="UE8M0"):
        make_runner(case).run(dispatch, quant_info(make_experts(case.num_experts)))


def test_other_quant_info_is_refused():
    from sglang.srt.layers.moe.moe_runner.triton import TritonMoeQuantInfo

    case = Case(7, 4)
    w13, _, w2, _ = make_experts(case.num_experts)
    ids, topk_weights = make_routing(case)
    with pytest.raises(TypeError, match="block-FP8"):
        make_runner(case).run(
            standard_dispatch(make_x(7), ids, topk_weights), TritonMoeQuantInfo(w13_weight=w13, w2_weight=w2)
        )


def test_unsupported_dispatch_format_is_refused():
    from sglang.srt.layers.moe.token_dispatcher.base import DispatchOutputFormat

    class FlashinferDispatch:
        format = DispatchOutputFormat.FLASHINFER
        hidden_states = make_x(1)

    with pytest.raises(ValueError, match="flashinfer"):
        make_runner(Case(1, 4)).run(FlashinferDispatch(), quant_info(make_experts(4)))


# ---- the Fp8MoEMethod hooks --------------------------------------------------------------------
def fp8_method(block: bool = True):
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

    return Fp8MoEMethod(Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[128, 128] if block else None))


def fp8_layer(weights) -> torch.nn.Module:
    layer = torch.nn.Module()
    for name, t in zip(("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv"), weights):
        setattr(layer, name, torch.nn.Parameter(t, requires_grad=False))
    return layer


def test_fp8_method_builds_and_applies_our_runner(moe_flags, on_cuda):
    from moe_backend_integrations.sglang.core import PhaseMoeRunnerCore

    moe_flags(runner="phasemoe")
    case = Case(7, 4)
    weights = make_experts(case.num_experts)
    layer = fp8_layer(weights)
    method = fp8_method()
    method.create_moe_runner(layer, make_config(case))
    assert isinstance(method.runner.runner_core, PhaseMoeRunnerCore)

    ids, topk_weights = make_routing(case)
    x = make_x(case.num_tokens)
    out = method.apply(layer, standard_dispatch(x, ids, topk_weights)).hidden_states
    ref = reference.routed_experts(x, *weights, topk_weights, ids).float() * ROUTED_SCALING_FACTOR
    assert rel_err(out, ref) <= LAYER_SAME_QUANT


def test_fp8_method_without_the_flag_is_untouched(moe_flags):
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    moe_flags(runner="triton")
    method = fp8_method()
    method.create_moe_runner(fp8_layer(make_experts(4)), make_config(Case(1, 4)))
    assert method.runner.runner_backend is MoeRunnerBackend.TRITON


# (problem, a2a backend, text of the ValueError): every refusal docs/sglang.md lists for model build.
REFUSED_AT_BUILD = [
    ("per_tensor", "none", "block"),
    ("mxfp8", "none", "MXFP8/FP4"),
    ("fp4", "none", "MXFP8/FP4"),
    ("activation", "none", "silu"),
    ("swiglu_limit", "none", "swiglu_limit"),
    ("apply_router_weight_on_input", "none", "apply_router_weight_on_input"),
    ("deepep_jit_off", "deepep", "DeepGEMM JIT off"),
    ("deepep_ue8m0", "deepep", "UE8M0"),
] + [(a2a, a2a, f"--moe-a2a-backend {a2a}") for a2a in ("deepep_v2", "mooncake", "nixl", "mori", "flashinfer")]


@pytest.mark.parametrize("problem,a2a,match", REFUSED_AT_BUILD, ids=[p for p, _, _ in REFUSED_AT_BUILD])
def test_fp8_method_unsupported_combinations_raise(moe_flags, monkeypatch, problem, a2a, match):
    from sglang.srt.layers import deep_gemm_wrapper

    moe_flags(runner="phasemoe", a2a=a2a)
    config = make_config(Case(1, 4))
    method = fp8_method(block=problem != "per_tensor")
    if problem == "activation":
        config.activation = "gelu"
    elif problem == "swiglu_limit":
        config.swiglu_limit = 7.0
    elif problem == "apply_router_weight_on_input":
        config.apply_router_weight_on_input = True
    elif problem == "mxfp8":
        method.use_mxfp8 = True
    elif problem == "fp4":
        method.is_fp4_expert = True
    # DeepEP's two conditions, each alone (the other one set to the supported value).
    monkeypatch.setattr(deep_gemm_wrapper, "ENABLE_JIT_DEEPGEMM", problem != "deepep_jit_off")
    monkeypatch.setattr(deep_gemm_wrapper, "DEEPGEMM_SCALE_UE8M0", problem == "deepep_ue8m0")
    with pytest.raises(ValueError, match=re.escape(match)):
        method.create_moe_runner(fp8_layer(make_experts(4)), config)


def test_deepep_with_supported_settings_builds(moe_flags, monkeypatch):
    """The control for the DeepEP refusals above: JIT on, fp32 scales -> our runner is built."""
    from sglang.srt.layers import deep_gemm_wrapper

    from moe_backend_integrations.sglang.core import PhaseMoeRunnerCore

    moe_flags(runner="phasemoe", a2a="deepep")
    monkeypatch.setattr(deep_gemm_wrapper, "ENABLE_JIT_DEEPGEMM", True)
    monkeypatch.setattr(deep_gemm_wrapper, "DEEPGEMM_SCALE_UE8M0", False)
    method = fp8_method()
    method.create_moe_runner(fp8_layer(make_experts(4)), make_config(Case(1, 4)))
    assert isinstance(method.runner.runner_core, PhaseMoeRunnerCore)


@pytest.mark.parametrize("problem", ["lora", "no_combine"])
def test_lora_and_no_combine_are_refused_at_run_time(problem):
    case = Case(7, 4)
    runner = make_runner(case)
    ids, topk_weights = make_routing(case)
    dispatch = standard_dispatch(make_x(7), ids, topk_weights)
    info = quant_info(make_experts(case.num_experts))
    if problem == "lora":
        with pytest.raises(ValueError, match="LoRA"):
            runner.runner_core.run_from_dispatch(dispatch, info, runner.config, hooks=object())
    else:
        runner.config.no_combine = True
        with pytest.raises(ValueError, match="no_combine"):
            runner.run(dispatch, info)


@pytest.mark.parametrize("platform", ["cuda", "musa", "xpu", "cpu"])
def test_routed_scaling_factor_applied_exactly_once(monkeypatch, platform):
    """What SGLang's DeepSeek model ends with: the standard combine, times routed_scaling_factor
    where the model applies it itself (except on CUDA, MUSA and XPU). Once on every platform branch."""
    import moe_backend_integrations.sglang.core as core

    # raising=False: the plugin before the fix had no such names, and must fail on the scaling.
    monkeypatch.setattr(core, "is_cuda", lambda: platform == "cuda", raising=False)
    monkeypatch.setattr(core, "is_musa", lambda: platform == "musa", raising=False)
    monkeypatch.setattr(core, "is_xpu", lambda: platform == "xpu", raising=False)
    case = Case(9, 4)
    weights = make_experts(case.num_experts)
    ids, topk_weights = make_routing(case)
    x = make_x(case.num_tokens)
    out = make_runner(case).run(standard_dispatch(x, ids, topk_weights), quant_info(weights)).hidden_states.float()
    model_applies = platform not in ("cuda", "musa", "xpu")  # models/deepseek_v2.py forward_normal
    final = out * ROUTED_SCALING_FACTOR if model_applies else out
    ref = reference.routed_experts(x, *weights, topk_weights, ids).float() * ROUTED_SCALING_FACTOR
    assert rel_err(final, ref) <= LAYER_SAME_QUANT
    assert rel_err(final, ref * ROUTED_SCALING_FACTOR) > 0.5  # the double scaling this guards against


def test_routed_scaling_factor_applied_once_on_this_machine():
    """Nothing patched: this machine's platform (CPU in CI) and the condition under which SGLang's
    DeepSeek model multiplies the experts' output by routed_scaling_factor, read from the model's
    own module flags (models/deepseek_v2.py, the standard forward after `self.experts(...)`). The
    plugin before the fix scaled in the combine as well: on CPU the output came out 2.5x too big."""
    from sglang.srt.models import deepseek_v2 as model

    case = Case(9, 4)
    weights = make_experts(case.num_experts)
    ids, topk_weights = make_routing(case)
    x = make_x(case.num_tokens)
    out = make_runner(case).run(standard_dispatch(x, ids, topk_weights), quant_info(weights)).hidden_states.float()
    model_applies = not model._is_cuda and not model._is_musa and not model._is_xpu and not model._use_aiter
    final = out * ROUTED_SCALING_FACTOR if model_applies else out
    ref = reference.routed_experts(x, *weights, topk_weights, ids).float() * ROUTED_SCALING_FACTOR
    assert rel_err(final, ref) <= LAYER_SAME_QUANT, f"model applies the factor itself: {model_applies}"


# ---- every path runs a plan; the policy reaches each ---------------------------------------------
def _plans_of(run):
    from moe_backend.experts import recorded_plans

    with recorded_plans() as plans:
        run()
    return plans


@pytest.mark.parametrize(
    "policy, standard, normal, low_latency",
    [
        ("", "contiguous", "contiguous", "masked"),
        (
            '{"decode_kernel": "triton", "prefill_kernel": "reference", "masked_kernel": "triton_masked"}',
            "triton",
            "reference",
            "triton_masked",
        ),
    ],
)
def test_every_dispatch_path_runs_the_policy_plan(monkeypatch, policy, standard, normal, low_latency):
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLDispatchOutput, DeepEPNormalDispatchOutput

    monkeypatch.setenv("MOE_BACKEND_POLICY", policy)
    case = Case(5, 4)
    weights = make_experts(case.num_experts)
    ids, topk_weights = make_routing(case)
    runner = make_runner(case)
    x = make_x(case.num_tokens)
    # SGLang's forward flag says decode here: the standard path plans a decode batch.
    monkeypatch.setattr("moe_backend_integrations.sglang.core._current_phase", lambda: "decode")
    plans = _plans_of(lambda: runner.run(standard_dispatch(x, ids, topk_weights), quant_info(weights)))
    assert [(p.kernel, p.phase) for p in plans] == [(standard, "decode")]
    assert plans[0].num_tokens == case.num_tokens and plans[0].num_experts == case.num_experts

    x_fp8, x_scale = quantize_fp8_per_token_group(x)
    counts = [int((ids == e).sum()) for e in range(case.num_experts)]
    normal_dispatch = DeepEPNormalDispatchOutput(x_fp8, x_scale, ids.to(torch.int64), topk_weights, counts)
    plans = _plans_of(lambda: runner.run(normal_dispatch, quant_info(weights)))
    assert [(p.kernel, p.phase) for p in plans] == [(normal, "prefill")]

    hidden, scale, masked_m = masked_dispatch(case, ids)
    ll = DeepEPLLDispatchOutput(hidden, scale, ids, topk_weights, masked_m, 3)
    plans = _plans_of(lambda: runner.run(ll, quant_info(weights)))
    assert [(p.kernel, p.layout, p.expected_m, p.num_rows) for p in plans] == [
        (low_latency, "masked", 3, hidden.shape[1])
    ]


def test_cpu_weight_processing_keeps_the_checkpoint_layout_for_phasemoe(moe_flags, monkeypatch):
    """On CPU, SGLang's FP8 MoE weight processing repacks the experts for AMX (or asserts AMX):
    with phasemoe selected the plugin skips it, the weights stay as loaded, and the layer runs."""
    import sglang.srt.layers.quantization.fp8 as fp8_module

    # SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1 sets this at import), on a CPU without AMX.
    monkeypatch.setattr(fp8_module, "_is_cpu", True)
    monkeypatch.setattr(fp8_module, "_is_cpu_amx_available", False)
    moe_flags(runner="phasemoe")
    case = Case(7, 4)
    weights = make_experts(case.num_experts)
    layer = fp8_layer([t.clone() for t in weights])
    method = fp8_method()
    method.process_weights_after_loading(layer)  # without the hook: "requires that CPU has AMX"
    assert all(
        torch.equal(getattr(layer, n), w)
        for n, w in zip(("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv"), weights)
    )
    method.create_moe_runner(layer, make_config(case))
    ids, topk_weights = make_routing(case)
    x = make_x(case.num_tokens)
    out = method.apply(layer, standard_dispatch(x, ids, topk_weights)).hidden_states
    assert rel_err(out, reference.routed_experts(x, *weights, topk_weights, ids)) <= LAYER_SAME_QUANT  # CPU: unscaled
    moe_flags(runner="triton")
    with pytest.raises(AssertionError, match="AMX"):  # other runners keep SGLang's own processing
        fp8_method().process_weights_after_loading(fp8_layer([t.clone() for t in weights]))
