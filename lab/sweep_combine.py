"""Device sweep of the un-permute + weighted combine: the shipped kernel
(`moe_backend/kernels/unpermute_combine.py`: one token x 1024 columns per program) beside
`lab/combine_tiles.py` at every (tokens per program, columns per program, warps) candidate, at the
DeepSeek-V3 slices, and an SM copy kernel moving the same bytes (the floor).

Why: at EP8 a token has one local slot on average, so a program of one token and 1024 columns
moves 2 KB per chain of dependent loads (its ids, then a row), and the prefill combine runs at
about half the copy bandwidth (docs/benchmarks.md, "Where the prefill layer's time goes"). More
tokens or columns per program put more loads in flight.

`shipped` is the kernel with masked loads of absent slots' rows (the plans' choice where most slots
are local), `branch` the same kernel skipping them by a branch (`branch_on_slots`, the plans' choice
under expert parallelism).

Shapes: EP8 (32 local experts of 256) and TP8 (all 256) contiguous layouts of uniform top-8
routing at T = 128, 2048 and 16384 tokens, y bf16 `[rows, 7168]` with NaN in its padding rows.
Each candidate is a CUDA-graph replay, median of `triton.testing.do_bench` (L2 flushed), and its
output is compared with the shipped kernel's byte for byte. Bytes that must move: every local slot's
row read once, every output row written once.

    python -m lab.sweep_combine --json $OUT/sweep_combine.json     # GPU, about a minute
    python -m lab.sweep_combine --candidates order --slices EP8    # the program order only
    python -m lab.sweep_combine --list                             # CPU: shapes, candidates
"""

from __future__ import annotations

import itertools

from lab._sweep_run import copy_floor_us, graph_us, parse, run_sweep, sweep_parser

HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8
DEVICE = "cuda"  # a CPU smoke test of run_shape sets "cpu" (with TRITON_INTERPRET=1)
SLICES = {"EP8": (32, 64), "TP8": (256, 0)}  # local experts, first local expert
TOKENS = (128, 2048, 16384)
# (tokens, columns, warps) per program of lab/combine_tiles.py, at most 64 fp32 sums per thread
# (more would spill).
CUTS = [
    (*c, False)
    for c in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096), (2, 4, 8))
    if c[0] * c[1] <= 64 * 32 * c[2]
]
# The other program order (a token block's column blocks on consecutive programs: a few whole rows
# written in order at a time), and whole rows per program, beside the shipped cut in its order.
ORDER = [
    (1, 1024, 2, True),
    (1, 1024, 4, True),
    (1, 2048, 4, True),
    (2, 1024, 4, True),
    (1, 4096, 8, True),
    (1, 8192, 8, False),
    (1, 8192, 16, False),
]
CANDIDATE_SETS = {"all": CUTS + ORDER, "order": ORDER}
CANDIDATES = CANDIDATE_SETS["all"]


def label(cfg: tuple[int, int, int, bool]) -> str:
    return ("rows:" if cfg[3] else "") + "{}x{}x{}".format(*cfg[:3])


def _time(fn, rep_ms: int) -> float:
    return graph_us(fn, rep_ms)


def _floor_us(nbytes: int, rep_ms: int) -> float:
    return copy_floor_us(nbytes, rep_ms, DEVICE)


def run_shape(slice_name: str, tokens: int, rep_ms: int, candidates: list | None = None) -> dict:
    import torch

    from lab.combine_tiles import combine_tiles
    from moe_backend import ops
    from moe_backend.kernels import unpermute_combine as mod

    num_local, start = SLICES[slice_name]
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    topk_ids = torch.rand(tokens, GLOBAL_EXPERTS, device=DEVICE, generator=gen).topk(TOPK, dim=-1).indices
    layout = ops.build_contiguous_layout(topk_ids, num_local, expert_start=start, alignment=128)
    weights = torch.rand(tokens, TOPK, device=DEVICE, generator=gen)
    y = torch.randn(layout.num_rows, HIDDEN, device=DEVICE, generator=gen).bfloat16()
    y[layout.src_token < 0] = float("nan")
    rows = layout.row_of_slot
    local_slots = int((rows >= 0).sum())
    nbytes = (local_slots + tokens) * HIDDEN * 2
    shipped = mod.unpermute_combine(y, rows, weights)
    out = torch.empty_like(shipped)
    configs = {"shipped": _time(lambda: mod.unpermute_combine(y, rows, weights, out), rep_ms)}
    equal = True
    out.fill_(float("nan"))
    configs["branch"] = _time(lambda: mod.unpermute_combine(y, rows, weights, out, branch_on_slots=True), rep_ms)
    equal &= torch.equal(out.view(torch.int16), shipped.view(torch.int16))
    for cfg in CANDIDATES if candidates is None else candidates:
        out.fill_(float("nan"))
        configs[label(cfg)] = _time(lambda cfg=cfg: combine_tiles(y, rows, weights, out, *cfg), rep_ms)
        equal &= torch.equal(out.view(torch.int16), shipped.view(torch.int16))
    result = dict(
        shape=f"{slice_name} T={tokens}",
        local_slots=local_slots,
        bytes=nbytes,
        floor_us=_floor_us(nbytes, rep_ms),
        default="shipped",
        configs=configs,
        equal=bool(equal),
    )
    return result


def render(results: list[dict]) -> str:
    lines = [
        "| shape | local slots | MB | floor µs | shipped µs | best (cfg) µs | best / floor "
        "| shipped / best | equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        best = min(r["configs"], key=r["configs"].get)
        best_us, default_us = r["configs"][best], r["configs"][r["default"]]
        lines.append(
            f"| {r['shape']} | {r['local_slots']} | {r['bytes'] / 1e6:.0f} | {r['floor_us']:.1f} "
            f"| {default_us:.1f} | {best_us:.1f} ({best}) | {best_us / r['floor_us']:.2f} "
            f"| {default_us / best_us:.2f}x | {'yes' if r['equal'] else '**NO**'} |"
        )
    lines += ["", "fastest eight (tokens x columns x warps per program; ratio to the floor)", ""]
    for r in results:
        ranked = sorted(r["configs"], key=r["configs"].get)
        cells = ", ".join(f"{c} {r['configs'][c]:.1f} ({r['configs'][c] / r['floor_us']:.2f})" for c in ranked[:8])
        lines.append(f"- {r['shape']}: {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = sweep_parser(__doc__, 10)
    p.add_argument("--candidates", choices=sorted(CANDIDATE_SETS), default="all", help="every cut, or the order set")
    p.add_argument("--slices", default=",".join(SLICES), help="comma-separated, of " + ", ".join(SLICES))
    args = parse(p, argv)
    candidates = CANDIDATE_SETS[args.candidates]
    slices = [s.strip() for s in args.slices.split(",") if s.strip()]
    if unknown := [s for s in slices if s not in SLICES]:
        p.error(f"--slices: unknown {unknown}, expected some of {list(SLICES)}")
    shapes = [(s, t) for s in slices for t in TOKENS]
    if args.list:
        print("shapes:", ", ".join(f"{s} T={t}" for s, t in shapes))
        print("candidates:", " ".join(label(c) for c in candidates))
        return 0

    return run_sweep(
        shapes,
        lambda shape: run_shape(*shape, args.rep_ms, candidates),
        lambda shape: "{} T={}".format(*shape),
        render,
        args.json,
    )

if __name__ == "__main__":
    raise SystemExit(main())
