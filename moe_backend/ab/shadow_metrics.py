"""Where shadow mode's observations go: Prometheus metrics and JSON lines.

Metrics are histograms and counters only, labelled by (layer, backend, phase): those aggregate
across processes in prometheus_client's multiprocess mode, which is how vLLM and SGLang serve
metrics recorded in their worker processes (PROMETHEUS_MULTIPROC_DIR; docs/ab-testing.md).
prometheus_client is optional (`pip install -e '<moe-backend clone>[ab]'`): without it, shadow mode still
writes JSON lines when MOE_BACKEND_SHADOW_LOG is set, and says once that metrics are off.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import weakref

from moe_backend._install import extra_install_command
from moe_backend._json_file import json_safe

__all__ = ["ShadowSink", "METRIC_PREFIX"]

METRIC_PREFIX = "moe_backend_shadow"
LABELS = ("layer", "backend", "phase")
_LATENCY_BUCKETS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)
# Correct FP8 kernels differ by ~1e-3 (rounding); the layer tolerance is 1e-2; above is a bug.
_REL_ERR_BUCKETS = (1e-5, 1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.3, 1.0)
_MAX_ABS_BUCKETS = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
_AGREEMENT_BUCKETS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
_METRICS_BY_REGISTRY: dict[int, dict] = {}
_LOCK = threading.Lock()


def _metrics(registry) -> dict | None:
    """The metric objects on `registry` (None: prometheus_client's default REGISTRY), created once
    per registry: registering a name twice is an error in prometheus_client."""
    try:
        import prometheus_client as prom
    except ImportError:
        return None
    registry = registry if registry is not None else prom.REGISTRY
    with _LOCK:
        found = _METRICS_BY_REGISTRY.get(id(registry))
        if found is not None and found["registry"] is registry:
            return found
        p, kw = METRIC_PREFIX, dict(registry=registry)
        found = {
            "registry": registry,
            "calls": prom.Counter(f"{p}_calls", "MoE calls seen by shadow mode (sampled or not)", LABELS, **kw),
            "samples": prom.Counter(f"{p}_samples", "MoE calls also run on the shadow backend", LABELS, **kw),
            "latency": prom.Histogram(
                f"{p}_latency_seconds",
                "shadow backend time per MoE call (on its side stream, concurrent with serving)",
                LABELS,
                buckets=_LATENCY_BUCKETS,
                **kw,
            ),
            "rel_err": prom.Histogram(
                f"{p}_relative_error",
                "||shadow - served|| / ||served|| per MoE call",
                LABELS,
                buckets=_REL_ERR_BUCKETS,
                **kw,
            ),
            "max_abs": prom.Histogram(
                f"{p}_max_abs_error", "max |shadow - served| per MoE call", LABELS, buckets=_MAX_ABS_BUCKETS, **kw
            ),
            "agreement": prom.Histogram(
                f"{p}_argmax_agreement",
                "fraction of output rows whose argmax agrees",
                LABELS,
                buckets=_AGREEMENT_BUCKETS,
                **kw,
            ),
            "skipped": prom.Counter(
                f"{p}_skipped", "sampled calls not run (graph capture, backlog)", ("backend", "reason"), **kw
            ),
            "errors": prom.Counter(f"{p}_errors", "shadow runs that raised", ("backend", "error"), **kw),
        }
        _METRICS_BY_REGISTRY[id(registry)] = found
        return found


class ShadowSink:
    """Records observations to Prometheus (`registry`, default prometheus_client.REGISTRY) and, when
    `log_path` is given, one JSON object per line appended to that file."""

    def __init__(self, registry=None, log_path: str | None = None) -> None:
        self._metrics = _metrics(registry)
        if self._metrics is None:
            print(
                "[moe_backend] shadow mode: prometheus_client is not installed, metrics are off "
                f"({extra_install_command('ab')})",
                file=sys.stderr,
                flush=True,
            )
        self._fd = None
        self._closer = None
        if log_path:
            try:
                self._fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as exc:
                raise ValueError(f"MOE_BACKEND_SHADOW_LOG: cannot open {log_path!r} for appending: {exc}") from None
            # A sink dropped without close() (a Shadow replaced or garbage-collected) still closes its log.
            self._closer = weakref.finalize(self, os.close, self._fd)
        self._counters: dict[tuple, object] = {}

    def _child(self, name: str, labels: tuple):
        # labels() takes a lock and builds a key: cache the children, calls are per MoE layer.
        key = (name, labels)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self._metrics[name].labels(*labels)
        return child

    def call(self, layer: str, backend: str, phase: str, n: int = 1) -> None:
        if self._metrics is not None:
            self._child("calls", (layer, backend, phase)).inc(n)

    def skipped(self, backend: str, reason: str) -> None:
        if self._metrics is not None:
            self._child("skipped", (backend, reason)).inc()

    def error(self, backend: str, error: str) -> None:
        if self._metrics is not None:
            self._child("errors", (backend, error)).inc()

    def record(
        self,
        *,
        layer: str,
        backend: str,
        phase: str,
        rows: int,
        latency_s: float,
        rel_err: float,
        max_abs: float,
        argmax_agreement: float,
    ) -> None:
        labels = (layer, backend, phase)
        if self._metrics is not None:
            self._child("samples", labels).inc()
            self._child("latency", labels).observe(latency_s)
            self._child("rel_err", labels).observe(rel_err)
            self._child("max_abs", labels).observe(max_abs)
            self._child("agreement", labels).observe(argmax_agreement)
        if self._fd is not None:
            line = json.dumps(
                json_safe(
                    {
                        "time": round(time.time(), 6),
                        "pid": os.getpid(),
                        "layer": layer,
                        "backend": backend,
                        "phase": phase,
                        "rows": rows,
                        "latency_s": latency_s,
                        "rel_err": rel_err,
                        "max_abs": max_abs,
                        "argmax_agreement": argmax_agreement,
                    }
                )
            )
            os.write(self._fd, (line + "\n").encode())  # one O_APPEND write: lines of processes never interleave

    def close(self) -> None:
        if self._closer is not None:
            self._closer()  # closes the log once, however often close() is called
        self._fd = self._closer = None
