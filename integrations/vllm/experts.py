"""Our routed experts behind vLLM's modular MoE kernel interface (`FusedMoEExpertsModular`).

vLLM's prepare step hands the experts FP8 activations with fp32 `[.., H/128]` scales (1x128
groups, the numerics of `moe_backend.quant`); the weights are the layer's `w13_weight`
`[E_local, 2I, H]` (gate rows, then up), `w2_weight` `[E_local, H, I]` and their 128x128 block
scales (`quant_config.w1_scale` / `w2_scale`, fp32 multipliers).

- `PhaseMoEExperts`, standard format (TP, DeepEP high-throughput, all-gather EP): `[M, H]` tokens
  with global `topk_ids`; runs `moe_backend.experts.routed_experts`, which executes the policy's
  plan for the batch, and writes the weighted sum (vLLM's finalize then only copies).
- `PhaseMoEBatchedExperts`, batched format (DeepEP low-latency, NIXL-EP; decode): `[E_local, T, H]`
  with the per-expert counts on the device; the policy's masked plan (GEMM1 -> SiLU*up+quant ->
  GEMM2) into vLLM's output, unweighted (vLLM's finalize weights and combines). No host sync, sizes from shapes
  only, GEMM1 output in vLLM's workspace: capturable in CUDA graphs.

This module imports vLLM: the plugin imports it only when the oracle asks for our classes.
"""

from __future__ import annotations

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
)
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
)
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    QuantKey,
    kFp8Dynamic128Sym,
    kFp8Static128BlockSym,
)
from vllm.platforms import current_platform

from moe_backend.constants import QUANT_BLOCK
from moe_backend.dispatch import Policy
from moe_backend_integrations.vllm._apply import apply_batched, apply_standard

__all__ = ["PhaseMoEExperts", "PhaseMoEBatchedExperts"]

# (weight, activation) quantization: DeepSeek-V3's 128x128 weight blocks, dynamic 1x128 tokens.
SUPPORTED_QUANT = ((kFp8Static128BlockSym, kFp8Dynamic128Sym),)


def _check_quant_config(quant_config: FusedMoEQuantConfig) -> None:
    if (
        quant_config.quant_dtype != torch.float8_e4m3fn
        or list(quant_config.block_shape or ()) != [QUANT_BLOCK, QUANT_BLOCK]
        or quant_config.per_act_token_quant
        or quant_config.per_out_ch_quant
    ):
        raise ValueError(
            f"phasemoe: expected FP8 e4m3 weights in {QUANT_BLOCK}x{QUANT_BLOCK} blocks with "
            f"dynamic 1x{QUANT_BLOCK} activation groups; got quant_dtype="
            f"{quant_config.quant_dtype}, block_shape={quant_config.block_shape}"
        )


class _PhaseMoEBase(mk.FusedMoEExpertsModular):
    """Capabilities shared by both formats (the oracle checks them before construction)."""

    @staticmethod
    def _supports_current_device() -> bool:
        # CUDA: our Triton kernels (FP8 tensor cores, sm89+). CPU: the same pipeline on the
        # reference GEMMs (tests).
        return (current_platform.is_cuda() and current_platform.has_device_capability(89)) or current_platform.is_cpu()

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key: QuantKey | None, activation_key: QuantKey | None) -> bool:
        return (weight_key, activation_key) in SUPPORTED_QUANT

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.SILU

    def _weight_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Raised, not asserted: `python -O` strips asserts, and a None scale would then reach a kernel.
        if self.w1_scale is None or self.w2_scale is None:
            raise ValueError(
                "phasemoe: the layer's w1_scale / w2_scale (128x128 block scales) are "
                "missing; only block-FP8 checkpoints are served"
            )
        return self.w1_scale, self.w2_scale


class PhaseMoEExperts(_PhaseMoEBase):
    """Standard format: `[M, H]` fp8 tokens, global `topk_ids` `[M, k]`, `expert_map` global->local."""

    def __init__(self, moe_config: FusedMoEConfig, quant_config: FusedMoEQuantConfig):
        super().__init__(moe_config=moe_config, quant_config=quant_config)
        _check_quant_config(quant_config)
        self.policy = Policy.from_env()

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_parallel_config(moe_parallel_config: FusedMoEParallelConfig) -> bool:
        # FlashInfer's NVLink all2alls hand over their own layouts.
        return not (
            moe_parallel_config.use_fi_nvl_two_sided_kernels or moe_parallel_config.use_fi_nvl_one_sided_kernels
        )

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP()  # `apply` already weighted and summed

    @property
    def expects_unquantized_inputs(self) -> bool:
        # vLLM quantizes MoE inputs with a Triton kernel, which a CPU has not: there the bf16
        # tokens come through and our own quantizer (moe_backend.quant, in routed_experts) runs.
        return current_platform.is_cpu()

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation):
        # routed_experts sizes its layout per batch from the policy's kernel; vLLM's workspaces
        # are not used here.
        return (0,), (0,), (M, K)

    def apply(
        self,
        output,
        hidden_states,
        w1,
        w2,
        topk_weights,
        topk_ids,
        activation,
        global_num_experts,
        expert_map,
        a1q_scale,
        a2_scale,
        workspace13,
        workspace2,
        expert_tokens_meta,
        apply_router_weight_on_input,
    ):
        if a1q_scale is None and not self.expects_unquantized_inputs:
            raise ValueError("phasemoe: a1q_scale is None; vLLM must quantize the input (1x128 groups)")
        _check_activation(activation)
        w13_scale_inv, w2_scale_inv = self._weight_scales()
        apply_standard(
            output,
            hidden_states,
            a1q_scale,
            w1,
            w13_scale_inv,
            w2,
            w2_scale_inv,
            topk_weights,
            topk_ids,
            expert_map,
            apply_router_weight_on_input,
            self.policy,
            global_num_experts,
        )


class PhaseMoEBatchedExperts(_PhaseMoEBase):
    """Batched (masked) format: `[E_local, T, H]` fp8 tokens, counts on the device."""

    def __init__(
        self, moe_config: FusedMoEConfig, quant_config: FusedMoEQuantConfig, max_num_tokens: int, num_dispatchers: int
    ):
        super().__init__(
            moe_config=moe_config,
            quant_config=quant_config,
            max_num_tokens=max_num_tokens,
            num_dispatchers=num_dispatchers,
        )
        _check_quant_config(quant_config)
        self.policy = Policy.from_env()

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.BatchedExperts

    @staticmethod
    def _supports_parallel_config(moe_parallel_config: FusedMoEParallelConfig) -> bool:
        return True

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceDelegate()  # the combine (prepare/finalize) weights the rows

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation):
        assert self.max_num_tokens is not None and self.num_dispatchers is not None
        rows = self.max_num_tokens * self.num_dispatchers
        # workspace13 holds GEMM1's bf16 output [E, rows, N=2I]; the output is [E, rows, K].
        return (local_num_experts, rows, N), (0,), (local_num_experts, rows, K)

    def apply(
        self,
        output,
        hidden_states,
        w1,
        w2,
        topk_weights,
        topk_ids,
        activation,
        global_num_experts,
        expert_map,
        a1q_scale,
        a2_scale,
        workspace13,
        workspace2,
        expert_tokens_meta,
        apply_router_weight_on_input,
    ):
        if expert_tokens_meta is None or expert_tokens_meta.expert_num_tokens is None:
            raise ValueError("phasemoe: the batched format needs expert_tokens_meta.expert_num_tokens")
        if a1q_scale is None:
            raise ValueError("phasemoe: a1q_scale is None; vLLM must quantize the input (1x128 groups)")
        _check_activation(activation)
        w13_scale_inv, w2_scale_inv = self._weight_scales()
        expected_m = _expected_m(global_num_experts, topk_ids.size(-1), hidden_states.size(1))
        apply_batched(
            output,
            hidden_states,
            a1q_scale,
            w1,
            w13_scale_inv,
            w2,
            w2_scale_inv,
            expert_tokens_meta.expert_num_tokens,
            workspace13,
            expected_m,
            self.policy,
        )


def _check_activation(activation: MoEActivation) -> None:
    if activation != MoEActivation.SILU:
        raise ValueError(f"phasemoe: activation must be SiLU (DeepSeek-V3), got {activation}")


def _expected_m(global_num_experts: int, topk: int, max_m: int) -> int | None:
    """Typical rows per expert for the masked kernels' tile choice, from the token counts vLLM
    keeps on the host for DP (no device sync); None when vLLM has no such counts."""
    if not is_forward_context_available():
        return None
    dp_metadata = get_forward_context().dp_metadata
    if dp_metadata is None or global_num_experts <= 0:
        return None
    total_tokens = int(dp_metadata.num_tokens_across_dp_cpu.sum())
    return max(1, min(max_m, -(-total_tokens * topk // global_num_experts)))
