"""No growth: 10,000 layer calls with varying token counts and phases leave every in-process cache
(plan/config/JIT memo, policy parse cache; tests/helpers/cache_sizes.py lists them) at its warm-up size,
and leak no Python objects. CPU, a tiny layer; the GPU variant (device memory, CUDA-graph
replays, Triton specializations) is tests/test_no_growth_gpu.py."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from moe_backend import MoEConfig
from moe_backend.layers import DeepseekV3MoE
from moe_backend.testing import random_moe_weights
from tests.helpers.cache_sizes import cache_sizes

CALLS = 10_000
# Token counts cycled through: decode sizes, odd sizes, and prefill sizes past decode_max_tokens.
TOKEN_COUNTS = [*range(1, 33), 47, 64, 100, 127, 128, 129, 255, 256, 257, 300]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_ten_thousand_calls_keep_caches_bounded(monkeypatch):
    monkeypatch.delenv("MOE_BACKEND_POLICY", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference on tiny shapes: threads only add overhead
    try:
        config = MoEConfig(
            hidden_size=128,
            moe_intermediate_size=128,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
        )
        layer = DeepseekV3MoE(config)
        layer.load_weights(random_moe_weights(config, seed=0))
        gen = torch.Generator().manual_seed(0)
        inputs = {t: torch.randn(t, 128, generator=gen).bfloat16() for t in TOKEN_COUNTS}
        phases = (None, "decode", "prefill")

        def call(i: int) -> None:
            t = TOKEN_COUNTS[i % len(TOKEN_COUNTS)]
            phase = phases[(i // len(TOKEN_COUNTS)) % len(phases)]
            out = layer(inputs[t], phase=phase)
            assert out.shape == (t, 128)

        for i in range(len(TOKEN_COUNTS) * len(phases)):  # warm-up: every (tokens, phase) once
            call(i)
        gc.collect()
        caches_before, objects_before, rss_before = cache_sizes(), len(gc.get_objects()), _rss_bytes()
        for i in range(CALLS):
            call(i)
        gc.collect()
        caches_after, objects_after, rss_after = cache_sizes(), len(gc.get_objects()), _rss_bytes()
    finally:
        torch.set_num_threads(threads)

    grown = {k: (caches_before.get(k), v) for k, v in caches_after.items() if caches_before.get(k) != v}
    assert not grown, f"caches grew over {CALLS} calls: {grown}"
    for name, (entries, maxsize) in caches_after.items():
        assert maxsize is None or entries <= maxsize, name
    # A leaked tensor or layout per call would add >= CALLS objects.
    assert objects_after - objects_before < 500, (objects_before, objects_after)
    print(
        f"\n{CALLS} calls, token counts {TOKEN_COUNTS[0]}..{TOKEN_COUNTS[-1]}: caches "
        f"{ {k.removeprefix('moe_backend.'): v[0] for k, v in caches_after.items()} }, gc objects "
        f"{objects_before} -> {objects_after}, RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    assert rss_after - rss_before < 64 * 2**20  # a per-call leak of [T, 128] bf16 would pass 100 MiB


def test_policy_parse_cache_is_bounded(monkeypatch):
    """MOE_BACKEND_POLICY values are parsed once each, into an LRU of 16: a changing variable
    cannot grow it."""
    from moe_backend.dispatch.policy import Policy

    for i in range(200):
        monkeypatch.setenv("MOE_BACKEND_POLICY", f'{{"decode_max_tokens": {i}}}')
        assert Policy.from_env(device_name=None).decode_max_tokens == i
    assert Policy._from_env_value.cache_info().currsize <= 16
