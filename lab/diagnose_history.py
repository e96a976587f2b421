"""Replays tests/layers/test_layer_history_gpu.py's history on the device without stopping at the
first failure, and for each call over its bound separates the causes: the same call repeated, on a
fresh copy of x, and the reference fed the device's own FP8 x (so a difference in the activations'
quantization is told apart from one in the GEMMs). Failing cases' tensors go to $OUT/diag.pt.

    python -m lab.diagnose_history
"""

from __future__ import annotations

import os

import torch

from moe_backend import experts as moe_experts
from moe_backend import ops, reference
from moe_backend.quant import quantize_fp8_per_token_group
from tests.helpers.naive import rel_err
from tests.helpers.property_layers import layer_reference, property_layer
from tests.helpers.tolerances import LAYER_SAME_QUANT_ONE_GROUP, layer_same_quant
from tests.layers.test_layer_history_gpu import (
    HISTORY,
    KERNELS,
    LAYER_TOKENS,
    LAYERS,
    _weights,
    kernel_policy,
    routed_inputs,
)

DUMPS: list[dict] = []


def _quant_compare(x: torch.Tensor, ue8m0: bool) -> str:
    q_dev, s_dev = ops.per_token_group_quant(x, 128, ue8m0)
    q_cpu, s_cpu = quantize_fp8_per_token_group(x.cpu(), 128, ue8m0)
    q_gpu_torch, s_gpu_torch = quantize_fp8_per_token_group(x, 128, ue8m0)
    codes = (q_dev.cpu().view(torch.uint8) != q_cpu.view(torch.uint8)).sum(dim=-1).tolist()
    ratio = float((s_dev.cpu() / s_cpu - 1).abs().max())
    torch_gpu_equal = torch.equal(s_gpu_torch.cpu(), s_cpu) and torch.equal(
        q_gpu_torch.cpu().view(torch.uint8), q_cpu.view(torch.uint8)
    )
    return (
        f"quant: codes differing/row {codes[:8]}, max scale ratio-1 {ratio:.2e}, "
        f"torch-on-GPU == CPU {torch_gpu_equal}"
    )


def _routed_step(step, kernel, case, weights, ue8m0, prequantized):
    ids, x, w = routed_inputs(step, case)
    x_in, x_scale = quantize_fp8_per_token_group(x, 128, ue8m0) if prequantized else (x, None)
    policy = kernel_policy(kernel)

    def run(xi):
        return moe_experts.routed_experts(xi, *weights, w, ids.cuda(), x_scale=x_scale, ue8m0=ue8m0, policy=policy)

    out = run(x_in)
    cpu_w = [t.cpu() for t in weights]
    ref = reference.routed_experts(
        x_in.cpu(), *cpu_w, w.cpu(), ids.long(), x_scale=None if x_scale is None else x_scale.cpu(), ue8m0=ue8m0
    )
    pairs = int((ids >= 0).sum())
    if not pairs or ref.float().norm() == 0:
        return None
    err = rel_err(out.cpu(), ref)
    bound = max(layer_same_quant(pairs), LAYER_SAME_QUANT_ONE_GROUP)
    if err < bound:
        return None
    again = rel_err(run(x_in).cpu(), ref)
    fresh = rel_err(run(x_in.clone()).cpu(), ref)
    lines = [f"step {step} {kernel} {case} ue8m0={ue8m0} prequant={prequantized}: err {err:.4f} (bound {bound:.3f})"]
    lines.append(f"  repeated {again:.4f}, fresh x copy {fresh:.4f}")
    if not prequantized:
        q_dev, s_dev = ops.per_token_group_quant(x, 128, ue8m0)
        ref_devq = reference.routed_experts(q_dev.cpu(), *cpu_w, w.cpu(), ids.long(), x_scale=s_dev.cpu(), ue8m0=ue8m0)
        lines.append(f"  vs reference fed the device's FP8 x: {rel_err(out.cpu(), ref_devq):.4f}")
        lines.append("  " + _quant_compare(x, ue8m0))
    per_row = ((out.cpu().double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1).clamp_min(1e-30)).tolist()
    lines.append(f"  per-row err {[round(e, 4) for e in per_row[:8]]}")
    if len(DUMPS) < 4:
        DUMPS.append(dict(step=step, kernel=kernel, case=case, ue8m0=ue8m0, x=x.cpu(), ids=ids, w=w.cpu(),
                          weights=cpu_w, out=out.cpu(), ref=ref))
    return "\n".join(lines)


def _layer_step(layer, spec, tokens):
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens)).bfloat16().cuda()
    out = layer(x)
    ue8m0 = layer.config.ue8m0_scales
    ref, pairs = layer_reference(layer, x)
    if ref.norm() == 0:
        return None
    bound = max(layer_same_quant(pairs), LAYER_SAME_QUANT_ONE_GROUP)
    err = rel_err(out.cpu(), ref)
    if err < bound:
        return None
    q_dev, s_dev = ops.per_token_group_quant(x, 128, ue8m0)
    lines = [f"layer {spec} T={tokens}: err {err:.4f} (bound {bound:.3f})"]
    again, fresh = rel_err(layer(x).cpu(), ref), rel_err(layer(x.clone()).cpu(), ref)
    lines.append(f"  repeated {again:.4f}, fresh x copy {fresh:.4f}")
    ref_devq = layer_reference(layer, x, (q_dev, s_dev))[0]
    lines.append(f"  vs reference fed the device's FP8 x: {rel_err(out.cpu(), ref_devq):.4f}")
    lines.append("  " + _quant_compare(x, ue8m0))
    if len(DUMPS) < 6:
        DUMPS.append(dict(layer=spec, tokens=tokens, x=x.cpu(), out=out.cpu(), ref=ref))
    return "\n".join(lines)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    found, step, kept = [], 0, {}
    for round_ in range(2):
        for case in HISTORY:
            for kernel in KERNELS:
                step += 1
                ue8m0, prequantized = bool(step % 3 == 0), bool(step % 2)
                num_local, _k, hidden, inter, _t = case
                if round_ == 0:
                    key = (num_local, hidden, inter, ue8m0)
                    kept.setdefault(key, None)
                    if kept[key] is None:
                        kept[key] = _weights(*key, seed=len(kept) - 1)
                    weights = kept[key]
                else:
                    weights = _weights(num_local, hidden, inter, ue8m0, seed=step)
                msg = _routed_step(step, kernel, case, weights, ue8m0, prequantized)
                if msg:
                    found.append(msg)
                    print(msg, flush=True)
    for spec in LAYERS:
        layer = property_layer(*spec, "cuda")
        for tokens in LAYER_TOKENS:
            msg = _layer_step(layer, spec, tokens)
            if msg:
                found.append(msg)
                print(msg, flush=True)
    print(f"== {len(found)} calls over their bound")
    out = os.environ.get("OUT")
    if out and DUMPS:
        torch.save(DUMPS, os.path.join(out, "diag.pt"))


if __name__ == "__main__":
    main()
