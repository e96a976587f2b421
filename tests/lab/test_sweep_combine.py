"""lab/sweep_combine.py's CPU side: the candidate grid, the tables, `--list`, and `run_shape` end to
end under the Triton interpreter at toy sizes (timing stubbed): every cut of lab/combine_tiles.py
gives the shipped combine's bytes, every output row written, token and column counts not multiples
of the cut."""

from __future__ import annotations

import importlib.util

import pytest

from lab import sweep_combine as sweep
from tests.helpers.interpreter import interpreted_json


def test_candidates_hold_at_most_64_sums_per_thread() -> None:
    assert (1, 1024, 2, False) in sweep.CANDIDATES  # the shipped kernel's cut
    assert all(t * n <= 64 * 32 * w for t, n, w, _ in sweep.CANDIDATES)
    assert (8, 4096, 2, False) not in sweep.CANDIDATES and (8, 1024, 4, False) in sweep.CANDIDATES
    assert len(set(sweep.CANDIDATES)) == len(sweep.CANDIDATES)
    assert set(sweep.CANDIDATE_SETS["order"]) < set(sweep.CANDIDATES)
    assert (1, 1024, 2, True) in sweep.CANDIDATE_SETS["order"]  # the shipped cut in the other order
    assert sweep.label((1, 1024, 2, True)) == "rows:1x1024x2" and sweep.label((2, 512, 4, False)) == "2x512x4"


def test_render() -> None:
    configs = {sweep.label(c): 10.0 - 0.1 * i for i, c in enumerate(sweep.CANDIDATES)}
    best = sweep.label(sweep.CANDIDATES[-1])
    result = dict(
        shape="EP8 T=16384",
        local_slots=16000,
        bytes=4_000_000,
        floor_us=2.0,
        default="shipped",
        configs={"shipped": 12.0, **configs},
        equal=False,
    )
    lines = sweep.render([result]).splitlines()
    assert lines[2].startswith("| EP8 T=16384 | 16000 | 4 | 2.0 | 12.0 | ")
    assert f"({best})" in lines[2] and lines[2].endswith("| **NO** |")
    assert lines[-1].startswith(f"- EP8 T=16384: {best} ")


def test_list_runs_without_gpu(capsys) -> None:
    assert sweep.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "EP8 T=16384" in out and "1x1024x4" in out and "rows:1x1024x2" in out
    assert sweep.main(["--list", "--candidates", "order", "--slices", "EP8"]) == 0
    out = capsys.readouterr().out
    assert "TP8" not in out and "rows:1x4096x8" in out and " 2x512x4" not in out
    with pytest.raises(SystemExit):
        sweep.main(["--list", "--slices", "EP4"])


SMOKE = """
import json, sys
import lab.sweep_combine as sweep
sweep.DEVICE = "cpu"
sweep.HIDDEN, sweep.GLOBAL_EXPERTS, sweep.TOPK = 384, 16, 4
sweep.SLICES = {"EP8": (4, 8), "TP8": (16, 0)}
sweep.CANDIDATES = [(1, 128, 1, False), (2, 256, 2, False), (4, 128, 4, False), (8, 512, 2, False), (1, 128, 1, True),
                    (2, 256, 2, True)]
sweep._time = lambda fn, rep_ms: (fn(), 1.0)[1]
sweep._floor_us = lambda nbytes, rep_ms: 0.5
out = [sweep.run_shape(s, 7, 1) for s in ("EP8", "TP8")]
print(sweep.render(out), file=sys.stderr)
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_run_shape_under_the_interpreter() -> None:
    """Both slices at toy sizes on CPU: every candidate launches and gives the shipped kernel's bytes."""
    results = interpreted_json(SMOKE)
    assert [r["equal"] for r in results] == [True, True]
    labels = ["1x128x1", "2x256x2", "4x128x4", "8x512x2", "rows:1x128x1", "rows:2x256x2", "shipped"]
    assert [sorted(r["configs"]) for r in results] == [sorted(labels + ["branch"])] * 2
    assert all(r["default"] == "shipped" for r in results)
    ep8, tp8 = results
    assert 0 < ep8["local_slots"] < tp8["local_slots"] == 7 * 4
    assert tp8["bytes"] == (7 * 4 + 7) * 384 * 2
