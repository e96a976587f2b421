"""`python -m moe_backend tune` on CPU: the routings reach the tuner, and a candidate wins by its
time summed over them (the GPU timing stubbed)."""

from __future__ import annotations

import torch

from moe_backend import testing, tune


class _Bar:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass


def _fake_timing(monkeypatch, times: dict) -> None:
    """Candidates A and B; time_graph answers from `times[(config name, routing)]`."""
    ran = {}
    monkeypatch.setattr(tune, "candidates", lambda m, masked, k: [{"name": "A"}, {"name": "B"}])
    monkeypatch.setattr(testing, "random_fp8_weights", lambda e, n, k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def job_inputs(kernel, e, m, n, k, routing, weights):
        def gemm(routing_, out, config):
            ran["last"] = (config["name"], routing_)

        return gemm, (routing,), None

    def time_graph(fn):
        fn()
        return times[ran["last"]]

    monkeypatch.setattr(tune, "_job_inputs", job_inputs)
    monkeypatch.setattr(testing, "time_graph", time_graph)


def test_the_least_summed_time_over_the_routings_wins(monkeypatch):
    times = {("A", "uniform"): 10.0, ("A", "zipf:0.6"): 30.0, ("B", "uniform"): 12.0, ("B", "zipf:0.6"): 20.0}
    _fake_timing(monkeypatch, times)
    job = [("grouped_gemm_masked", ("ep8", "w13", 32, 4096, 7168), 16)]
    uniform = tune._time_candidates(["grouped_gemm_masked"], job, _Bar(), None)
    both = tune._time_candidates(["grouped_gemm_masked"], job, _Bar(), None, ("uniform", "zipf:0.6"))
    assert uniform["grouped_gemm_masked"]["N=4096,K=7168"]["16"] == {"name": "A", "us": 10.0}
    assert both["grouped_gemm_masked"]["N=4096,K=7168"]["16"] == {"name": "B", "us": 32.0}


def test_routings_reach_the_tuner(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune, "tune", lambda **kwargs: seen.update(kwargs) or {"paths": []})
    assert tune.main(["--routing", "uniform,zipf:0.6", "--slices", "ep8"]) == 0
    assert seen["routings"] == ("uniform", "zipf:0.6")
    assert tune.main([]) == 0 and seen["routings"] == ("uniform",)


def test_masked_candidates_at_few_rows_include_tiles_for_a_hot_expert():
    """At a mean of at most 16 rows per expert the grid also holds 32- and 64-row tiles (a hot
    expert's several M tiles each stream its weights), also with NARROW_M; from 32 rows on it stays
    at the mean and half of it."""

    def block_ms(m):
        return {c["BLOCK_M"] for c in tune.candidates(m, masked=True, k=7168)}

    def narrow(m):
        return {(c["BLOCK_M"], c["NARROW_M"]) for c in tune.candidates(m, masked=True, k=7168) if c.get("NARROW_M")}

    assert block_ms(16) == {16, 32, 64}
    assert block_ms(4) == {16, 32, 64}
    assert narrow(16) == {(32, 16), (64, 16)}  # wide tiles whose tiles near the mean run 16 wide
    assert block_ms(64) == {32, 64}
    assert not narrow(32) and not narrow(64)
    assert block_ms(128) == {64, 128}
