"""Shadow mode on CPU: the sampling rate, the served output left bit-identical, Prometheus metrics
scraped over HTTP, JSON lines, bad settings, failures that never reach serving."""

import json
import math
import urllib.request

import pytest
import torch

from moe_backend.ab import shadow as ab_shadow
from moe_backend.ab import shadow_hooks
from moe_backend.ab.backends import register_backend, unregister_backend
from moe_backend.ab.shadow import Shadow, parse_shadow_spec
from moe_backend.ab.shadow_sampling import FLUSH_EVERY
from moe_backend.layers import DeepseekV3MoE
from moe_backend.testing import random_moe_weights

prom = pytest.importorskip("prometheus_client")
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families

H, INTER, E = 256, 128, 4


@pytest.fixture
def weights():
    from moe_backend.ab.slices import SliceSpec, random_slice_weights

    return random_slice_weights(SliceSpec("t", H, INTER, E, E, 2), torch.device("cpu"), seed=0)


def _batch(tokens, seed=0):
    from moe_backend import ops
    from moe_backend.ab.routing import make_routing, parse_routing

    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    tw, ids = make_routing(parse_routing("uniform"), tokens, E, 2, seed=seed)
    x_fp8, x_scale = ops.per_token_group_quant(x, 128)
    return x_fp8, x_scale, tw, ids


@pytest.fixture
def counting():
    """A cheap shadow backend that counts its calls and returns zeros (relative error 1)."""
    calls = []

    def fn(x, *args, **kwargs):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], H, dtype=torch.bfloat16)

    def masked_fn(a_fp8, *args, **kwargs):
        calls.append(a_fp8.shape[0])
        return torch.zeros(*a_fp8.shape[:2], H, dtype=torch.bfloat16)

    register_backend("counting", fn, masked_fn=masked_fn)
    yield calls
    unregister_backend("counting")


@pytest.fixture
def perturbed():
    def fn(x, *args, **kwargs):
        from moe_backend.ab.backends import get_backend

        return (get_backend("reference").routed(x, *args, **kwargs).float() * 1.05).to(torch.bfloat16)

    register_backend("perturbed", fn)
    yield "perturbed"
    unregister_backend("perturbed")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "expected 'backend:rate'"),
        ("deepgemm", "is not 'backend:rate'"),
        ("deepgemm:0", r"in \(0, 1\]"),
        ("deepgemm:1.5", r"in \(0, 1\]"),
        ("deepgemm:abc", r"in \(0, 1\]"),
        ("nope:0.1", "unknown name 'nope'"),
        ("triton:0.1,triton:0.2", "given twice"),
        (":0.1", "is not 'backend:rate'"),
    ],
)
def test_bad_specs(spec, message, monkeypatch):
    with pytest.raises(ValueError, match=message) as exc:
        parse_shadow_spec(spec)
    assert "MOE_BACKEND_SHADOW" in str(exc.value)
    if spec:
        monkeypatch.setenv("MOE_BACKEND_SHADOW", spec)
        with pytest.raises(ValueError, match="MOE_BACKEND_SHADOW"):
            shadow_hooks.from_env()


def test_target_lists_are_checked_as_specs_are():
    from moe_backend.ab.shadow_spec import ShadowTarget

    for targets, error, message in [
        (
            [ShadowTarget("triton", 0.0)],
            ValueError,
            r"targets: the rate of backend 'triton' must be a number in \(0, 1\]",
        ),
        ([ShadowTarget("triton", float("nan"))], ValueError, "must be a number"),
        ([ShadowTarget("triton", 2.0)], ValueError, "must be a number"),
        ([ShadowTarget("triton", "0.1")], ValueError, "must be a number"),
        ([ShadowTarget("nope", 0.1)], ValueError, "unknown name 'nope'"),
        ([ShadowTarget("triton", 0.1), ShadowTarget("triton", 0.2)], ValueError, "given twice"),
        ([], ValueError, "empty list"),
        ([("triton", 0.1)], TypeError, "expected ShadowTarget items"),
        (3, TypeError, "expected a list of ShadowTarget"),
    ]:
        with pytest.raises(error, match=message):
            Shadow(targets)


def test_shadow_log_is_closed(tmp_path):
    """close() closes the log once; a Shadow dropped without close() closes it when collected."""
    import gc
    import os

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    shadows = [Shadow("triton:0.5", log_path=str(tmp_path / f"log{i}.jsonl")) for i in range(5)]
    assert open_fds() == before + 5
    shadows[0].close()
    shadows[0].close()
    assert open_fds() == before + 4
    del shadows
    gc.collect()
    assert open_fds() == before


def test_env_settings(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_BACKEND_SHADOW", raising=False)
    assert shadow_hooks.from_env() is None
    monkeypatch.setenv("MOE_BACKEND_SHADOW", "deepgemm:0.01,triton:0.5")
    monkeypatch.setenv("MOE_BACKEND_SHADOW_SEED", "seven")
    with pytest.raises(ValueError, match="MOE_BACKEND_SHADOW_SEED"):
        shadow_hooks.from_env()
    monkeypatch.setenv("MOE_BACKEND_SHADOW_SEED", "7")
    monkeypatch.setenv("MOE_BACKEND_SHADOW_LOG", str(tmp_path / "no" / "dir.jsonl"))
    with pytest.raises(ValueError, match="MOE_BACKEND_SHADOW_LOG"):
        shadow_hooks.from_env()
    monkeypatch.delenv("MOE_BACKEND_SHADOW_LOG")
    s = shadow_hooks.from_env()
    assert [(t.backend, t.rate) for t in s.targets] == [("deepgemm", 0.01), ("triton", 0.5)]
    assert shadow_hooks.from_env() is s  # built once per setting
    with pytest.raises(TypeError, match="shadow: expected"):
        shadow_hooks.shadow_arg(0.1)


def test_sampling_rate_is_honoured(weights, counting):
    rate, calls = 0.05, 4000
    x_fp8, x_scale, tw, ids = _batch(1)
    primary = torch.zeros(1, H, dtype=torch.bfloat16)
    s = Shadow(f"counting:{rate}", seed=11, registry=prom.CollectorRegistry())
    for _ in range(calls):
        s.observe_routed(primary, x_fp8, weights, tw, ids, x_scale=x_scale)
    mean, sd = rate * calls, math.sqrt(calls * rate * (1 - rate))
    assert abs(len(counting) - mean) < 5 * sd, (len(counting), mean, sd)  # 5 sigma: fails 1 in 1.7 million
    assert s.calls == calls and s.sampled == len(counting)
    # Seeded: the same seed samples the same calls, another seed others.
    picks = []
    for seed in (11, 11, 12):
        s = Shadow(f"counting:{rate}", seed=seed, registry=prom.CollectorRegistry())
        picks.append([s._sample() != [] for _ in range(500)])
    assert picks[0] == picks[1] != picks[2]


def test_layer_output_bit_identical_and_metrics_over_http(weights, perturbed, tmp_path):
    from moe_backend import MoEConfig

    cfg = MoEConfig(
        hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1
    )
    registry = prom.CollectorRegistry()
    log = tmp_path / "shadow.jsonl"
    shadow = Shadow(f"{perturbed}:1.0,reference:1.0", registry=registry, log_path=str(log))
    on = DeepseekV3MoE(cfg, shadow=shadow)
    off = DeepseekV3MoE(cfg)
    for layer in (on, off):
        layer.load_weights(random_moe_weights(cfg, seed=4))
    x = torch.randn(2, 9, H).to(torch.bfloat16)
    for _ in range(3):
        y_on, y_off = on(x), off(x)
        assert torch.equal(y_on, y_off)  # bit-identical: the shadow never writes the served output
    y_prefill = on(torch.randn(300, H).to(torch.bfloat16))  # past decode_max_tokens: the prefill phase
    assert y_prefill.shape == (300, H)

    server, thread = prom.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    def value(name, backend, phase, **extra):
        return samples[(name, tuple(sorted(dict(layer="0", backend=backend, phase=phase, **extra).items())))]

    for backend in (perturbed, "reference"):
        assert value("moe_backend_shadow_calls_total", backend, "decode") == 3
        assert value("moe_backend_shadow_samples_total", backend, "decode") == 3
        assert value("moe_backend_shadow_samples_total", backend, "prefill") == 1
        assert value("moe_backend_shadow_latency_seconds_count", backend, "decode") == 3
        assert value("moe_backend_shadow_latency_seconds_sum", backend, "decode") > 0
    # The 5% perturbation lands in the (2e-2, 5e-2] or (5e-2, 0.1] buckets; the reference pipeline
    # differs from the served one by rounding only (<= 1e-2).
    assert value("moe_backend_shadow_relative_error_bucket", perturbed, "decode", le="0.02") == 0
    assert value("moe_backend_shadow_relative_error_bucket", perturbed, "decode", le="0.1") == 3
    assert value("moe_backend_shadow_relative_error_bucket", "reference", "decode", le="0.01") == 3
    assert value("moe_backend_shadow_argmax_agreement_bucket", perturbed, "decode", le="0.9") == 0

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 8 and {ln["backend"] for ln in lines} == {perturbed, "reference"}
    bad = [ln for ln in lines if ln["backend"] == perturbed]
    assert all(0.04 < ln["rel_err"] < 0.06 and ln["argmax_agreement"] > 0.9 for ln in bad)
    assert {ln["rows"] for ln in lines} == {18, 300} and {ln["phase"] for ln in lines} == {"decode", "prefill"}
    shadow.sink.close()


def test_vllm_paths_bit_identical_with_shadow_on(weights, counting, monkeypatch):
    """The vLLM apply functions (free of vLLM) with MOE_BACKEND_SHADOW on and off."""
    from moe_backend.dispatch.policy import Policy
    from moe_backend.reference import build_masked_layout
    from moe_backend_integrations.vllm._apply import apply_batched, apply_standard

    x_fp8, x_scale, tw, ids = _batch(12, seed=3)
    layout = build_masked_layout(ids, E)
    a_fp8, a_scale = x_fp8[layout.src_token.clamp_min(0).long()], x_scale[layout.src_token.clamp_min(0).long()]
    a_fp8, a_scale = a_fp8.view(E, -1, H), a_scale.view(E, -1, H // 128)
    outs = {}
    for setting in ("", "counting:1.0"):
        monkeypatch.setenv("MOE_BACKEND_SHADOW", setting)
        std = torch.full((12, H), float("nan"), dtype=torch.bfloat16)
        apply_standard(std, x_fp8, x_scale, *weights, tw, ids, None, False, Policy())
        batched = torch.full((E, a_fp8.shape[1], H), float("nan"), dtype=torch.bfloat16)
        workspace = torch.empty(E * a_fp8.shape[1] * 2 * INTER, dtype=torch.bfloat16)
        apply_batched(batched, a_fp8, a_scale, *weights, layout.masked_m, workspace)
        outs[setting] = (std, batched)
    assert len(counting) == 2  # one standard, one batched shadow run
    assert torch.equal(outs[""][0], outs["counting:1.0"][0])
    assert torch.equal(outs[""][1].nan_to_num(7.0), outs["counting:1.0"][1].nan_to_num(7.0))


def test_failures_and_capture_never_reach_serving(weights, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    register_backend("broken", broken)
    try:
        registry = prom.CollectorRegistry()
        s = Shadow("broken:1.0", registry=registry)
        x_fp8, x_scale, tw, ids = _batch(3)
        primary = torch.zeros(3, H, dtype=torch.bfloat16)
        for _ in range(3):
            s.observe_routed(primary, x_fp8, weights, tw, ids, x_scale=x_scale)  # must not raise
        assert (
            registry.get_sample_value("moe_backend_shadow_errors_total", {"backend": "broken", "error": "RuntimeError"})
            == 3
        )
        assert capsys.readouterr().err.count("kernel exploded") == 1  # warned once
        with pytest.raises(TypeError, match="experts: expected"):  # our hook called wrongly: a bug, raised
            s.observe_routed(primary, x_fp8, 3, tw, ids)
        monkeypatch.setattr(ab_shadow, "capturing", lambda: True)
        s.observe_routed(primary, x_fp8, weights, tw, ids, x_scale=x_scale)
        assert (
            registry.get_sample_value(
                "moe_backend_shadow_skipped_total", {"backend": "broken", "reason": "graph_capture"}
            )
            == 1
        )
        assert s.calls == 3  # nothing sampled, nothing drawn while capturing
    finally:
        unregister_backend("broken")


def test_layers_are_labelled_in_first_call_order(weights, counting):
    registry = prom.CollectorRegistry()
    s = Shadow("counting:1.0", registry=registry)
    other = tuple(w.clone() for w in weights)
    x_fp8, x_scale, tw, ids = _batch(2)
    primary = torch.zeros(2, H, dtype=torch.bfloat16)
    for w in (other, weights, other):
        s.observe_routed(primary, x_fp8, w, tw, ids, x_scale=x_scale)
    s.observe_routed(primary, x_fp8, weights, tw, ids, x_scale=x_scale, layer="L61")
    get = registry.get_sample_value
    assert get("moe_backend_shadow_calls_total", {"layer": "0", "backend": "counting", "phase": "decode"}) == 2
    assert get("moe_backend_shadow_calls_total", {"layer": "1", "backend": "counting", "phase": "decode"}) == 1
    assert get("moe_backend_shadow_calls_total", {"layer": "L61", "backend": "counting", "phase": "decode"}) == 1


def test_layer_shadow_argument_is_checked_at_construction():
    from moe_backend import MoEConfig

    cfg = MoEConfig(
        hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1
    )
    with pytest.raises(ValueError, match="shadow: backend: unknown name 'bogus'"):
        DeepseekV3MoE(cfg, shadow="bogus:0.1")
    with pytest.raises(ValueError, match=r"shadow: the rate of 'triton:2' must be a number in \(0, 1\]"):
        DeepseekV3MoE(cfg, shadow="triton:2")
    with pytest.raises(TypeError, match="shadow: expected a Shadow"):
        DeepseekV3MoE(cfg, shadow=0.01)
    assert isinstance(DeepseekV3MoE(cfg, shadow="triton:0.5").shadow, Shadow)
    assert DeepseekV3MoE(cfg).shadow is None


def test_a_call_not_sampled_does_no_host_work(weights, counting, monkeypatch):
    """Shadow mode's cost on the calls it does not sample is host work on the serving path: no
    torch op (allocation, copy, reduction), no CUDA query or sync, no random draw per call, no
    metric update per call (the calls counter is published in batches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moe_backend.ab.shadow_metrics import ShadowSink

    x_fp8, x_scale, tw, ids = _batch(2)
    primary = torch.zeros(2, H, dtype=torch.bfloat16)
    registry = prom.CollectorRegistry()
    s = Shadow("counting:1e-6", seed=3, registry=registry)
    counts = {}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        return wrapper

    for owner, name in [
        (torch.cuda, "is_available"),
        (torch.cuda, "is_current_stream_capturing"),
        (torch.cuda, "synchronize"),
        (torch.cuda.Event, "synchronize"),
        (torch.cuda.Event, "query"),
        (torch.Tensor, "item"),
        (torch.Tensor, "tolist"),
        (type(s._rng), "random"),
        (ShadowSink, "call"),
    ]:
        monkeypatch.setattr(owner, name, counted(name, getattr(owner, name)))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["torch op"] = counts.get("torch op", 0) + 1
            return func(*args, **(kwargs or {}))

    calls = 2000
    with Ops():
        for _ in range(calls):
            s.observe_routed(primary, x_fp8, weights, tw, ids, x_scale=x_scale)
    assert s.sampled == 0 and not counting  # rate 1e-6, seeded: none of these calls is sampled
    assert s.calls == calls
    assert counts.get("torch op", 0) == 0
    for per_call in ("synchronize", "query", "item", "tolist", "random"):
        assert counts.get(per_call, 0) == 0, (per_call, counts)
    # The slow path (a capture check, publishing the calls counter) runs every FLUSH_EVERY calls.
    for batched in ("is_available", "is_current_stream_capturing", "call"):
        assert counts.get(batched, 0) <= calls // FLUSH_EVERY, (batched, counts)
    s.flush()
    calls_total = registry.get_sample_value(
        "moe_backend_shadow_calls_total", {"layer": "0", "backend": "counting", "phase": "decode"}
    )
    assert calls_total == calls  # batched, none lost


def test_geometric_gaps_sample_each_call_independently():
    """The countdown's gaps give each call the same chance, whatever the calls before it: the
    sampled fraction of calls right after a sample equals the rate too (no dead time, no burst)."""
    rate, calls = 0.2, 20000
    s = Shadow(f"reference:{rate}", seed=5, registry=prom.CollectorRegistry())
    picks = [s._sample() != [] for _ in range(calls)]
    after = [b for a, b in zip(picks, picks[1:]) if a]
    sd = math.sqrt(rate * (1 - rate))
    assert abs(sum(picks) / calls - rate) < 5 * sd / math.sqrt(calls)
    assert abs(sum(after) / len(after) - rate) < 5 * sd / math.sqrt(len(after))
    # Two backends draw independently: both sampled on one call at rate^2.
    s = Shadow("reference:0.5,triton:0.5", seed=5, registry=prom.CollectorRegistry())
    both = sum(len(s._sample()) == 2 for _ in range(calls))
    assert abs(both / calls - 0.25) < 5 * math.sqrt(0.25 * 0.75 / calls)


def test_divergence_sums_match_the_device_metrics():
    from moe_backend.ab.divergence import divergence, divergence_sums, from_sums

    g = torch.Generator().manual_seed(2)
    ref = torch.randn(4, 6, H, generator=g).to(torch.bfloat16)
    out = (ref.float() + 0.01 * torch.randn(4, 6, H, generator=g)).to(torch.bfloat16)
    out[1, 2] = float("nan")  # a row that is not an output may hold anything
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, 2:] = False
    for v in (valid, None):
        device_side = {k: float(t) for k, t in divergence(out, ref, v).items()}
        host_side = from_sums(divergence_sums(out, ref, v).tolist())
        assert host_side == pytest.approx(device_side, rel=1e-6, nan_ok=True)
    assert math.isnan(from_sums(divergence_sums(out, ref).tolist())["rel_err"])  # the NaN row counts
    assert from_sums(divergence_sums(out, ref, valid).tolist())["rel_err"] < 0.02
    empty = torch.zeros(0, H, dtype=torch.bfloat16)
    assert from_sums(divergence_sums(empty, empty).tolist()) == {
        "rel_err": 0.0,
        "max_abs": 0.0,
        "argmax_agreement": 1.0,
    }


def test_the_shadow_gets_the_served_calls_tile_hint(monkeypatch):
    """An expert-parallel layer serves with the model's expert count as the tile hint's
    denominator; its shadow run must too, or it times other tiles than that backend would serve."""
    from moe_backend import MoEConfig
    from moe_backend.ab import backends

    cfg = MoEConfig(
        hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1
    )
    seen = []
    served = backends.experts.routed_experts

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_global_experts"))
        return served(*args, **kwargs)

    monkeypatch.setattr(backends.experts, "routed_experts", spy)
    layer = DeepseekV3MoE(cfg, expert_range=(0, 4), shadow=Shadow("phasemoe:1.0", registry=prom.CollectorRegistry()))
    layer.load_weights(random_moe_weights(cfg, seed=1, experts=range(4)))
    layer(torch.randn(5, H).to(torch.bfloat16))
    layer.shadow.flush()
    assert seen == [8, 8]  # the served call, then its shadow run
