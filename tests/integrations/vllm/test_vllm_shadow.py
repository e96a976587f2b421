"""Shadow mode through vLLM's own FP8 MoE layer with --moe-backend phasemoe, on CPU: the served
output is bit-identical with MOE_BACKEND_SHADOW on and off, and the call is shadowed and measured.
Runs in the vLLM venv; skipped where vLLM is not installed."""

from __future__ import annotations

import pytest
import torch

from moe_backend.ab import shadow_hooks
from moe_backend.ab.shadow import Shadow
from tests.integrations.vllm.test_vllm_experts import HIDDEN, TOPK, cpu_input_quant, vllm_fp8, vllm_layer  # noqa: F401

pytest.importorskip("vllm")
prom = pytest.importorskip("prometheus_client")


@pytest.mark.parametrize("num_tokens", [5, 300])
def test_vllm_layer_output_bit_identical_with_shadow(vllm_layer, cpu_input_quant, monkeypatch, num_tokens):  # noqa: F811
    from vllm.config import set_current_vllm_config

    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, HIDDEN, generator=g).to(torch.bfloat16)
    topk_ids = torch.stack([torch.randperm(4, generator=g)[:TOPK] for _ in range(num_tokens)]).to(torch.int32)
    topk_weights = torch.rand(num_tokens, TOPK, generator=g)
    monkeypatch.delenv("MOE_BACKEND_SHADOW", raising=False)
    with set_current_vllm_config(vllm_layer.config):
        off = vllm_layer.experts.forward_modular(x, topk_weights, topk_ids).clone()
        registry = prom.CollectorRegistry()
        shadow = Shadow("reference:1.0", registry=registry)
        monkeypatch.setattr(shadow_hooks, "from_env", lambda: shadow)
        on = vllm_layer.experts.forward_modular(x, topk_weights, topk_ids)
    assert torch.equal(on, off)
    assert shadow.sampled == 1
    phase = "decode" if num_tokens <= 256 else "prefill"
    labels = {"layer": "0", "backend": "reference", "phase": phase}
    assert registry.get_sample_value("moe_backend_shadow_samples_total", labels) == 1
    assert registry.get_sample_value("moe_backend_shadow_relative_error_bucket", dict(labels, le="0.01")) == 1
