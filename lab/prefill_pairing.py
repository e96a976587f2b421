"""Our CUDA contiguous GEMM's CTA pairs on routed prefill counts: what pairs of M tiles sharing B
lose when expert segments have an odd number of 128-row tiles (routed counts rarely are multiples
of 256, so a pair straddles two experts and each CTA loads its own B), and what a walk pairing
tiles per expert would gain, side by side with DeepGEMM's contiguous GEMM on the same rows.

Contenders per (cell, gemm), each a plain bf16-output GEMM on rows already in the layout, timed as
CUDA-graph replays in interleaved rounds:
- `plan`: the segments padded to 128 rows, the config `select_config` picks (pairs sharing B);
- `c1`, `c2a`: the same layout without pairs, and with pairs of N tiles sharing A;
- `even`: every segment padded to an even number of tiles (no pair straddles; the dead tile of
  an odd segment's last pair computes and stores nothing), pairs sharing B;
- `split`: an estimate of a per-expert pairing walk: the even-tile part of each segment with pairs
  sharing B, then the odd last tiles with pairs sharing A, two launches in one graph;
- `dg`: DeepGEMM's `m_grouped_fp8_gemm_nt_contiguous` on the `plan` layout.
Every contender's rows are checked against the `plan` output (max relative difference).

    python -m lab.prefill_pairing [--cells ep8:8192:uniform,...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses

SHAPES = {  # slice -> local experts, [(gemm, N, K)]
    "ep8": (32, [("w13", 4096, 7168), ("w2", 7168, 2048)]),
    "tp8": (256, [("w13", 512, 7168), ("w2", 7168, 256)]),
}
GLOBAL_EXPERTS, TOPK, TILE = 256, 8, 128
DEFAULT_CELLS = "ep8:8192:uniform,ep8:8192:zipf:0.6,ep8:16384:uniform,ep8:2048:uniform"


def layouts(counts: list[int]) -> dict[str, list[tuple[list[int], list[tuple[int, int]]]]]:
    """Per layout, its launches: (expert id per row, -1 padding; [(row in launch, row in the
    `plan` layout)] for the real rows). `plan` and `even` are one launch, `split` two."""
    plan_ids, plan_pos, pos = [], {}, 0
    for e, c in enumerate(counts):
        for r in range(c):
            plan_pos[(e, r)] = pos + r
        plan_ids += [e] * c + [-1] * (-c % TILE)
        pos += c + (-c % TILE)

    def launch(parts):  # parts: [(expert, first row, rows, padded rows)]
        ids, rows = [], []
        for e, first, n, padded in parts:
            rows += [(len(ids) + i, plan_pos[(e, first + i)]) for i in range(n)]
            ids += [e] * n + [-1] * (padded - n)
        return ids, rows

    even, pairs, tails = [], [], []
    for e, c in enumerate(counts):
        tiles = -(-c // TILE)
        even.append((e, 0, c, (tiles + tiles % 2) * TILE))
        paired = min(c, (tiles - tiles % 2) * TILE)
        if paired:
            pairs.append((e, 0, paired, -(-paired // TILE) * TILE))
        if c > paired:
            tails.append((e, paired, c - paired, TILE))
    plan = launch([(e, 0, c, -(-c // TILE) * TILE) for e, c in enumerate(counts)])
    return {"plan": [plan], "even": [launch(even)], "split": [launch(pairs), launch(tails)]}


def dg_contiguous(dg, a, a_s, b, bs, expert_ids, out):
    """A callable running DeepGEMM's contiguous GEMM on our operands (A `[M, K]` with per-token-group
    scales, B `[E, N, K]` with 128x128 block scales, int32 expert id per row, -1 padding) into `out`."""
    m, k = a.shape
    num_experts, n, _ = b.shape
    sfa = dg.transform_sf_into_required_layout(a_s, m, k, (1, TILE, TILE), None, True)
    sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, TILE, TILE), num_experts, False)

    def run():
        dg.m_grouped_fp8_gemm_nt_contiguous((a, sfa), (b, sfb), out, expert_ids)

    return run


def main(argv=None) -> int:
    import torch

    from moe_backend import testing
    from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous
    from moe_backend.cuda.heuristic import select_config
    from moe_backend.quant import quantize_fp8_per_token_group

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="slice:tokens:routing,...")
    p.add_argument("--gemms", default="w13,w2")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        import deep_gemm as dg
    except ImportError:
        dg = None
    from lab._prebuild import compile_all
    from moe_backend.cuda import launch

    specs = []
    for cell in args.cells.split(","):
        slice_name, tokens, _ = cell.split(":", 2)
        for _, n, k in SHAPES[slice_name][1]:
            base = select_config(8 * int(tokens) + SHAPES[slice_name][0] * TILE, n, sms, k=k)
            others = (dataclasses.replace(base, cluster=1), dataclasses.replace(base, cluster=2, multicast="a"))
            specs += [launch.kernel_spec(n, k, cfg) for cfg in (base, *others)]
    compile_all(specs)
    print("| cell | gemm | tiles: odd segments / all | contender | config | µs (lo-hi) | /plan | /dg | max rel diff |")
    print("|---|---|---|---|---|---|---:|---:|---:|")
    for cell in args.cells.split(","):
        slice_name, tokens, routing = cell.split(":", 2)
        num_local, gemms = SHAPES[slice_name]
        _, topk_ids = testing.random_topk(
            int(tokens), GLOBAL_EXPERTS, TOPK, testing.parse_routing_exponent(routing), int(tokens)
        )
        counts = testing.expert_counts(topk_ids, num_local).tolist()
        lays = layouts(counts)
        odd = sum(1 for c in counts if -(-c // TILE) % 2)
        for gemm, n, k in gemms:
            if gemm not in args.gemms.split(","):
                continue
            b, bs = testing.random_fp8_weights(num_local, n, k)
            m_plan = len(lays["plan"][0][0])
            a, a_s = quantize_fp8_per_token_group(torch.randn(m_plan, k, device="cuda", dtype=torch.bfloat16))
            base = select_config(m_plan, n, sms, k=k)
            variants = {
                "plan": ("plan", [base]),
                "c1": ("plan", [dataclasses.replace(base, cluster=1)]),
                "c2a": ("plan", [dataclasses.replace(base, cluster=2, multicast="a")]),
                "even": ("even", [base]),
                "split": ("split", [base, dataclasses.replace(base, cluster=2, multicast="a")]),
            }
            fns, outs, checks = {}, {}, {}
            for name, (lay, cfgs) in variants.items():
                calls = []
                for (ids, rows), cfg in zip(lays[lay], cfgs, strict=True):
                    src = torch.tensor([r[1] for r in rows], dtype=torch.long, device="cuda")
                    dst = torch.tensor([r[0] for r in rows], dtype=torch.long, device="cuda")
                    la = torch.zeros(len(ids), k, dtype=a.dtype, device="cuda")
                    la_s = torch.ones(len(ids), k // TILE, dtype=torch.float32, device="cuda")
                    la.view(torch.uint8)[dst] = a.view(torch.uint8)[src]
                    la_s[dst] = a_s[src]
                    o = torch.full((len(ids), n), float("nan"), dtype=torch.bfloat16, device="cuda")
                    e_ids = torch.tensor(ids, dtype=torch.int32, device="cuda")
                    calls.append((la, la_s, e_ids, o, cfg, src, dst))
                    checks.setdefault(name, []).append((o, src, dst))

                def run(calls=calls, b=b, bs=bs):
                    for la, la_s, e_ids, o, cfg, _, _ in calls:
                        grouped_gemm_contiguous(la, la_s, b, bs, e_ids, o, config=cfg)

                fns[name] = run
                outs[name] = calls
            if dg is not None:
                ids, _ = lays["plan"][0]
                layout_d = torch.tensor(ids, dtype=torch.int32, device="cuda")
                dg_out = torch.full((m_plan, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                fns["dg"] = dg_contiguous(dg, a, a_s, b, bs, layout_d, dg_out)
                checks["dg"] = [(dg_out, None, None)]
            for fn in fns.values():
                fn()
            torch.cuda.synchronize()
            plan_out = checks["plan"][0][0]
            live = torch.tensor([r[1] for r in lays["plan"][0][1]], dtype=torch.long, device="cuda")
            want = plan_out[live].float()
            diffs = {}
            for name, parts in checks.items():
                got = torch.full_like(plan_out, float("nan"), dtype=torch.float32)
                for o, src, dst in parts:
                    if src is None:
                        got[live] = o[live].float()
                    else:
                        got[src] = o[dst].float()
                g = got[live]
                diffs[name] = float(((g - want).abs().max() / want.abs().max().clamp_min(1e-6)).item())
                if not torch.isfinite(g).all():
                    diffs[name] = float("nan")
            graphs = {name: testing.capture_graph(fn)[0] for name, fn in fns.items()}
            t = testing.interleaved_us(graphs, rounds=args.rounds)
            for name in fns:
                cfgs = variants[name][1] if name in variants else []
                tag = " + ".join(
                    f"n{c.block_n} c{c.cluster}{c.multicast if c.cluster > 1 else ''} g{c.group_m}" for c in cfgs
                )
                dg_ratio = f"{t[name]['us'] / t['dg']['us']:.3f}" if "dg" in t else "–"
                print(
                    f"| {slice_name} {tokens} {routing} | {gemm} | {odd}/{len(counts)} | {name} | "
                    f"{tag or 'DeepGEMM'} | "
                    f"{t[name]['us']:.1f} ({t[name]['lo']:.1f}-{t[name]['hi']:.1f}) | "
                    f"{t[name]['us'] / t['plan']['us']:.3f} | {dg_ratio} | {diffs[name]:.1e} |",
                    flush=True,
                )
            del graphs, fns, outs, checks, a, a_s, b, bs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
