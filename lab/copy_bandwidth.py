"""Device copy bandwidth against size and timing method: which copy is the floor of the prefill's
copy-bound kernels.

Why: the sweeps of the combine, the row gather and the quant (`lab/sweep_combine.py`,
`lab/sweep_quant_gather.py`) call a torch copy of the same bytes, replayed from a CUDA graph, their
floor. That floor moved 2.5-2.7 TB/s (read plus written) at 170-470 MB and 3.8-4.3 TB/s at 170 MB
to 2.1 GB in other cells of the same runs, while `bench_layer`'s prefill bound uses a 4 GB eager copy
(4.25 TB/s). The EP8 prefill combine and permute+quant sit at 0.99-1.06x their floor, so whether
that floor is the device's or the timing's decides whether they have room left.

Per size (bytes read plus written), each a median in TB/s:
- `graph u8`: uint8 `copy_`, CUDA-graph replay, do_bench with its L2 flush (the sweeps' floor
  before this table showed it to be a memcpy node's speed; `lab._sweep_run.copy_floor_us` now
  times the SM copy below);
- `graph bf16`: the same copy of bf16 elements;
- `eager`: `copy_` launched directly under do_bench (no graph), as `bench_layer`'s ceiling;
- `triton`: an SM copy kernel (16 bytes per thread per load), CUDA-graph replay, do_bench;
- `no flush`: the graphed uint8 copy replayed back to back, CUDA events around 20 replays, no L2
  flush in between;
- `graph u8 again`: the sweeps' floor again, last, to show drift over the run.

    python -m lab.copy_bandwidth --json $OUT/copy_bandwidth.json   # GPU, about half a minute
    python -m lab.copy_bandwidth --list                            # CPU: sizes and methods
"""

from __future__ import annotations

from lab._sweep_run import graph_us, parse, run_sweep, sweep_parser

# Bytes read plus written, MB: the sweeps' floors (170-470 MB at EP8, 2114 MB at TP8) and around.
SIZES_MB = (64, 168, 240, 468, 1024, 2114, 4096)
METHODS = ("graph u8", "graph bf16", "eager", "triton", "no flush", "graph u8 again")
BLOCK_WORDS = 2048  # int32 x4 vectors per program of the Triton copy: 32 KB per program
DEVICE = "cuda"


def _copy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_words(src, dst, n, BLOCK: tl.constexpr):
        # int32 elements in groups of 4 (16-byte loads and stores); 64-bit offsets past 2 GB.
        offs = tl.program_id(0).to(tl.int64) * BLOCK * 4 + tl.arange(0, BLOCK * 4)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    return copy_words


def triton_copy(src, dst) -> None:
    """dst <- src, both contiguous int32 of equal size."""
    import triton

    n = src.numel()
    _copy_kernel()[(triton.cdiv(n, BLOCK_WORDS * 4),)](src, dst, n, BLOCK=BLOCK_WORDS, num_warps=8)


def _no_flush_us(fn, reps: int = 20) -> float:
    """fn as a CUDA-graph replay, back to back: mean µs over `reps` replays (median of 5 windows)."""
    import torch

    from moe_backend.testing import capture_graph

    replay, _ = capture_graph(fn)
    for _ in range(3):
        replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[2]


def run_size(size_mb: int, rep_ms: int) -> dict:
    import torch
    import triton

    nbytes = size_mb * 10**6
    half = nbytes // 2 // 16 * 16  # each way; whole 16-byte vectors for the Triton copy
    src = torch.empty(half, dtype=torch.uint8, device=DEVICE).random_(0, 256)
    dst = torch.empty_like(src)
    moved = 2 * half

    def tbs(us: float) -> float:
        return moved / us / 1e6

    us = {
        "graph u8": graph_us(lambda: dst.copy_(src), rep_ms),
        "graph bf16": graph_us(lambda: dst.view(torch.bfloat16).copy_(src.view(torch.bfloat16)), rep_ms),
        "eager": 1e3 * triton.testing.do_bench(lambda: dst.copy_(src), warmup=3, rep=rep_ms, return_mode="median"),
        "triton": graph_us(lambda: triton_copy(src.view(torch.int32), dst.view(torch.int32)), rep_ms),
        "no flush": _no_flush_us(lambda: dst.copy_(src)),
    }
    dst.zero_()
    triton_copy(src.view(torch.int32), dst.view(torch.int32))
    equal = torch.equal(dst, src)
    us["graph u8 again"] = graph_us(lambda: dst.copy_(src), rep_ms)
    return dict(shape=f"{size_mb} MB", bytes=moved, us=us, tbs={m: tbs(t) for m, t in us.items()}, equal=bool(equal))


def render(results: list[dict]) -> str:
    lines = [
        "| MB read + written | " + " | ".join(f"{m} TB/s (µs)" for m in METHODS) + " | Triton copy exact |",
        "|---:|" + "---:|" * len(METHODS) + "---|",
    ]
    for r in results:
        cells = [f"{r['tbs'][m]:.2f} ({r['us'][m]:.1f})" for m in METHODS]
        lines.append(f"| {r['bytes'] / 1e6:.0f} | " + " | ".join(cells) + f" | {'yes' if r['equal'] else '**NO**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(sweep_parser(__doc__, 20), argv)
    if args.list:
        print("sizes (MB read + written):", ", ".join(str(s) for s in SIZES_MB))
        print("methods:", ", ".join(METHODS))
        return 0
    return run_sweep(
        list(SIZES_MB), lambda size: run_size(size, args.rep_ms), lambda size: f"{size} MB", render, args.json
    )


if __name__ == "__main__":
    raise SystemExit(main())
