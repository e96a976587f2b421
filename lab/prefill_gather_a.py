"""Device experiment: at prefill, is it cheaper for GEMM1 to read its A rows through src_token
(the Triton kernel's GATHER_A, no permuted copy) than to gather them first and run the CUDA GEMM?

For each (slice, tokens, routing) the whole routed pipeline (`plan_execution.run_plan`) is timed
as a CUDA-graph replay under plan variants that differ only in GEMM1's provider / operand prep:
  policy     the plan the policy makes (CUDA GEMMs at these sizes, x gathered into the layout)
  g1triton   GEMM1 on our Triton kernel over the gathered rows (its tuned contiguous config)
  g1gather   GEMM1 on our Triton kernel reading token rows through src_token (no gather)
  allgather  both GEMMs on Triton, GEMM1 gathering
  cudagather / cudacopy  the policy plan with our CUDA GEMM1 reading the token rows through
             src_token itself / over the gathered copy (whichever the policy did not pick)
  siluapart  the policy plan with the SiLU*up quant kernel between the GEMMs (where the policy's
             CUDA GEMM1 stores it from its epilogue)
  nodirect   the policy plan with GEMM2 storing every row into y for the combine (where the
             policy's CUDA GEMM2 stores single-slot tokens' rows into the output itself)
  sk1 / sk2 / sk12  the policy plan with stream-K on our CUDA GEMM1 / GEMM2 / both
  ar1 / ar2 / ar12  the policy plan with our 256-wide CUDA GEMM1 / GEMM2 / both reading each K
             block's A fragments once into registers (`a_regs`)
  sh12       the policy plan with both CUDA GEMMs skipping the MMAs of tiles' all-padding halves
  sh12c1 / c1  the same (and without the skip) on single CTAs instead of the plan's pairs
Timed interleaved (rounds of A B C D E), checked against the policy plan's output (rel err).

    python -m lab.prefill_gather_a                         # GPU, about a minute
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from lab._plan_variants import SLICES, cell_inputs, slice_plan, slice_weights, time_plans


def _variants(plan, device):
    from moe_backend.dispatch import gemm_choice
    from moe_backend.dispatch import plan as plan_mod

    def triton_gemm(g):
        rows_hint = plan.expected_m
        return gemm_choice.gemm_plan("triton", "contiguous", rows_hint, rows_hint, g.n, g.k, device)

    g1 = triton_gemm(plan.gemm1)
    g2 = triton_gemm(plan.gemm2)
    out = {"policy": plan}

    def with_gemms(gemm1, gemm2, gather):
        align = gemm_choice.segment_alignment((gemm1, gemm2))
        rows = plan_mod.max_contiguous_rows(plan.num_tokens * plan.topk, plan.num_experts, align)
        return dataclasses.replace(
            plan,
            gemm1=gemm1,
            gemm2=gemm2,
            alignment=align,
            num_rows=rows,
            gather_a=gather,
            fused_permute_quant=False,
            silu_in_gemm1=False,
            graph_plan=None,
        )

    no_tma = dataclasses.replace(g1, config=tuple((k, v) for k, v in g1.config if k != "TMA"))
    out["g1triton"] = with_gemms(g1, plan.gemm2, False)
    out["g1gather"] = with_gemms(no_tma, plan.gemm2, True)
    out["allgather"] = with_gemms(no_tma, g2, True)
    if plan.gemm1.provider == "cuda":  # the CUDA GEMM1 with the other choice of operand
        gather = not plan.gather_a
        real_rows = min(plan.num_tokens * plan.topk, plan.expected_m * plan.num_experts)
        fused = not gather and gemm_choice.fused_permute_quant_pays(plan.num_tokens, real_rows)
        name = "cudagather" if gather else "cudacopy"
        out[name] = dataclasses.replace(plan, gather_a=gather, fused_permute_quant=fused, graph_plan=None)
    if plan.silu_in_gemm1:  # the policy plan with the SiLU*up quant kernel between the GEMMs
        out["siluapart"] = dataclasses.replace(plan, silu_in_gemm1=False, graph_plan=None)
    if plan.direct_rows:  # the policy plan with every row going through y and the combine
        out["nodirect"] = dataclasses.replace(plan, direct_rows=False, graph_plan=None)

    def cuda_with(g, **changes):
        """`g` with its CUDA config changed; None for another provider or a config the launch picks."""
        if g.provider != "cuda" or g.config is None:
            return None
        return dataclasses.replace(g, config=dataclasses.replace(g.config, **changes))

    def each_and_both(prefix, g1, g2):
        """`prefix`1 / 2 / 12: the plan with the changed GEMM1, GEMM2, both (where each applies)."""
        for name, gemms in (("1", {"gemm1": g1}), ("2", {"gemm2": g2}), ("12", {"gemm1": g1, "gemm2": g2})):
            if all(g is not None for g in gemms.values()):
                out[prefix + name] = dataclasses.replace(plan, **gemms, graph_plan=None)

    each_and_both("sk", cuda_with(plan.gemm1, stream_k=True), cuda_with(plan.gemm2, stream_k=True))

    def a_regs(g):
        wide = g.provider == "cuda" and g.config is not None and g.config.block_n == 256
        return cuda_with(g, a_regs=True) if wide else None

    each_and_both("ar", a_regs(plan.gemm1), a_regs(plan.gemm2))

    # Both CUDA GEMMs skipping tiles' all-padding halves (never with stream-K, which keeps every
    # MMA), and on single CTAs: a CTA pair runs in step, so a skipped half only frees its SM when
    # the partner's half is skipped too.
    gemms = (plan.gemm1, plan.gemm2)
    if all(g.provider == "cuda" and g.config is not None and not g.config.stream_k for g in gemms):
        single = {"cluster": 1, "multicast": "b"}
        skip = {"skip_padding_halves": True}
        for name, changes in (("sh12", skip), ("sh12c1", {**skip, **single}), ("c1", single)):
            g1, g2 = (cuda_with(g, **changes) for g in gemms)
            out[name] = dataclasses.replace(plan, gemm1=g1, gemm2=g2, graph_plan=None)
    return out


def main() -> None:
    from moe_backend.dispatch import Policy

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="2048,16384")
    p.add_argument("--routing", default="0.6,0")
    p.add_argument("--slices", default=",".join(SLICES))
    p.add_argument("--only", default="", help="comma-separated variant names to time beside the policy (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows = []
    for slice_name in args.slices.split(","):
        weights = slice_weights(slice_name)
        for tokens in map(int, args.tokens.split(",")):
            for alpha in map(float, args.routing.split(",")):
                x, tw, ti = cell_inputs(tokens, alpha, dev)
                plan = slice_plan(slice_name, tokens, "prefill", dev, Policy(graph_max_tokens=0))
                variants = _variants(plan, dev)
                if args.only:
                    keep = {"policy", *args.only.split(",")}
                    variants = {name: v for name, v in variants.items() if name in keep}
                times, outs = time_plans(variants, (x, *weights, tw, ti), rounds=args.rounds)
                ref = outs["policy"]
                for name, vp in variants.items():
                    err = 0.0 if torch.equal(outs[name], ref) else float((outs[name] - ref).norm() / ref.norm())
                    rows.append(
                        (
                            slice_name,
                            tokens,
                            alpha,
                            name,
                            times[name]["us"],
                            times[name]["us"] / times["policy"]["us"],
                            err,
                            vp.describe(),
                        )
                    )
                    print(
                        f"{slice_name} T={tokens} zipf={alpha} {name:10s} {times[name]['us']:9.1f} us "
                        f"x{times[name]['us'] / times['policy']['us']:.3f} err {err:.1e} | {vp.describe()}",
                        flush=True,
                    )
                del outs
                torch.cuda.empty_cache()
    print("\nslice tokens zipf variant us vs_policy")
    for r in rows:
        print(f"{r[0]} {r[1]} {r[2]} {r[3]} {r[4]:.1f} {r[5]:.3f}")


if __name__ == "__main__":
    main()
