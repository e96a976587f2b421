"""Where a `DeepseekV3MoE` call diverges from the torch reference, stage by stage, for a failure
message: the router, the activations' FP8 quantization, the routed experts (as the layer ran them,
then with CUDA graphs off), the shared expert, and the output, each
as a per-row relative error against `moe_backend.reference` on the CPU.

Used by tests/test_properties.py when the layer property fails and by the history GPU test
(tests/layers/test_layer_history_gpu.py), so a divergence seen once on the device names its stage."""

from __future__ import annotations

import dataclasses

import torch

from moe_backend import eager_graphs, ops, reference
from moe_backend import experts as experts_path
from moe_backend.constants import QUANT_BLOCK
from moe_backend.dispatch.policy import Policy
from moe_backend.layers.router import noaux_tc_route
from moe_backend.quant import quantize_fp8_per_token_group


def _row_errors(got: torch.Tensor, want: torch.Tensor) -> list[float]:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)).tolist()


def _fmt(errors: list[float]) -> str:
    return "[" + ", ".join(f"{e:.1e}" for e in errors) + "]"


@dataclasses.dataclass
class LayerDiagnosis:
    """Per-row relative errors of each stage (lists of floats) and the router/quant comparisons."""

    ids_equal: bool  # the device router picked the CPU router's experts (as sets, per row)
    weights_max_diff: float  # max |topk_weights device - CPU| over matching slots
    x_scale_equal: bool  # the device quant's scales equal the reference quant's
    x_fp8_rows_differing: list[int]  # per row: FP8 codes that differ from the reference quant
    routed: list[float]  # routed experts as the layer runs them (the policy's graphs included)
    routed_eager: list[float]  # the same with graphs off (after eager_graphs.clear() if asked)
    shared: list[float] | None  # the shared expert (None: this slice has none)
    output: list[float]  # the layer's output vs the reference sum

    def stages_over(self, bound: float) -> list[str]:
        """The stages whose worst row exceeds `bound` (plus router/quant mismatches)."""
        bad = [] if self.ids_equal else ["router ids"]
        if not self.x_scale_equal or any(self.x_fp8_rows_differing):
            bad.append("x quant")
        for name in ("routed", "routed_eager", "shared", "output"):
            errors = getattr(self, name)
            if errors is not None and errors and max(errors) > bound:
                bad.append(name)
        return bad

    def __str__(self) -> str:
        return (
            f"router ids equal {self.ids_equal}, weights max diff {self.weights_max_diff:.1e}; "
            f"x quant scales equal {self.x_scale_equal}, fp8 codes differing per row {self.x_fp8_rows_differing}; "
            f"per-row rel err: routed {_fmt(self.routed)}, routed (graphs off, fresh) {_fmt(self.routed_eager)}, "
            f"shared {'-' if self.shared is None else _fmt(self.shared)}, output {_fmt(self.output)}; "
            f"eager_graphs {eager_graphs.cache_sizes()}"
        )


def diagnose_layer_call(layer, x: torch.Tensor, out: torch.Tensor, *, clear_graphs: bool = False) -> LayerDiagnosis:
    """Compares `out = layer(x)` (x bf16 `[T, H]` on the layer's device) with the reference, stage
    by stage. Runs the layer's stages again on the device (the routed experts twice: as the layer
    does, then kernel by kernel with graphs off), so it is for failure messages, not hot paths.
    clear_graphs: drop every graph, pool and static buffer first (a fresh `eager_graphs` state for
    the second run; hypothesis would then see a state-dependent failure vanish, so the property
    test leaves it off)."""
    config, ue8m0 = layer.config, layer.config.ue8m0_scales
    cpu = {name: b.cpu() for name, b in layer.named_buffers()}
    x_cpu = x.cpu()
    tokens = x.shape[0]

    # Router: device vs CPU.
    w_dev, ids_dev = noaux_tc_route(x, layer.gate_weight, layer.e_score_correction_bias, config)
    w_cpu, ids_cpu = noaux_tc_route(x_cpu, cpu["gate_weight"], cpu["e_score_correction_bias"], config)
    order_dev, order_cpu = ids_dev.cpu().long().sort(dim=1), ids_cpu.long().sort(dim=1)
    ids_equal = bool(torch.equal(order_dev.values, order_cpu.values))
    weights_max_diff = float(
        (w_dev.cpu().gather(1, order_dev.indices) - w_cpu.gather(1, order_cpu.indices)).abs().max()
    )

    # Activations' quantization: the device op vs the reference.
    xq_dev, xs_dev = ops.per_token_group_quant(x, QUANT_BLOCK, ue8m0)
    xq_ref, xs_ref = quantize_fp8_per_token_group(x_cpu, QUANT_BLOCK, ue8m0)
    x_scale_equal = bool(torch.equal(xs_dev.cpu(), xs_ref))
    x_fp8_rows_differing = (xq_dev.cpu().view(torch.uint8) != xq_ref.view(torch.uint8)).sum(dim=1).tolist()

    # Routed experts: the reference on the CPU router's choice, in the layer's local numbering.
    local = (ids_cpu >= layer.expert_start) & (ids_cpu < layer.expert_stop)
    local_ids = torch.where(local, ids_cpu.long() - layer.expert_start, -1)
    weights = ("w13_fp8", "w13_scale_inv", "w2_fp8", "w2_scale_inv")
    ref_routed = reference.routed_experts(x_cpu, *(cpu[n] for n in weights), w_cpu, local_ids, ue8m0=ue8m0).float()
    policy = layer.policy if layer.policy is not None else Policy.from_env()
    routed_args = dict(
        x_scale=xs_dev,
        expert_start=layer.expert_start,
        ue8m0=ue8m0,
        num_global_experts=config.n_routed_experts,
    )
    device_weights = tuple(getattr(layer, n) for n in weights)
    routed = experts_path.routed_experts(xq_dev, *device_weights, w_dev, ids_dev, policy=policy, **routed_args)
    if clear_graphs:
        eager_graphs.clear()
    eager_policy = dataclasses.replace(policy, graph_max_tokens=0)
    routed_eager = experts_path.routed_experts(
        xq_dev, *device_weights, w_dev, ids_dev, policy=eager_policy, **routed_args
    )

    ref_out = ref_routed.clone()
    shared = None
    if layer.with_shared_experts:
        ref_shared = reference.routed_experts(
            x_cpu,
            *(cpu["shared_" + n] for n in weights),
            torch.ones(tokens, 1),
            torch.zeros(tokens, 1, dtype=torch.int64),
            ue8m0=ue8m0,
        ).float()
        shared = _row_errors(layer.shared_expert(xq_dev, xs_dev), ref_shared)
        ref_out += ref_shared
    return LayerDiagnosis(
        ids_equal=ids_equal,
        weights_max_diff=weights_max_diff,
        x_scale_equal=x_scale_equal,
        x_fp8_rows_differing=x_fp8_rows_differing,
        routed=_row_errors(routed, ref_routed),
        routed_eager=_row_errors(routed_eager, ref_routed),
        shared=shared,
        output=_row_errors(out, ref_out),
    )
