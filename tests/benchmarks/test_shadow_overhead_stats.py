"""The statistics behind benchmarks.bench_shadow_overhead's verdict, its whole procedure on a small
CPU layer (its figures need the GPU), and benchmarks.bench_shadow_hook."""

import random

import pytest

from benchmarks.bench_shadow_overhead import median_interval, verdict


def test_median_interval_brackets_the_median_by_order_statistics():
    values = list(range(1, 21))  # n = 20: the 95% interval is the 6th and 15th values
    median, low, high = median_interval([float(v) for v in values])
    assert median == 10.5 and (low, high) == (6.0, 15.0)
    assert median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)  # too few values: min and max


def test_median_interval_covers_the_true_median_at_the_stated_rate():
    rng = random.Random(0)
    trials, covered = 400, 0
    for _ in range(trials):
        sample = [rng.gauss(0.005, 0.03) for _ in range(20)]
        _, low, high = median_interval(sample)
        covered += low <= 0.005 <= high
    assert covered / trials >= 0.93  # nominal >= 95%; a wrong rank choice lands far below


def test_verdict_needs_the_whole_interval_on_one_side():
    assert verdict(-0.004, 0.008, 0.01) == "PASS"
    assert verdict(0.012, 0.03, 0.01) == "FAIL"
    assert verdict(-0.02, 0.05, 0.01) == "UNRESOLVED"
    with pytest.raises(ValueError, match="values"):
        median_interval([])


def test_the_whole_procedure_runs_on_a_small_cpu_layer(capsys):
    """The GPU run's procedure end to end (warm-ups, pairs, hook timing, the table) on a small CPU
    layer, so the one device run cannot fail on a slip of this script."""
    from benchmarks.bench_shadow_overhead import main

    assert (
        main(
            [
                "--small-cpu",
                "--backend",
                "reference",
                "--rate",
                "0.2",
                "--tokens",
                "3",
                "--blocks",
                "1",
                "--sample-blocks",
                "2",
                "--seconds",
                "0.001",
                "--profile-sampled",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 sampled calls profiled" in out and "cumulative" in out  # the sampled calls' profile
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("| 3 |")).split("|")
    assert row[10].strip() in ("PASS", "FAIL", "UNRESOLVED") and row[13].strip() in ("PASS", "FAIL", "UNRESOLVED")
    # Every call sampled runs the reference beside the layer on the CPU: a sampled call costs more.
    extra, scaled = float(row[11].split()[0]), float(row[12].split()[0].rstrip("%"))
    assert extra > 0 and scaled == pytest.approx(100 * 0.2 * extra, abs=0.11)  # extra printed to 0.01
    runs, _, total = row[7].split()[:3]
    assert int(runs) > 0 and int(total) == 200  # one 'on' block of the minimum 200 calls, some sampled
    off, plain, sampled = (v.strip() for v in row[9].split("/"))
    assert float(off) > 0 and float(plain) > 0 and sampled != "-"


def test_the_hook_benchmark_times_both_hooks_unsampled(capsys, monkeypatch):
    from benchmarks.bench_shadow_hook import main

    monkeypatch.delenv("MOE_BACKEND_SHADOW", raising=False)
    assert main(["--calls", "300", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| observe_")]
    assert len(rows) == 2 and all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert "were sampled" not in out  # the 'on' rows time calls that are not sampled
