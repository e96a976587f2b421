"""Our experts, built and called through vLLM's own FP8 MoE interfaces on CPU, against the oracle.

The kernel is assembled the way vLLM's `Fp8MoEMethod` does it: `select_fp8_moe_backend` ->
`convert_to_fp8_moe_kernel_format` -> `make_fp8_moe_quant_config` -> `make_fp8_moe_kernel`
(standard format; vLLM's no-EP prepare/finalize) or `FusedMoEKernel(BatchedPrepareAndFinalize,
...)` (batched format, as DeepEP low-latency would feed it). vLLM's own input quantization needs
a GPU (CUDA op or Triton), so its `_fp8_quantize` is replaced here by `moe_backend.quant`'s 1x128
quantizer, which computes the same function (amax / 448 per group, fp32 scales).

Tolerance: both sides quantize the same bf16 input the same way and use the same FP8 weights; what
differs is the summation order, the combine (vLLM's batched finalize weights and sums in bf16)
and one bf16 rounding of the output. That stays near bf16's 2^-8 relative step; 1e-2 on the
relative Frobenius error fails for any real mismatch, which the negative control checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from moe_backend import reference
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from tests.helpers.tolerances import LAYER_SAME_QUANT

pytest.importorskip("vllm")

REL_TOL = LAYER_SAME_QUANT  # 1e-2, see the module docstring
HIDDEN, INTER, TOPK = 256, 256, 2
LOCAL_EXPERTS = 4
MAX_TOKENS = 64  # batched format: rows per expert


@dataclass(frozen=True)
class Case:
    fmt: str  # "standard" | "batched"
    num_tokens: int
    ep: bool = False  # 8 global experts, this rank holds 4 of them
    # Standard+EP: this rank holds global 4..7 (expert_map); batched: rank 0 holds 0..3.

    @property
    def num_global(self) -> int:
        return 2 * LOCAL_EXPERTS if self.ep else LOCAL_EXPERTS

    @property
    def first_local(self) -> int:
        return LOCAL_EXPERTS if (self.ep and self.fmt == "standard") else 0

    def __str__(self) -> str:
        return f"{self.fmt}-T{self.num_tokens}{'-ep' if self.ep else ''}"


CASES = [
    Case("standard", 1),
    Case("standard", 7),
    Case("standard", 33),
    Case("standard", 7, ep=True),
    Case("standard", 33, ep=True),
    Case("batched", 1, ep=True),
    Case("batched", 7, ep=True),
    Case("batched", 33, ep=True),
]


@pytest.fixture(scope="module")
def vllm_fp8():
    import moe_backend_integrations.vllm as plugin

    plugin.register()  # what vLLM's loader runs; the loader itself is tested in a fresh process
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    import vllm.model_executor.layers.fused_moe.utils as fused_moe_utils
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle
    from vllm.model_executor.layers.fused_moe.prepare_finalize.batched import (
        BatchedPrepareAndFinalize,
    )
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        kFp8Dynamic128Sym,
        kFp8Static128BlockSym,
    )

    return SimpleNamespace(
        mk=mk,
        utils=fused_moe_utils,
        MoEActivation=MoEActivation,
        FusedMoEConfig=FusedMoEConfig,
        FusedMoEParallelConfig=FusedMoEParallelConfig,
        RoutingMethodType=RoutingMethodType,
        oracle=oracle,
        BatchedPrepareAndFinalize=BatchedPrepareAndFinalize,
        keys=(kFp8Static128BlockSym, kFp8Dynamic128Sym),
    )


@pytest.fixture
def cpu_input_quant(vllm_fp8, monkeypatch):
    def fp8_quantize(A, A_scale, per_act_token, block_shape=None, is_scale_transposed=False):
        assert A_scale is None and not per_act_token and not is_scale_transposed
        assert list(block_shape) == [128, 128]
        return quantize_fp8_per_token_group(A, 128)

    monkeypatch.setattr(vllm_fp8.utils, "_fp8_quantize", fp8_quantize)


def _moe_config(v, case: Case):
    if case.fmt == "batched":
        parallel = v.FusedMoEParallelConfig(
            tp_size=1,
            pcp_size=1,
            dp_size=2,
            ep_size=2,
            tp_rank=0,
            pcp_rank=0,
            dp_rank=0,
            ep_rank=0,
            sp_size=1,
            use_ep=True,
            all2all_backend="deepep_low_latency",
            enable_eplb=False,
        )
    elif case.ep:  # EP without DP: no all2all, vLLM passes expert_map to the experts
        parallel = v.FusedMoEParallelConfig(
            tp_size=1,
            pcp_size=1,
            dp_size=1,
            ep_size=2,
            tp_rank=0,
            pcp_rank=0,
            dp_rank=0,
            ep_rank=1,
            sp_size=1,
            use_ep=True,
            all2all_backend="allgather_reducescatter",
            enable_eplb=False,
        )
    else:
        parallel = v.FusedMoEParallelConfig.make_no_parallel()
    return v.FusedMoEConfig(
        num_experts=case.num_global,
        experts_per_token=TOPK,
        hidden_dim=HIDDEN,
        intermediate_size=INTER,
        num_local_experts=LOCAL_EXPERTS,
        num_logical_experts=case.num_global,
        activation=v.MoEActivation.SILU,
        device="cpu",
        routing_method=v.RoutingMethodType.DeepSeekV3,
        moe_parallel_config=parallel,
        in_dtype=torch.bfloat16,
        moe_backend="phasemoe",
    )


def _problem(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13, w13_scale_inv = quantize_fp8_blockwise(torch.randn(LOCAL_EXPERTS, 2 * INTER, HIDDEN, generator=g) / 16)
    w2, w2_scale_inv = quantize_fp8_blockwise(torch.randn(LOCAL_EXPERTS, HIDDEN, INTER, generator=g) / 16)
    x = torch.randn(case.num_tokens, HIDDEN, generator=g).to(torch.bfloat16)
    # Local expert 2 gets no token; off-rank experts (EP) are drawn too.
    empty = case.first_local + 2
    candidates = torch.tensor([e for e in range(case.num_global) if e != empty])
    topk_ids = torch.stack(
        [candidates[torch.randperm(len(candidates), generator=g)[:TOPK]] for _ in range(case.num_tokens)]
    )
    if not bool((topk_ids[0] == case.first_local).any()):
        topk_ids[0, 0] = case.first_local  # at least one local hit, so the reference is not all zero
    topk_weights = torch.rand(case.num_tokens, TOPK, generator=g)
    local = topk_ids - case.first_local
    local_ids = torch.where((local >= 0) & (local < LOCAL_EXPERTS), local, -1)
    return SimpleNamespace(
        w13=w13,
        w13_scale_inv=w13_scale_inv,
        w2=w2,
        w2_scale_inv=w2_scale_inv,
        x=x,
        topk_ids=topk_ids.to(torch.int32),
        topk_weights=topk_weights,
        local_ids=local_ids.to(torch.int32),
    )


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _reference(p, topk_ids=None) -> torch.Tensor:
    return reference.routed_experts(
        p.x, p.w13, p.w13_scale_inv, p.w2, p.w2_scale_inv, p.topk_weights, p.local_ids if topk_ids is None else topk_ids
    )


def _vllm_kernel(v, case: Case, p):
    moe_config = _moe_config(v, case)
    backend, experts_cls = v.oracle.select_fp8_moe_backend(moe_config, *v.keys)
    assert backend.name == "PHASEMOE"
    layer = SimpleNamespace(weight_block_size=[128, 128])
    w13, w2, w13_scale, w2_scale = v.oracle.convert_to_fp8_moe_kernel_format(
        fp8_backend=backend,
        layer=layer,
        w13=p.w13,
        w2=p.w2,
        w13_scale=p.w13_scale_inv,
        w2_scale=p.w2_scale_inv,
        w13_input_scale=None,
        w2_input_scale=None,
    )
    quant_config = v.oracle.make_fp8_moe_quant_config(
        fp8_backend=backend, w1_scale=w13_scale, w2_scale=w2_scale, a1_scale=None, a2_scale=None, block_shape=[128, 128]
    )
    if case.fmt == "standard":
        kernel = v.oracle.make_fp8_moe_kernel(quant_config, moe_config, experts_cls, backend)
    else:
        prepare_finalize = v.BatchedPrepareAndFinalize(
            max_num_tokens=MAX_TOKENS, num_local_experts=LOCAL_EXPERTS, num_dispatchers=1, rank=0
        )
        experts = experts_cls(moe_config, quant_config, max_num_tokens=MAX_TOKENS, num_dispatchers=1)
        kernel = v.mk.FusedMoEKernel(prepare_finalize, experts)
    expert_map = None
    if case.fmt == "standard" and case.ep:
        expert_map = torch.full((case.num_global,), -1, dtype=torch.int32)
        expert_map[case.first_local : case.first_local + LOCAL_EXPERTS] = torch.arange(LOCAL_EXPERTS, dtype=torch.int32)
    return kernel, expert_map, (w13, w2)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_experts_through_vllm_match_reference(vllm_fp8, cpu_input_quant, case):
    v = vllm_fp8
    p = _problem(case)
    kernel, expert_map, (w13, w2) = _vllm_kernel(v, case, p)
    type_name = type(kernel.impl.fused_experts).__name__
    assert type_name == ("PhaseMoEExperts" if case.fmt == "standard" else "PhaseMoEBatchedExperts")

    out = kernel.apply(
        p.x,
        w13,
        w2,
        topk_weights=p.topk_weights,
        topk_ids=p.topk_ids,
        activation=v.MoEActivation.SILU,
        global_num_experts=case.num_global,
        expert_map=expert_map,
        apply_router_weight_on_input=False,
    )
    ref = _reference(p)
    assert out.shape == (case.num_tokens, HIDDEN) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) <= REL_TOL, _rel_err(out, ref)
    # Negative control: dropping each token's second expert must exceed the tolerance.
    wrong = p.local_ids.clone()
    wrong[:, 1] = -1
    if (p.local_ids[:, 1] >= 0).any():
        assert _rel_err(out, _reference(p, wrong)) > 10 * REL_TOL


def test_batched_apply_ignores_rows_past_counts(vllm_fp8):
    """Direct `apply` with stale (NaN) workspaces and padding rows: only the first
    `expert_num_tokens[e]` rows of each expert are computed and compared."""
    v = vllm_fp8
    case = Case("batched", 7, ep=True)
    p = _problem(case, seed=1)
    moe_config = _moe_config(v, case)
    _, experts_cls = v.oracle.select_fp8_moe_backend(moe_config, *v.keys)
    quant_config = v.oracle.make_fp8_moe_quant_config(
        fp8_backend=v.oracle.Fp8MoeBackend.PHASEMOE,
        w1_scale=p.w13_scale_inv,
        w2_scale=p.w2_scale_inv,
        a1_scale=None,
        a2_scale=None,
        block_shape=[128, 128],
    )
    experts = experts_cls(moe_config, quant_config, max_num_tokens=MAX_TOKENS, num_dispatchers=1)

    counts = torch.tensor([5, 0, 3, MAX_TOKENS], dtype=torch.int32)  # one empty, one full
    g = torch.Generator().manual_seed(2)
    a = torch.randn(LOCAL_EXPERTS, MAX_TOKENS, HIDDEN, generator=g)
    a_fp8, a_scale = quantize_fp8_per_token_group(a, 128)
    ws13_shape, ws2_shape, out_shape = experts.workspace_shapes(
        MAX_TOKENS, 2 * INTER, HIDDEN, TOPK, case.num_global, LOCAL_EXPERTS, None, v.MoEActivation.SILU
    )
    output = torch.full(out_shape, float("nan"), dtype=torch.bfloat16)
    workspace13 = torch.full(ws13_shape, float("nan"), dtype=torch.bfloat16)
    workspace2 = torch.full(ws2_shape, float("nan"), dtype=torch.bfloat16)
    meta = v.mk.ExpertTokensMetadata(expert_num_tokens=counts, expert_num_tokens_cpu=None)
    experts.apply(
        output,
        a_fp8,
        p.w13,
        p.w2,
        p.topk_weights,
        p.topk_ids,
        v.MoEActivation.SILU,
        case.num_global,
        None,
        a_scale,
        None,
        workspace13,
        workspace2,
        meta,
        False,
    )

    for e, m in enumerate(counts.tolist()):
        if m == 0:
            continue
        h = reference.grouped_gemm_masked(
            a_fp8[e : e + 1, :m],
            a_scale[e : e + 1, :m],
            p.w13[e : e + 1],
            p.w13_scale_inv[e : e + 1],
            torch.tensor([m], dtype=torch.int32),
        )
        act_fp8, act_scale = reference.silu_mul_quant(h)
        y = reference.grouped_gemm_masked(
            act_fp8, act_scale, p.w2[e : e + 1], p.w2_scale_inv[e : e + 1], torch.tensor([m], dtype=torch.int32)
        )
        assert torch.isfinite(output[e, :m]).all()
        assert _rel_err(output[e, :m], y[0]) <= REL_TOL


def test_convert_refuses_non_block_layers(vllm_fp8):
    v = vllm_fp8
    w = torch.zeros(1, 128, 128, dtype=torch.float8_e4m3fn)
    s = torch.ones(1, 1, 1)
    for layer in (SimpleNamespace(), SimpleNamespace(weight_block_size=[1, 128])):
        with pytest.raises(ValueError, match="128x128 block-quantized"):
            v.oracle.convert_to_fp8_moe_kernel_format(
                fp8_backend=v.oracle.Fp8MoeBackend.PHASEMOE,
                layer=layer,
                w13=w,
                w2=w,
                w13_scale=s,
                w2_scale=s,
                w13_input_scale=None,
                w2_input_scale=None,
            )


# ---- vLLM's own FP8 MoE layer (FusedMoEFactory -> Fp8MoEMethod) with --moe-backend phasemoe ----


@pytest.fixture(scope="module")
def vllm_layer(vllm_fp8):
    """A DeepSeek-V3-style FP8 MoE layer built by vLLM, loaded from per-expert checkpoint tensors
    (`{e}.gate_proj.weight`, `.weight_scale_inv`, ...), weights post-processed by vLLM."""
    import socket

    import torch.distributed as dist
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.kernel import KernelConfig
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    config = VllmConfig(kernel_config=KernelConfig(moe_backend="phasemoe"))
    with set_current_vllm_config(config):
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(
                world_size=1, rank=0, local_rank=0, backend="gloo", distributed_init_method=f"tcp://127.0.0.1:{port}"
            )
            initialize_model_parallel(1, 1)
        quant_config = Fp8Config(
            is_checkpoint_fp8_serialized=True, activation_scheme="dynamic", weight_block_size=[128, 128]
        )
        runner = FusedMoEFactory(
            num_experts=LOCAL_EXPERTS,
            top_k=TOPK,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            params_dtype=torch.bfloat16,
            renormalize=False,
            quant_config=quant_config,
            prefix="model.layers.3.mlp.experts",
        )

    g = torch.Generator().manual_seed(3)
    proj = {
        name: [quantize_fp8_blockwise(torch.randn(*shape, generator=g) / 16) for _ in range(LOCAL_EXPERTS)]
        for name, shape in (
            ("gate_proj", (INTER, HIDDEN)),
            ("up_proj", (INTER, HIDDEN)),
            ("down_proj", (HIDDEN, INTER)),
        )
    }
    checkpoint = [
        (f"{e}.{name}.{suffix}", pair[i])
        for name, pairs in proj.items()
        for e, pair in enumerate(pairs)
        for i, suffix in enumerate(("weight", "weight_scale_inv"))
    ]
    list(runner.load_weights(checkpoint))
    experts = runner.routed_experts
    experts.quant_method.process_weights_after_loading(experts)
    # Our own stacking of the checkpoint: w13 = [gate; up] per expert, as the reference expects.
    stack = lambda name, i: torch.stack([pair[i] for pair in proj[name]])  # noqa: E731
    w13 = torch.cat([stack("gate_proj", 0), stack("up_proj", 0)], dim=1)
    w13_scale_inv = torch.cat([stack("gate_proj", 1), stack("up_proj", 1)], dim=1)
    return SimpleNamespace(
        config=config,
        experts=experts,
        w13=w13,
        w13_scale_inv=w13_scale_inv,
        w2=stack("down_proj", 0),
        w2_scale_inv=stack("down_proj", 1),
    )


def test_vllm_layer_selects_phasemoe_and_keeps_checkpoint_layout(vllm_layer):
    experts = vllm_layer.experts
    assert type(experts.quant_method).__name__ == "Fp8MoEMethod"
    assert experts.quant_method.fp8_backend.name == "PHASEMOE"
    assert type(experts.quant_method.moe_kernel.impl.fused_experts).__name__ == "PhaseMoEExperts"
    # convert_to_fp8_moe_kernel_format (rebound inside quantization/fp8.py) left vLLM's layout as is.
    assert torch.equal(experts.w13_weight.view(torch.uint8), vllm_layer.w13.view(torch.uint8))
    assert torch.equal(experts.w13_weight_scale_inv, vllm_layer.w13_scale_inv)
    assert torch.equal(experts.w2_weight.view(torch.uint8), vllm_layer.w2.view(torch.uint8))


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_vllm_layer_forward_matches_reference(vllm_layer, cpu_input_quant, num_tokens):
    from vllm.config import set_current_vllm_config

    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, HIDDEN, generator=g).to(torch.bfloat16)
    # Expert 3 gets no token.
    topk_ids = torch.stack([torch.randperm(3, generator=g)[:TOPK] for _ in range(num_tokens)])
    topk_ids = topk_ids.to(torch.int32)
    topk_weights = torch.rand(num_tokens, TOPK, generator=g)
    with set_current_vllm_config(vllm_layer.config):
        out = vllm_layer.experts.forward_modular(x, topk_weights, topk_ids)
    ref = reference.routed_experts(
        x, vllm_layer.w13, vllm_layer.w13_scale_inv, vllm_layer.w2, vllm_layer.w2_scale_inv, topk_weights, topk_ids
    )
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert _rel_err(out, ref) <= REL_TOL, _rel_err(out, ref)


@pytest.mark.parametrize(
    "policy, standard, batched",
    [
        ("", "contiguous", "masked"),
        ('{"decode_kernel": "triton", "masked_kernel": "triton_masked"}', "triton", "triton_masked"),
    ],
)
@pytest.mark.parametrize("fmt", ["standard", "batched"])
def test_each_format_runs_the_policy_plan(vllm_fp8, cpu_input_quant, monkeypatch, policy, standard, batched, fmt):
    """vLLM's standard and batched paths execute a plan from MOE_BACKEND_POLICY (read when vLLM
    builds the experts), with the global expert count as the tile hint's denominator."""
    from moe_backend.experts import recorded_plans

    monkeypatch.setenv("MOE_BACKEND_POLICY", policy)
    v = vllm_fp8
    case = Case(fmt, 7, ep=True)
    p = _problem(case)
    kernel, expert_map, (w13, w2) = _vllm_kernel(v, case, p)
    with recorded_plans() as plans:
        kernel.apply(
            p.x,
            w13,
            w2,
            topk_weights=p.topk_weights,
            topk_ids=p.topk_ids,
            activation=v.MoEActivation.SILU,
            global_num_experts=case.num_global,
            expert_map=expert_map,
            apply_router_weight_on_input=False,
        )
    assert len(plans) == 1
    plan = plans[0]
    if fmt == "standard":
        assert (plan.kernel, plan.layout, plan.phase) == (standard, "contiguous", "decode")
        assert plan.expected_m == -(-case.num_tokens * TOPK // case.num_global)
    else:
        assert (plan.kernel, plan.layout, plan.num_rows) == (batched, "masked", MAX_TOKENS)


def test_standard_format_on_cpu_quantizes_inputs_itself(vllm_fp8):
    """No test fixture for the input quantization here: on CPU our experts ask vLLM for the bf16
    tokens (`expects_unquantized_inputs`) and quantize them with moe_backend's quantizer, since
    vLLM's own input quantization is a Triton kernel."""
    v = vllm_fp8
    case = Case("standard", 7, ep=True)
    p = _problem(case)
    kernel, expert_map, (w13, w2) = _vllm_kernel(v, case, p)
    assert kernel.impl.fused_experts.expects_unquantized_inputs
    out = kernel.apply(
        p.x,
        w13,
        w2,
        topk_weights=p.topk_weights,
        topk_ids=p.topk_ids,
        activation=v.MoEActivation.SILU,
        global_num_experts=case.num_global,
        expert_map=expert_map,
        apply_router_weight_on_input=False,
    )
    assert _rel_err(out, _reference(p)) <= REL_TOL
