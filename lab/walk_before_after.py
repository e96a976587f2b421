"""The Triton grouped GEMM's persistent walk, variants side by side in one process: the whole routed
decode pipeline (`plan_execution.run_plan` under the policy's decode plan, CUDA-graph replays,
interleaved rounds) with the package's kernel module and with variants of it loaded from source
under other module names, each swapped into `_grouped_gemm_core` while its plan is captured.

Variants (the walk's stride; everything else is the package's kernel):
- `package`: the kernel as shipped (the balanced stride where the resident grid would take at
  most 3 rounds, the last holding fewer than 64 units of at least 8 K blocks);
- `old`: `--old FILE`, an earlier `_grouped_gemm_kernel.py` (e.g. `git show REV:...`);
- `always`: the balanced stride for every walk;
- `resident`: the stride fixed at the resident grid (the old schedule in the new code: tells a
  schedule effect from a code-generation one);
- `longonly`: the balanced stride for units of at least 8 K blocks, whatever the last round;
- `tail64`: as `package` whatever the rounds;
- `rounds2`: the balanced stride only where the walk takes exactly two rounds;
- `fill25`, `fill50`: the balanced stride only where the resident grid's last round would hold
  under a quarter (a half) of its programs.

Per cell it prints the GEMMs' units against their resident grids (`_grouped_gemm_core._resident`),
and each variant's µs; outputs must equal the package's bit for bit (the same units, other
programs).

    git show fbc8772:moe_backend/kernels/_grouped_gemm_kernel.py > /tmp/old_kernel.py
    python -m lab.walk_before_after --old /tmp/old_kernel.py [--tokens 8,32,128,256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from lab._plan_variants import SLICES, slice_plan, slice_weights

KERNEL = Path(__file__).resolve().parents[1] / "moe_backend" / "kernels" / "_grouped_gemm_kernel.py"
STRIDE = "    stride = tl.where(balanced, tl.maximum(tl.cdiv(units, rounds), 1), num_programs)\n"
BALANCED = "tl.maximum(tl.cdiv(units, rounds), 1)"
# name -> the line that replaces the package's STRIDE line.
SOURCE_VARIANTS = {
    "always": f"    stride = {BALANCED}\n",
    "resident": "    stride = num_programs + 0 * rounds\n",
    "longonly": f"    stride = tl.where(unit_k_blocks >= BALANCED_WALK_MIN_K_BLOCKS, {BALANCED}, num_programs)\n",
    "tail64": "    stride = tl.where((unit_k_blocks >= BALANCED_WALK_MIN_K_BLOCKS)"
    f" & (last_round < BALANCED_WALK_MAX_TAIL), {BALANCED}, num_programs)\n",
    "rounds2": f"    stride = tl.where(rounds == 2, {BALANCED}, num_programs)\n",
    # balanced only where the resident grid's last round would be under a quarter / half full
    "fill25": f"    stride = tl.where(last_round * 4 < num_programs, {BALANCED}, num_programs)\n",
    "fill50": f"    stride = tl.where(last_round * 2 < num_programs, {BALANCED}, num_programs)\n",
}


def _load(name: str, source: str):
    """A kernel module from `source` under module name `name` (its imports: the package's)."""
    path = Path(f"/tmp/_walk_variant_{name}.py")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"walk_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module._fp8_grouped_gemm_kernel


def kernels(old: Path | None) -> dict:
    from moe_backend.kernels import _grouped_gemm_core

    source = KERNEL.read_text()
    if STRIDE not in source:
        raise RuntimeError("the package's _walk no longer has the stride line this lab edits")
    out = {"package": _grouped_gemm_core._fp8_grouped_gemm_kernel}
    if old is not None:
        out["old"] = _load("old", old.read_text())
    for name, line in SOURCE_VARIANTS.items():
        out[name] = _load(name, source.replace(STRIDE, line))
    return out


def _grid_key(key) -> str:
    """A resident-grid cache key, shortened: the constexprs that tell the plan's GEMMs apart."""
    meta = dict(key[1])
    return (
        f"bm{meta['BLOCK_M']} bn{meta['BLOCK_N']} nl{meta['N_LOOP']} st{meta['num_stages']} "
        f"ku{meta['K_UNROLL']} swap{int(meta['SWAP_AB'])} tma{int(meta['USE_TMA'])} split{meta['SPLIT_K']}"
    )


def gemm_durations(replay, calls: int = 20) -> tuple[float, float]:
    """Median device µs of the plan's first and second grouped-GEMM kernel over `calls` replays
    (torch.profiler; the two launches of each replay in order: GEMM1, GEMM2)."""
    import statistics

    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            replay()
        torch.cuda.synchronize()
    kernels = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "grouped_gemm" in e.name),
        key=lambda e: e.time_range.start,
    )
    if len(kernels) != 2 * calls:
        return float("nan"), float("nan")
    return tuple(statistics.median(e.time_range.elapsed_us() for e in kernels[i::2]) for i in (0, 1))


def walk_desc(plan, counts, grids: list) -> str:
    """Per GEMM: units = the layout's m-tiles (segments padded to BLOCK_M) x n-units (x the K
    slices the kernel's rule cuts), and the rounds a resident grid takes over them."""
    parts = []
    for g in (plan.gemm1, plan.gemm2):
        if g.provider != "triton":
            parts.append(g.provider)
            continue
        c = g.triton_config
        tiles = int(sum(-(-int(x) // c["BLOCK_M"]) for x in counts.tolist()))
        units = tiles * -(-(-(-g.n // c["BLOCK_N"])) // c.get("N_LOOP", 1))
        split, cap, floor_units = 1, c.get("SPLIT_K", 1), c.get("SPLIT_MIN_UNITS", 0)
        while split < cap and (units * split < floor_units or floor_units <= 0):
            split *= 2
        cfg = f"bm{c['BLOCK_M']} bn{c['BLOCK_N']} nl{c.get('N_LOOP', 1)} st{c['num_stages']} split{split}"
        parts.append(f"{cfg}: {units * split} units")
    return "; ".join(parts) + f" (resident grids {grids})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, default=None, help="an earlier _grouped_gemm_kernel.py")
    p.add_argument("--slices", default="ep8,tp8")
    p.add_argument("--tokens", default="8,32,128,256")
    p.add_argument("--routing", default="zipf:0.6,uniform")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    args = p.parse_args(argv)

    import torch

    from benchmarks.bench_layer import cell_routing
    from moe_backend.kernels import _grouped_gemm_core
    from moe_backend.plan_execution import run_plan
    from moe_backend.testing import capture_graph, interleaved_us

    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    variants = kernels(args.old)
    if args.only:
        variants = {n: k for n, k in variants.items() if n == "package" or n in args.only.split(",")}
    shipped = _grouped_gemm_core._fp8_grouped_gemm_kernel
    rows = []
    for sl in args.slices.split(","):
        weights = slice_weights(sl)
        for tokens in map(int, args.tokens.split(",")):
            for routing in args.routing.split(","):
                tw, ti, _ = cell_routing(sl, routing, tokens, 0, "busiest")
                x = torch.randn(tokens, 7168, device=dev, dtype=torch.bfloat16)
                plan = slice_plan(sl, tokens, "decode", dev)
                fns, outs, grids = {}, {}, {}
                for name, kernel in variants.items():
                    _grouped_gemm_core._fp8_grouped_gemm_kernel = kernel
                    _grouped_gemm_core._resident.clear()
                    try:

                        def fn(plan=plan):
                            return run_plan(plan, x, None, *weights, tw, ti, 0, False)

                        replay, out = capture_graph(fn)
                        replay()
                        torch.cuda.synchronize()
                        outs[name], fns[name] = out.clone(), replay
                        grids[name] = sorted((_grid_key(key), r) for key, r in _grouped_gemm_core._resident.items())
                    finally:
                        _grouped_gemm_core._fp8_grouped_gemm_kernel = shipped
                times = interleaved_us(fns, rounds=args.rounds, warmup_ms=5, rep_ms=25)
                gemm_us = {name: gemm_durations(fn) for name, fn in fns.items()}
                counts = torch.bincount(ti[(ti >= 0) & (ti < SLICES[sl][0])].long().flatten(), minlength=SLICES[sl][0])
                base = times["package"]["us"]
                for name in fns:
                    same = bool(torch.equal(outs[name], outs["package"]))
                    t = times[name]
                    rows.append((sl, tokens, routing, name, t["us"], t["lo"], t["hi"], t["us"] / base, same))
                print(
                    f"{sl} T={tokens} {routing}: active {int((counts > 0).sum())}, max rows {int(counts.max())}, "
                    f"{walk_desc(plan, counts, grids['package'])} | "
                    + "  ".join(f"{n} {times[n]['us']:.1f} (G1 {g[0]:.1f} G2 {g[1]:.1f})" for n, g in gemm_us.items()),
                    flush=True,
                )
    print("\n| slice | T | routing | variant | µs (lo-hi) | / package | output equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} ({r[5]:.1f}-{r[6]:.1f}) | {r[7]:.3f} | {r[8]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
