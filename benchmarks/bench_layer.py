"""The whole routed-expert layer (quant -> layout -> GEMM1 -> SiLU*up+quant -> GEMM2 -> combine)
through `moe_backend.experts.routed_experts`, at the decode and prefill token counts of
BENCHMARKING.md, on the EP8 slice (32 local experts of 256, I = 2048) and the TP8 slice (256
experts, I = 256). Random routing (top-8 of 256). CUDA-graph replay where the layer captures
(decode), plain event timing otherwise; median. Checked against `moe_backend.reference` once per
slice at a small token count.

    python benchmarks/bench_layer.py --json $OUT/layer.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_backend import reference  # noqa: E402
from moe_backend.experts import routed_experts  # noqa: E402
from moe_backend.tune import random_weights  # noqa: E402

SLICES = {"ep8": (32, 2048), "tp8": (256, 256)}  # local experts, intermediate
HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8
DECODE, PREFILL = (1, 8, 32, 128, 256), (2048, 8192, 16384)


def time_us(fn, graph: bool) -> tuple[float, bool]:
    import triton

    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            g.replay()
            torch.cuda.synchronize()
            return 1e3 * triton.testing.do_bench(g.replay, warmup=10, rep=50, return_mode="median"), True
        except Exception:  # the layer holds a host sync: time it eagerly
            torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"), False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--slices", default="ep8,tp8")
    args = p.parse_args(argv)
    rows = []
    for sl in args.slices.split(","):
        e, inter = SLICES[sl]
        w13, w13_s = random_weights(e, 2 * inter, HIDDEN)
        w2, w2_s = random_weights(e, HIDDEN, inter)
        for t in DECODE + PREFILL:
            x = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
            scores = torch.rand(t, GLOBAL_EXPERTS, device="cuda")
            topk_w, topk_ids = scores.topk(TOPK, dim=-1)
            topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).float()
            # EP8: ids outside [0, 32) belong to other ranks and contribute nothing; TP8: all local.
            fn = lambda: routed_experts(x, w13, w13_s, w2, w2_s, topk_w, topk_ids,  # noqa: E731
                                        num_global_experts=GLOBAL_EXPERTS)
            err = None
            if t in (8, 2048):
                out = fn()
                ref = reference.routed_experts(x, w13, w13_s, w2, w2_s, topk_w, topk_ids)
                err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
            try:
                us, graphed = time_us(fn, graph=t <= max(DECODE))
            except Exception as exc:
                print(f"{sl} T={t}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            rows.append(dict(slice=sl, tokens=t, us=us, graph=graphed, relerr=err))
            print(f"{sl} T={t:6d}: {us:9.1f} us  graph={graphed}  relerr={err if err is None else f'{err:.1e}'}",
                  flush=True)
            del x, scores
        del w13, w13_s, w2, w2_s
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    print("\n| slice | tokens | phase | µs | CUDA graph | rel err vs reference |\n|---|---|---|---|---|---|")
    for r in rows:
        phase = "decode" if r["tokens"] <= max(DECODE) else "prefill"
        err = "–" if r["relerr"] is None else f"{r['relerr']:.1e}"
        print(f"| {r['slice']} | {r['tokens']} | {phase} | {r['us']:.1f} | {'yes' if r['graph'] else 'no'} | {err} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
