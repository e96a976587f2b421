"""Shadow mode in SGLang's three dispatch formats (standard, DeepEP normal, DeepEP low-latency):
the served combine input is bit-identical with the shadow on and off, and each format's call is
shadowed and measured. Runs in the SGLang venv; skipped where sglang is not installed."""

from __future__ import annotations

import pytest
import torch

from moe_backend.ab import shadow_hooks
from moe_backend.ab.shadow import Shadow
from moe_backend.quant import quantize_fp8_per_token_group
from tests.integrations.sglang import test_sglang_runner as base  # its case builders; skips without sglang

pytest.importorskip("sglang")
prom = pytest.importorskip("prometheus_client")

registered = base.registered  # the plugin registration fixture (autouse there, module-scoped)
CASE = base.Case(33, 5)


def _dispatches():
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLDispatchOutput, DeepEPNormalDispatchOutput

    ids, topk_weights = base.make_routing(CASE)
    x = base.make_x(CASE.num_tokens)
    x_fp8, x_scale = quantize_fp8_per_token_group(x)
    counts = [int((ids == e).sum()) for e in range(CASE.num_experts)]
    hidden, scale, masked_m = base.masked_dispatch(CASE, ids)
    return {
        "standard": lambda: base.standard_dispatch(x, ids, topk_weights),
        "deepep_normal": lambda: DeepEPNormalDispatchOutput(x_fp8, x_scale, ids.to(torch.int64), topk_weights, counts),
        "deepep_ll": lambda: DeepEPLLDispatchOutput(hidden, scale, ids, topk_weights, masked_m, 8),
    }


@pytest.mark.parametrize("fmt, phase", [("standard", None), ("deepep_normal", "prefill"), ("deepep_ll", "decode")])
def test_served_output_bit_identical_with_shadow(fmt, phase, monkeypatch):
    weights = base.make_experts(CASE.num_experts)
    make = _dispatches()[fmt]
    monkeypatch.delenv("MOE_BACKEND_SHADOW", raising=False)
    off = base.make_runner(CASE).run(make(), base.quant_info(weights)).hidden_states.clone()

    registry = prom.CollectorRegistry()
    shadow = Shadow("reference:1.0", registry=registry)
    monkeypatch.setattr(shadow_hooks, "from_env", lambda: shadow)
    on = base.make_runner(CASE).run(make(), base.quant_info(weights)).hidden_states
    assert torch.equal(on, off)

    assert shadow.sampled == 1
    samples = [
        s
        for m in registry.collect()
        if m.name == "moe_backend_shadow_samples"
        for s in m.samples
        if s.name.endswith("_total")
    ]
    assert len(samples) == 1 and samples[0].value == 1
    if phase:
        assert samples[0].labels["phase"] == phase
    rel = [
        s
        for m in registry.collect()
        if m.name == "moe_backend_shadow_relative_error"
        for s in m.samples
        if s.name.endswith("_bucket") and s.labels["le"] == "0.01"
    ]
    assert rel[0].value == 1  # the reference vs the served kernels: rounding only
