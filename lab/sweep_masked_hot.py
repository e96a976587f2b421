"""Our CUDA masked GEMM's configs on the cells with a hot expert, beside DeepGEMM's masked GEMM: the
EP8 slice at a mean of 128 rows per expert under Zipf routing (`testing.routed_counts`, the counts
of `bench_grouped_gemm --routings`), max_m the hottest expert's rows rounded up to a power of two.
Every contender is a CUDA-graph replay timed in interleaved rounds; outputs are compared with the
shipped config's (bytes of the valid rows) and the rows past each count must stay untouched.

    python -m lab.sweep_masked_hot [--gemms w13,w2] [--routings zipf:0.9,zipf:1.2] [--json PATH]

GPU only; `--list` prints the candidate configs on CPU.
"""

from __future__ import annotations

import argparse
import json

DEVICE = "cuda"
MEAN_ROWS = 128
SHAPES = {"w13": (32, 4096, 7168), "w2": (32, 7168, 2048)}  # EP8: experts, N, K


def candidates() -> dict:
    from moe_backend.cuda.config import ContiguousConfig

    out = {}
    for bn in (64, 128, 256):
        out[f"c1:{bn}"] = ContiguousConfig(bn, group_m=1, cluster=1)
    for bn in (64, 128, 256):
        for stages in (0, 3) if bn == 256 else (0, 4):
            tag = "" if stages == 0 else f":s{stages}"
            out[f"c2a:{bn}{tag}"] = ContiguousConfig(bn, num_stages=stages, group_m=1, cluster=2, multicast="a")
    return out


def contiguous_candidates() -> dict:
    """Our contiguous kernel on the same rows (segments padded to 128): CTA pairs on M tiles
    2i, 2i+1 sharing B where both hold one expert (a hot expert's tiles), else loading their own."""
    from moe_backend.cuda.config import ContiguousConfig

    return {
        "contig:c2b:128:g2": ContiguousConfig(128, group_m=2, cluster=2),
        "contig:c2b:128:g8": ContiguousConfig(128, group_m=8, cluster=2),
        "contig:c2b:256:g2": ContiguousConfig(256, group_m=2, cluster=2),
        "contig:c2b:256:g8": ContiguousConfig(256, group_m=8, cluster=2),
        "contig:c2a:128:g1": ContiguousConfig(128, group_m=1, cluster=2, multicast="a"),
    }


def max_m_of(counts) -> int:
    return 1 << max(7, (int(counts.max()) - 1).bit_length())


def prebuild(cells: list[tuple[str, str]], workers: int = 16) -> None:
    """Every (config, max_m) kernel of the sweep compiled in parallel (each is a JIT build)."""
    from concurrent.futures import ThreadPoolExecutor

    from moe_backend import testing
    from moe_backend.cuda import jit
    from moe_backend.cuda.heuristic import select_masked_config
    from moe_backend.cuda.launch import kernel_spec

    specs = {}
    for gemm, routing in cells:
        e, n, k = SHAPES[gemm]
        max_m = max_m_of(testing.routed_counts(e, MEAN_ROWS, routing, seed=0))
        for cfg in [select_masked_config(n, k), *candidates().values()]:
            spec = kernel_spec(n, k, cfg, masked_max_m=max_m)
            specs[spec.kernel_name] = spec
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(jit.compile_cubin, specs.values()))


def run_cell(gemm: str, routing: str, rounds: int, contiguous: bool = False) -> dict:
    import torch

    from benchmarks._peers import load_deep_gemm
    from moe_backend import testing
    from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked
    from moe_backend.cuda.heuristic import select_masked_config
    from moe_backend.quant import quantize_fp8_per_token_group

    e, n, k = SHAPES[gemm]
    counts = testing.routed_counts(e, MEAN_ROWS, routing, seed=0)
    top = int(counts.max())
    max_m = max_m_of(counts)
    counts_dev = counts.to(torch.int32).to(DEVICE)
    b, bs = testing.random_fp8_weights(e, n, k)
    a = torch.zeros(e, max_m, k, dtype=torch.float8_e4m3fn, device=DEVICE)
    a_s = torch.ones(e, max_m, k // 128, device=DEVICE)
    a[:, :top], a_s[:, :top] = quantize_fp8_per_token_group(torch.randn(e, top, k, device=DEVICE, dtype=torch.bfloat16))
    valid = torch.arange(max_m, device=DEVICE)[None, :] < counts_dev[:, None]

    shipped = select_masked_config(n, k)
    configs = {"shipped": shipped, **{name: c for name, c in candidates().items() if c != shipped}}
    fns, outs, errors = {}, {}, {}
    for name, cfg in configs.items():
        out = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        try:
            grouped_gemm_masked(a, a_s, b, bs, counts_dev, out, config=cfg)
            torch.cuda.synchronize()
            outs[name] = out
            fns[name] = testing.capture_graph(
                lambda out=out, cfg=cfg: grouped_gemm_masked(a, a_s, b, bs, counts_dev, out, config=cfg)
            )[0]
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
    contig_rows = {}
    if contiguous:
        from moe_backend.cuda.grouped_gemm_contiguous import grouped_gemm_contiguous

        starts, ids = [], []
        for x, c in enumerate(counts.tolist()):
            starts.append(len(ids))
            ids += [x] * c + [-1] * (-c % 128)
        rows = torch.tensor(
            [starts[x] + r for x, c in enumerate(counts.tolist()) for r in range(c)], dtype=torch.int64, device=DEVICE
        )
        expert_ids = torch.tensor(ids, dtype=torch.int32, device=DEVICE)
        a_c = torch.zeros(len(ids), k, dtype=a.dtype, device=DEVICE)
        a_s_c = torch.ones(len(ids), k // 128, device=DEVICE)
        a_c.view(torch.uint8)[rows] = a.view(torch.uint8)[valid]  # fp8 rows moved as bytes
        a_s_c[rows] = a_s[valid]
        for name, cfg in contiguous_candidates().items():
            out = torch.full((len(ids), n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
            try:
                grouped_gemm_contiguous(a_c, a_s_c, b, bs, expert_ids, out, config=cfg)
                torch.cuda.synchronize()
                contig_rows[name] = out[rows]
                fns[name] = testing.capture_graph(
                    lambda out=out, cfg=cfg: grouped_gemm_contiguous(a_c, a_s_c, b, bs, expert_ids, out, config=cfg)
                )[0]
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
    dg = load_deep_gemm()
    sfa = dg.transform_sf_into_required_layout(a_s, max_m, k, (1, 128, 128), e, True)
    sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False)
    out_dg = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    fns["dg_masked"] = testing.capture_graph(
        lambda: dg.m_grouped_fp8_fp4_gemm_nt_masked((a, sfa), (b, sfb), out_dg, counts_dev, MEAN_ROWS)
    )[0]
    times = testing.interleaved_us(fns, rounds=rounds)
    ref = outs["shipped"]
    same = {
        name: bool(torch.equal(o[valid].view(torch.int16), ref[valid].view(torch.int16)))
        and bool(torch.isnan(o[~valid]).all())
        for name, o in outs.items()
    }
    for name, got in contig_rows.items():  # the valid rows, in the masked layout's order
        same[name] = bool(torch.equal(got.view(torch.int16), ref[valid].view(torch.int16)))
    dg_close = float((out_dg[valid].float() - ref[valid].float()).norm() / ref[valid].float().norm())
    return dict(
        cell=f"ep8 {gemm} {routing}",
        describe=testing.describe_counts(counts),
        max_m=max_m,
        configs={name: str(c) for name, c in configs.items()},
        times=times,
        same=same,
        dg_vs_shipped=dg_close,
        errors=errors,
    )


def render(results: list[dict]) -> str:
    names = []
    for r in results:
        names += [n for n in r["times"] if n not in names]
    lines = [
        "| cell | max_m | " + " | ".join(names) + " | best ours / DG |",
        "|---|---:|" + "---:|" * len(names) + "---:|",
    ]
    for r in results:
        t = r["times"]
        ours = min((v["us"], n) for n, v in t.items() if n != "dg_masked")
        row = [
            "–" if n not in t else f"{t[n]['us']:.1f}" + ("" if r["same"].get(n, True) else " (DIFFERS)") for n in names
        ]
        ratio = t["dg_masked"]["us"] / ours[0]
        head = f"| {r['cell']} ({r['describe']}) | {r['max_m']} | "
        lines.append(head + " | ".join(row) + f" | {ratio:.3f} ({ours[1]}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gemms", default="w13")
    p.add_argument("--routings", default="zipf:0.9,zipf:1.2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--contiguous", action="store_true", help="also our contiguous kernel on the same rows")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for name, cfg in candidates().items():
            print(name, cfg)
        return 0
    cells = [(g, r) for g in args.gemms.split(",") for r in args.routings.split(",")]
    prebuild(cells)
    results = []
    for gemm in args.gemms.split(","):
        for routing in args.routings.split(","):
            r = run_cell(gemm, routing, args.rounds, args.contiguous)
            results.append(r)
            dg_err = f"{r['dg_vs_shipped']:.2e}"
            print(r["cell"], r["describe"], "errors:", r["errors"], "dg vs shipped:", dg_err, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
