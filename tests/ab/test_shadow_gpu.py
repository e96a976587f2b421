"""Shadow mode on the GPU: side stream, served output bit-identical, results read back without a
host sync on the serving stream, nothing run during CUDA-graph capture. Run on the device."""

import pytest
import torch

from moe_backend.layers import DeepseekV3MoE
from moe_backend.testing import random_moe_weights
from tests.helpers.configs import SMALL_V3

prom = pytest.importorskip("prometheus_client")
pytestmark = pytest.mark.gpu

CONFIG = SMALL_V3


@pytest.fixture(scope="module")
def layers():
    from moe_backend.ab.shadow import Shadow

    registry = prom.CollectorRegistry()
    shadow = Shadow("triton:1.0,reference:1.0", registry=registry)
    on, off = DeepseekV3MoE(CONFIG, device="cuda", shadow=shadow), DeepseekV3MoE(CONFIG, device="cuda")
    for layer in (on, off):
        layer.load_weights(random_moe_weights(CONFIG, seed=0, device="cuda"))
    return on, off, shadow, registry


@pytest.mark.parametrize("tokens", [1, 33, 300, 2048])
def test_served_output_bit_identical_and_shadow_close(layers, tokens):
    on, off, shadow, registry = layers
    before = (
        registry.get_sample_value(
            "moe_backend_shadow_samples_total",
            {"layer": "0", "backend": "triton", "phase": "decode" if tokens <= 256 else "prefill"},
        )
        or 0
    )
    x = torch.randn(tokens, CONFIG.hidden_size, device="cuda").to(torch.bfloat16)
    for _ in range(3):
        assert torch.equal(on(x), off(x))
    shadow.flush()
    phase = "decode" if tokens <= 256 else "prefill"
    labels = {"layer": "0", "backend": "triton", "phase": phase}
    assert registry.get_sample_value("moe_backend_shadow_samples_total", labels) == before + 3
    # Our Triton kernels against the served policy kernels: FP8 rounding only (layer tolerance 1e-2).
    assert registry.get_sample_value("moe_backend_shadow_relative_error_bucket", dict(labels, le="0.01")) >= before + 3
    assert registry.get_sample_value("moe_backend_shadow_latency_seconds_sum", labels) > 0
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the side stream was left


def test_results_come_back_without_blocking_serving(layers):
    """observe() returns before the shadow finishes; the next call or flush() records it."""
    on, _, shadow, _ = layers
    shadow.flush()
    x = torch.randn(512, CONFIG.hidden_size, device="cuda").to(torch.bfloat16)
    on(x)
    assert len(shadow._pending) >= 1  # queued on the side stream, not waited for
    shadow.flush()
    assert not shadow._pending


def test_sampled_calls_never_sync_the_host(layers, monkeypatch):
    """A sampled call and the read-back on later calls: no host sync of any kind inside the hook
    (torch's sync debug mode raises on stream/device syncs and blocking copies; event waits and
    scalar reads are patched to raise), and results still arrive. Triton only: the reference
    backend reads expert ids on the host (a sync of the side stream, which waits for serving)."""
    from moe_backend.ab import shadow_hooks
    from moe_backend.ab.shadow import Shadow

    on, off, _, _ = layers
    registry = prom.CollectorRegistry()
    shadow = Shadow("triton:1.0", registry=registry)
    monkeypatch.setattr(on, "shadow", shadow)
    x = torch.randn(64, CONFIG.hidden_size, device="cuda").to(torch.bfloat16)
    for _ in range(3):  # warm: plans run once eagerly, graphs captured, the read-back buffer made
        on(x)
    shadow.flush()

    def refuse(name):
        def raising(*args, **kwargs):
            raise AssertionError(f"{name} called on the serving path")

        return raising

    original = shadow_hooks.observe_layer

    def guarded(*args, **kwargs):
        with monkeypatch.context() as m:
            for owner, name in [
                (torch.cuda.Event, "synchronize"),
                (torch.cuda.Stream, "synchronize"),
                (torch.cuda, "synchronize"),
                (torch.Tensor, "item"),
            ]:
                m.setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))
            torch.cuda.set_sync_debug_mode("error")
            try:
                original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(shadow_hooks, "observe_layer", guarded)
    labels = {"layer": "0", "backend": "triton", "phase": "decode"}
    before = registry.get_sample_value("moe_backend_shadow_samples_total", labels) or 0
    for _ in range(5):
        assert torch.equal(on(x), off(x))
    monkeypatch.setattr(shadow_hooks, "observe_layer", original)
    shadow.flush()
    assert registry.get_sample_value("moe_backend_shadow_samples_total", labels) == before + 5


def test_engine_buffers_overwritten_right_after_do_not_reach_the_shadow(monkeypatch):
    """vLLM's output is a workspace the next layer overwrites on the serving stream while the
    side stream may still be reading it: the engine hook hands the side stream copies taken in
    stream order, so the comparison is against what was served."""
    from moe_backend.ab import shadow_hooks
    from moe_backend.ab.shadow import Shadow
    from moe_backend.dispatch import Policy
    from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
    from moe_backend_integrations.vllm._apply import apply_standard

    registry = prom.CollectorRegistry()
    s = Shadow("triton:1.0", registry=registry)
    monkeypatch.setattr(shadow_hooks, "from_env", lambda: s)
    g = torch.Generator(device="cuda").manual_seed(1)
    w13, s13 = quantize_fp8_blockwise(torch.randn(8, 512, 1024, device="cuda", generator=g) / 32)
    w2, s2 = quantize_fp8_blockwise(torch.randn(8, 1024, 256, device="cuda", generator=g) / 32)
    workspace = torch.empty(200, 1024, dtype=torch.bfloat16, device="cuda")
    for _ in range(4):
        x = torch.randn(200, 1024, device="cuda", generator=g).to(torch.bfloat16)
        ids = torch.randint(0, 8, (200, 2), device="cuda", dtype=torch.int32, generator=g)
        weights = torch.rand(200, 2, device="cuda", generator=g)
        x_fp8, x_scale = quantize_fp8_per_token_group(x)
        apply_standard(workspace, x_fp8, x_scale, w13, s13, w2, s2, weights, ids, None, False, Policy())
        # The serving stream reuses every buffer at once, before the side stream can have read them.
        for buffer in (workspace, x_fp8, x_scale, weights, ids):
            buffer.zero_()
    s.flush()
    labels = {"layer": "0", "backend": "triton", "phase": "decode"}
    assert registry.get_sample_value("moe_backend_shadow_samples_total", labels) == 4
    assert registry.get_sample_value("moe_backend_shadow_relative_error_bucket", dict(labels, le="0.01")) == 4


def test_nothing_runs_during_graph_capture(monkeypatch):
    from moe_backend.ab import shadow_hooks
    from moe_backend.ab.shadow import Shadow
    from moe_backend.dispatch import Policy
    from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
    from moe_backend_integrations.vllm._apply import apply_standard

    registry = prom.CollectorRegistry()
    monkeypatch.setattr(shadow_hooks, "from_env", lambda: s)
    s = Shadow("triton:1.0", registry=registry)
    g = torch.Generator(device="cuda").manual_seed(0)
    w13, s13 = quantize_fp8_blockwise(torch.randn(8, 512, 1024, device="cuda", generator=g) / 32)
    w2, s2 = quantize_fp8_blockwise(torch.randn(8, 1024, 256, device="cuda", generator=g) / 32)
    x_fp8, x_scale = quantize_fp8_per_token_group(torch.randn(16, 1024, device="cuda").to(torch.bfloat16))
    ids = torch.randint(0, 8, (16, 2), device="cuda", dtype=torch.int32)
    weights = torch.rand(16, 2, device="cuda")
    out, eager = (torch.empty(16, 1024, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    run = lambda o: apply_standard(o, x_fp8, x_scale, w13, s13, w2, s2, weights, ids, None, False, Policy())  # noqa
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(out)  # warm up outside the capture (one shadow sample, on a side stream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(out)
    graph.replay()
    run(eager)
    s.flush()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert (
        registry.get_sample_value("moe_backend_shadow_skipped_total", {"backend": "triton", "reason": "graph_capture"})
        == 1
    )
    assert s.sampled == 2  # the warm-up and the eager call; not the capture


def test_a_deepgemm_prefill_shadow_runs_on_the_rows_in_use_without_a_sync(layers, monkeypatch):
    """DeepGEMM's contiguous kernel walks every row it is given: a prefill shadow on it counts the
    rows in use on the side stream, and a later hook launches it with that count from pinned
    memory. No host sync on the serving path, and its GEMMs get every real row and no tail."""
    pytest.importorskip("deep_gemm")
    from moe_backend.ab import shadow_hooks
    from moe_backend.ab.shadow import Shadow
    from moe_backend.providers import deepgemm

    on, off, _, _ = layers
    registry = prom.CollectorRegistry()
    shadow = Shadow("deepgemm:1.0", registry=registry)
    monkeypatch.setattr(on, "shadow", shadow)
    tokens = 512  # prefill: DeepGEMM's contiguous kernel
    x = torch.randn(tokens, CONFIG.hidden_size, device="cuda").to(torch.bfloat16)
    labels = {"layer": "0", "backend": "deepgemm", "phase": "prefill"}
    given = []  # (rows, expert ids) of every DeepGEMM GEMM launched or captured
    original_gemm = deepgemm.grouped_gemm_contiguous

    def recording(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out=None):
        given.append((a_fp8.shape[0], expert_ids))
        return original_gemm(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out)

    monkeypatch.setattr(deepgemm, "grouped_gemm_contiguous", recording)
    for _ in range(3):  # warm: JIT, graphs, the read-back buffers
        on(x)
    shadow.flush()
    samples = registry.get_sample_value("moe_backend_shadow_samples_total", labels)
    close = registry.get_sample_value("moe_backend_shadow_relative_error_bucket", dict(labels, le="0.01"))
    original = shadow_hooks.observe_layer

    def guarded(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", lambda *a: (_ for _ in ()).throw(AssertionError("item() on serving")))
            torch.cuda.set_sync_debug_mode("error")
            try:
                original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(shadow_hooks, "observe_layer", guarded)
    for _ in range(4):
        assert torch.equal(on(x), off(x))
    assert shadow._staged or shadow._pending  # queued, not waited for
    monkeypatch.setattr(shadow_hooks, "observe_layer", original)
    shadow.flush()
    assert registry.get_sample_value("moe_backend_shadow_samples_total", labels) == samples + 4
    assert registry.get_sample_value("moe_backend_shadow_relative_error_bucket", dict(labels, le="0.01")) == close + 4
    bound = tokens * CONFIG.num_experts_per_tok + CONFIG.n_routed_experts * (deepgemm.contiguous_alignment() - 1)
    assert given
    for rows, ids in given:
        assert rows < bound and rows % deepgemm.contiguous_alignment() == 0
        assert int((ids >= 0).sum()) == tokens * CONFIG.num_experts_per_tok  # every real row, in the cut
