"""CPU check of lab/token_experts.py under the Triton interpreter against the reference's
routed_experts (global ids with expert_start 2 of 5 local experts, other ranks' ids and -1, a token
of no local expert, x prequantized or bf16, e4m3 and UE8M0 scales, several launch configs):

    TRITON_INTERPRET=1 python -m lab.check_token_experts
"""

from __future__ import annotations

import torch

from lab.token_experts import TokenGemvConfig, token_experts
from moe_backend import reference
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group


def check(num_tokens, topk, ids, prequantized, ue8m0, cfg, seed=0) -> float:
    gen = torch.Generator().manual_seed(seed)
    e, hidden, inter, start = 5, 384, 256, 2
    w13, w13_s = quantize_fp8_blockwise(torch.randn(e, 2 * inter, hidden, generator=gen) * 0.05)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(e, hidden, inter, generator=gen) * 0.05)
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16()
    weights = torch.rand(num_tokens, topk, generator=gen) + 0.1
    ids = torch.tensor(ids, dtype=torch.int32).view(num_tokens, topk)
    local = ids.long() - start
    local = torch.where((local >= 0) & (local < e), local, -1)
    x_in, x_scale = quantize_fp8_per_token_group(x, 128, ue8m0) if prequantized else (x, None)
    ref = reference.routed_experts(x_in, w13, w13_s, w2, w2_s, weights, local, x_scale=x_scale, ue8m0=ue8m0)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=torch.bfloat16)
    token_experts(x_in, x_scale, w13, w13_s, w2, w2_s, weights, ids, start, ue8m0, out, cfg)
    assert torch.isfinite(out).all(), "rows left unwritten"
    assert (out[~(local >= 0).any(dim=1)] == 0).all(), "a token with no local expert must get zeros"
    err = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert err <= 1e-2, f"rel err {err:.2e} for {cfg}"
    return err


if __name__ == "__main__":
    ids = [2, 6, 0, -1, 3, 4, 5, 6, 7, 9, 1, -1, 6, 2, 3, 4]
    for split in (1, 2, 3):
        for flat in (True, False):
            cfg = TokenGemvConfig(32, 32, 4, 4, flat_down=flat, up_split_k=split)
            for prequantized, ue8m0 in ((True, False), (False, True)):
                print(cfg, prequantized, ue8m0, f"{check(4, 4, ids, prequantized, ue8m0, cfg):.1e}", flush=True)
    print(f"{check(1, 1, [4], True, False, TokenGemvConfig(16, 128, 2, 2, up_split_k=3)):.1e}")
