"""Does DeepGEMM's SM90 contiguous GEMM cost follow the layout's static row bound or the rows in use?
Times DeepGEMM's two contiguous GEMMs on one layout (EP8 / TP8 slice, uniform routing) over the
static bound (T*k + E*(align-1) rows, padding and tail marked -1) and over the rows in use only,
then the `deepgemm` A/B backend's whole call (its policy; the rows in use read before timing, as
`compare` and shadow mode do) beside ours.

    python -m lab.probe_deepgemm_rows [--tokens 4096,8192]
"""

from __future__ import annotations

import argparse

import torch

from moe_backend import ops
from moe_backend.ab.backends import get_backend
from moe_backend.ab.measure import time_us
from moe_backend.ab.routing import parse_routing, make_routing
from moe_backend.ab.slices import parse_slices, random_slice_weights
from moe_backend.config import MoEConfig
from moe_backend.providers import deepgemm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="4096,8192")
    p.add_argument("--slices", default="ep8,tp8")
    args = p.parse_args()
    dev = torch.device("cuda")
    align = deepgemm.contiguous_alignment()
    print(f"{'slice':5} {'T':>6} {'bound':>7} {'used':>7} {'dg bound us':>12} {'dg used us':>11} "
          f"{'dg backend us':>14} {'ours us':>8}")
    for s in parse_slices(args.slices, MoEConfig()):
        w13, w13_s, w2, w2_s = random_slice_weights(s, dev)
        for t in (int(v) for v in args.tokens.split(",")):
            weights, ids = make_routing(parse_routing("uniform"), t, s.num_experts, s.topk, device=dev)
            x = torch.randn(t, s.hidden, device=dev, dtype=torch.bfloat16)
            lay = ops.build_contiguous_layout(ids, s.local_experts, alignment=align)
            used = int(lay.expert_offsets[s.local_experts])
            bound = lay.expert_ids.shape[0]
            xq, xs = ops.per_token_group_quant(x, 128, False)
            src = lay.src_token.clamp(min=0).long()
            a, a_s = xq[src].contiguous(), xs[src].contiguous()
            h = torch.empty(bound, w13.shape[1], dtype=torch.bfloat16, device=dev)
            act = torch.randn(bound, w2.shape[2], device=dev, dtype=torch.bfloat16)
            aq, as_ = ops.per_token_group_quant(act, 128, False)
            y = torch.empty(bound, w2.shape[1], dtype=torch.bfloat16, device=dev)
            eid = lay.expert_ids

            def two(rows):
                deepgemm.grouped_gemm_contiguous(a[:rows], a_s[:rows], w13, w13_s, eid[:rows], h[:rows])
                deepgemm.grouped_gemm_contiguous(aq[:rows], as_[:rows], w2, w2_s, eid[:rows], y[:rows])

            t_bound = time_us(lambda: two(bound), dev)
            t_used = time_us(lambda: two(used), dev)
            call = dict(phase="prefill", num_global_experts=s.num_experts)
            dg = get_backend("deepgemm")
            ours = get_backend("phasemoe")
            plan = dg.plan(x, w13, ids, phase="prefill", num_global_experts=s.num_experts)
            in_use = dg.rows_in_use(plan, ids)
            call_dg = dict(call, used_rows=int(in_use.item()) if in_use is not None else None)
            t_dg = time_us(lambda: dg.routed(x, w13, w13_s, w2, w2_s, weights, ids, **call_dg), dev)
            t_ours = time_us(lambda: ours.routed(x, w13, w13_s, w2, w2_s, weights, ids, **call), dev)
            print(f"{s.name:5} {t:6d} {bound:7d} {used:7d} {t_bound:12.0f} {t_used:11.0f} {t_dg:14.0f} {t_ours:8.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
