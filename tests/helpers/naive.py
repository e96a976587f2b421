"""An independent, deliberately naive DeepSeek-V3 MoE: per-token loops, explicit block loops for
scales, float64 math. Written from the model card's equations, not from moe_backend's code, so a
shared bug cannot hide."""

import math

import torch

FP8_MAX = 448.0


def dequant_weight(w_fp8, scale_inv):
    w = w_fp8.to(torch.float64)
    out = torch.empty_like(w)
    rows, cols = w.shape
    for bi in range(math.ceil(rows / 128)):
        for bj in range(math.ceil(cols / 128)):
            r, c = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            out[r, c] = w[r, c] * float(scale_inv[bi, bj])
    return out


def fake_quant_row(v):
    """Quantize -> dequantize one 1-D row in 128-column groups, the DeepSeek way (scale = amax/448)."""
    v = v.to(torch.float32)
    out = torch.empty_like(v, dtype=torch.float64)
    for g in range(0, v.numel(), 128):
        chunk = v[g : g + 128]
        scale = max(float(chunk.abs().max()), 1e-10) / FP8_MAX
        q = (chunk / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out[g : g + 128] = q.to(torch.float64) * scale
    return out


def route(x, gate_weight, bias, cfg):
    """Returns a list per token of (expert, weight) pairs."""
    experts_per_group = cfg.n_routed_experts // cfg.n_group
    picks = []
    for t in range(x.shape[0]):
        logits = gate_weight.to(torch.float64) @ x[t].to(torch.float64)
        scores = 1 / (1 + torch.exp(-logits))
        biased = scores + bias.to(torch.float64)
        group_strength = [
            sorted(biased[g * experts_per_group : (g + 1) * experts_per_group].tolist())[-2:]
            for g in range(cfg.n_group)
        ]
        group_strength = [sum(s) for s in group_strength]
        kept = sorted(range(cfg.n_group), key=lambda g: -group_strength[g])[: cfg.topk_group]
        candidates = [e for e in range(cfg.n_routed_experts) if e // experts_per_group in kept]
        chosen = sorted(candidates, key=lambda e: -float(biased[e]))[: cfg.num_experts_per_tok]
        w = torch.tensor([float(scores[e]) for e in chosen], dtype=torch.float64)
        if cfg.norm_topk_prob:
            w = w / w.sum()
        picks.append(list(zip(chosen, (w * cfg.routed_scaling_factor).tolist())))
    return picks


def mlp(x_row, w_gate, w_up, w_down, quantize):
    """One expert on one token; weights already dequantized float64."""
    a = fake_quant_row(x_row) if quantize else x_row.to(torch.float64)
    gate, up = w_gate @ a, w_up @ a
    if quantize:  # GEMM1 writes bf16, as the kernels do
        gate, up = gate.to(torch.bfloat16).to(torch.float64), up.to(torch.bfloat16).to(torch.float64)
    h = gate / (1 + torch.exp(-gate)) * up
    h = fake_quant_row(h) if quantize else h
    y = w_down @ h
    return y.to(torch.bfloat16).to(torch.float64) if quantize else y


def moe_forward(x, weights, cfg, quantize=True, experts=None, shared=True):
    """x [T, H]; weights: dict of HF names -> tensors (FP8 + scale_inv). Returns float64 [T, H].
    `experts`: only these routed experts contribute (an EP slice); `shared`: add the shared expert."""

    def proj(prefix):
        return dequant_weight(weights[f"{prefix}.weight"], weights[f"{prefix}.weight_scale_inv"])

    cache = {}

    def expert(name):
        if name not in cache:
            cache[name] = tuple(proj(f"{name}.{p}") for p in ("gate_proj", "up_proj", "down_proj"))
        return cache[name]

    picks = route(x, weights["gate.weight"], weights["gate.e_score_correction_bias"], cfg)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, w in picks[t]:
            if experts is not None and e not in experts:
                continue
            out[t] += w * mlp(x[t], *expert(f"experts.{e}"), quantize)
        if cfg.n_shared_experts and shared:
            out[t] += mlp(x[t], *expert("shared_experts"), quantize)
    return out


def rel_err(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
