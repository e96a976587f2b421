"""Our CUDA masked GEMM's configs on the cells with a hot expert, beside DeepGEMM's masked GEMM: the
EP8 slice (or TP8, `--slice tp8`) at a mean of 128 rows per expert under Zipf routing (`testing.routed_counts`, the counts
of `bench_grouped_gemm --routings`), max_m the hottest expert's rows rounded up to a power of two.
Every contender is a CUDA-graph replay timed in interleaved rounds; outputs are compared with the
shipped config's (bytes of the valid rows; stream-K contenders, `:sk`, whose sums are added in another
order: within 1e-3) and the rows past each count must stay untouched. `:h` contenders skip the
MMAs of tiles' all-padding 64-row halves; `:h2` ones split a tile whose rows lie in its first half by N
between the two warpgroups.

    python -m lab.sweep_masked_hot [--slice ep8|tp8] [--gemms w13,w2] [--routings zipf:0.9,zipf:1.2]
        [--configs c2a:128,...] [--json PATH]

GPU only; `--list` prints the candidate configs on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

DEVICE = "cuda"
MEAN_ROWS = 128
# experts, N, K of each GEMM of the two DeepSeek-V3 slices
SHAPES = {
    "ep8": {"w13": (32, 4096, 7168), "w2": (32, 7168, 2048)},
    "tp8": {"w13": (256, 512, 7168), "w2": (256, 7168, 256)},
}


def candidates() -> dict:
    from moe_backend.cuda.config import ContiguousConfig

    out = {}
    for bn in (64, 128, 256):
        out[f"c1:{bn}"] = ContiguousConfig(bn, group_m=1, cluster=1)
    for bn in (64, 128, 256):
        for stages in (0, 3) if bn == 256 else (0, 4):
            tag = "" if stages == 0 else f":s{stages}"
            out[f"c2a:{bn}{tag}"] = ContiguousConfig(bn, num_stages=stages, group_m=1, cluster=2, multicast="a")
    # CTA pairs on consecutive live M tiles sharing B when both hold one expert (DeepGEMM's choice
    # for these cells: 128 x 192 tiles, pairs sharing B)
    for bn in (128, 192, 256):
        out[f"c2b:{bn}"] = ContiguousConfig(bn, group_m=1, cluster=2, multicast="b")
    # mixed pairs: per expert, pairs of its M tiles sharing B, its odd last tile in N-tile pairs
    # sharing A (no pair spans two experts)
    for bn, stages in ((128, 0), (128, 4), (192, 0), (192, 4), (256, 0), (256, 3)):
        tag = "" if stages == 0 else f":s{stages}"
        out[f"c2m:{bn}{tag}"] = ContiguousConfig(bn, num_stages=stages, group_m=1, cluster=2, multicast="mixed")
    # stream-K: the last part-full wave of live units dealt by K chunks over every SM (pairs
    # sharing B across experts deal whole units only: launch.check_paired_tiles refuses them
    # stream-K; the mixed pairs' units hold one expert each)
    for name in ("c2a:128", "c2a:256", "c1:256", "c2m:256:s3", "c2m:256", "c2m:192"):
        out[f"{name}:sk"] = dataclasses.replace(out[name], stream_k=True)
    # consumer warpgroups skipping the MMAs of their all-padding halves (`:h`): an expert's last
    # tile of at most 64 rows costs one warpgroup's MMAs
    for name in ("c2m:256:s3", "c2m:256", "c2m:192", "c2m:192:s4", "c2a:128", "c2a:256", "c2a:256:s3", "c1:64"):
        out[f"{name}:h"] = dataclasses.replace(out[name], skip_padding_halves=True)
    # `:h2` (256-wide tiles): such a tile split by N between the two warpgroups instead
    for name in ("c2m:256:s3", "c2m:256", "c2a:256", "c2a:256:s3"):
        out[f"{name}:h2"] = dataclasses.replace(out[f"{name}:h"], split_padding_halves=True)
    return out


def max_m_of(counts) -> int:
    return 1 << max(7, (int(counts.max()) - 1).bit_length())


def shipped_config(n: int, k: int):
    """The config the op picks on this GPU."""
    import torch

    from moe_backend.cuda.heuristic import select_masked_config
    from moe_backend.kernels._launch_utils import device_name

    return select_masked_config(n, k, device_name(torch.device(DEVICE)))


def chosen(only: str | None) -> dict:
    """The candidates named in `only` (comma-separated; None: every one)."""
    every = candidates()
    if not only:
        return every
    unknown = [name for name in only.split(",") if name not in every]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; --list prints the candidates")
    return {name: every[name] for name in only.split(",")}


def prebuild(cells: list[tuple[str, str]], only: str | None = None, slice_name: str = "ep8") -> None:
    """Every (config, max_m) kernel of the sweep compiled in parallel (each is a JIT build)."""
    from lab._prebuild import compile_all
    from moe_backend import testing
    from moe_backend.cuda.launch import kernel_spec

    specs = []
    for gemm, routing in cells:
        e, n, k = SHAPES[slice_name][gemm]
        max_m = max_m_of(testing.routed_counts(e, MEAN_ROWS, routing, seed=0))
        specs += [kernel_spec(n, k, cfg, masked_max_m=max_m) for cfg in [shipped_config(n, k), *chosen(only).values()]]
    compile_all(specs)


def hot_operands(gemm: str, routing: str, slice_name: str = "ep8") -> dict:
    """One cell's operands: the counts (`testing.routed_counts`, int32 on the GPU as `masked_m`),
    max_m, random FP8 weights and activations in the masked layout (rows past the hottest
    expert's zero, scales one)."""
    import torch

    from moe_backend import testing

    e, n, k = SHAPES[slice_name][gemm]
    counts = testing.routed_counts(e, MEAN_ROWS, routing, seed=0)
    top, max_m = int(counts.max()), max_m_of(counts)
    b, bs = testing.random_fp8_weights(e, n, k)
    a = torch.zeros(e, max_m, k, dtype=torch.float8_e4m3fn, device=DEVICE)
    a_s = torch.ones(e, max_m, k // 128, device=DEVICE)
    a[:, :top], a_s[:, :top] = testing.random_fp8_activations(e, top, k, DEVICE)
    return dict(e=e, n=n, k=k, counts=counts, max_m=max_m, masked_m=counts.to(torch.int32).to(DEVICE), a=a, a_s=a_s,
                b=b, bs=bs)  # fmt: skip


def run_cell(gemm: str, routing: str, rounds: int, only: str | None = None, slice_name: str = "ep8") -> dict:
    import torch

    from benchmarks._peers import load_deep_gemm
    from moe_backend import testing
    from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked

    operands = hot_operands(gemm, routing, slice_name)
    e, n, k, counts, max_m = (operands[key] for key in ("e", "n", "k", "counts", "max_m"))
    counts_dev, a, a_s, b, bs = (operands[key] for key in ("masked_m", "a", "a_s", "b", "bs"))
    valid = torch.arange(max_m, device=DEVICE)[None, :] < counts_dev[:, None]

    shipped = shipped_config(n, k)
    configs = {"shipped": shipped, **{name: c for name, c in chosen(only).items() if c != shipped}}
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
    first = outs["shipped"].clone()  # the shipped config's output before any replay
    dg = load_deep_gemm()
    sfa = dg.transform_sf_into_required_layout(a_s, max_m, k, (1, 128, 128), e, True)
    sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False)
    out_dg = torch.full((e, max_m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    fns["dg_masked"] = testing.capture_graph(
        lambda: dg.m_grouped_fp8_fp4_gemm_nt_masked((a, sfa), (b, sfb), out_dg, counts_dev, MEAN_ROWS)
    )[0]
    torch.cuda.synchronize()
    dg_first = out_dg.clone()
    times = testing.interleaved_us(fns, rounds=rounds)
    ref = outs["shipped"]
    # The replays must reproduce the first outputs (a drift: a graph reads memory it does not own).
    replay_stable = {
        "shipped": bool(torch.equal(ref[valid].view(torch.int16), first[valid].view(torch.int16))),
        "dg_masked": bool(torch.equal(out_dg[valid].view(torch.int16), dg_first[valid].view(torch.int16))),
    }

    def agrees(name, o):
        if name.endswith(":sk"):  # its fp32 sums in another order: equal to rounding, not bit for bit
            close = float((o[valid].float() - ref[valid].float()).norm() / ref[valid].float().norm()) <= 1e-3
        else:
            close = bool(torch.equal(o[valid].view(torch.int16), ref[valid].view(torch.int16)))
        return close and bool(torch.isnan(o[~valid]).all())

    same = {name: agrees(name, o) for name, o in outs.items()}
    dg_close = float((out_dg[valid].float() - ref[valid].float()).norm() / ref[valid].float().norm())
    return dict(
        cell=f"{slice_name} {gemm} {routing}",
        describe=testing.describe_counts(counts),
        max_m=max_m,
        configs={name: str(c) for name, c in configs.items()},
        times=times,
        same=same,
        dg_vs_shipped=dg_close,
        errors=errors,
        replay_stable=replay_stable,
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
    p.add_argument("--slice", default="ep8", choices=sorted(SHAPES))
    p.add_argument("--gemms", default="w13")
    p.add_argument("--routings", default="zipf:0.9,zipf:1.2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--configs", default=None, help="candidates to time beside the shipped config (default: all)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for name, cfg in candidates().items():
            print(name, cfg)
        return 0
    cells = [(g, r) for g in args.gemms.split(",") for r in args.routings.split(",")]
    prebuild(cells, args.configs, args.slice)
    results = []
    for gemm in args.gemms.split(","):
        for routing in args.routings.split(","):
            r = run_cell(gemm, routing, args.rounds, args.configs, args.slice)
            results.append(r)
            dg_err = f"{r['dg_vs_shipped']:.2e}"
            stable = r["replay_stable"]
            print(r["cell"], r["describe"], "errors:", r["errors"], "dg vs shipped:", dg_err, stable, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
