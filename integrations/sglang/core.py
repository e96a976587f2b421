"""`PhaseMoeRunnerCore`: SGLang's three dispatch formats onto moe_backend.

| dispatch (SGLang)     | input                                         | ours                          | returns                                        |
|-----------------------|-----------------------------------------------|-------------------------------|------------------------------------------------|
| standard (TP)         | bf16 `[T, H]`, topk f32/int32 `[T, k]` local  | `experts.routed_experts`,     | `StandardCombineInput` `[T, H]`: weighted sum  |
|                       | ids (-1 = drop; fused shared expert = id E)   | phase from SGLang's batch     | x routed_scaling_factor on CUDA, MUSA, XPU     |
|                       |                                               |                               | (the model applies it itself elsewhere)        |
| DeepEP normal         | fp8 `[N, H]` + f32 `[N, H/128]`, int64 local  | `experts.routed_experts`,     | `DeepEPNormalCombineInput` `[N, H]`: weighted  |
| (prefill)             | ids (-1 = other rank), f32 weights            | phase "prefill" (contiguous)  | sum over local experts, no scaling factor      |
| DeepEP low-latency    | masked fp8 `[E, M, H]` + f32 `[E, M, H/128]`  | `experts.masked_experts`      | `DeepEPLLCombineInput` `[E, M, H]`: unweighted |
| (decode)              | (scales column-major), `masked_m` on device   | (masked GEMM, act, GEMM)      | rows (m < masked_m[e]); DeepEP weights them    |

The decode paths launch shape-static work without host syncs, so SGLang can capture them in
CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.moe.moe_runner.base import (
    DispatchMoeRunnerCore,
    MoeQuantInfo,
    MoeRunnerConfig,
)
from sglang.srt.layers.moe.token_dispatcher.deepep import (
    DeepEPLLCombineInput,
    DeepEPNormalCombineInput,
)
from sglang.srt.layers.moe.token_dispatcher.standard import StandardCombineInput
from sglang.srt.layers.moe.topk import TopKOutputChecker
from sglang.srt.layers.moe.utils import resolve_moe_runner_backend
from sglang.srt.runtime_context import get_forward
from sglang.srt.utils import is_cuda, is_musa, is_xpu

from moe_backend import experts, ops
from moe_backend.ab import shadow_hooks
from moe_backend.constants import QUANT_BLOCK
from moe_backend.dispatch.policy import Policy
from moe_backend.quant import FP8_DTYPE
from moe_backend_integrations.sglang import BACKEND_NAME

__all__ = ["PhaseMoeRunnerCore", "PhaseMoeQuantInfo"]


@dataclass
class PhaseMoeQuantInfo(MoeQuantInfo):
    """One layer's local experts, as loaded by SGLang's Fp8MoEMethod (checkpoint layout)."""

    w13_fp8: torch.Tensor  # [E, 2I, H] fp8 e4m3, gate rows then up rows
    w13_scale_inv: torch.Tensor  # [E, 2I/128, H/128] fp32 multipliers
    w2_fp8: torch.Tensor  # [E, H, I] fp8 e4m3
    w2_scale_inv: torch.Tensor  # [E, H/128, I/128] fp32 multipliers
    # Power-of-two activation scales, for checkpoints quantized that way (`scale_fmt: ue8m0`).
    ue8m0: bool = False

    def __post_init__(self) -> None:
        # Metadata checks only (no host sync): this runs on every forward.
        for name in ("w13_fp8", "w13_scale_inv", "w2_fp8", "w2_scale_inv"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(
                    f"{BACKEND_NAME}: {name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}"
                )
        if not isinstance(self.ue8m0, bool):
            raise TypeError(f"{BACKEND_NAME}: ue8m0 must be a bool, got {self.ue8m0!r}")
        for name in ("w13_fp8", "w2_fp8"):
            t = getattr(self, name)
            if t.dtype != FP8_DTYPE or t.dim() != 3:
                raise TypeError(
                    f"{BACKEND_NAME}: {name} must be float8_e4m3fn [E, N, K], got {t.dtype} {list(t.shape)}"
                )
        for name in ("w13_scale_inv", "w2_scale_inv"):
            t = getattr(self, name)
            if t.dtype != torch.float32:
                raise TypeError(
                    f"{BACKEND_NAME}: {name} must hold fp32 block scales, got {t.dtype}"
                    f" (UE8M0-packed scales are DeepGEMM's layout, not supported)"
                )
        experts_13, experts_2 = self.w13_fp8.shape[0], self.w2_fp8.shape[0]
        if experts_13 != experts_2 or self.w13_fp8.shape[2] != self.w2_fp8.shape[1]:
            raise ValueError(
                f"{BACKEND_NAME}: w13_fp8 {list(self.w13_fp8.shape)} and w2_fp8 "
                f"{list(self.w2_fp8.shape)} do not describe one set of experts [E, 2I, H] / [E, H, I]"
            )

    @property
    def num_local_experts(self) -> int:
        return self.w13_fp8.shape[0]


def runner_applies_routed_scaling() -> bool:
    """Whether the standard combine must carry routed_scaling_factor. SGLang's DeepSeek model
    multiplies the experts' output by it itself except on CUDA, MUSA and XPU (models/deepseek_v2.py,
    `forward_normal` after `self.experts(...)`), where its runners apply it: the combine carries
    it exactly there, so that it is applied once on every platform."""
    return is_cuda() or is_musa() or is_xpu()


def _current_phase() -> str:
    # SGLang's per-forward flag: True for batches with prefill (extend) tokens; graph runners
    # force it False while capturing decode graphs.
    return "prefill" if get_forward().is_extend_in_batch else "decode"


def _activation_scale(x: torch.Tensor, x_scale: torch.Tensor | None, where: str) -> torch.Tensor | None:
    """The fp32 `[..., H/128]` scales of an fp8 dispatch, contiguous; None for a bf16 dispatch."""
    if x.dtype != FP8_DTYPE:
        if x_scale is not None:
            raise TypeError(f"{BACKEND_NAME} ({where}): {x.dtype} activations came with scales")
        return None
    if x_scale is None:
        raise TypeError(f"{BACKEND_NAME} ({where}): fp8 activations came without scales")
    if x_scale.dtype != torch.float32:
        raise TypeError(
            f"{BACKEND_NAME} ({where}): activation scales are {x_scale.dtype}; only fp32 "
            f"per-128-column scales are supported (UE8M0-packed int32 scales, as DeepEP "
            f"sends on Blackwell, are not)"
        )
    # DeepEP LL hands the scales column-major in the last two dims; our kernels read row-major.
    return x_scale.contiguous()


class PhaseMoeRunnerCore(DispatchMoeRunnerCore):
    """Runs a layer's local experts for each of SGLang's dispatch formats (table above)."""

    def __init__(self, config: MoeRunnerConfig):
        super().__init__(config)
        self.policy = Policy.from_env()  # cached per setting; each layer's plans come from it

    @property
    def runner_backend(self):
        return resolve_moe_runner_backend(BACKEND_NAME)

    def run_from_dispatch(self, dispatch_output, quant_info, runner_config, hooks=None):
        if hooks is not None:
            raise ValueError(f"{BACKEND_NAME}: LoRA MoE hooks are not supported")
        if not isinstance(quant_info, PhaseMoeQuantInfo):
            raise TypeError(
                f"{BACKEND_NAME} serves block-FP8 MoE layers only (got "
                f"{type(quant_info).__name__}); this layer's quantization method is not "
                f"supported by --moe-runner-backend {BACKEND_NAME}"
            )
        # MoeRunnerConfig is mutated after construction: read it per call.
        if runner_config.no_combine or runner_config.apply_router_weight_on_input:
            raise ValueError(f"{BACKEND_NAME}: no_combine / apply_router_weight_on_input are not supported")
        fmt = dispatch_output.format
        if fmt.is_standard():
            return self._run_standard(dispatch_output, quant_info, runner_config)
        if fmt.is_deepep_normal():
            return self._run_deepep_normal(dispatch_output, quant_info, runner_config)
        if fmt.is_deepep_ll():
            return self._run_deepep_ll(dispatch_output, quant_info)
        raise ValueError(
            f"{BACKEND_NAME}: dispatch format {fmt.value!r} is not supported (use --moe-a2a-backend none or deepep)"
        )

    # ---- standard (TP): weighted sum x routed_scaling_factor ----
    def _run_standard(self, d, q: PhaseMoeQuantInfo, runner_config):
        if not TopKOutputChecker.format_is_standard(d.topk_output):
            raise ValueError(
                f"{BACKEND_NAME}: top-k output {type(d.topk_output).__name__} is not supported (standard top-k only)"
            )
        x = d.hidden_states  # [T, H]
        x_scale = _activation_scale(x, d.hidden_states_scale, "standard")
        topk_weights = d.topk_output.topk_weights.float()  # [T, k]
        scale = runner_config.routed_scaling_factor
        if scale is not None and scale != 1.0 and runner_applies_routed_scaling():
            # Folded into the fp32 weights so the output is rounded to bf16 once.
            topk_weights = topk_weights * scale
        out = experts.routed_experts(
            x,
            q.w13_fp8,
            q.w13_scale_inv,
            q.w2_fp8,
            q.w2_scale_inv,
            topk_weights,
            d.topk_output.topk_ids,
            x_scale=x_scale,
            ue8m0=q.ue8m0,
            policy=self.policy,
            phase=_current_phase(),
        )
        shadow_hooks.observe_routed(
            out, x, q, topk_weights, d.topk_output.topk_ids, x_scale=x_scale, ue8m0=q.ue8m0, phase=_current_phase()
        )
        return StandardCombineInput(hidden_states=out)

    # ---- DeepEP normal (prefill): weighted sum over local experts, contiguous kernel ----
    def _run_deepep_normal(self, d, q: PhaseMoeQuantInfo, runner_config):
        x = d.hidden_states  # [N, H]
        x_scale = _activation_scale(x, d.hidden_states_scale, "deepep normal")
        # The host list num_recv_tokens_per_expert is not needed: the layout is built from ids.
        topk_weights = d.topk_weights.float()  # once: the shadow hook reads the same tensor
        out = experts.routed_experts(
            x,
            q.w13_fp8,
            q.w13_scale_inv,
            q.w2_fp8,
            q.w2_scale_inv,
            topk_weights,
            d.topk_ids,
            x_scale=x_scale,
            ue8m0=q.ue8m0,
            policy=self.policy,
            phase="prefill",
            num_global_experts=runner_config.num_experts,
        )
        shadow_hooks.observe_routed(
            out,
            x,
            q,
            topk_weights,
            d.topk_ids,
            x_scale=x_scale,
            ue8m0=q.ue8m0,
            phase="prefill",
            num_global_experts=runner_config.num_experts,
        )
        return DeepEPNormalCombineInput(hidden_states=out, topk_ids=d.topk_ids, topk_weights=d.topk_weights)

    # ---- DeepEP low-latency (decode): unweighted per-expert rows, masked kernel ----
    def _run_deepep_ll(self, d, q: PhaseMoeQuantInfo):
        x = d.hidden_states  # [E, M, H]
        if x.dim() != 3 or x.shape[0] != q.num_local_experts:
            raise ValueError(
                f"{BACKEND_NAME} (deepep low-latency): expected activations "
                f"[{q.num_local_experts}, M, H], got {list(x.shape)}"
            )
        x_scale = _activation_scale(x, d.hidden_states_scale, "deepep low-latency")
        if x_scale is None:  # bf16 dispatch
            x, x_scale = ops.per_token_group_quant(x, QUANT_BLOCK, q.ue8m0)
        x = x.contiguous()  # DeepEP's receive buffer already is; our kernels require it
        masked_m = d.masked_m.to(torch.int32)  # [E], on the device: never read on the host
        out = experts.masked_experts(
            x,
            x_scale,
            q.w13_fp8,
            q.w13_scale_inv,
            q.w2_fp8,
            q.w2_scale_inv,
            masked_m,
            policy=self.policy,
            ue8m0=q.ue8m0,
            expected_m=d.expected_m,
        )
        shadow_hooks.observe_masked(out, x, x_scale, q, masked_m, ue8m0=q.ue8m0, expected_m=d.expected_m)
        return DeepEPLLCombineInput(hidden_states=out, topk_ids=d.topk_ids, topk_weights=d.topk_weights)
