"""Device sweep of the prefill layer's two copy-bound steps: the per-token-group FP8 quant
(`_group_quant_core`, flat (row, group) items) and the fp8 row gather into the layout
(`kernels/permute_rows.py`), at the DeepSeek-V3 shapes, each beside the code it replaces and an
SM copy kernel moving the same bytes (the floor, `lab._sweep_run.copy_floor_us`).

- quant: x `[T, 7168]` bf16 for T in 128, 2048, 16384; SiLU*up + quant of GEMM1's output on the
  contiguous layout (expert_ids + used_rows, as plan_execution runs it) for EP8 (32 local experts,
  I = 2048, ~16k rows) and TP8 (256 local experts, I = 256, 131072 rows + padding), T = 16384;
  the old kernel (lab/_old_group_quant.py, frozen) against the new one at every
  (items per program, warps) candidate.
- gather: TP8 and EP8 layouts of T = 16384 tokens (x_fp8 `[T, 7168]` + 56 scales per row);
  torch's `index_select` (the old `ops.permute_rows`: every row of the static bound, padding
  included) against the new kernel at every (rows per program, warps) candidate.

Every contender is timed as a CUDA-graph replay, median of `triton.testing.do_bench` (L2 flushed
between reps). GB/s and the floor count the bytes that must move: valid rows read once and
written once. The outputs are checked in the same run (every quant candidate byte for byte equal
to the first on valid rows; new gather == index_select on rows holding a token).

    python -m lab.sweep_quant_gather --json $OUT/sweep_quant_gather.json     # GPU, < 2 minutes
    python -m lab.sweep_quant_gather --list                                  # CPU: shapes, candidates
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass

from lab._sweep_run import candidate_table, copy_floor_us, graph_us, parse, run_sweep, sweep_parser

HIDDEN, GLOBAL_EXPERTS, TOPK, GROUP = 7168, 256, 8, 128
DEVICE = "cuda"  # a CPU smoke test of the run functions sets "cpu" (with TRITON_INTERPRET=1)
QUANT_CANDIDATES = list(itertools.product((8, 16, 32, 64), (2, 4, 8)))  # (items per program, warps)
GATHER_CANDIDATES = list(itertools.product((1, 2, 4, 8, 16), (2, 4, 8)))  # (rows per program, warps)


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # "quant_x", "silu_quant" or "gather"
    tokens: int
    num_local: int = 0  # local experts of the slice (silu_quant, gather)
    inter: int = 0  # I: SiLU*up's output columns (silu_quant)


SHAPES = [
    Shape("x_quant T=128", "quant_x", 128),
    Shape("x_quant T=2048", "quant_x", 2048),
    Shape("x_quant T=16384", "quant_x", 16384),
    Shape("silu_quant EP8 T=16384", "silu_quant", 16384, num_local=32, inter=2048),
    Shape("silu_quant TP8 T=16384", "silu_quant", 16384, num_local=256, inter=256),
    Shape("gather TP8 T=16384", "gather", 16384, num_local=256),
    Shape("gather EP8 T=16384", "gather", 16384, num_local=32),
]


def candidates(shape: Shape) -> list[tuple[int, int]]:
    return GATHER_CANDIDATES if shape.kind == "gather" else QUANT_CANDIDATES


def config_label(cfg: tuple[int, int]) -> str:
    return f"{cfg[0]}x{cfg[1]}"


def baseline_name(shape: Shape) -> str:
    return "index_select" if shape.kind == "gather" else "old kernel"


def moved_bytes(shape: Shape, valid_rows: int) -> int:
    """Bytes that must move: each valid row read once and written once."""
    if shape.kind == "gather":
        return valid_rows * 2 * (HIDDEN + 4 * HIDDEN // GROUP)
    cols = shape.inter if shape.kind == "silu_quant" else HIDDEN
    read = valid_rows * cols * 2 * (2 if shape.kind == "silu_quant" else 1)
    return read + valid_rows * (cols + 4 * cols // GROUP)


def render(results: list[dict]) -> str:
    """Two compact tables: one line per shape (floor, baseline, default, best), then every candidate's µs."""
    lines = [
        "| shape | MB | floor µs | baseline µs | default (cfg) µs | best (cfg) µs | best GB/s | best/floor "
        "| baseline/best | equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        best = min(r["configs"], key=r["configs"].get)
        best_us, floor_us = r["configs"][best], r["floor_us"]
        default_us = r["configs"].get(r["default"], float("nan"))
        lines.append(
            f"| {r['shape']} | {r['bytes'] / 1e6:.0f} | {floor_us:.1f} | {r['baseline']}: {r['baseline_us']:.1f} "
            f"| {default_us:.1f} ({r['default']}) | {best_us:.1f} ({best}) | {r['bytes'] / best_us / 1e3:.0f} "
            f"| {best_us / floor_us:.2f} | {r['baseline_us'] / best_us:.2f}x | {'yes' if r['equal'] else '**NO**'} |"
        )
    for kind, cands in (("quant", QUANT_CANDIDATES), ("gather", GATHER_CANDIDATES)):
        rows = [r for r in results if (r["kind"] == "gather") == (kind == "gather")]
        if not rows:
            continue
        labels = [config_label(c) for c in cands]
        lines += candidate_table(rows, labels, f"{kind} per candidate (items or rows per program x warps)")
    return "\n".join(lines)


def _topk_ids(num_tokens: int, seed: int = 0):
    import torch

    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.rand(num_tokens, GLOBAL_EXPERTS, device=DEVICE, generator=gen).topk(TOPK, dim=-1).indices


def _layout(shape: Shape):
    """The contiguous layout on its static row bound (as plan_execution builds it) and its rows in use."""
    from moe_backend import ops

    layout = ops.build_contiguous_layout(_topk_ids(shape.tokens), shape.num_local, alignment=128)
    return layout, layout.expert_offsets[shape.num_local :]


def _time(fn, rep_ms: int) -> float:
    return graph_us(fn, rep_ms)


def _floor_us(nbytes: int, rep_ms: int) -> float:
    return copy_floor_us(nbytes, rep_ms, DEVICE)


def _poison(q, s) -> None:
    """Before each candidate, so a row it fails to write cannot pass on an earlier candidate's bytes."""
    import torch

    q.view(torch.uint8).fill_(0x7F)
    s.fill_(float("nan"))


def _run_quant(shape: Shape, rep_ms: int) -> dict:
    import torch

    from lab import _old_group_quant
    from moe_backend.kernels import _group_quant_core as core

    silu = shape.kind == "silu_quant"
    validity: dict = {}
    if silu:
        layout, used_rows = _layout(shape)
        cols, rows = shape.inter, layout.num_rows
        x = (torch.randn(rows, 2 * cols, device=DEVICE) * 4).bfloat16()
        validity = dict(expert_ids=layout.expert_ids, used_rows=used_rows)
        valid = (layout.expert_ids >= 0) & (torch.arange(rows, device=DEVICE) < used_rows)
    else:
        cols, rows = HIDDEN, shape.tokens
        x = (torch.randn(rows, cols, device=DEVICE) * 3).bfloat16()
        valid = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    valid_rows = int(valid.sum())
    args = dict(cols=cols, silu_mul=silu, ue8m0=False, group=GROUP, **validity)

    def outputs():
        return (
            torch.zeros(rows, cols, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn),
            torch.zeros(rows, cols // GROUP, device=DEVICE),
        )

    old_q, old_s = outputs()
    baseline_us = _time(lambda: _old_group_quant.launch(x, old_q, old_s, **args), rep_ms)
    q, s = outputs()
    configs, equal, first = {}, True, None
    for items, warps in candidates(shape):
        cfg = core.QuantLaunchConfig(items, warps)
        _poison(q, s)
        configs[config_label((items, warps))] = _time(lambda: core.launch(x, q, s, config=cfg, **args), rep_ms)
        # Every candidate against the first (the old kernel divides approximately, the new one
        # exactly, so their bytes differ where a value sits on an fp8 rounding tie).
        if first is None:
            first = (q[valid].clone(), s[valid].clone())
        equal &= torch.equal(q[valid].view(torch.uint8), first[0].view(torch.uint8))
        equal &= torch.equal(s[valid].view(torch.int32), first[1].view(torch.int32))
    default = core.quant_launch_config(rows, cols // GROUP)
    nbytes = moved_bytes(shape, valid_rows)
    return dict(
        shape=shape.name,
        kind=shape.kind,
        rows=rows,
        valid_rows=valid_rows,
        bytes=nbytes,
        floor_us=_floor_us(nbytes, rep_ms),
        baseline=baseline_name(shape),
        baseline_us=baseline_us,
        configs=configs,
        default=config_label((default.items_per_program, default.num_warps)),
        equal=bool(equal),
    )


def _torch_gather(x_fp8, x_scale, src_token):
    """The old `ops.permute_rows`: every row of the bound, padding rows copying token 0."""
    src = src_token.clamp(min=0)
    return x_fp8.index_select(0, src), x_scale.index_select(0, src)


def _run_gather(shape: Shape, rep_ms: int) -> dict:
    import torch

    from moe_backend import ops
    from moe_backend.kernels import permute_rows as mod

    x_fp8, x_scale = ops.per_token_group_quant((torch.randn(shape.tokens, HIDDEN, device=DEVICE) * 3).bfloat16())
    layout, used_rows = _layout(shape)
    src, rows = layout.src_token, layout.num_rows
    valid = (src >= 0) & (torch.arange(rows, device=DEVICE) < used_rows)
    valid_rows = int(valid.sum())
    baseline_us = _time(lambda: _torch_gather(x_fp8, x_scale, src), rep_ms)
    ref_q, ref_s = _torch_gather(x_fp8, x_scale, src)
    q = torch.zeros(rows, HIDDEN, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn)
    s = torch.zeros(rows, HIDDEN // GROUP, device=DEVICE)
    configs, equal = {}, True
    for per_program, warps in candidates(shape):
        cfg = mod.GatherLaunchConfig(per_program, warps)
        _poison(q, s)
        configs[config_label((per_program, warps))] = _time(
            lambda: mod.permute_rows(x_fp8, x_scale, src, out=(q, s), used_rows=used_rows, config=cfg), rep_ms
        )
        equal &= torch.equal(q[valid].view(torch.uint8), ref_q[valid].view(torch.uint8))
        equal &= torch.equal(s[valid], ref_s[valid])
    default = mod.gather_launch_config(rows, HIDDEN + 4 * HIDDEN // GROUP)
    nbytes = moved_bytes(shape, valid_rows)
    return dict(
        shape=shape.name,
        kind=shape.kind,
        rows=rows,
        valid_rows=valid_rows,
        bytes=nbytes,
        floor_us=_floor_us(nbytes, rep_ms),
        baseline=baseline_name(shape),
        baseline_us=baseline_us,
        configs=configs,
        default=config_label((default.rows_per_program, default.num_warps)),
        equal=bool(equal),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = sweep_parser(__doc__, 20)
    p.add_argument("--only", default=None, help="comma-separated substrings: run the shapes whose name holds one")
    return parse(p, argv)


def selected(only: str | None) -> list[Shape]:
    if not only:
        return list(SHAPES)
    keys = [k.strip() for k in only.split(",") if k.strip()]
    return [s for s in SHAPES if any(k in s.name for k in keys)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = selected(args.only)
    if not shapes:
        print(f"--only {args.only!r} matches no shape: {[s.name for s in SHAPES]}", file=sys.stderr)
        return 2
    if args.list:
        for s in shapes:
            labels = " ".join(config_label(c) for c in candidates(s))
            print(f"{s.name:24s} {s.kind:10s} baseline: {baseline_name(s):12s} candidates: {labels}")
        return 0

    def run_one(shape: Shape) -> dict:
        return (_run_gather if shape.kind == "gather" else _run_quant)(shape, args.rep_ms)

    return run_sweep(shapes, run_one, lambda shape: shape.name, render, args.json)

if __name__ == "__main__":
    raise SystemExit(main())
