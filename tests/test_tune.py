"""`python -m moe_backend tune` on CPU: the routings reach the tuner, and a candidate wins by its
time summed over them (the GPU timing stubbed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_backend import testing, tune


class _Bar:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass


def _fake_timing(monkeypatch, times: dict, configs=({"name": "A"}, {"name": "B"})) -> list:
    """Candidates `configs` (A and B); time_graph answers from `times[(config name, routing)]`, or
    `times[(config name, routing, layout)]` on a layout other than the masked one. Returns the
    list of timings asked for that `times` lacks (the tuner scores a failing candidate as
    infinitely slow, so a gap in the stub would otherwise pass unseen)."""
    ran = {}
    missing = []
    monkeypatch.setattr(tune, "candidates", lambda m, masked, k: [dict(c) for c in configs])
    monkeypatch.setattr(testing, "random_fp8_weights", lambda e, n, k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def job_inputs(kernel, e, m, n, k, routing, weights, layout, job):
        def gemm(config):
            ran["last"] = (config["name"], routing) + (() if layout == "masked" else (layout,))

        return gemm

    def time_graph(fn):
        fn()
        if ran["last"] not in times:
            missing.append(ran["last"])
        return times[ran["last"]]

    monkeypatch.setattr(tune, "_job_inputs", job_inputs)
    monkeypatch.setattr(testing, "time_graph", time_graph)
    return missing


def test_the_least_summed_time_over_the_routings_wins(monkeypatch):
    times = {("A", "uniform"): 10.0, ("A", "zipf:0.6"): 30.0, ("B", "uniform"): 12.0, ("B", "zipf:0.6"): 20.0}
    missing = _fake_timing(monkeypatch, times)
    job = [("grouped_gemm_masked", ("ep8", "w13", 32, 4096, 7168), 16)]
    uniform = tune._time_candidates(["grouped_gemm_masked"], job, _Bar(), None)
    both = tune._time_candidates(["grouped_gemm_masked"], job, _Bar(), None, ("uniform", "zipf:0.6"))
    assert missing == []
    assert uniform["grouped_gemm_masked"]["N=4096,K=7168"]["16"] == {"name": "A", "us": 10.0}
    assert both["grouped_gemm_masked"]["N=4096,K=7168"]["16"] == {"name": "B", "us": 32.0}


def test_on_both_decode_layouts_the_least_time_summed_over_routings_and_layouts_wins(monkeypatch):
    """A wins on the masked layout, B as the layer's decode runs the tiles (contiguous); over both
    layouts and both routings, the sum decides. Candidates the layer cannot run as timed are left
    out once the contiguous layout is asked for: N (narrow tiles, fastest on the masked layout) and
    W (32-row tiles where the layer runs 16: the layer pads both GEMMs' segments to the larger
    tile)."""
    times = {
        ("A", "uniform"): 10.0,
        ("B", "uniform"): 11.0,
        ("N", "uniform"): 5.0,
        ("W", "uniform"): 6.0,
        ("A", "zipf:0.6"): 12.0,
        ("B", "zipf:0.6"): 13.0,
        ("A", "uniform", "contiguous"): 14.0,
        ("B", "uniform", "contiguous"): 11.0,
        ("A", "zipf:0.6", "contiguous"): 16.0,
        ("B", "zipf:0.6", "contiguous"): 14.0,
    }
    configs = (
        {"name": "A", "BLOCK_M": 16},
        {"name": "B", "BLOCK_M": 16},
        {"name": "N", "BLOCK_M": 32, "NARROW_M": 16},
        {"name": "W", "BLOCK_M": 32},
    )
    missing = _fake_timing(monkeypatch, times, configs=configs)
    monkeypatch.setattr(tune, "_layer_block_m", lambda m, n, k: 16)
    job = [("grouped_gemm_masked", ("ep8", "w13", 32, 4096, 7168), 4)]
    both_layouts = ("masked", "contiguous")
    masked = tune._time_candidates(["grouped_gemm_masked"], job, _Bar(), None)
    both = tune._time_candidates(["grouped_gemm_masked"], job, _Bar(), None, decode_layouts=both_layouts)
    routed = tune._time_candidates(
        ["grouped_gemm_masked"], job, _Bar(), None, ("uniform", "zipf:0.6"), decode_layouts=both_layouts
    )
    assert missing == []
    assert masked["grouped_gemm_masked"]["N=4096,K=7168"]["4"] == dict(configs[2], us=5.0)
    assert both["grouped_gemm_masked"]["N=4096,K=7168"]["4"] == dict(configs[1], us=22.0)
    # A: 10 + 12 + 14 + 16 = 52; B: 11 + 13 + 11 + 14 = 49
    assert routed["grouped_gemm_masked"]["N=4096,K=7168"]["4"] == dict(configs[1], us=49.0)
    names = [c["name"] for c in tune.job_candidates("grouped_gemm_masked", 4, 4096, 7168, both_layouts)]
    assert names == ["A", "B"]
    assert len(tune.job_candidates("grouped_gemm_contiguous", 4, 4096, 7168, both_layouts)) == 4


def test_where_the_grid_has_no_tile_of_the_layers_rows_the_layers_rows_are_tiled(monkeypatch):
    """At 32 rows per expert the grid's tiles are 16 and 32 rows high, but a layer that runs 64
    rows there (the nearest bucket's entry) would take a new 32-row bucket's smaller tile for
    every batch near it: the candidates are the grid's plain tiles 64 rows high instead."""
    monkeypatch.setattr(tune, "_layer_block_m", lambda m, n, k: 64)
    grid = tune.candidates(32, masked=True, k=7168)
    assert {cfg["BLOCK_M"] for cfg in grid} == {16, 32}
    picked = tune.job_candidates("grouped_gemm_masked", 32, 4096, 7168, ("masked", "contiguous"))
    assert picked and all(cfg["BLOCK_M"] == 64 and not cfg.get("NARROW_M") for cfg in picked)
    assert picked == tune._masked_tiles(64, 32)
    assert tune.job_candidates("grouped_gemm_masked", 32, 4096, 7168) == grid  # masked layout alone


def test_each_gemm_is_timed_on_segments_padded_to_the_larger_tile_of_the_pair(monkeypatch):
    """The layer pads both GEMMs' segments to the larger of their tiles (`segment_alignment`): a
    w2 of 16-row tiles beside a w13 of 32-row ones is timed on 32-row segments."""
    block_m = {4096: 32, 7168: 16}  # w13 (N = 4096) and w2 (N = 7168) of the EP8 slice
    monkeypatch.setattr(tune, "_layer_block_m", lambda m, n, k: block_m[n])
    assert tune._partner_block_m("ep8", "w2", 4) == 32
    assert tune._partner_block_m("ep8", "w13", 4) == 16
    assert tune._partner_block_m("other", "w13", 4) == 1
    seen = []
    real = tune.layer_decode_layout
    monkeypatch.setattr(
        tune, "layer_decode_layout", lambda counts, pad, perm: seen.append(pad) or real(counts, pad, perm)
    )
    weights = testing.random_fp8_weights(2, 256, 256, device="cpu")
    tune._layer_decode_inputs(
        torch.tensor([3, 1]), 2, 256, 256, weights, {16}, gather_a=False, pad_at_least=32, device="cpu"
    )
    tune._layer_decode_inputs(torch.tensor([3, 1]), 2, 256, 256, weights, {16}, gather_a=False, device="cpu")
    assert seen == [32, 16]


def test_tune_refuses_decode_layouts_it_does_not_know_or_repeats():
    for bad in ("masked,contiguous", (), ("masked", "contigous"), ("masked", "masked")):
        with pytest.raises(ValueError, match="decode_layouts"):
            tune.tune(decode_layouts=bad)


def test_the_layer_block_m_is_what_the_layer_runs_now(monkeypatch, tmp_path):
    """An entry with narrow tiles (32 rows, 16 narrow), which the contiguous walk does not run:
    the layer runs the nearest plain entry's tile (16 rows); a plain entry's own tile elsewhere."""
    from moe_backend.kernels import _gemm_config

    gpu = "NVIDIA H100 80GB HBM3"
    plain = dict(BLOCK_N=128, GROUP_M=1, SWAP_AB=True, K_UNROLL=1, num_warps=4, num_stages=3)
    table = {
        "N=7168,K=256": {"4": dict(plain, BLOCK_M=16), "8": dict(plain, BLOCK_M=32, NARROW_M=16, TMA=False)},
        "N=4096,K=7168": {"1": dict(plain, BLOCK_M=32)},
    }
    monkeypatch.setattr(_gemm_config, "CONFIG_DIR", tmp_path)
    (tmp_path / _gemm_config.table_path("grouped_gemm_masked", gpu).name).write_text(json.dumps(table))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: gpu)
    _gemm_config.load_table.cache_clear()
    try:
        assert tune._layer_block_m(8, 7168, 256) == 16
        assert tune._layer_block_m(1, 4096, 7168) == 32
    finally:
        _gemm_config.load_table.cache_clear()


def test_the_layer_decode_layout_pads_each_segment_to_the_tile():
    counts = torch.tensor([3, 0, 17, 16])
    perm = torch.randperm(36)
    ids, src, used = tune.layer_decode_layout(counts, 16, perm)
    assert ids.numel() == src.numel() == 36 + 4 * 15  # the static bound
    assert used == 16 + 0 + 32 + 16
    assert ids[:3].tolist() == [0] * 3 and (ids[3:16] == -1).all()
    assert ids[16:33].tolist() == [2] * 17 and (ids[33:48] == -1).all()
    assert ids[48:64].tolist() == [3] * 16 and (ids[64:] == -1).all()
    assert src[ids >= 0].tolist() == perm.tolist()  # each routed row reads its own token
    assert (src[ids < 0] == -1).all()


def test_a_candidate_on_the_layer_layout_runs_as_the_plan_would(monkeypatch):
    """GEMM1 without TMA reads token rows through the layout (the plan's gather), with TMA the
    rows laid out; too few units to fill the GPU split K into f32 partial sums, as `with_split_k`
    does for the layer (4 experts of 1 row at N = 256: units far under the threshold)."""
    from moe_backend import plan_execution
    from moe_backend.dispatch import gemm_choice
    from moe_backend.kernels._gemm_config import check_config

    calls = []
    monkeypatch.setattr(
        plan_execution, "run_contiguous_gemm", lambda g, a, a_s, b, bs, ids, out, e, **kw: calls.append((g, a, out, kw))
    )
    counts = torch.tensor([1, 1, 1, 1])
    weights = testing.random_fp8_weights(4, 256, 7168, device="cpu")
    run = tune._layer_decode_inputs(counts, 1, 256, 7168, weights, {16}, gather_a=True, device="cpu")
    cfg = dict(BLOCK_M=16, BLOCK_N=128, GROUP_M=1, SWAP_AB=True, K_UNROLL=2, num_warps=4, num_stages=3)
    run(dict(cfg, TMA=False))
    run(dict(cfg, TMA=True))
    expected = gemm_choice.with_split_k(
        gemm_choice.GemmPlan("triton", 256, 7168, tuple(sorted(check_config(cfg).items()))), 4, 1
    )
    assert expected.split_k > 1
    (g, a, out, kw), (g_tma, a_tma, _, kw_tma) = calls
    assert g.split_k == expected.split_k and out.shape == (expected.split_k, 4 + 4 * 15, 256)
    assert out.dtype == torch.float32 and kw["splits_out"] is not None
    assert a.shape[0] == 4 and kw["a_rows"] is not None  # the token rows, gathered
    assert a_tma.shape[0] == 4 + 4 * 15 and kw_tma["a_rows"] is None  # the rows laid out
    assert int(kw["rows_in_use"]) == 4 * 16


def test_routings_reach_the_tuner(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune, "tune", lambda **kwargs: seen.update(kwargs) or {"paths": []})
    assert tune.main(["--routing", "uniform,zipf:0.6", "--slices", "ep8", "--decode-layouts", "masked,contiguous"]) == 0
    assert seen["routings"] == ("uniform", "zipf:0.6") and seen["decode_layouts"] == ("masked", "contiguous")
    assert tune.main([]) == 0 and seen["routings"] == ("uniform",) and seen["decode_layouts"] == ("masked",)


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


_RUN = {
    "date": "2026-12-06",
    "method": "CUDA-graph replay, median, summed over routings",
    "routings": ["uniform", "zipf:0.6"],
}


def _table() -> dict:
    return {
        "meta": {
            "date": "2026-11-26",
            "method": "CUDA-graph replay, median",
            "tuned_us": {"N=8,K=128": {"1": 5.0, "4": 6.0}},
        },
        "N=8,K=128": {"1": {"BLOCK_M": 16}, "4": {"BLOCK_M": 32}},
    }


def test_a_run_over_part_of_a_table_keeps_its_meta_and_records_what_it_changed():
    merged = tune.merge_tuned(_table(), {"N=8,K=128": {"4": {"BLOCK_M": 64, "us": 7.5}}}, _RUN)
    assert merged["N=8,K=128"] == {"1": {"BLOCK_M": 16}, "4": {"BLOCK_M": 64}}  # no "us" among the launch keys
    meta = merged["meta"]
    assert meta["date"] == "2026-11-26" and meta["method"] == "CUDA-graph replay, median"
    assert meta["tuned_us"] == {"N=8,K=128": {"1": 5.0}}  # the old time no longer belongs to the entry
    assert meta["retuned"] == {"N=8,K=128": {"4": dict(_RUN, us=7.5)}}


def test_a_run_over_the_whole_table_or_a_new_one_takes_the_runs_meta():
    tuned = {"N=8,K=128": {"1": {"BLOCK_M": 16, "us": 4.0}, "4": {"BLOCK_M": 64, "us": 7.5}}}
    old = _table()
    old["meta"]["retuned"] = {"N=8,K=128": {"4": dict(_RUN, us=9.0)}}
    for table in (old, None):
        merged = tune.merge_tuned(table, tuned, _RUN)
        assert merged["meta"] == dict(_RUN, tuned_us={"N=8,K=128": {"1": 4.0, "4": 7.5}})
    assert old["meta"]["date"] == "2026-11-26"  # the caller's table is left as it was


def test_the_table_is_saved_after_each_job_so_an_interrupted_run_keeps_them(monkeypatch, tmp_path, capsys):
    """Two jobs; the second is interrupted (Ctrl-C) after its first candidate: the table on disk
    holds the first job's winner, merged into the shipped table, and says where it is."""
    times = {("A", "uniform"): 10.0, ("B", "uniform"): 12.0}
    _fake_timing(monkeypatch, times)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    calls = []

    def time_graph(fn, _inner=testing.time_graph):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return _inner(fn)

    monkeypatch.setattr(testing, "time_graph", time_graph)
    shapes = [("ep8", "w13", 32, 4096, 7168)]
    try:
        tune.tune(kernels=("grouped_gemm_masked",), shapes=shapes, decode_rows=(4, 16), out_dir=tmp_path)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt did not reach the caller")
    path = tmp_path / "grouped_gemm_masked_NVIDIA_H100_80GB_HBM3.json"
    table = json.loads(path.read_text())
    shipped = json.loads((Path(tune.__file__).parent / "kernels/configs" / path.name).read_text())
    assert table["N=4096,K=7168"]["4"] == {"name": "A"}
    assert table["N=4096,K=7168"]["16"] == shipped["N=4096,K=7168"]["16"]  # the unfinished job: untouched
    assert table["N=512,K=7168"] == shipped["N=512,K=7168"]
    assert table["meta"]["retuned"]["N=4096,K=7168"]["4"]["us"] == 10.0
    assert str(path) in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


def test_a_second_interrupt_does_not_cut_the_saved_tables_line(monkeypatch, tmp_path, capsys):
    """`timeout -s INT` signals the command, then its process group: the second SIGINT arrives
    while tune says what it saved. It is ignored there, and the handler is restored after."""
    import os
    import signal

    _fake_timing(monkeypatch, {("A", "uniform"): 10.0, ("B", "uniform"): 12.0})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")

    def interrupted(fn):
        raise KeyboardInterrupt

    monkeypatch.setattr(testing, "time_graph", interrupted)
    real_print = print

    def print_after_a_second_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        real_print(*args, **kwargs)

    monkeypatch.setattr(tune, "print", print_after_a_second_signal, raising=False)
    before = signal.getsignal(signal.SIGINT)
    try:
        tune.tune(
            kernels=("grouped_gemm_masked",),
            shapes=[("ep8", "w13", 32, 4096, 7168)],
            decode_rows=(4,),
            out_dir=tmp_path,
        )
    except KeyboardInterrupt:
        pass
    assert "tune: interrupted; tables with the finished jobs: none yet" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupted_run_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune, "tune", interrupted)
    assert tune.main(["--slices", "ep8"]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_reaches_python_after_a_library_replaced_its_handler(monkeypatch):
    """A library that installs its own C-level SIGINT handler (simulated: SIG_IGN through libc,
    behind Python's back) must not swallow the next Ctrl-C: the tuner installs Python's handler
    again before each candidate, so the interrupt arrives as KeyboardInterrupt."""
    import ctypes
    import os
    import signal

    _fake_timing(monkeypatch, {("A", "uniform"): 10.0, ("B", "uniform"): 12.0})
    inner = testing.time_graph
    calls = []

    def time_graph(fn):
        calls.append(1)
        if len(calls) == 1:
            ctypes.CDLL(None).signal(signal.SIGINT, ctypes.c_void_p(1))  # SIG_IGN, unseen by Python
        else:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(fn)

    monkeypatch.setattr(testing, "time_graph", time_graph)
    handler = signal.getsignal(signal.SIGINT)
    job = [("grouped_gemm_masked", ("ep8", "w13", 32, 4096, 7168), 16)]
    try:
        tune._time_candidates(["grouped_gemm_masked"], job, _Bar(), None)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    finally:
        signal.signal(signal.SIGINT, handler)


def test_a_run_with_no_job_says_so(monkeypatch, capsys):
    """TP8 prefill buckets over 512 rows per expert are skipped (256 experts: memory, time): asked
    for only those, tune says there is nothing to tune instead of exiting 0 having done nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    args = ["--kernels", "grouped_gemm_contiguous", "--slices", "tp8", "--prefill-rows", "4096"]
    assert tune.main(args) == 2
    assert "nothing to tune" in capsys.readouterr().err
