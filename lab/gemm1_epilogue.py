"""Our CUDA GEMM1 at the layer's prefill rows, as the layer runs it and taken apart: the plain bf16
epilogue or the SiLU*up quant one (`act_scale`), over a layout cut to the rows in use or over the
layer's static bound (T*k + E*127 rows, `rows_in_use` on the device), side by side with DeepGEMM's
contiguous w13 on the same rows. Every run of ours takes the config the layer's plan gives GEMM1.
CUDA-graph replays in interleaved rounds (do_bench medians, L2 flushed); the two plain runs' rows
must match bit for bit, and so must the two SiLU runs'. With --old DIR (earlier *.cuh files, e.g.
from `git show REV:moe_backend/cuda/epilogue.cuh`), the SiLU kernel built from those headers runs
too, at the static bound, and its rows must match the current one's bit for bit. With --group-m
G,..., the SiLU kernel also runs with the plan's config but G M tiles walked together (`silu gG`,
static bound; rows equal to the plan's); --silu-only drops the plain and rows-in-use runs. With
--stream-k, the SiLU kernel also runs with the plan's config dealing its last part-full wave by K
chunks over every SM (`silu sk`, static bound); its fp32 sums are added in another order, so the
column gives the share of its FP8 bytes equal to the plan's instead of a bit-for-bit answer.
With --a-regs, the plan's config with each K block's A fragments in registers (`a_regs`) runs
too, SiLU (and, without --silu-only, plain) at the static bound; its rows must match the plan's.

    python -m lab.gemm1_epilogue [--cells ep8:8192:uniform,ep8:16384:uniform] [--rounds 5] [--old DIR]
        [--group-m 4,16] [--silu-only] [--stream-k] [--a-regs]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lab.prefill_pairing import GLOBAL_EXPERTS, SHAPES, TILE, TOPK, dg_contiguous, layouts

DEFAULT_CELLS = "ep8:8192:uniform,ep8:16384:uniform"


def gemm1_operands(slice_name: str, tokens: int, routing: str):
    """GEMM1's operands at a slice's prefill rows (rank 0's experts, routing seeded by the token
    count): the plan layout's expert ids over the layer's static row bound (`used` rows in use,
    `rows_in_use` on the device), random A over the bound, random FP8 weights, and the config the
    layer's plan gives GEMM1."""
    import types

    import torch

    from lab._plan_variants import slice_plan
    from moe_backend import testing
    from moe_backend.dispatch.layouts import max_contiguous_rows
    from moe_backend.quant import quantize_fp8_per_token_group

    num_local, gemms = SHAPES[slice_name]
    _, n, k = gemms[0]
    exponent = testing.parse_routing_exponent(routing)
    _, topk_ids = testing.random_topk(tokens, GLOBAL_EXPERTS, TOPK, exponent, tokens)
    ids = layouts(testing.expert_counts(topk_ids, num_local).tolist())["plan"][0][0]
    used = len(ids)
    bound = max(max_contiguous_rows(tokens * TOPK, num_local, TILE), used)
    b, bs = testing.random_fp8_weights(num_local, n, k)
    a, a_scale = quantize_fp8_per_token_group(torch.randn(bound, k, device="cuda", dtype=torch.bfloat16))
    expert_ids = torch.full((bound,), -1, dtype=torch.int32, device="cuda")
    expert_ids[:used] = torch.tensor(ids, dtype=torch.int32, device="cuda")
    return types.SimpleNamespace(
        n=n, k=k, used=used, bound=bound, b=b, bs=bs, a=a, a_scale=a_scale, expert_ids=expert_ids,
        rows_in_use=torch.tensor([used], dtype=torch.int32, device="cuda"),
        config=slice_plan(slice_name, tokens, "prefill", torch.device("cuda")).gemm1.config,
    )  # fmt: skip


def main(argv=None) -> int:
    import torch

    from lab._prebuild import old_launcher
    from moe_backend import testing
    from moe_backend.constants import FP8_DTYPE
    from moe_backend.cuda.launch import kernel_args, kernel_spec, launch, silu_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default=DEFAULT_CELLS, help="slice:tokens:routing,...")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--old", type=Path, default=None, help="earlier CUDA headers: their SiLU kernel runs too")
    p.add_argument("--group-m", default="", help="M tiles walked together, SiLU kernel variants: G,...")
    p.add_argument("--silu-only", action="store_true", help="only the SiLU kernel at the static bound")
    p.add_argument("--stream-k", action="store_true", help="the SiLU kernel with stream-K too")
    p.add_argument("--a-regs", action="store_true", help="the plan's config with A fragments in registers too")
    args = p.parse_args(argv)
    try:
        import deep_gemm as dg
    except ImportError:
        dg = None
    print("| cell | contender | config | µs (lo-hi) | / DeepGEMM | same bits |")
    print("|---|---|---|---|---:|---|")
    for cell in args.cells.split(","):
        slice_name, tokens, routing = cell.split(":", 2)
        op = gemm1_operands(slice_name, int(tokens), routing)
        n, k, used, bound, b, bs, ids_b = op.n, op.k, op.used, op.bound, op.b, op.bs, op.expert_ids
        a_b, as_b, rows_in_use, plan_cfg = op.a, op.a_scale, op.rows_in_use, op.config
        outs = {}

        def plain(m, rows=None, name="", cfg=plan_cfg):
            o = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            outs[name] = (o, None)
            return cfg, lambda: launch(a_b[:m], as_b[:m], b, bs, ids_b[:m], o, config=cfg, rows_in_use=rows)

        def silu_outputs(m, name):
            o = torch.zeros(m, n // 2, dtype=FP8_DTYPE, device="cuda")
            sc = torch.full((m, n // 256), float("nan"), dtype=torch.float32, device="cuda")
            outs[name] = (o, sc)
            return o, sc

        def silu(m, rows=None, name="", cfg=plan_cfg):
            o, sc = silu_outputs(m, name)
            return cfg, lambda: launch(
                a_b[:m], as_b[:m], b, bs, ids_b[:m], o, config=cfg, rows_in_use=rows, act_scale=sc
            )

        def silu_before(m, rows, old_dir):
            o, sc = silu_outputs(m, "silu before, static bound")
            cfg = silu_config(plan_cfg)
            params = kernel_args(a_b[:m], as_b[:m], b, bs, ids_b[:m], o, cfg, rows, None, sc)
            return cfg, old_launcher(kernel_spec(n, k, cfg, silu_quant=1), old_dir, m, n, cfg, params)

        contenders = {}
        if not args.silu_only:
            contenders["plain, rows in use"] = plain(used, name="plain, rows in use")
            contenders["plain, static bound"] = plain(bound, rows_in_use, name="plain, static bound")
            contenders["silu, rows in use"] = silu(used, name="silu, rows in use")
        contenders["silu, static bound"] = silu(bound, rows_in_use, name="silu, static bound")
        if args.old is not None:
            contenders["silu before, static bound"] = silu_before(bound, rows_in_use, args.old)
        if args.stream_k:
            name = "silu sk, static bound"
            contenders[name] = silu(bound, rows_in_use, name, dataclasses.replace(plan_cfg, stream_k=True))
        if args.a_regs:
            ar_cfg = dataclasses.replace(plan_cfg, a_regs=True)
            if not args.silu_only:
                contenders["plain ar, static bound"] = plain(bound, rows_in_use, "plain ar, static bound", ar_cfg)
            contenders["silu ar, static bound"] = silu(bound, rows_in_use, "silu ar, static bound", ar_cfg)
        for g in filter(None, args.group_m.split(",")):
            name = f"silu g{g}, static bound"
            contenders[name] = silu(bound, rows_in_use, name, dataclasses.replace(plan_cfg, group_m=int(g)))
        fns = {name: fn for name, (_, fn) in contenders.items()}
        if dg is not None:
            dg_out = torch.empty(used, n, dtype=torch.bfloat16, device="cuda")
            fns["DeepGEMM contiguous"] = dg_contiguous(dg, a_b[:used], as_b[:used], b, bs, ids_b[:used].clone(), dg_out)
        for fn in fns.values():
            fn()
        torch.cuda.synchronize()
        live = ids_b[:used] >= 0

        def same(x, y):
            (o1, s1), (o2, s2) = outs[x], outs[y]
            eq = torch.equal(o1[:used][live].view(torch.uint8), o2[:used][live].view(torch.uint8))
            return eq and (s1 is None or torch.equal(s1[:used][live], s2[:used][live]))

        bits = {}
        if not args.silu_only:
            bits["plain, rows in use"] = same("plain, rows in use", "plain, static bound")
            bits["silu, rows in use"] = same("silu, rows in use", "silu, static bound")
            bits["plain, static bound"], bits["silu, static bound"] = (
                bits["plain, rows in use"],
                bits["silu, rows in use"],
            )
        for name in contenders:
            if name.startswith("silu g") or name == "silu ar, static bound":
                bits[name] = same(name, "silu, static bound")
            if name == "plain ar, static bound":
                bits[name] = same(name, "plain, static bound")
        if args.old is not None:
            bits["silu before, static bound"] = same("silu before, static bound", "silu, static bound")
        if args.stream_k:  # the share of equal FP8 bytes (sums in another order), and equal scales
            (o1, s1), (o2, s2) = outs["silu sk, static bound"], outs["silu, static bound"]
            equal = (o1[:used][live].view(torch.uint8) == o2[:used][live].view(torch.uint8)).float().mean()
            scale_err = ((s1[:used][live] - s2[:used][live]).abs() / s2[:used][live]).max()
            bits["silu sk, static bound"] = f"{float(equal):.4f} of bytes, scales within {float(scale_err):.1e}"
        graphs = {name: testing.capture_graph(fn)[0] for name, fn in fns.items()}
        t = testing.interleaved_us(graphs, rounds=args.rounds)
        ref = t.get("DeepGEMM contiguous", {}).get("us")
        for name in fns:
            cfg = contenders[name][0] if name in contenders else None
            tag = f"n{cfg.block_n} c{cfg.cluster}{cfg.multicast} g{cfg.group_m}" if cfg else "DeepGEMM"
            tag += " sk" if cfg is not None and cfg.stream_k else ""
            tag += " ar" if cfg is not None and cfg.a_regs else ""
            ratio = f"{t[name]['us'] / ref:.3f}" if ref else "–"
            print(
                f"| {cell} | {name} | {tag} | {t[name]['us']:.1f} ({t[name]['lo']:.1f}-{t[name]['hi']:.1f}) | "
                f"{ratio} | {bits.get(name, '–')} |",
                flush=True,
            )
        del graphs, fns, contenders
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
