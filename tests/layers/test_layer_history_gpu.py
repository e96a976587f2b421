"""The layer property's history on the device, replayed deterministically: routed_experts under
every policy kernel, then the property's small layers at several token counts, each checked
against the reference; a failure names the diverging stage (tests/helpers/layer_diagnosis.py).

Its fixed inputs hit e4m3 rounding ties (bf16 rows whose x * 448 / amax lands exactly on a
midpoint: T=1 and 5 in the history, T=3 in the layers), which round the other way when the
activations' scale is one ulp off the reference's, as it was with Triton's approximate division;
the quantizer divides exactly (kernels/_group_quant_core.py).

History: `routed_experts` under every policy kernel the property draws (contiguous, triton,
masked, ...), token counts on both sides of the graph buckets and the decode/prefill split, with
expert weights kept (as the property does) and weights freed and reallocated every call (so
addresses, and the graphs keyed on them, are reused with other shapes); then layers of 8 and 16
experts, slices 1, 2, 4, fp32 and UE8M0 scales, each called at 4, 16, 300, 3, 1, 2, 3, 5, 3 tokens.
Run on the device: `python -m pytest -q -s tests/layers/test_layer_history_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from moe_backend import experts as moe_experts
from moe_backend import reference
from moe_backend.dispatch import Policy
from moe_backend.layers import DeepseekV3MoE
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from tests.helpers.layer_diagnosis import diagnose_layer_call
from tests.helpers.naive import rel_err
from tests.helpers.property_layers import layer_reference, property_layer
from tests.helpers.tolerances import LAYER_SAME_QUANT_ONE_GROUP, layer_same_quant

pytestmark = pytest.mark.gpu

KERNELS = ["contiguous", "triton_contiguous", "triton", "masked", "triton_masked"]
# (local experts, top-k, hidden, intermediate, tokens), cycled over the kernels, scales and inputs.
HISTORY = [
    (8, 4, 128, 128, 3),
    (8, 4, 128, 128, 4),
    (16, 4, 128, 256, 300),
    (4, 2, 256, 128, 7),
    (32, 8, 128, 128, 2048),
    (2, 1, 128, 128, 1),
    (8, 4, 128, 128, 4096),
    (1, 1, 256, 256, 16),
    (16, 8, 256, 128, 5),
    (8, 4, 128, 128, 1000),
]
LAYER_TOKENS = [4, 16, 300, 3, 1, 2, 3, 5, 3]
LAYERS = [(8, 1, 0, False), (16, 2, 1, False), (8, 2, 1, False), (8, 1, 0, True), (16, 4, 0, False), (8, 4, 3, False)]


def _weights(num_local: int, hidden: int, inter: int, ue8m0: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_local, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_local, hidden, inter, generator=gen) / inter**0.5
    return tuple(t.cuda() for t in (*quantize_fp8_blockwise(w13, 128, ue8m0), *quantize_fp8_blockwise(w2, 128, ue8m0)))


def routed_inputs(step: int, case: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """History step `step`'s (topk ids on the CPU, some -1; x bf16 and topk weights on the GPU)."""
    num_local, k, hidden, _inter, tokens = case
    gen = torch.Generator().manual_seed(step)
    ids = torch.rand(tokens, num_local, generator=gen).argsort(dim=1)[:, :k]
    ids = torch.where(torch.rand(ids.shape, generator=gen) < 0.2, -1, ids).to(torch.int32 if step % 2 else torch.int64)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16().cuda()
    return ids, x, torch.rand(tokens, k, generator=gen).cuda()


def kernel_policy(kernel: str) -> Policy:
    """A policy that runs `kernel` at every token count of the history."""
    static = kernel in ("masked", "triton_masked", "triton")
    return Policy(
        prefill_kernel="contiguous" if static else kernel,
        decode_kernel=kernel if static else "masked",
        decode_max_tokens=4096 if static else 0,
    )


def _routed_call(step: int, kernel: str, case: tuple, weights, ue8m0: bool, prequantized: bool) -> None:
    ids, x, w = routed_inputs(step, case)
    x_in, x_scale = quantize_fp8_per_token_group(x, 128, ue8m0) if prequantized else (x, None)
    policy = kernel_policy(kernel)
    out = moe_experts.routed_experts(x_in, *weights, w, ids.cuda(), x_scale=x_scale, ue8m0=ue8m0, policy=policy)
    ref = reference.routed_experts(
        x_in.cpu(),
        *(t.cpu() for t in weights),
        w.cpu(),
        ids.long(),
        x_scale=None if x_scale is None else x_scale.cpu(),
        ue8m0=ue8m0,
    )
    pairs = int((ids >= 0).sum())
    if pairs and ref.float().norm() > 0:
        err = rel_err(out.cpu(), ref)
        bound = max(layer_same_quant(pairs), LAYER_SAME_QUANT_ONE_GROUP)
        assert err < bound, f"history step {step} {kernel} {case} ue8m0={ue8m0}: rel err {err:.4f}"


def _check_layer_call(layer: DeepseekV3MoE, tokens: int, where: str) -> None:
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens)).bfloat16().cuda()
    out = layer(x)
    ref, pairs = layer_reference(layer, x)
    if ref.norm() == 0:
        return
    bound = max(layer_same_quant(pairs), LAYER_SAME_QUANT_ONE_GROUP)
    err = rel_err(out.cpu(), ref)
    assert err < bound, f"{where} T={tokens}: rel err {err:.6f} >= {bound:.4f}; {diagnose_layer_call(layer, x, out)}"


def test_layer_after_the_property_history():
    kept = {}
    step = 0
    for round_ in range(2):
        for i, case in enumerate(HISTORY):
            for kernel in KERNELS:
                step += 1
                ue8m0, prequantized = bool(step % 3 == 0), bool(step % 2)
                num_local, _k, hidden, inter, _tokens = case
                if round_ == 0:  # kept, as the property keeps its weights per shape
                    key = (num_local, hidden, inter, ue8m0)
                    if key not in kept:
                        kept[key] = _weights(*key, seed=len(kept))
                    weights = kept[key]
                else:  # fresh every call: freed addresses come back with other shapes and scales
                    weights = _weights(num_local, hidden, inter, ue8m0, seed=step)
                _routed_call(step, kernel, case, weights, ue8m0, prequantized)
                del weights
    layers = {spec: property_layer(*spec, "cuda") for spec in LAYERS}
    for spec, layer in layers.items():
        for tokens in LAYER_TOKENS:
            _check_layer_call(layer, tokens, f"layer {spec}")
