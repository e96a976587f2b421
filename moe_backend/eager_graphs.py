"""Eager calls of the routed experts served by CUDA graphs.

An eager call launches about eight kernels, and their Python launch cost (argument binding,
specialization keys, packing) is larger than the kernels' own time at decode and small prefill.
When the plan carries a `graph_plan` (`moe_backend.dispatch.plan.token_bucket`), the call copies
its inputs into static buffers, replays that plan's graph, and copies the rows it asked for out:
four small copies and one replay instead of the pipeline's launches.

- One graph per (bucket plan, weights, expert offset, scale format), captured on first use after
  a warm-up run (JIT compiles and occupancy look-ups happen outside the capture).
- Static buffers are sized for the policy's `graph_max_tokens` and shared by every layer on a
  (device, stream): each bucket's graph works on leading views of them. Tokens past the call's
  count carry id -1, so they route nowhere; their output rows are never copied out.
- Every graph allocates from one memory pool per (device, stream), captured on one stream per
  pool (the allocator reuses a freed block only on its own stream). Replays on a stream run one
  at a time, and nothing a graph leaves behind lives in the pool (its output is the static
  buffer), so graphs of one stream may reuse each other's intermediates in any order; graphs of
  different streams (shadow mode's side stream) may run at once and never share a pool.
- A capture that fails (an operation that cannot be captured) is remembered and that key runs
  eagerly from then on, with one warning.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from moe_backend.dispatch.plan import Plan

__all__ = ["run_graphed", "clear", "cache_sizes", "bucket_args", "MAX_GRAPHS"]

# Graphs kept (least recently used dropped first): 61 MoE layers x the default policy's buckets fit.
MAX_GRAPHS = 1024


@dataclass
class _StaticIO:
    x: torch.Tensor  # [capacity, H] in the caller's dtype (fp8 when prequantized)
    x_scale: torch.Tensor | None  # [capacity, H/128] f32 when prequantized
    ids: torch.Tensor  # [capacity, k]; -1 past the rows in use
    weights: torch.Tensor  # [capacity, k] f32
    out: torch.Tensor  # [capacity, H] bf16
    dirty_rows: int = 0  # rows of `ids` that may hold ids other than -1
    # tokens -> leading views (x, x_scale, ids, weights, out): slicing five tensors per call costs
    # more host time than a dict look-up.
    views: dict[int, tuple] = field(default_factory=dict)

    def leading(self, tokens: int) -> tuple:
        views = self.views.get(tokens)
        if views is None:
            x_scale = None if self.x_scale is None else self.x_scale[:tokens]
            views = (self.x[:tokens], x_scale, self.ids[:tokens], self.weights[:tokens], self.out[:tokens])
            self.views[tokens] = views
        return views


_static: dict[tuple, _StaticIO] = {}
# key -> (bucket plan, graph or None when its capture failed). The key holds the plan's id (hashing
# a plan per call costs more than the copies); the value keeps the plan alive so the id stays its own.
_graphs: OrderedDict[tuple, tuple[Plan, torch.cuda.CUDAGraph | None]] = OrderedDict()
_pools: dict[tuple[int, int], tuple] = {}  # (device, serving stream) -> (pool, capture stream)
_eager_once: dict[int, Plan] = {}  # plans (by id, kept alive here) that have run eagerly once
# The caller's current stream as its cudaStream_t, from torch's raw getter where the build has it:
# torch.cuda.current_stream builds a Stream object on each call.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_id(device: torch.device) -> int:
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def clear() -> None:
    """Drops every graph, pool and static buffer (tests; freeing memory)."""
    _graphs.clear()
    _eager_once.clear()
    _static.clear()
    _pools.clear()


def cache_sizes() -> dict[str, int]:
    return {
        "graphs": len(_graphs),
        "static_buffers": len(_static),
        "pools": len(_pools),
        "plans_seen": len(_eager_once),
    }


def _static_io(
    capacity: int, x: torch.Tensor, x_scale: torch.Tensor | None, ids: torch.Tensor, stream_id: int
) -> _StaticIO:
    key = (x.device.index, stream_id, capacity, x.shape[1], x.dtype, x_scale is None, ids.shape[1], ids.dtype)
    io = _static.get(key)
    if io is None:
        dev, hidden, topk = x.device, x.shape[1], ids.shape[1]
        # Zeros, not empty: rows past a call's tokens are read (never used) by whole-tensor steps.
        io = _StaticIO(
            x=torch.zeros(capacity, hidden, dtype=x.dtype, device=dev),
            x_scale=None
            if x_scale is None
            else torch.ones(capacity, x_scale.shape[1], dtype=torch.float32, device=dev),
            ids=torch.full((capacity, topk), -1, dtype=ids.dtype, device=dev),
            weights=torch.zeros(capacity, topk, dtype=torch.float32, device=dev),
            out=torch.empty(capacity, hidden, dtype=torch.bfloat16, device=dev),
        )
        _static[key] = io
    return io


def _pool(device_index: int, stream_id: int) -> tuple:
    """(memory pool, capture stream) per (device, serving stream): graphs replayed on one stream run
    one at a time, so they may share intermediates; a graph on another stream (shadow mode's side
    stream, an engine's second stream) can run at the same time and must not. Every graph of a pool
    is captured on the same stream: the caching allocator hands a freed block only to allocations
    on the stream that freed it, so captures on streams drawn afresh (torch.cuda.Stream() deals
    them round-robin) would each keep intermediates of their own."""
    key = (device_index, stream_id)
    if key not in _pools:
        _pools[key] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(device=device_index))
    return _pools[key]


def run_graphed(
    plan: Plan,
    execute: Callable[..., torch.Tensor],
    capacity: int,
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int,
    ue8m0: bool,
    out: torch.Tensor | None,
    *,
    used_rows: int | None = None,
) -> torch.Tensor | None:
    """Runs `plan.graph_plan` as a graph on checked operands; returns the [T, H] result, or None
    when this key cannot be graphed (the caller then runs the plan eagerly). used_rows: for a plan
    with `rows_on_host`, the rows its GEMMs walk (a `rows_bucket`): one graph per bucket.

    execute(plan, x, x_scale, w13, w13_s, w2, w2_s, topk_weights, topk_ids, expert_start, ue8m0, out)
    runs a plan's kernels (`moe_backend.experts` passes `moe_backend.plan_execution`'s executor)."""
    if id(plan) not in _eager_once:
        # The first call of a plan runs eagerly: it compiles that plan's own kernels, which a later
        # capture of this shape by the caller (an engine's decode graphs) then finds ready.
        _eager_once[id(plan)] = plan
        return None
    bucket_plan = plan.graph_plan
    tokens, bucket = x.shape[0], bucket_plan.num_tokens
    stream_id = _stream_id(x.device)
    io = _static_io(capacity, x, x_scale, topk_ids, stream_id)
    # The graph reads and writes `io`: its key names everything `io`'s does (capacity: two
    # policies with different graph_max_tokens share plans, not static buffers).
    key = (
        id(bucket_plan),
        stream_id,
        capacity,
        w13_fp8.data_ptr(),
        w13_scale_inv.data_ptr(),
        w2_fp8.data_ptr(),
        w2_scale_inv.data_ptr(),
        expert_start,
        ue8m0,
        x.dtype,
        topk_ids.shape[1],
        topk_ids.dtype,
        used_rows,
    )
    entry = _graphs.get(key)
    graph = False if entry is None else entry[1]
    if graph is None:
        return None
    # Inputs into the static buffers; ids past this call's tokens back to -1.
    x_in, x_scale_in, ids_in, weights_in, out_rows = io.leading(tokens)
    x_in.copy_(x)
    if x_scale is not None:
        x_scale_in.copy_(x_scale)
    if io.dirty_rows > tokens:
        io.ids[tokens : io.dirty_rows].fill_(-1)
    ids_in.copy_(topk_ids)
    weights_in.copy_(topk_weights)
    io.dirty_rows = tokens
    if graph is False:
        if used_rows is not None:
            execute = functools.partial(execute, used_rows=used_rows)
        stream = torch.cuda.current_stream(x.device)
        graph = _capture(
            bucket_plan, execute, io, bucket, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, expert_start, ue8m0, stream
        )
        _graphs[key] = (bucket_plan, graph)
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
        if graph is None:
            return None
    else:
        _graphs.move_to_end(key)
    graph.replay()
    if out is not None:
        return out.copy_(out_rows)
    return out_rows.clone()


def bucket_args(plan: Plan, io: _StaticIO, bucket: int, *weights, expert_start: int, ue8m0: bool) -> tuple:
    """The executor's arguments for a bucket's graph: leading views of the static buffers; weights
    are (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv)."""
    x_scale = None if io.x_scale is None else io.x_scale[:bucket]
    routing = (io.weights[:bucket], io.ids[:bucket])
    return (plan, io.x[:bucket], x_scale, *weights, *routing, expert_start, ue8m0, io.out[:bucket])


def _capture(
    plan: Plan,
    execute,
    io: _StaticIO,
    bucket: int,
    w13_fp8,
    w13_scale_inv,
    w2_fp8,
    w2_scale_inv,
    expert_start: int,
    ue8m0: bool,
    stream: torch.cuda.Stream,
) -> torch.cuda.CUDAGraph | None:
    weights = (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv)
    args = bucket_args(plan, io, bucket, *weights, expert_start=expert_start, ue8m0=ue8m0)
    # Warm-up on the capture stream (compiles, occupancy look-ups, lazy inits stay out of the capture).
    pool, side = _pool(io.x.device.index, stream.cuda_stream)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        execute(*args)
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # capture_begin/end rather than torch.cuda.graph(), which synchronizes the device and empties
    # the allocator's cache on entry: the side stream already waits for the caller's work. Thread-
    # local capture mode: a lazy capture runs inside a serving process, whose other threads (an
    # engine's output thread copying to the host) must stay free to allocate and synchronize their
    # own streams meanwhile; in the global mode such a call fails in that thread and breaks this
    # capture.
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                execute(*args)
            finally:
                graph.capture_end()
    except Exception as exc:  # any capture failure: this key launches kernel by kernel
        warnings.warn(
            f"moe_backend: eager calls of plan [{plan.describe()}] run without a CUDA graph: "
            f"capture failed ({type(exc).__name__}: {exc})",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    stream.wait_stream(side)
    return graph
