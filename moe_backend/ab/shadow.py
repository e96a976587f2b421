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
"""

from __future__ import annotations

import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import torch

from moe_backend.ab.backends import Backend, get_backend
from moe_backend.ab.divergence import divergence
from moe_backend.ab.shadow_metrics import ShadowSink
from moe_backend.dispatch.policy import Policy
from moe_backend.env import ENV

__all__ = [
    "Shadow",
    "ShadowTarget",
    "parse_shadow_spec",
    "from_env",
    "shadow_arg",
    "observe_routed",
    "observe_masked",
    "observe_layer",
]

MAX_PENDING = 32


@dataclass(frozen=True)
class ShadowTarget:
    backend: str
    rate: float


def parse_shadow_spec(spec: str, where: str = "MOE_BACKEND_SHADOW") -> list[ShadowTarget]:
    """`backend:rate[,backend:rate...]` -> targets; ValueError naming `where` on bad input."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{where}: expected 'backend:rate', e.g. 'deepgemm:0.01', got {spec!r}")
    targets = []
    for item in (s.strip() for s in spec.split(",")):
        name, sep, rate_text = item.rpartition(":")
        if not sep or not name:
            raise ValueError(f"{where}: {item!r} is not 'backend:rate' (e.g. 'deepgemm:0.01')")
        try:
            rate = float(rate_text)
        except ValueError:
            rate = float("nan")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"{where}: the rate of {item!r} must be a number in (0, 1], got {rate_text!r}")
        try:
            get_backend(name)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if any(t.backend == name for t in targets):
            raise ValueError(f"{where}: backend {name!r} is given twice")
        targets.append(ShadowTarget(name, rate))
    return targets


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


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Shadow:
    """Samples MoE calls and runs them on the target backends. `observe_*` never raise into
    serving: a failing shadow run is counted (`moe_backend_shadow_errors_total`) and warned once."""

    def __init__(
        self, targets: str | list[ShadowTarget], *, seed: int = 0, registry=None, log_path: str | None = None
    ) -> None:
        self.targets = parse_shadow_spec(targets, "shadow") if isinstance(targets, str) else list(targets)
        if not self.targets or not all(isinstance(t, ShadowTarget) for t in self.targets):
            raise TypeError("targets: expected a 'backend:rate' spec or a list of ShadowTarget")
        self._backends: list[tuple[Backend, float]] = [(get_backend(t.backend), t.rate) for t in self.targets]
        self._rng = random.Random(seed)
        # Labels batches without a phase by the process's policy, read once (this runs per MoE call).
        self._policy = Policy.from_env()
        self.sink = ShadowSink(registry, log_path)
        self._layers: dict[int, str] = {}  # w13 address -> layer label, in first-call order
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: deque = deque()
        self._warned: set[tuple[str, str]] = set()  # (backend, exception type) already reported
        self.calls = 0
        self.sampled = 0

    # ---- sampling ----
    def _sample(self) -> list[Backend]:
        return [b for b, rate in self._backends if self._rng.random() < rate]

    def _layer(self, layer, w13_fp8: torch.Tensor) -> str:
        if layer is not None:
            return str(layer)
        # Layers first run in model order, so the first-call order of their weights numbers them.
        return self._layers.setdefault(w13_fp8.data_ptr(), str(len(self._layers)))

    def _begin(self, layer, experts) -> tuple[str, list[Backend], tuple] | None:
        """A served call's bookkeeping: None while a CUDA graph is being captured (nothing may run
        beside it then), else (layer label, the backends sampled this call, the four weights)."""
        if _capturing():
            for b, _ in self._backends:
                self.sink.skipped(b.name, "graph_capture")
            return None
        weights = _weights(experts)
        self._drain()
        label = self._layer(layer, weights[0])
        self.calls += 1
        chosen = self._sample()
        if chosen and len(self._pending) >= MAX_PENDING:
            for b in chosen:
                self.sink.skipped(b.name, "backlog")
            chosen = []
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
        layer=None,
    ) -> None:
        """After a served `routed_experts` call: its output `primary` `[T, H]` and arguments, the four
        weight tensors as `experts` (see `_weights`)."""
        started = self._begin(layer, experts)
        if started is None:
            return
        label, chosen, (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv) = started
        phase = self._policy.phase_of(x.shape[0], phase)
        for b, _ in self._backends:
            self.sink.call(label, b.name, phase)
        for b in chosen:
            self._run(
                b,
                label,
                phase,
                primary,
                None,
                lambda b=b: b.routed(
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
                ),
                (x, x_scale, topk_weights, topk_ids),
            )

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
    ) -> None:
        """After a served `masked_experts` call: its output `primary` `[E, max_m, H]` and arguments;
        only rows m < masked_m[e] are compared (the others are not outputs)."""
        started = self._begin(layer, experts)
        if started is None:
            return
        label, chosen, (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv) = started
        for b, _ in self._backends:
            self.sink.call(label, b.name, "decode")
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

    # ---- running and reading back ----
    def _run(self, backend: Backend, label: str, phase: str, primary: torch.Tensor, valid_fn, fn, inputs) -> None:
        self.sampled += 1
        try:
            if primary.is_cuda:
                self._run_cuda(backend, label, phase, primary, valid_fn, fn, inputs)
            else:
                start = time.perf_counter()
                out = fn()
                latency = time.perf_counter() - start
                valid = valid_fn() if valid_fn else None
                stats = divergence(out, primary, valid)
                rows = int(valid.sum()) if valid is not None else primary.shape[0]
                self._record(label, backend.name, phase, rows, latency, [float(v) for v in stats.values()])
        except Exception as exc:  # noqa: BLE001 - a shadow failure must never fail the served request
            kind = type(exc).__name__
            self.sink.error(backend.name, kind)
            if (backend.name, kind) not in self._warned:
                self._warned.add((backend.name, kind))
                print(
                    f"[moe_backend] shadow backend {backend.name!r} failed ({kind}: {str(exc)[:200]}); "
                    f"counted in moe_backend_shadow_errors_total, serving is unaffected",
                    file=sys.stderr,
                    flush=True,
                )

    def _run_cuda(self, backend, label, phase, primary, valid_fn, fn, inputs) -> None:
        device = primary.device
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))  # the served output is complete
        # The serving stream may free and reuse these while the side stream still reads them; marked
        # before any launch, so a shadow that fails half-way is covered too.
        for t in (primary, *inputs):
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(side)
        start, stop, done = (torch.cuda.Event(enable_timing=t) for t in (True, True, False))
        host = torch.empty(4, dtype=torch.float32, pin_memory=True)
        with torch.cuda.stream(side):
            start.record()
            out = fn()
            stop.record()
            valid = valid_fn() if valid_fn else None
            stats = divergence(out, primary, valid)
            # new_full, not torch.tensor: no host-to-device copy on the way.
            rows = valid.sum().float() if valid is not None else stats["rel_err"].new_full((), primary.shape[0])
            host.copy_(torch.stack([*stats.values(), rows]), non_blocking=True)
            done.record()
        self._pending.append((done, start, stop, host, label, backend.name, phase))

    def _drain(self, wait: bool = False) -> None:
        while self._pending and (wait or self._pending[0][0].query()):
            done, start, stop, host, label, name, phase = self._pending.popleft()
            done.synchronize()  # returns at once unless wait=True
            rel, max_abs, agree, rows = host.tolist()
            self._record(label, name, phase, int(rows), start.elapsed_time(stop) / 1e3, [rel, max_abs, agree])

    def _record(self, label, name, phase, rows, latency_s, stats) -> None:
        rel, max_abs, agree = stats
        self.sink.record(
            layer=label,
            backend=name,
            phase=phase,
            rows=rows,
            latency_s=latency_s,
            rel_err=rel,
            max_abs=max_abs,
            argmax_agreement=agree,
        )

    def flush(self) -> None:
        """Waits for every shadow run in flight and records it (tests; shutdown)."""
        self._drain(wait=True)


@lru_cache(maxsize=8)
def _from_spec(spec: str, seed: int, log_path: str | None) -> Shadow:
    return Shadow(parse_shadow_spec(spec), seed=seed, log_path=log_path)


def from_env() -> Shadow | None:
    """The process's Shadow from MOE_BACKEND_SHADOW (None when unset), built once per setting."""
    spec = ENV.shadow
    if not spec:
        return None
    return _from_spec(spec, ENV.shadow_seed, ENV.shadow_log)


def shadow_arg(shadow) -> Shadow | None:
    """A layer's `shadow=` argument, checked: a Shadow, a 'backend:rate' spec (built now, so a bad
    one fails at construction), or None (MOE_BACKEND_SHADOW decides at each call)."""
    if shadow is None or isinstance(shadow, Shadow):
        return shadow
    if isinstance(shadow, str):
        try:
            parse_shadow_spec(shadow, "shadow")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return _from_spec(shadow, ENV.shadow_seed, ENV.shadow_log)
    raise TypeError(f"shadow: expected a Shadow, a 'backend:rate' spec or None, got {type(shadow).__name__}")


def _resolve(shadow) -> Shadow | None:
    return from_env() if shadow is None else shadow_arg(shadow)


def observe_routed(primary, *args, shadow=None, **kwargs) -> None:
    """The engine hook after a served `routed_experts` call (a no-op unless shadow mode is on)."""
    s = _resolve(shadow)
    if s is not None:
        s.observe_routed(primary, *args, **kwargs)


def observe_layer(layer, out: torch.Tensor, x_fp8, x_scale, topk_weights, topk_ids, phase) -> None:
    """`DeepseekV3MoE.forward`'s hook, after its routed experts (the shared expert is the same
    computation on either backend, so it is left out of the comparison)."""
    s = _resolve(layer.shadow)
    if s is not None:
        s.observe_routed(
            out,
            x_fp8,
            layer,
            topk_weights,
            topk_ids,
            x_scale=x_scale,
            expert_start=layer.expert_start,
            ue8m0=layer.config.ue8m0_scales,
            phase=phase,
        )


def observe_masked(primary, *args, shadow=None, **kwargs) -> None:
    """The engine hook after a served `masked_experts` call (a no-op unless shadow mode is on)."""
    s = _resolve(shadow)
    if s is not None:
        s.observe_masked(primary, *args, **kwargs)
