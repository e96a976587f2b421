"""`python -m moe_backend tune` on CPU: the routings reach the tuner, and a candidate wins by its
time summed over them (the GPU timing stubbed)."""

from __future__ import annotations

import json
from pathlib import Path

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
