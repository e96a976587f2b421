"""Our CUDA contiguous GEMM's N tile at prefill sizes: the 256-wide tile the heuristic picks (two
m64n128 wgmmas per K step) against 192-wide tiles (one m64n192 wgmma per K step, as DeepGEMM
runs at these sizes), side by side with DeepGEMM's contiguous GEMM on the same rows.

Cells: `slice:tokens:routing` (the EP8/TP8 segments a batch of tokens gives one rank, top-8 of
256, as `bench_layer` routes them) or `slice:rows:fixed` (every local expert `rows` rows, issue
22's prefill cells). Contenders per (cell, gemm), each a plain bf16-output GEMM on rows already in
the layout (segments padded to 128), timed as CUDA-graph replays in interleaved rounds:
- `plan`: the config `select_config` picks on this GPU; `n128`: the same with 128-wide tiles;
- `n192` (pairs sharing B, as the plan pairs), `n192c1` (single CTAs), `n192g16`: 192-wide tiles;
- `dg`: DeepGEMM's `m_grouped_fp8_gemm_nt_contiguous` on the same layout;
- `--variants`: more configs by tag, `n<block_n>[s<stages>]c<1|2>[a|b][g<group_m>][r]` (unset
  fields as the plan's; `r`: A fragments in registers, 256-wide tiles), e.g. `n128c2a,n256c2br`.
Every contender's real rows are checked against `plan`'s (max relative difference) and against
an fp32 dequantized reference on a sample of rows.

    python -m lab.prefill_tile_width [--cells ep8:8192:uniform,ep8:2048:fixed,...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from lab.prefill_pairing import GLOBAL_EXPERTS, SHAPES, TILE, TOPK, dg_contiguous

DEFAULT_CELLS = (
    "ep8:8192:uniform,ep8:8192:zipf:0.6,ep8:16384:uniform,ep8:16384:zipf:0.6,ep8:2048:uniform,"
    "ep8:512:fixed,ep8:2048:fixed,ep8:4096:fixed,tp8:16384:uniform"
)


_VARIANT = re.compile(r"n(\d+)(?:s(\d+))?c([12])([ab]?)(?:g(\d+))?(r?)$")


def variant(base, tag: str):
    """`base` with the fields a tag names: n<block_n>[s<stages>]c<cluster>[a|b][g<group_m>][r]."""
    hit = _VARIANT.match(tag)
    if hit is None:
        raise SystemExit(f"--variants: {tag!r} is not n<block_n>[s<stages>]c<1|2>[a|b][g<group_m>][r]")
    bn, stages, cluster, mcast, group, regs = hit.groups()
    fields = {"block_n": int(bn), "num_stages": int(stages or 0), "cluster": int(cluster), "a_regs": regs == "r"}
    fields |= {"multicast": mcast} if mcast else {}
    fields |= {"group_m": int(group)} if group else {}
    return dataclasses.replace(base, **fields)


def main(argv=None) -> int:
    import torch

    from moe_backend import reference, testing
    from moe_backend.cuda import launch
    from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous
    from moe_backend.cuda.heuristic import select_config
    from moe_backend.quant import quantize_fp8_per_token_group

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="slice:tokens:routing or slice:rows:fixed, ...")
    p.add_argument("--gemms", default="w13,w2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="", help="extra configs: n128c2a,n192s4c1g2,...")
    p.add_argument("--no-defaults", action="store_true", help="only plan, the --variants and DeepGEMM")
    args = p.parse_args(argv)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        import deep_gemm as dg
    except ImportError:
        dg = None
    from lab._prebuild import compile_all

    def counts_of(cell: str) -> tuple[str, list[int]]:
        slice_name, size, routing = cell.split(":", 2)
        num_local = SHAPES[slice_name][0]
        if routing == "fixed":
            return slice_name, [int(size)] * num_local
        _, topk_ids = testing.random_topk(
            int(size), GLOBAL_EXPERTS, TOPK, testing.parse_routing_exponent(routing), int(size)
        )
        return slice_name, testing.expert_counts(topk_ids, num_local).tolist()

    def contenders(m: int, n: int, k: int) -> dict:
        base = select_config(m, n, sms, k=k, device_name=torch.cuda.get_device_name())
        out = {"plan": base}
        if not args.no_defaults:
            out |= {
                "n128": dataclasses.replace(base, block_n=128, num_stages=0),
                "n192": dataclasses.replace(base, block_n=192, num_stages=0),
                "n192c1": dataclasses.replace(base, block_n=192, num_stages=0, cluster=1),
                "n192g16": dataclasses.replace(base, block_n=192, num_stages=0, group_m=16),
            }
        for tag in filter(None, args.variants.split(",")):
            out[tag] = variant(base, tag)
        return out

    cells = {cell: counts_of(cell) for cell in args.cells.split(",")}  # cell -> (slice, counts)
    specs = []
    for slice_name, counts in cells.values():
        m = sum(c + (-c % TILE) for c in counts)
        for gemm, n, k in SHAPES[slice_name][1]:
            if gemm in args.gemms.split(","):
                specs += [launch.kernel_spec(n, k, cfg) for cfg in contenders(m, n, k).values()]
    compile_all(specs)
    print(
        "| cell | gemm | rows (max/mean per expert) | contender | config | µs (lo-hi) | /plan | /dg "
        "| rel diff vs plan | rel err vs ref |"
    )
    print("|---|---|---|---|---|---|---:|---:|---:|---:|")
    for cell, (slice_name, counts) in cells.items():
        num_local, gemms = SHAPES[slice_name]
        ids = []
        for e, c in enumerate(counts):
            ids += [e] * c + [-1] * (-c % TILE)
        expert_ids = torch.tensor(ids, dtype=torch.int32, device="cuda")
        real = expert_ids >= 0
        m = len(ids)
        spread = f"{max(counts)}/{sum(counts) / len(counts):.1f}"
        for gemm, n, k in gemms:
            if gemm not in args.gemms.split(","):
                continue
            b, bs = testing.random_fp8_weights(num_local, n, k)
            a, a_s = quantize_fp8_per_token_group(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            cfgs = contenders(m, n, k)
            fns, outs = {}, {}
            for name, cfg in cfgs.items():
                o = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                outs[name] = o

                def run(cfg=cfg, o=o, a=a, a_s=a_s, b=b, bs=bs):
                    grouped_gemm_contiguous(a, a_s, b, bs, expert_ids, o, config=cfg)

                fns[name] = run
            if dg is not None:
                outs["dg"] = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                fns["dg"] = dg_contiguous(dg, a, a_s, b, bs, expert_ids, outs["dg"])
            for fn in fns.values():
                fn()
            torch.cuda.synchronize()
            want = outs["plan"][real].float()
            sample = real.nonzero().flatten()[:: max(1, int(real.sum()) // 512)]
            ref = reference.grouped_gemm_contiguous(a[sample], a_s[sample], b, bs, expert_ids[sample]).float()
            diffs, errs = {}, {}
            for name, o in outs.items():
                g = o[real].float()
                ok = bool(torch.isfinite(g).all()) and (name == "dg" or bool(torch.isnan(o[~real]).all()))
                diffs[name] = float((g - want).abs().max() / want.abs().max()) if ok else float("nan")
                s = o[sample].float()
                errs[name] = float((s - ref).norm() / ref.norm()) if ok else float("nan")
            graphs = {name: testing.capture_graph(fn)[0] for name, fn in fns.items()}
            t = testing.interleaved_us(graphs, rounds=args.rounds)
            for name in fns:
                c = cfgs.get(name)
                tag = (
                    f"n{c.block_n} s{c.num_stages} c{c.cluster}{c.multicast if c.cluster > 1 else ''} g{c.group_m}"
                    + (" ar" if c.a_regs else "")
                    if c
                    else "DeepGEMM"
                )
                dg_ratio = f"{t[name]['us'] / t['dg']['us']:.3f}" if "dg" in t else "–"
                print(
                    f"| {cell} | {gemm} | {m} ({spread}) | {name} | {tag} | "
                    f"{t[name]['us']:.1f} ({t[name]['lo']:.1f}-{t[name]['hi']:.1f}) | "
                    f"{t[name]['us'] / t['plan']['us']:.3f} | {dg_ratio} | {diffs[name]:.1e} | {errs[name]:.1e} |",
                    flush=True,
                )
            del graphs, fns, outs, a, a_s, b, bs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
