"""Where an eager prefill layer call spends device time between its kernels, and two candidate cuts
of it, timed side by side.

Per cell (slice, tokens, routing) the policy's prefill plan runs eagerly as `bench_layer` times it
(do_bench median, L2 flushed before each call), in interleaved rounds beside:
- `pdl`: the same plan with its kernels launched as programmatic dependents (the plan does this at
  decode only; our CUDA GEMMs launch normally, so only the Triton kernels' boundaries change);
- `pipe:sN`: the plan with `lab/permute_quant_pipelined.py` (N stages) in place of the shipped fused
  permute + quant (plans that run it: EP8);
- `pdl+pipe:sN`.
Every variant's output is compared with the plan's (bytes). Then one torch.profiler trace of the
plan's eager calls, each after the same L2 flush: per call, the span from its first kernel's start
to its last kernel's end, the kernels' summed durations, and the idle gaps between consecutive
kernels (which kernel each follows), so a layer time above its kernels' sum is located.

    python -m lab.prefill_launch_gaps [--cells ep8:8192,ep8:16384] [--routings uniform,zipf:0.6]
        [--stages 2] [--json PATH]

GPU only; `--list` prints the variants on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from lab._plan_variants import GLOBAL_EXPERTS, HIDDEN, TOPK, slice_plan, slice_weights

DEVICE = "cuda"
FLUSH_BYTES = 256 * 2**20  # as triton.testing.do_bench's cache flush


def variants(stages: list[int]) -> list[str]:
    names = ["plan", "pdl"]
    for s in stages:
        names += [f"pipe:s{s}", f"pdl+pipe:s{s}"]
    return names


def _pipelined_permute_quant(stages: int):
    """An `ops.permute_quant` stand-in running the pipelined candidate (same outputs' shapes)."""
    import torch

    from lab.permute_quant_pipelined import permute_quant_pipelined
    from moe_backend.constants import FP8_DTYPE

    def permute_quant(x, src_token, group=128, ue8m0=False, *, out=None, used_rows=None):
        rows, hidden = src_token.numel(), x.shape[1]
        if out is None:
            out = (
                torch.empty(rows, hidden, dtype=FP8_DTYPE, device=x.device),
                torch.empty(rows, hidden // group, dtype=torch.float32, device=x.device),
            )
        return permute_quant_pipelined(x, src_token.reshape(-1), used_rows, out, stages, ue8m0)

    return permute_quant


def _layer_fn(name: str, plan, operands):
    from moe_backend import ops
    from moe_backend.plan_execution import run_plan

    x, w13, w13_s, w2, w2_s, tw, ti = operands
    if name.startswith("pdl"):
        plan = dataclasses.replace(plan, dependent_launch=True)
    stages = int(name.split("pipe:s")[1]) if "pipe:s" in name else 0
    stand_in = _pipelined_permute_quant(stages) if stages else None

    def fn():
        if stand_in is None:
            return run_plan(plan, x, None, w13, w13_s, w2, w2_s, tw, ti, 0, False)
        shipped = ops.permute_quant
        ops.permute_quant = stand_in
        try:
            return run_plan(plan, x, None, w13, w13_s, w2, w2_s, tw, ti, 0, False)
        finally:
            ops.permute_quant = shipped

    return fn


def gap_trace(fn, calls: int = 5) -> dict:
    """Profiler trace of `calls` eager calls, each after an L2 flush: per-call span, busy time and
    the gaps between its kernels (median call)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=DEVICE)
    for _ in range(2):
        flush.zero_()
        fn()
    torch.cuda.synchronize()
    marks = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    events = sorted(
        (e for e in prof.events() if e.device_type == DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    # The flush is a fill of FLUSH_BYTES: the longest memset-like kernel before each call.
    per_call, current = [], None
    for e in events:
        is_flush = ("fill" in e.name.lower() or "memset" in e.name.lower()) and e.time_range.elapsed_us() > 20
        if is_flush:
            current = []
            per_call.append(current)
        elif current is not None:
            current.append(e)
    for kernels in per_call:
        if not kernels:
            continue
        span = kernels[-1].time_range.end - kernels[0].time_range.start
        busy = sum(k.time_range.elapsed_us() for k in kernels)
        gaps = [
            (kernels[i].name[:48], kernels[i + 1].time_range.start - kernels[i].time_range.end)
            for i in range(len(kernels) - 1)
        ]
        marks.append(dict(span_us=span, busy_us=busy, kernels=len(kernels), gaps=gaps,
                          durations=[(k.name[:48], k.time_range.elapsed_us()) for k in kernels]))
    marks.sort(key=lambda m: m["span_us"])
    return marks[len(marks) // 2] if marks else {}


def run_cell(slice_name: str, tokens: int, routing: str, stages: list[int], weights: dict) -> dict:
    import torch

    from moe_backend.testing import interleaved_us, parse_routing_exponent, random_topk

    plan = slice_plan(slice_name, tokens, "prefill", torch.device(DEVICE))
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    tw, ti = random_topk(tokens, GLOBAL_EXPERTS, TOPK, parse_routing_exponent(routing), seed=tokens, device=DEVICE)
    operands = (x, *weights[slice_name], tw, ti)
    names = [n for n in variants(stages) if "pipe" not in n or (plan.fused_permute_quant and not plan.gather_a)]
    fns = {n: _layer_fn(n, plan, operands) for n in names}
    ref = fns["plan"]().clone()
    equal = {n: bool(torch.equal(fn().view(torch.int16), ref.view(torch.int16))) for n, fn in fns.items()}
    times = interleaved_us(fns, rounds=3, warmup_ms=10, rep_ms=50)
    trace = gap_trace(fns["plan"])
    trace_pdl = gap_trace(fns["pdl"])
    return dict(
        cell=f"{slice_name} {routing} T={tokens}",
        plan=plan.describe(),
        times=times,
        equal=equal,
        trace=trace,
        trace_pdl={k: v for k, v in trace_pdl.items() if k in ("span_us", "busy_us", "kernels")},
    )


def render(results: list[dict]) -> str:
    names = []
    for r in results:
        names += [n for n in r["times"] if n not in names]
    lines = [
        "| cell | " + " | ".join(f"{n} µs" for n in names) + " | span / busy µs (plan) | largest gaps µs |",
        "|---|" + "---:|" * len(names) + "---|---|",
    ]
    for r in results:
        cells = []
        for n in names:
            t = r["times"].get(n)
            cells.append("–" if t is None else f"{t['us']:.1f}" + ("" if r["equal"][n] else " (DIFFERS)"))
        tr = r["trace"]
        gaps = sorted(tr.get("gaps", []), key=lambda g: -g[1])[:3]
        gap_text = "; ".join(f"{g:.1f} after {name}" for name, g in gaps)
        lines.append(
            f"| {r['cell']} | " + " | ".join(cells)
            + f" | {tr.get('span_us', 0):.1f} / {tr.get('busy_us', 0):.1f} | {gap_text} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="ep8:8192,ep8:16384")
    p.add_argument("--routings", default="uniform,zipf:0.6")
    p.add_argument("--stages", default="2")
    p.add_argument("--json", default=None)
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    stages = [int(s) for s in args.stages.split(",") if s]
    if args.list:
        print("variants:", " ".join(variants(stages)))
        return 0
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    weights = {name: slice_weights(name) for name in sorted({s for s, _ in cells})}
    results = []
    for slice_name, tokens in cells:
        for routing in args.routings.split(","):
            r = run_cell(slice_name, tokens, routing, stages, weights)
            results.append(r)
            print(r["cell"], r["plan"], flush=True)
            print("  busy per kernel:", ", ".join(f"{n} {d:.1f}" for n, d in r["trace"].get("durations", [])))
            print("  gaps:", ", ".join(f"{g:.1f}" for _, g in r["trace"].get("gaps", [])))
            print("  pdl trace:", r["trace_pdl"], flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
