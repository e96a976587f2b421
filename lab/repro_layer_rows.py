"""Device repro: per-row error of the property test's small layer (8 experts, hidden 128) at T=1..16,
routed part and shared part apart, under several policies."""

import torch
from moe_backend import experts as experts_path, reference
from moe_backend.dispatch import Policy
from moe_backend.layers.router import noaux_tc_route
from tests.test_properties import _layer

torch.manual_seed(0)
layer = _layer(8, 1, 0, False)
cpu = {n: b.cpu() for n, b in layer.named_buffers()}


def rows_err(out, ref):
    d = (out.float().cpu() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-9)
    return d


policies = {
    "default": None,
    "contig": Policy(decode_kernel="triton"),
    "contig_nograph": Policy(decode_kernel="triton", graph_max_tokens=0),
    "nograph": Policy(graph_max_tokens=0),
    "masked": Policy(decode_kernel="masked"),
    "masked_nograph": Policy(decode_kernel="masked", graph_max_tokens=0),
}
for tokens in [3, 1, 2, 4, 5, 7, 9, 16, 3, 3]:
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 128, generator=gen).bfloat16()
    ids_w, ids = noaux_tc_route(x, cpu["gate_weight"], cpu["e_score_correction_bias"], layer.config)
    ref_r = reference.routed_experts(
        x, cpu["w13_fp8"], cpu["w13_scale_inv"], cpu["w2_fp8"], cpu["w2_scale_inv"], ids_w, ids.long(), ue8m0=False
    ).float()
    ref_s = reference.routed_experts(
        x,
        cpu["shared_w13_fp8"],
        cpu["shared_w13_scale_inv"],
        cpu["shared_w2_fp8"],
        cpu["shared_w2_scale_inv"],
        torch.ones(tokens, 1),
        torch.zeros(tokens, 1, dtype=torch.int64),
        ue8m0=False,
    ).float()
    xg = x.to(layer.w13_fp8.device)
    gw, gi = noaux_tc_route(xg, layer.gate_weight, layer.e_score_correction_bias, layer.config)
    same_ids = bool((gi.cpu().sort(1).values == ids.sort(1).values).all())
    shared = layer.shared_expert(xg)
    line = [f"T={tokens:2d} ids_same={same_ids} shared max_row_err={rows_err(shared, ref_s).max():.2e}"]
    for name, pol in policies.items():
        layer.policy = pol
        from moe_backend import ops

        xq, xs = ops.per_token_group_quant(xg, 128, False)
        r = experts_path.routed_experts(
            xq,
            layer.w13_fp8,
            layer.w13_scale_inv,
            layer.w2_fp8,
            layer.w2_scale_inv,
            gw,
            gi,
            x_scale=xs,
            expert_start=0,
            ue8m0=False,
            policy=pol or Policy.from_env(),
            num_global_experts=8,
        )
        full = layer(xg)
        e_r = rows_err(r, ref_r)
        e_f = rows_err(full, ref_r + ref_s)
        line.append(f"{name}: routed {e_r.max():.1e}@{int(e_r.argmax())} layer {e_f.max():.1e}@{int(e_f.argmax())}")
    layer.policy = None
    print(" | ".join(line), flush=True)
