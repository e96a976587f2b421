"""Device sweep of the fused permute + quant at EP8 prefill: the shipped kernel
(`moe_backend/kernels/permute_quant.py`, one layout row x 8 groups per step) beside
`lab/permute_quant_items.py` at every (items per block, warps) candidate,
`lab/permute_quant_pipelined.py` at 1-3 stages, and an SM copy kernel
moving the same bytes (the floor, `lab._sweep_run.copy_floor_us`).

Shapes: the EP8 slice (32 local experts of 256) at T = 2048, 8192 and 16384 tokens of uniform
top-8 routing, on the contiguous layout the prefill plan builds (segments of 128 rows, the static
row bound, `used_rows` on the device); x bf16 `[T, 7168]`. Each contender is a CUDA-graph replay,
median of `triton.testing.do_bench` (L2 flushed); outputs are poisoned before each candidate and
compared with the shipped kernel's byte for byte on the rows holding a token. Bytes that must
move: each such row's bf16 source read once, its fp8 row and scales written once.

    python -m lab.sweep_permute_quant --json $OUT/sweep_permute_quant.json     # GPU, < a minute
    python -m lab.sweep_permute_quant --list                                   # CPU: shapes, candidates
"""

from __future__ import annotations

import itertools

from lab._sweep_run import candidate_table, copy_floor_us, graph_us, parse, run_sweep, sweep_parser

HIDDEN, GLOBAL_EXPERTS, TOPK, NUM_LOCAL, EXPERT_START, ALIGNMENT = 7168, 256, 8, 32, 64, 128
DEVICE = "cuda"  # a CPU smoke test of run_shape sets "cpu" (with TRITON_INTERPRET=1)
TOKENS = (2048, 8192, 16384)
CANDIDATES = list(itertools.product((8, 16, 32, 64), (2, 4, 8)))  # (items per block, warps)
PIPELINED = (1, 2, 3)  # stages of lab/permute_quant_pipelined.py's row loop, labelled "pipe:sN"


def label(cfg: tuple[int, int]) -> str:
    return "{}x{}".format(*cfg)


def _time(fn, rep_ms: int) -> float:
    return graph_us(fn, rep_ms)


def _floor_us(nbytes: int, rep_ms: int) -> float:
    return copy_floor_us(nbytes, rep_ms, DEVICE)


def run_shape(tokens: int, rep_ms: int) -> dict:
    import torch

    from lab.permute_quant_items import permute_quant_items
    from lab.permute_quant_pipelined import permute_quant_pipelined
    from moe_backend import ops
    from moe_backend.kernels.permute_quant import permute_quant

    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    topk_ids = torch.rand(tokens, GLOBAL_EXPERTS, device=DEVICE, generator=gen).topk(TOPK, dim=-1).indices
    layout = ops.build_contiguous_layout(topk_ids, NUM_LOCAL, expert_start=EXPERT_START, alignment=ALIGNMENT)
    src, used_rows = layout.src_token, layout.expert_offsets[NUM_LOCAL:]
    x = (torch.randn(tokens, HIDDEN, device=DEVICE, generator=gen) * 3).bfloat16()
    rows = src.numel()
    valid = (src >= 0) & (torch.arange(rows, device=DEVICE) < used_rows)
    valid_rows = int(valid.sum())

    def outputs():
        return (
            torch.full((rows, HIDDEN), 0x7F, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn),
            torch.full((rows, HIDDEN // 128), float("nan"), device=DEVICE),
        )

    shipped = outputs()
    configs = {"shipped": _time(lambda: permute_quant(x, src, out=shipped, used_rows=used_rows), rep_ms)}
    out, equal = outputs(), True
    contenders = {label(cfg): lambda cfg=cfg: permute_quant_items(x, src, used_rows, out, *cfg) for cfg in CANDIDATES}
    for stages in PIPELINED:
        contenders[f"pipe:s{stages}"] = lambda stages=stages: permute_quant_pipelined(x, src, used_rows, out, stages)
    for name, fn in contenders.items():
        out[0].view(torch.uint8).fill_(0x7F)
        out[1].fill_(float("nan"))
        configs[name] = _time(fn, rep_ms)
        equal &= torch.equal(out[0][valid].view(torch.uint8), shipped[0][valid].view(torch.uint8))
        equal &= torch.equal(out[1][valid].view(torch.int32), shipped[1][valid].view(torch.int32))
        equal &= bool((out[0][~valid].view(torch.uint8) == 0x7F).all())  # padding rows never written
    nbytes = valid_rows * (2 * HIDDEN + HIDDEN + 4 * HIDDEN // 128)
    return dict(
        shape=f"EP8 T={tokens}",
        valid_rows=valid_rows,
        bytes=nbytes,
        floor_us=_floor_us(nbytes, rep_ms),
        default="shipped",
        configs=configs,
        equal=bool(equal),
    )


def render(results: list[dict]) -> str:
    lines = [
        "| shape | rows | MB | floor µs | shipped µs | best (cfg) µs | best / floor | shipped / best | equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        best = min(r["configs"], key=r["configs"].get)
        best_us, shipped_us = r["configs"][best], r["configs"]["shipped"]
        lines.append(
            f"| {r['shape']} | {r['valid_rows']} | {r['bytes'] / 1e6:.0f} | {r['floor_us']:.1f} | {shipped_us:.1f} "
            f"| {best_us:.1f} ({best}) | {best_us / r['floor_us']:.2f} | {shipped_us / best_us:.2f}x "
            f"| {'yes' if r['equal'] else '**NO**'} |"
        )
    labels = ["shipped"] + [label(c) for c in CANDIDATES] + [f"pipe:s{n}" for n in PIPELINED]
    lines += candidate_table(results, labels, "per contender (items per block x warps; pipe: pipelined row loop)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(sweep_parser(__doc__, 10), argv)
    if args.list:
        print("shapes:", ", ".join(f"EP8 T={t}" for t in TOKENS))
        print("candidates:", " ".join([label(c) for c in CANDIDATES] + [f"pipe:s{n}" for n in PIPELINED]))
        return 0
    return run_sweep(list(TOKENS), lambda t: run_shape(t, args.rep_ms), lambda t: f"EP8 T={t}", render, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
