"""Why the EP8 prefill layer's first timing round is its fastest: the layer and DeepGEMM's pair
timed in phases (the layer alone, the peers alone, the layer again, after an idle pause, after a
large allocation was made and freed), each round a do_bench median (L2 flushed) with the SM clock,
board power, temperature and throttle reasons nvidia-smi sampled during it; then the layer's
kernels traced on a cool board and on a warm one.

    python -m lab.prefill_drift [--cells ep8:8192:uniform,ep8:16384:uniform] [--rounds 6]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import time

DEFAULT_CELLS = "ep8:8192:uniform,ep8:16384:uniform"
QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def parse_samples(text: str) -> list[tuple[float, float, float, float, str]]:
    """nvidia-smi's CSV rows (QUERY, no header, no units) -> (epoch seconds, SM MHz, W, C, throttle
    mask); rows that do not parse (a "[N/A]", a cut last line) are left out."""
    import datetime

    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((stamp, float(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
        except ValueError:
            continue
    return rows


def summarise(rows: list[tuple[float, float, float, float, str]], t0: float, t1: float) -> str:
    """The samples stamped between t0 and t1 (time.time()): median SM clock and power, the highest
    temperature, the throttle masks seen."""
    inside = [r for r in rows if t0 <= r[0] <= t1]
    if not inside:
        return "no samples"
    mhz = statistics.median(r[1] for r in inside)
    watts = statistics.median(r[2] for r in inside)
    temp = max(r[3] for r in inside)
    masks = sorted({r[4] for r in inside})
    return f"{mhz:5.0f} MHz {watts:5.0f} W {temp:3.0f} C {'/'.join(masks)}"


class Sampler:
    """nvidia-smi every 50 ms in the background until `stop()`, which returns its parsed rows."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "50"],
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> list[tuple[float, float, float, float, str]]:
        self.proc.terminate()
        return parse_samples(self.proc.communicate()[0])


def main(argv: list[str] | None = None) -> int:
    import torch
    import triton

    from benchmarks import _peers
    from lab._layer_cells import layer_and_dg_pair
    from lab.prefill_launch_gaps import gap_trace
    from moe_backend.testing import capture_graph

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="slice:tokens:routing,...")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    log = io.StringIO()
    loaded, _ = _peers.load_peers(log)
    weights: dict = {}
    sampler = Sampler()
    marks: list[tuple[str, str, float, float, float]] = []

    def timed(phase: str, name: str, fn) -> float:
        t0 = time.time()
        us = 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        marks.append((phase, name, us, t0, time.time()))
        return us

    traces = []
    for cell in args.cells.split(","):
        layer, dg, keep = layer_and_dg_pair(cell, weights, loaded.get("dg"), log)
        graph = capture_graph(layer)[0]
        torch.cuda.synchronize()

        time.sleep(3.0)
        traces.append((cell, "cool (after 3 s idle)", gap_trace(layer, calls=3)))
        time.sleep(2.0)
        for _ in range(args.rounds):
            timed(f"{cell} A layer first", "eager", layer)
            timed(f"{cell} A layer first", "graph", graph)
        for _ in range(args.rounds):
            timed(f"{cell} B peers", "dg w13", dg["dg w13"])
            timed(f"{cell} B peers", "dg w2", dg["dg w2"])
        for _ in range(args.rounds):
            timed(f"{cell} C layer after peers", "eager", layer)
            timed(f"{cell} C layer after peers", "graph", graph)
        triton.testing.do_bench(layer, warmup=10, rep=500)
        traces.append((cell, "warm (after 0.5 s of calls)", gap_trace(layer, calls=3)))
        time.sleep(3.0)
        for _ in range(3):
            timed(f"{cell} D after 3 s idle", "eager", layer)
        for _ in range(3):
            timed(f"{cell} D after 3 s idle", "dg w13", dg["dg w13"])
        # A large block made and freed, as the masked peer's buffers are: the caching allocator
        # keeps it, so the layer's next buffers may come from it.
        big = torch.empty(20 * 1024**3, dtype=torch.uint8, device="cuda")
        del big
        for _ in range(3):
            timed(f"{cell} E after a 20 GiB block freed", "eager", layer)
        torch.cuda.empty_cache()
        for _ in range(3):
            timed(f"{cell} F after empty_cache", "eager", layer)
        del keep, dg, graph
        torch.cuda.empty_cache()

    time.sleep(0.2)
    samples = sampler.stop()
    print(f"{len(samples)} nvidia-smi samples")
    for phase, name, us, t0, t1 in marks:
        print(f"{phase:46s} {name:7s} {us:8.1f} µs  {summarise(samples, t0, t1)}")
    for cell, when, trace in traces:
        print(
            f"{cell} {when}: span {trace.get('span_us', 0):.1f}, kernels {trace.get('busy_us', 0):.1f}: "
            + ", ".join(f"{n[:28]} {d:.1f}" for n, d in trace.get("durations", []))
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
