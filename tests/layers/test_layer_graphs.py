"""The routed-expert layer has no host sync in either phase (issue 21): `routed_experts` at a decode
and a prefill token count is captured in a CUDA graph on static buffers, then replayed with new
activations and new routing copied into them (uniform, Zipf-skewed, every token on one expert,
nothing local), each replay checked against `moe_backend.reference.routed_experts`. A layout sized
from the counts seen at capture, or a host read of them, fails here. The same calls run eagerly
under `torch.cuda.set_sync_debug_mode("error")`, which names the op that synchronizes.

Both DeepSeek-V3 slices at full size: EP8 (32 local experts of 256, I = 2048) and TP8 (256 experts,
I = 256). Run on the device: `python -m pytest -q tests/layers/test_layer_graphs.py`."""

import threading
import warnings

import pytest
import torch

from moe_backend import eager_graphs, reference
from moe_backend.dispatch import Policy
from moe_backend.dispatch.plan import token_bucket
from moe_backend.experts import recorded_plans, routed_experts
from tests.helpers.tolerances import LAYER_SAME_QUANT

pytestmark = pytest.mark.gpu

HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8
SLICES = {"ep8": (32, 2048), "tp8": (256, 256)}  # local experts, intermediate
DECODE_TOKENS, PREFILL_TOKENS = 64, 2048  # under and over the policy's decode limit (256)
HOT_EXPERT = 3  # local in both slices
# (name, Zipf exponent, hot expert forced into every token, only non-local ids)
REPLAYS = [
    ("uniform", 0.0, None, False),
    ("zipf 1.2", 1.2, None, False),
    ("one hot expert", 0.0, HOT_EXPERT, False),
    ("nothing local", 0.0, None, True),
]


def _rel(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _route(tokens, seed, exponent=0.0, hot=None, nonlocal_only_from=None):
    """(topk_weights f32 `[T, 8]`, topk_ids int32 `[T, 8]`, distinct per token) on the GPU: top-8 of
    256 drawn without replacement with popularity 1/rank^exponent (Gumbel top-k), `hot` forced
    into every token, or only ids >= `nonlocal_only_from`."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rank = torch.arange(1, GLOBAL_EXPERTS + 1, device="cuda").float()  # the hottest experts are local
    u = torch.rand(tokens, GLOBAL_EXPERTS, generator=g, device="cuda").clamp_min(1e-12)
    keys = -exponent * rank.log() - (-u.log()).log()
    if hot is not None:
        keys[:, hot] = float("inf")
    if nonlocal_only_from is not None:
        keys[:, :nonlocal_only_from] = -float("inf")
    ids = keys.topk(TOPK, dim=-1).indices
    w = torch.rand(tokens, TOPK, generator=g, device="cuda") + 0.1
    return (w / w.sum(-1, keepdim=True)).float(), ids.int()


@pytest.fixture(scope="module", params=sorted(SLICES))
def expert_slice(request):
    from moe_backend.testing import random_fp8_weights

    num_experts, inter = SLICES[request.param]
    torch.manual_seed(0)
    w13 = random_fp8_weights(num_experts, 2 * inter, HIDDEN)
    w2 = random_fp8_weights(num_experts, HIDDEN, inter)
    yield request.param, (*w13, *w2)
    del w13, w2
    torch.cuda.empty_cache()


@pytest.mark.parametrize("tokens", [DECODE_TOKENS, PREFILL_TOKENS], ids=["decode", "prefill"])
def test_layer_graph_replays_new_routing(expert_slice, tokens):
    name, weights = expert_slice
    num_experts = SLICES[name][0]
    x = torch.randn(tokens, HIDDEN, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = _route(tokens, seed=0)
    routed_experts(x, *weights, topk_w, topk_ids)  # JIT and allocator warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = routed_experts(x, *weights, topk_w, topk_ids)
    for seed, (case, exponent, hot, nothing_local) in enumerate(REPLAYS, start=1):
        if nothing_local and num_experts == GLOBAL_EXPERTS:
            continue  # TP8: every expert is local
        new_w, new_ids = _route(tokens, seed, exponent, hot, num_experts if nothing_local else None)
        x.copy_(torch.randn(tokens, HIDDEN, device="cuda").to(torch.bfloat16))
        topk_w.copy_(new_w)
        topk_ids.copy_(new_ids)
        out.fill_(float("nan"))  # rows the replay does not write stay NaN
        graph.replay()
        torch.cuda.synchronize()
        want = reference.routed_experts(x, *weights, topk_w, topk_ids)
        assert torch.isfinite(out.float()).all(), f"{name} T={tokens} {case}: unwritten or non-finite rows"
        if nothing_local:
            assert not out.float().abs().max(), f"{name} T={tokens} {case}: no local expert, output must be 0"
        else:
            err = _rel(out, want)
            assert err <= LAYER_SAME_QUANT, f"{name} T={tokens} {case}: rel err {err:.2e}"


@pytest.mark.parametrize("tokens", [DECODE_TOKENS, PREFILL_TOKENS], ids=["decode", "prefill"])
def test_layer_eager_call_never_syncs(expert_slice, tokens):
    name, weights = expert_slice
    x = torch.randn(tokens, HIDDEN, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = _route(tokens, seed=5, exponent=1.2)
    routed_experts(x, *weights, topk_w, topk_ids)  # first call: JIT, config look-ups
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = routed_experts(x, *weights, topk_w, topk_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _rel(out, reference.routed_experts(x, *weights, topk_w, topk_ids)) <= LAYER_SAME_QUANT


def test_eager_calls_replay_a_graph_per_bucket(expert_slice):
    """An eager call's second sight of a shape replays the graph of its token bucket: the plan it
    records is the bucket's, the result matches the reference, rows past the call's tokens never
    leak into it, results already returned are not overwritten by later calls, and `out=` is
    honoured. Token counts go down as well as up (the ids past a call's tokens are reset)."""
    name, weights = expert_slice
    eager_graphs.clear()
    kept = []
    for step, tokens in enumerate([300, 37, 64, 5, 2048, 37, 1]):
        x = torch.randn(tokens, HIDDEN, device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = _route(tokens, seed=20 + step, exponent=1.2 if step % 2 else 0.0)
        routed_experts(x, *weights, topk_w, topk_ids)  # a plan's first call runs eagerly
        out = torch.full((tokens, HIDDEN), float("nan"), dtype=torch.bfloat16, device="cuda")
        with recorded_plans() as plans:
            got = routed_experts(x, *weights, topk_w, topk_ids, out=out if step % 2 else None)
        assert [p.num_tokens for p in plans] == [token_bucket(tokens, 2048)], f"{name} T={tokens}: {plans}"
        if step % 2:
            assert got.data_ptr() == out.data_ptr()
        want = reference.routed_experts(x, *weights, topk_w, topk_ids)
        assert got.shape == (tokens, HIDDEN) and torch.isfinite(got.float()).all()
        err = _rel(got, want)
        assert err <= LAYER_SAME_QUANT, f"{name} T={tokens}: rel err {err:.2e}"
        kept.append((got, got.clone()))
    for got, copy in kept:
        assert torch.equal(got, copy), "a later call overwrote a result already returned"
    assert eager_graphs.cache_sizes()["graphs"] == len({token_bucket(t, 2048) for t in [300, 37, 64, 5, 2048, 1]})


def test_eager_graphs_of_two_graph_limits_keep_their_buffers(expert_slice):
    """Two policies differing only in graph_max_tokens run the same plan on static buffers of their
    own capacity: each replays a graph captured on its own buffers (a graph keyed by the plan alone
    would read the other policy's stale inputs and return uninitialised rows)."""
    name, weights = expert_slice
    eager_graphs.clear()
    policies = [Policy(), Policy(graph_max_tokens=4096)]
    for step in range(3):
        for i, policy in enumerate(policies):
            x = torch.randn(DECODE_TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
            topk_w, topk_ids = _route(DECODE_TOKENS, seed=40 + 2 * step + i, exponent=1.2)
            got = routed_experts(x, *weights, topk_w, topk_ids, policy=policy)
            err = _rel(got, reference.routed_experts(x, *weights, topk_w, topk_ids))
            assert err <= LAYER_SAME_QUANT, f"{name} call {step} graph_max_tokens {policy.graph_max_tokens}: {err:.2e}"
    assert eager_graphs.cache_sizes()["graphs"] == 2


def test_eager_graphs_of_one_stream_share_their_intermediates(expert_slice):
    """Graphs of one serving stream are captured on one stream into one pool, so a second graph
    of the same plan (another expert offset: another key) reuses the first one's intermediates:
    device memory reserved stays where the first capture left it. Each result against the
    reference."""
    name, weights = expert_slice
    num_experts = SLICES[name][0]
    eager_graphs.clear()
    torch.cuda.synchronize()
    reserved = []
    for step, start in enumerate((0, 32, 64, 96)):
        x = torch.randn(PREFILL_TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = _route(PREFILL_TOKENS, seed=60 + step)
        routed_experts(x, *weights, topk_w, topk_ids, expert_start=start)  # eager (first) or capture
        got = routed_experts(x, *weights, topk_w, topk_ids, expert_start=start)
        local = (topk_ids >= start) & (topk_ids < start + num_experts)
        want = reference.routed_experts(x, *weights, topk_w, torch.where(local, topk_ids - start, -1))
        err = _rel(got, want)
        assert err <= LAYER_SAME_QUANT, f"{name} expert_start {start}: rel err {err:.2e}"
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert eager_graphs.cache_sizes()["graphs"] == 4
    grown = (reserved[-1] - reserved[0]) / 2**20
    assert grown <= 32, f"{name}: {grown:.0f} MiB more reserved after three more captures of one plan"


def test_eager_graph_capture_leaves_other_threads_free(expert_slice, monkeypatch):
    """A lazy capture runs inside a serving process whose other threads keep working: another
    thread allocating fresh device memory and copying to the host on its own stream in the middle
    of the capture neither fails there nor breaks the capture (thread-local capture mode), and the
    graph's result matches the reference."""
    name, weights = expert_slice
    eager_graphs.clear()
    x = torch.randn(PREFILL_TOKENS, HIDDEN, device="cuda").to(torch.bfloat16)
    topk_w, topk_ids = _route(PREFILL_TOKENS, seed=70, exponent=0.6)
    routed_experts(x, *weights, topk_w, topk_ids)  # the plan's eager first call
    errors, ran = [], []

    def other_thread():
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                block = torch.empty(96 << 20, dtype=torch.uint8, device="cuda")  # beyond the cache: cudaMalloc
                block.fill_(1)
                ran.append(int(block[:4096].sum()))  # to the host: synchronizes this stream
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    capture_begin = torch.cuda.CUDAGraph.capture_begin

    def capture_begin_then_other_thread(self, *args, **kwargs):
        capture_begin(self, *args, **kwargs)
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(30)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", capture_begin_then_other_thread)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns
        got = routed_experts(x, *weights, topk_w, topk_ids)
    assert not errors and ran == [4096], f"{name}: the other thread failed during the capture: {errors}"
    assert eager_graphs.cache_sizes()["graphs"] == 1
    err = _rel(got, reference.routed_experts(x, *weights, topk_w, topk_ids))
    assert err <= LAYER_SAME_QUANT, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("kernel,tokens", [("deepgemm_masked", DECODE_TOKENS), ("deepgemm_contiguous", PREFILL_TOKENS)])
def test_deepgemm_eager_calls_replay_a_graph(expert_slice, kernel, tokens):
    """DeepGEMM's kernels (JIT-compiled by the warm-up run before the capture) are captured like
    ours: an eager call of a DeepGEMM plan replays its bucket's graph, no capture fails (that would
    warn), and every replay matches the reference with new routing."""
    pytest.importorskip("deep_gemm")
    name, weights = expert_slice
    eager_graphs.clear()
    for step in range(3):  # the plan's eager first call, then the capture, then a replay
        x = torch.randn(tokens, HIDDEN, device="cuda").to(torch.bfloat16)
        topk_w, topk_ids = _route(tokens, seed=40 + step, exponent=0.6)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with recorded_plans() as plans:
                got = routed_experts(x, *weights, topk_w, topk_ids, kernel=kernel)
        if step:
            assert [p.num_tokens for p in plans] == [token_bucket(tokens, 2048)], f"{name} {kernel}: {plans}"
        err = _rel(got, reference.routed_experts(x, *weights, topk_w, topk_ids))
        assert err <= LAYER_SAME_QUANT, f"{name} {kernel} T={tokens} call {step}: rel err {err:.2e}"
    assert eager_graphs.cache_sizes()["graphs"] == 1
