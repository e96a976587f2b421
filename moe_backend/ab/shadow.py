"""Shadow mode: a sampled fraction of served MoE calls also runs on a second backend, and how far
its output is from the served one (and how long it took) is recorded. The served output is never
touched: the shadow reads the served call's inputs and output and writes only its own buffers.

Switched on by `MOE_BACKEND_SHADOW="deepgemm:0.01"` (backend:rate, comma-separated for several;
rate in (0, 1]) or by `DeepseekV3MoE(..., shadow=...)`. `MOE_BACKEND_SHADOW_SEED` seeds the
sampler (default 0: the same calls are sampled on every run); `MOE_BACKEND_SHADOW_LOG` is a JSON
lines file. Rules: nothing runs while a CUDA graph is being captured (a graph replays only the
served path); on CUDA the shadow runs on a side stream, so serving does not wait for it, and its
results are read back from pinned memory once its event completes (no host sync on the serving
stream); at most `MAX_PENDING` shadow runs are in flight, further samples are skipped.

The parts, one module each: `shadow_spec` (the targets), `shadow_sampling` (which calls are
sampled), `shadow_runs` (running a sample and reading it back), `shadow` (the `Shadow` that joins
them, with the calls tally and the two call formats), `shadow_hooks` (what engines call).
"""

from __future__ import annotations

import torch

from moe_backend.ab.backends import Backend, get_backend
from moe_backend.ab.shadow_metrics import ShadowSink
from moe_backend.ab.shadow_runs import ShadowRuns, capturing
from moe_backend.ab.shadow_sampling import SamplingCountdown
from moe_backend.ab.shadow_spec import ShadowTarget, check_shadow_targets, parse_shadow_spec
from moe_backend.dispatch.policy import Policy

__all__ = ["Shadow", "ShadowTarget", "parse_shadow_spec"]


def _weights(experts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv) from a 4-tuple, or from any object holding
    them under those names (our layer, SGLang's quant info)."""
    if isinstance(experts, (tuple, list)) and len(experts) == 4:
        return tuple(experts)
    try:
        return experts.w13_fp8, experts.w13_scale_inv, experts.w2_fp8, experts.w2_scale_inv
    except AttributeError:
        raise TypeError(
            f"experts: expected (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv) or an object with "
            f"those attributes, got {type(experts).__name__}"
        ) from None


class Shadow(SamplingCountdown, ShadowRuns):
    """Samples MoE calls and runs them on the target backends. `observe_*` never raise into
    serving: a failing shadow run is counted (`moe_backend_shadow_errors_total`) and warned once.

    Cost to serving. A call that is not sampled decrements a countdown and adds one to a tally:
    the sampling decisions are drawn ahead, as each backend's geometric gap to its next sample
    (the same Bernoulli(rate) per call as a draw per call), and the calls counter is published
    from the tally on the slow path. The slow path runs on a sampled call and at least every
    `FLUSH_EVERY` calls: it publishes the tally and records the shadow runs whose event has
    completed (a query, never a wait). A sampled CUDA call records an event on the serving stream
    for the side stream to wait on and launches the shadow and its divergence sums on the side
    stream, which copies five numbers into a pinned buffer allocated once; nothing waits for
    them on the serving path."""

    def __init__(
        self, targets: str | list[ShadowTarget], *, seed: int = 0, registry=None, log_path: str | None = None
    ) -> None:
        self.targets = (
            parse_shadow_spec(targets, "shadow") if isinstance(targets, str) else check_shadow_targets(targets)
        )
        self._backends: list[tuple[Backend, float]] = [(get_backend(t.backend), t.rate) for t in self.targets]
        # Labels batches without a phase by the process's policy, read once (this runs per MoE call).
        self._policy = Policy.from_env()
        self.sink = ShadowSink(registry, log_path)
        self._layers: dict[int, str] = {}  # w13 address -> layer label, in first-call order
        self._init_runs()
        # (id of the weights' holder, tokens, phase argument, layer argument) -> [calls, w13, holder]
        # since the last publish; the holder is kept so its id stays its own until then.
        self._tally: dict[tuple, list] = {}
        self._init_sampling(seed)

    def _skip(self, experts, tokens: int, phase, layer) -> bool:
        """The per-call fast path: True (the call tallied) unless the slow path is due."""
        self._countdown -= 1
        if self._countdown > 0:
            self._count(experts, tokens, phase, layer)
            return True
        return False

    def _count(self, experts, tokens: int, phase, layer) -> None:
        holder = experts[0] if type(experts) in (tuple, list) else experts
        key = (id(holder), tokens, phase, layer)
        entry = self._tally.get(key)
        if entry is None:
            self._tally[key] = [1, _weights(experts)[0], holder]  # checked on first sight
        else:
            entry[0] += 1

    def _publish(self) -> None:
        """The tallied calls into the calls counter, in first-call order (which numbers the layers)."""
        tally, self._tally = self._tally, {}
        for (_, tokens, phase, layer), (n, w13, _) in tally.items():
            label, phase = self._layer(layer, w13), self._policy.phase_of(tokens, phase)
            for b, _ in self._backends:
                self.sink.call(label, b.name, phase, n)

    def _layer(self, layer, w13_fp8: torch.Tensor) -> str:
        if layer is not None:
            return str(layer)
        # Layers first run in model order, so the first-call order of their weights numbers them.
        label = self._layers.get(w13_fp8.data_ptr())
        if label is None:
            label = self._layers[w13_fp8.data_ptr()] = str(len(self._layers))
        return label

    def _begin(self, experts, tokens: int, phase, layer) -> tuple[str, list[Backend], tuple] | None:
        """The slow path of a served call: None while a CUDA graph is being captured (nothing may
        run beside it then; a sample due is skipped), else (layer label, the backends sampled on
        this call, the four weights)."""
        if capturing():
            for b in self._due():
                self.sink.skipped(b.name, "graph_capture")
            self._calls_before -= 1
            return None
        weights = _weights(experts)
        self._count(experts, tokens, phase, layer)
        self._publish()
        self._drain()
        chosen = self._due()
        label = self._layer(layer, weights[0])
        return label, chosen, weights

    # ---- the two formats ----
    def observe_routed(
        self,
        primary: torch.Tensor,
        x,
        experts,
        topk_weights,
        topk_ids,
        *,
        x_scale=None,
        expert_start: int = 0,
        ue8m0: bool = False,
        phase: str | None = None,
        expected_m: int | None = None,
        num_global_experts: int | None = None,
        layer=None,
        copy_inputs: bool = False,
    ) -> None:
        """After a served `routed_experts` call: its output `primary` `[T, H]` and arguments, the four
        weight tensors as `experts` (see `_weights`). copy_inputs: the caller may overwrite these
        buffers on the serving stream right after (an engine's workspace, a receive buffer), so
        a sampled call on CUDA hands the side stream copies taken in stream order."""
        if self._skip(experts, x.shape[0], phase, layer):
            return
        self._routed_due(
            primary,
            x,
            experts,
            topk_weights,
            topk_ids,
            x_scale,
            expert_start,
            ue8m0,
            phase,
            expected_m,
            num_global_experts,
            layer,
            copy_inputs,
        )

    def _routed_due(
        self,
        primary,
        x,
        experts,
        topk_weights,
        topk_ids,
        x_scale,
        expert_start,
        ue8m0,
        phase,
        expected_m,
        num_global_experts,
        layer,
        copy_inputs,
    ) -> None:
        started = self._begin(experts, x.shape[0], phase, layer)
        if started is None:
            return
        label, chosen, (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv) = started
        phase = self._policy.phase_of(x.shape[0], phase)
        plans = {b.name: self._plan(b, x, w13_fp8, topk_ids, x_scale, phase, expected_m, num_global_experts)
                 for b in chosen} if primary.is_cuda else {}  # fmt: skip
        staged = any(p is not None and p.rows_on_host for p in plans.values())
        if chosen and (copy_inputs or staged) and primary.is_cuda:  # a staged run reads them later
            copies = self._copies(chosen, (primary, x, x_scale, topk_weights, topk_ids))
            if copies is None:
                return
            primary, x, x_scale, topk_weights, topk_ids = copies
        for b in chosen:
            plan = plans.get(b.name)
            self._run(
                b,
                label,
                phase,
                primary,
                None,
                lambda used_rows=None, b=b: b.routed(
                    x,
                    w13_fp8,
                    w13_scale_inv,
                    w2_fp8,
                    w2_scale_inv,
                    topk_weights,
                    topk_ids,
                    x_scale=None if x_scale is None else x_scale.contiguous(),
                    expert_start=expert_start,
                    ue8m0=ue8m0,
                    phase=phase,
                    expected_m=expected_m,
                    num_global_experts=num_global_experts,
                    used_rows=used_rows,
                ),
                (x, x_scale, topk_weights, topk_ids),
                rows_fn=(lambda b=b, plan=plan: b.rows_in_use(plan, topk_ids, expert_start))
                if plan is not None and plan.rows_on_host
                else None,
            )

    @staticmethod
    def _plan(b: Backend, x, w13_fp8, topk_ids, x_scale, phase, expected_m, num_global_experts):
        """The plan `b` runs for this call, None for a registered function or one that cannot be
        made (the run then fails and is counted)."""
        try:
            return b.plan(
                x, w13_fp8, topk_ids, phase=phase, num_global_experts=num_global_experts, expected_m=expected_m,
                quantized_input=x_scale is not None,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - reported by the run itself
            return None

    def observe_masked(
        self,
        primary: torch.Tensor,
        a_fp8,
        a_scale,
        experts,
        masked_m,
        *,
        ue8m0: bool = False,
        expected_m: int | None = None,
        layer=None,
        copy_inputs: bool = False,
    ) -> None:
        """After a served `masked_experts` call: its output `primary` `[E, max_m, H]` and arguments;
        only rows m < masked_m[e] are compared (the others are not outputs). copy_inputs: as in
        `observe_routed`."""
        if self._skip(experts, 0, "decode", layer):
            return
        started = self._begin(experts, 0, "decode", layer)
        if started is None:
            return
        label, chosen, (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv) = started
        if chosen and copy_inputs and primary.is_cuda:
            copies = self._copies(chosen, (primary, a_fp8, a_scale, masked_m))
            if copies is None:
                return
            primary, a_fp8, a_scale, masked_m = copies
        max_m = a_fp8.shape[1]
        for b in chosen:

            def valid(masked_m=masked_m):
                counts = masked_m[: a_fp8.shape[0]].to(torch.int64)
                return torch.arange(max_m, device=counts.device)[None, :] < counts[:, None]  # [E, max_m]

            self._run(
                b,
                label,
                "decode",
                primary,
                valid,
                lambda b=b: b.masked(
                    a_fp8.contiguous(),
                    a_scale.contiguous(),
                    w13_fp8,
                    w13_scale_inv,
                    w2_fp8,
                    w2_scale_inv,
                    masked_m[: a_fp8.shape[0]],
                    ue8m0=ue8m0,
                    expected_m=expected_m,
                ),
                (a_fp8, a_scale, masked_m),
            )

    def flush(self) -> None:
        """Waits for every shadow run in flight and records it, and publishes the calls counted
        since the last slow path (tests; before a scrape that must be exact; shutdown)."""
        self._publish()
        self._drain(wait=True)

    def close(self) -> None:
        """`flush`, then closes the shadow log (MOE_BACKEND_SHADOW_LOG); a Shadow dropped without
        it closes its log when collected."""
        self.flush()
        self.sink.close()
