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

import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import torch

from moe_backend.ab.backends import Backend, get_backend
from moe_backend.ab.divergence import SUMS, divergence_sums, from_sums
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
# The slow path (publish the calls tally, record finished shadow runs) runs at least this often.
FLUSH_EVERY = 128


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


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every Shadow of the process: shadow runs queue behind each
    other, and the eager graphs a shadow backend captured on it (keyed by stream) serve them all."""
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return side


@dataclass
class _Pending:
    """A shadow run queued on the side stream, read back once `done` has completed."""

    done: torch.cuda.Event
    start: torch.cuda.Event
    stop: torch.cuda.Event
    host: torch.Tensor  # a row of the pinned read-back buffer: divergence_sums' five values
    slot: tuple  # (device, row) to hand back
    label: str
    backend: str
    phase: str


class Shadow:
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
        self.targets = parse_shadow_spec(targets, "shadow") if isinstance(targets, str) else list(targets)
        if not self.targets or not all(isinstance(t, ShadowTarget) for t in self.targets):
            raise TypeError("targets: expected a 'backend:rate' spec or a list of ShadowTarget")
        self._backends: list[tuple[Backend, float]] = [(get_backend(t.backend), t.rate) for t in self.targets]
        self._rng = random.Random(seed)
        # Labels batches without a phase by the process's policy, read once (this runs per MoE call).
        self._policy = Policy.from_env()
        self.sink = ShadowSink(registry, log_path)
        self._layers: dict[int, str] = {}  # w13 address -> layer label, in first-call order
        self._pending: deque[_Pending] = deque()
        self._host: dict[torch.device, torch.Tensor] = {}  # pinned [MAX_PENDING, 5] read-back rows
        self._free_rows: dict[torch.device, deque] = {}
        self._warned: set[tuple[str, str]] = set()  # (backend, exception type) already reported
        # (id of the weights' holder, tokens, phase argument, layer argument) -> [calls, w13, holder]
        # since the last publish; the holder is kept so its id stays its own until then.
        self._tally: dict[tuple, list] = {}
        self._due_in = [self._gap(rate) for _, rate in self._backends]  # calls to each one's next sample
        self._calls_before = 0  # calls up to the last slow path
        self._armed = 0  # the countdown's start: calls from the last slow path to the next
        self._countdown = 0
        self._arm()
        self.sampled = 0

    @property
    def calls(self) -> int:
        """Calls seen, sampled or not (one that reaches the slow path while a CUDA graph is being
        captured is not counted)."""
        return self._calls_before + self._armed - self._countdown

    # ---- sampling ----
    def _gap(self, rate: float) -> int:
        """Calls up to and including the next sampled one: geometric, P(gap = k) = (1-r)^(k-1) r."""
        if rate >= 1.0:
            return 1
        gap = math.log(1.0 - self._rng.random()) / math.log1p(-rate)
        return 1 + int(min(gap, 2.0**62))  # a vanishing rate: never, in practice (and no overflow)

    def _arm(self) -> None:
        self._armed = self._countdown = min(min(self._due_in), FLUSH_EVERY)

    def _due(self) -> list[Backend]:
        """At the countdown's end: the backends whose sample falls on this call (their next gaps
        drawn), the countdown re-armed."""
        elapsed = self._armed
        self._calls_before += elapsed
        chosen = []
        for i, (backend, rate) in enumerate(self._backends):
            self._due_in[i] -= elapsed
            if self._due_in[i] == 0:
                chosen.append(backend)
                self._due_in[i] = self._gap(rate)
        self._arm()
        return chosen

    def _sample(self) -> list[Backend]:
        """One call's sampling decision: the backends sampled on it (usually none)."""
        self._countdown -= 1
        return [] if self._countdown > 0 else self._due()

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
        if _capturing():
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
        if chosen and copy_inputs and primary.is_cuda:
            copies = self._copies(chosen, (primary, x, x_scale, topk_weights, topk_ids))
            if copies is None:
                return
            primary, x, x_scale, topk_weights, topk_ids = copies
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
                    num_global_experts=num_global_experts,
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

    # ---- running and reading back ----
    def _copies(self, chosen: list[Backend], tensors: tuple) -> tuple | None:
        """Copies of a sampled call's tensors, queued on the serving stream (so they hold what the
        served call saw); None, counted as an error of each chosen backend, if they fail."""
        try:
            return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in tensors)
        except Exception as exc:  # noqa: BLE001 - out of memory for the copies must not fail serving
            for b in chosen:
                self._failed(b, exc)
            return None

    def _failed(self, backend: Backend, exc: Exception) -> None:
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

    def _run(self, backend: Backend, label: str, phase: str, primary: torch.Tensor, valid_fn, fn, inputs) -> None:
        try:
            if primary.is_cuda:
                self._run_cuda(backend, label, phase, primary, valid_fn, fn, inputs)
            else:
                self.sampled += 1
                start = time.perf_counter()
                out = fn()
                latency = time.perf_counter() - start
                valid = valid_fn() if valid_fn else None
                stats, rows = _finished(divergence_sums(out, primary, valid).tolist())
                self._record(label, backend.name, phase, rows, latency, stats)
        except Exception as exc:  # noqa: BLE001 - a shadow failure must never fail the served request
            self._failed(backend, exc)

    def _host_row(self, device: torch.device) -> tuple[torch.Tensor, tuple] | None:
        """A free row of the device's pinned read-back buffer (allocated on first use), or None
        when `MAX_PENDING` runs are in flight."""
        free = self._free_rows.get(device)
        if free is None:
            self._host[device] = torch.zeros(MAX_PENDING, len(SUMS), dtype=torch.float32, pin_memory=True)
            free = self._free_rows[device] = deque(range(MAX_PENDING))
        if not free:
            return None
        row = free.popleft()
        return self._host[device][row], (device, row)

    def _run_cuda(self, backend, label, phase, primary, valid_fn, fn, inputs) -> None:
        device = primary.device
        found = self._host_row(device)
        if found is None:
            self.sink.skipped(backend.name, "backlog")
            return
        host, slot = found
        self.sampled += 1
        side = _side_stream(device)
        try:
            side.wait_stream(torch.cuda.current_stream(device))  # the served output is complete
            # The serving stream may free and reuse these while the side stream still reads them;
            # marked before any launch, so a shadow that fails half-way is covered too.
            for t in (primary, *inputs):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(side)
            start, stop, done = (torch.cuda.Event(enable_timing=t) for t in (True, True, False))
            with torch.cuda.stream(side):
                start.record()
                out = fn()
                stop.record()
                valid = valid_fn() if valid_fn else None
                host.copy_(divergence_sums(out, primary, valid), non_blocking=True)
                done.record()
        except BaseException:
            self._free_rows[device].append(slot[1])
            raise
        self._pending.append(_Pending(done, start, stop, host, slot, label, backend.name, phase))

    def _drain(self, wait: bool = False) -> None:
        while self._pending and (wait or self._pending[0].done.query()):
            run = self._pending.popleft()
            if wait:
                run.done.synchronize()
            stats, rows = _finished(run.host.tolist())  # pinned host memory the copy has filled
            self._free_rows[run.slot[0]].append(run.slot[1])
            self._record(run.label, run.backend, run.phase, rows, run.start.elapsed_time(run.stop) / 1e3, stats)

    def _record(self, label, name, phase, rows, latency_s, stats) -> None:
        self.sink.record(
            layer=label,
            backend=name,
            phase=phase,
            rows=rows,
            latency_s=latency_s,
            rel_err=stats["rel_err"],
            max_abs=stats["max_abs"],
            argmax_agreement=stats["argmax_agreement"],
        )

    def flush(self) -> None:
        """Waits for every shadow run in flight and records it, and publishes the calls counted
        since the last slow path (tests; before a scrape that must be exact; shutdown)."""
        self._publish()
        self._drain(wait=True)


def _finished(sums: list[float]) -> tuple[dict[str, float], int]:
    return from_sums(sums), int(sums[SUMS.index("rows")])


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
    """The engine hook after a served `routed_experts` call (a no-op unless shadow mode is on).
    Engines reuse their buffers (vLLM's workspace, DeepEP's receive buffers), so a sampled call's
    tensors are copied for the side stream unless `copy_inputs=False`."""
    s = _resolve(shadow)
    if s is not None:
        kwargs.setdefault("copy_inputs", True)
        s.observe_routed(primary, *args, **kwargs)


def observe_layer(layer, out: torch.Tensor, x_fp8, x_scale, topk_weights, topk_ids, phase) -> None:
    """`DeepseekV3MoE.forward`'s hook, after its routed experts (the shared expert is the same
    computation on either backend, so it is left out of the comparison)."""
    s = layer.shadow
    if s is None:
        s = from_env()
        if s is None:
            return
    elif not isinstance(s, Shadow):
        s = shadow_arg(s)
    if s._skip(layer, x_fp8.shape[0], phase, None):
        return
    s._routed_due(
        out,
        x_fp8,
        layer,
        topk_weights,
        topk_ids,
        x_scale,
        layer.expert_start,
        layer.config.ue8m0_scales,
        phase,
        None,
        layer.config.n_routed_experts,
        None,
        False,  # the layer's tensors are its own, fresh per call: record_stream covers them
    )


def observe_masked(primary, *args, shadow=None, **kwargs) -> None:
    """The engine hook after a served `masked_experts` call (a no-op unless shadow mode is on);
    copies as `observe_routed`."""
    s = _resolve(shadow)
    if s is not None:
        kwargs.setdefault("copy_inputs", True)
        s.observe_masked(primary, *args, **kwargs)
