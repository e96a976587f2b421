"""`DeepseekV3MoE`: the DeepSeek-V3 MoE block (router, routed experts, shared experts) over FP8
block-quantized weights, loadable from Hugging Face names or a sharded safetensors checkpoint
(`moe_backend.layers.loading`)."""

from __future__ import annotations

import torch

from moe_backend import experts as experts_path
from moe_backend import ops
from moe_backend._checks import check_finite_rows, check_output_rows, check_tensor, finite_checks_enabled
from moe_backend.ab import shadow_hooks
from moe_backend.config import MoEConfig
from moe_backend.constants import FP8_DTYPE, QUANT_BLOCK
from moe_backend.dispatch.policy import PHASES, Policy
from moe_backend.layers.fixed_dtypes import FixedDtypes
from moe_backend.layers.loading import WeightLoading, scale_blocks
from moe_backend.layers.router import noaux_tc_route

__all__ = ["DeepseekV3MoE"]


class DeepseekV3MoE(WeightLoading, FixedDtypes):
    """DeepSeek-V3 MoE block: `forward(hidden_states [..., H] bf16) -> [..., H] bf16`.

    expert_range: `(start, stop)` of the routed experts held here (an expert-parallel slice);
    tokens routed elsewhere contribute nothing. with_shared_experts: whether this slice adds the
    shared expert (exactly one slice of an EP group should). shadow: a `moe_backend.ab.shadow.Shadow`
    or a 'backend:rate' spec that also runs a sampled fraction of calls on another backend and
    records the divergence (docs/ab-testing.md); None leaves it to MOE_BACKEND_SHADOW.
    """

    def __init__(
        self,
        config: MoEConfig,
        policy: Policy | None = None,
        *,
        expert_range: tuple[int, int] | None = None,
        with_shared_experts: bool = True,
        device: torch.device | str | None = None,
        shadow=None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(
                f"policy: expected a moe_backend.dispatch.Policy or None, got "
                f"{type(policy).__name__} (build one with Policy.from_dict)"
            )
        if not isinstance(with_shared_experts, bool):
            raise TypeError(f"with_shared_experts: expected a bool, got {with_shared_experts!r}")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device: expected a torch.device, a string or None, got {type(device).__name__}")
        if expert_range is not None:
            if not isinstance(expert_range, (tuple, list)) or len(expert_range) != 2:
                raise TypeError(f"expert_range: expected a (start, stop) pair of ints, got {expert_range!r}")
            if any(not isinstance(v, int) or isinstance(v, bool) for v in expert_range):
                raise TypeError(f"expert_range: start and stop must be ints, got {expert_range!r}")
        start, stop = expert_range if expert_range is not None else (0, config.n_routed_experts)
        if not 0 <= start < stop <= config.n_routed_experts:
            raise ValueError(
                f"expert_range: expected 0 <= start < stop <= {config.n_routed_experts}, got {expert_range}"
            )
        self.config = config
        self.policy = policy
        self.expert_start, self.expert_stop = start, stop
        self.with_shared_experts = with_shared_experts and config.n_shared_experts > 0
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        shared_inter = inter * config.n_shared_experts
        local = stop - start
        f32 = dict(dtype=torch.float32, device=device)
        fp8 = dict(dtype=FP8_DTYPE, device=device)
        # The router stays fp32: near-tied logits decide which experts run.
        self.register_buffer("gate_weight", torch.empty(config.n_routed_experts, hidden, **f32))
        self.register_buffer("e_score_correction_bias", torch.empty(config.n_routed_experts, **f32))
        self.register_buffer("w13_fp8", torch.empty(local, 2 * inter, hidden, **fp8))  # [E, 2I, H]
        self.register_buffer("w13_scale_inv", torch.empty(local, scale_blocks(2 * inter), scale_blocks(hidden), **f32))
        self.register_buffer("w2_fp8", torch.empty(local, hidden, inter, **fp8))  # [E, H, I]
        self.register_buffer("w2_scale_inv", torch.empty(local, scale_blocks(hidden), scale_blocks(inter), **f32))
        if self.with_shared_experts:
            self.register_buffer("shared_w13_fp8", torch.empty(1, 2 * shared_inter, hidden, **fp8))
            self.register_buffer(
                "shared_w13_scale_inv", torch.empty(1, scale_blocks(2 * shared_inter), scale_blocks(hidden), **f32)
            )
            self.register_buffer("shared_w2_fp8", torch.empty(1, hidden, shared_inter, **fp8))
            self.register_buffer(
                "shared_w2_scale_inv", torch.empty(1, scale_blocks(hidden), scale_blocks(shared_inter), **f32)
            )
        self._loaded = False
        self.shadow = shadow_hooks.shadow_arg(shadow)  # None: MOE_BACKEND_SHADOW decides per call

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # A state dict holding every buffer (a saved layer restored, or one built on the meta device
        # and loaded with assign=True) is a whole set of weights, as load_weights() commits one.
        errors_before = len(errors)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        whole = all(prefix + name in state_dict for name, _ in self.named_buffers(recurse=False))
        if whole and len(errors) == errors_before:
            self._loaded = True

    @property
    def num_local_experts(self) -> int:
        return self.expert_stop - self.expert_start

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden={c.hidden_size}, intermediate={c.moe_intermediate_size}, "
            f"experts=[{self.expert_start}, {self.expert_stop}) of {c.n_routed_experts}, "
            f"top{c.num_experts_per_tok}, shared={self.with_shared_experts}"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, phase: str | None = None) -> torch.Tensor:
        if not self._loaded:
            raise RuntimeError("DeepseekV3MoE: call load_weights() or load_from_checkpoint() first")
        hidden = self.config.hidden_size
        check_tensor("hidden_states", hidden_states, dtypes=(torch.bfloat16,), min_dim=1, device=self.w13_fp8.device)
        if hidden_states.shape[-1] != hidden:
            raise ValueError(
                f"hidden_states: last dim must be hidden_size {hidden}, got shape {list(hidden_states.shape)}"
            )
        if phase is not None and phase not in PHASES:
            raise ValueError(f"phase: expected one of {PHASES} or None, got {phase!r}")
        x = hidden_states.reshape(-1, hidden)
        if x.shape[0] == 0:
            return hidden_states.new_empty(hidden_states.shape)
        checked = finite_checks_enabled(x)
        if checked:
            check_finite_rows("hidden_states", x)

        topk_weights, topk_ids = noaux_tc_route(x, self.gate_weight, self.e_score_correction_bias, self.config)
        policy = self.policy if self.policy is not None else Policy.from_env()
        # Quantize once: the routed and the shared experts read the same FP8 activations.
        x_fp8, x_scale = ops.per_token_group_quant(x, QUANT_BLOCK, self.config.ue8m0_scales)
        out = experts_path.routed_experts(
            x_fp8,
            self.w13_fp8,
            self.w13_scale_inv,
            self.w2_fp8,
            self.w2_scale_inv,
            topk_weights,
            topk_ids,
            x_scale=x_scale,
            expert_start=self.expert_start,
            ue8m0=self.config.ue8m0_scales,
            policy=policy,
            phase=phase,
            num_global_experts=self.config.n_routed_experts,
        )
        shadow_hooks.observe_layer(self, out, x_fp8, x_scale, topk_weights, topk_ids, phase)
        if self.with_shared_experts:
            out = out + self.shared_expert(x_fp8, x_scale)
        if checked:
            check_output_rows("hidden_states", x, out)
        return out.view(hidden_states.shape)

    def shared_expert(self, x: torch.Tensor, x_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The shared expert(s) on every token: one dense FP8 MLP, run as a one-expert grouped GEMM.
        x: bf16 `[T, H]`, or fp8 with `x_scale` `[T, H/128]` (already quantized)."""
        ue8m0 = self.config.ue8m0_scales
        if x_scale is None:
            x_fp8, x_scale = ops.per_token_group_quant(x, QUANT_BLOCK, ue8m0)
        else:
            x_fp8 = x
        one_expert = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        h = ops.grouped_gemm_contiguous(x_fp8, x_scale, self.shared_w13_fp8, self.shared_w13_scale_inv, one_expert)
        a_fp8, a_scale = ops.silu_mul_quant(h, QUANT_BLOCK, ue8m0)
        return ops.grouped_gemm_contiguous(a_fp8, a_scale, self.shared_w2_fp8, self.shared_w2_scale_inv, one_expert)
