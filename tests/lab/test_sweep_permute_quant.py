"""lab/sweep_permute_quant.py's CPU side: the candidate grid, the tables, `--list`, and `run_shape`
end to end under the Triton interpreter at toy sizes (timing stubbed): every cut of
lab/permute_quant_items.py and every stage count of lab/permute_quant_pipelined.py give the
shipped permute_quant's bytes on the rows holding a token and
leaves padding rows unwritten."""

from __future__ import annotations

import importlib.util

import pytest

from lab import sweep_permute_quant as sweep
from tests.helpers.interpreter import interpreted_json


def test_candidates() -> None:
    assert sweep.CANDIDATES == [(i, w) for i in (8, 16, 32, 64) for w in (2, 4, 8)]
    assert sweep.PIPELINED == (1, 2, 3)


def test_render() -> None:
    configs = {"shipped": 150.0, **{sweep.label(c): 100.0 + i for i, c in enumerate(sweep.CANDIDATES)}}
    configs.update({f"pipe:s{n}": 120.0 for n in sweep.PIPELINED})
    result = dict(
        shape="EP8 T=16384", valid_rows=16000, bytes=350_000_000, floor_us=90.0, default="shipped", configs=configs
    )
    lines = sweep.render([dict(result, equal=True)]).splitlines()
    assert lines[2] == "| EP8 T=16384 | 16000 | 350 | 90.0 | 150.0 | 100.0 (8x2) | 1.11 | 1.50x | yes |"
    assert lines[-1].startswith("| EP8 T=16384 | 150.0 (1.67) | 100.0 (1.11) | 101.0 (1.12)")


def test_list_runs_without_gpu(capsys) -> None:
    assert sweep.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "EP8 T=16384" in out and "pipe:s2" in out


SMOKE = """
import json, sys
import lab.sweep_permute_quant as sweep
sweep.DEVICE = "cpu"
sweep.HIDDEN, sweep.GLOBAL_EXPERTS, sweep.TOPK = 384, 16, 4
sweep.NUM_LOCAL, sweep.EXPERT_START, sweep.ALIGNMENT = 4, 8, 4
sweep.CANDIDATES = [(8, 2), (16, 4)]
sweep.PIPELINED = (1, 2)
sweep._time = lambda fn, rep_ms: (fn(), 1.0)[1]
sweep._floor_us = lambda nbytes, rep_ms: 0.5
out = [sweep.run_shape(t, 1) for t in (5, 9)]
print(sweep.render(out), file=sys.stderr)
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_run_shape_under_the_interpreter() -> None:
    results = interpreted_json(SMOKE)
    assert [r["equal"] for r in results] == [True, True]
    assert [sorted(r["configs"]) for r in results] == [["16x4", "8x2", "pipe:s1", "pipe:s2", "shipped"]] * 2
    assert all(0 < r["valid_rows"] <= t * 4 for r, t in zip(results, (5, 9)))
