"""Shadow mode's runs: a sampled call re-run on a target backend and its divergence read back.
On CUDA the run goes on a per-device side stream, so serving does not wait for it, and its five
divergence sums come back through pinned memory once its event completes; at most `MAX_PENDING`
runs are in flight per device. Nothing runs while a CUDA graph is being captured.

A backend whose plan needs the layout's rows in use on the host (`Plan.rows_on_host`: DeepGEMM's
contiguous kernel) runs in two stages, still without a sync: the side stream counts the rows and
copies the count into pinned memory; a later slow path whose query finds it there launches the
run with it. Its inputs are copies, as the served call's buffers may be reused meanwhile."""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from moe_backend.ab.backends import Backend
from moe_backend.ab.divergence import SUMS, divergence_sums, from_sums

__all__ = ["MAX_PENDING", "capturing", "side_stream", "Staged", "Pending", "ShadowRuns"]

MAX_PENDING = 32


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every Shadow of the process: shadow runs queue behind each
    other, and the eager graphs a shadow backend captured on it (keyed by stream) serve them all."""
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return side


@dataclass
class Staged:
    """A shadow run waiting for its rows in use (`ready`: the count is in `rows`), then launched."""

    ready: torch.cuda.Event
    rows: torch.Tensor  # a pinned int32 [1] view: the layout's rows in use
    run: Callable[[int], torch.Tensor]  # the backend's call given those rows
    primary: torch.Tensor
    host: torch.Tensor
    slot: tuple
    label: str
    backend: Backend
    phase: str


@dataclass
class Pending:
    """A shadow run queued on the side stream, read back once `done` has completed."""

    done: torch.cuda.Event
    start: torch.cuda.Event
    stop: torch.cuda.Event
    host: torch.Tensor  # a row of the pinned read-back buffer: divergence_sums' five values
    slot: tuple  # (device, row) to hand back
    label: str
    backend: str
    phase: str


class ShadowRuns:
    """The running part of `Shadow`: it reads `self.sink` (a ShadowSink) and owns the runs in
    flight, the pinned read-back rows and the `sampled` count. A run that fails is counted and
    warned once, never raised into serving."""

    def _init_runs(self) -> None:
        self._staged: deque[Staged] = deque()
        self._pending: deque[Pending] = deque()
        self._host: dict[torch.device, torch.Tensor] = {}  # pinned [MAX_PENDING, 5] read-back rows
        self._host_rows: dict[torch.device, torch.Tensor] = {}  # pinned int32 [MAX_PENDING]: staged counts
        self._free_rows: dict[torch.device, deque] = {}
        self._warned: set[tuple[str, str]] = set()  # (backend, exception type) already reported
        self.sampled = 0

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

    def _run(
        self, backend: Backend, label: str, phase: str, primary: torch.Tensor, valid_fn, fn, inputs, rows_fn=None
    ) -> None:
        """fn(): the backend's output; rows_fn (CUDA, optional): queues the layout's rows in use
        (int32 `[1]`) or returns None; with a count, fn(used_rows) runs in a later stage."""
        try:
            if primary.is_cuda:
                self._run_cuda(backend, label, phase, primary, valid_fn, fn, inputs, rows_fn)
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
            self._host_rows[device] = torch.zeros(MAX_PENDING, dtype=torch.int32, pin_memory=True)
            free = self._free_rows[device] = deque(range(MAX_PENDING))
        if not free:
            return None
        row = free.popleft()
        return self._host[device][row], (device, row)

    def _run_cuda(self, backend, label, phase, primary, valid_fn, fn, inputs, rows_fn=None) -> None:
        device = primary.device
        found = self._host_row(device)
        if found is None:
            self.sink.skipped(backend.name, "backlog")
            return
        host, slot = found
        self.sampled += 1
        side = side_stream(device)
        try:
            side.wait_stream(torch.cuda.current_stream(device))  # the served output is complete
            # The serving stream may free and reuse these while the side stream still reads them;
            # marked before any launch, so a shadow that fails half-way is covered too.
            for t in (primary, *inputs):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(side)
            with torch.cuda.stream(side):
                rows = rows_fn() if rows_fn is not None else None
                if rows is not None:
                    pinned = self._host_rows[device][slot[1] : slot[1] + 1]
                    pinned.copy_(rows, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                    self._staged.append(Staged(ready, pinned, fn, primary, host, slot, label, backend, phase))
                    return
            self._launch(side, fn, primary, valid_fn, host, slot, label, backend.name, phase)
        except BaseException:
            self._free_rows[device].append(slot[1])
            raise

    def _launch(self, side, fn, primary, valid_fn, host, slot, label: str, backend: str, phase: str) -> None:
        """Queues the run and its divergence sums on the side stream; read back by `_drain`."""
        start, stop, done = (torch.cuda.Event(enable_timing=t) for t in (True, True, False))
        with torch.cuda.stream(side):
            start.record()
            out = fn()
            stop.record()
            valid = valid_fn() if valid_fn else None
            host.copy_(divergence_sums(out, primary, valid), non_blocking=True)
            done.record()
        self._pending.append(Pending(done, start, stop, host, slot, label, backend, phase))

    def _launch_staged(self, wait: bool) -> None:
        """Launches the staged runs whose rows in use have reached the host (all of them, waiting
        for each, when `wait`), in the order they were sampled."""
        while self._staged and (wait or self._staged[0].ready.query()):
            run = self._staged.popleft()
            if wait:
                run.ready.synchronize()
            used_rows = int(run.rows[0])  # pinned host memory the copy has filled
            try:
                side = side_stream(run.primary.device)
                self._launch(
                    side, lambda: run.run(used_rows), run.primary, None, run.host, run.slot, run.label,
                    run.backend.name, run.phase,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a shadow failure must never fail the served request
                self._free_rows[run.slot[0]].append(run.slot[1])
                self._failed(run.backend, exc)

    def _drain(self, wait: bool = False) -> None:
        self._launch_staged(wait)
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


def _finished(sums: list[float]) -> tuple[dict[str, float], int]:
    return from_sums(sums), int(sums[SUMS.index("rows")])
