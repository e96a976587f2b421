"""lab/sweep_quant_gather.py's CPU side: arguments, shape selection, bytes, the tables, `--list`, and
its run functions end to end under the Triton interpreter at toy sizes (timing stubbed), so the
one device command does not fail on a typo."""

from __future__ import annotations

import importlib.util

import pytest

from lab import sweep_quant_gather as sweep
from tests.helpers.interpreter import interpreted_json


def _result(shape: str, kind: str, configs: dict, default: str, equal: bool = True) -> dict:
    return dict(
        shape=shape,
        kind=kind,
        rows=10,
        valid_rows=8,
        bytes=4_000_000,
        floor_us=2.0,
        baseline="old kernel",
        baseline_us=8.0,
        configs=configs,
        default=default,
        equal=equal,
    )


def test_parse_args_and_selection() -> None:
    args = sweep.parse_args(["--json", "/tmp/x.json", "--only", "gather,T=128", "--rep-ms", "5"])
    assert args.json == "/tmp/x.json" and args.rep_ms == 5
    assert [s.name for s in sweep.selected(args.only)] == ["x_quant T=128", "gather TP8 T=16384", "gather EP8 T=16384"]
    assert sweep.selected(None) == sweep.SHAPES
    with pytest.raises(SystemExit):
        sweep.parse_args(["--rep-ms", "0"])


def test_candidates_are_the_briefed_grid() -> None:
    quant = {c for s in sweep.SHAPES if s.kind != "gather" for c in sweep.candidates(s)}
    assert quant == {(i, w) for i in (8, 16, 32, 64) for w in (2, 4, 8)}
    assert {s.kind for s in sweep.SHAPES} == {"quant_x", "silu_quant", "gather"}


def test_moved_bytes() -> None:
    x, silu, gather = (next(s for s in sweep.SHAPES if s.kind == k) for k in ("quant_x", "silu_quant", "gather"))
    assert sweep.moved_bytes(x, 1) == 7168 * 2 + 7168 + 56 * 4
    assert sweep.moved_bytes(silu, 1) == silu.inter * 4 + silu.inter + silu.inter // 128 * 4
    assert sweep.moved_bytes(gather, 1) == 2 * (7168 + 56 * 4)


def test_render() -> None:
    quant = {sweep.config_label(c): 4.0 + i for i, c in enumerate(sweep.QUANT_CANDIDATES)}
    gather = {sweep.config_label(c): 3.0 for c in sweep.GATHER_CANDIDATES}
    text = sweep.render(
        [_result("x_quant T=128", "quant_x", quant, "16x4"), _result("gather TP8", "gather", gather, "4x4", False)]
    )
    lines = text.splitlines()
    assert lines[2].startswith("| x_quant T=128 | 4 | 2.0 | old kernel: 8.0 | 8.0 (16x4) | 4.0 (8x2) | 1000 | 2.00")
    assert "| 2.00x | yes |" in lines[2] and lines[3].endswith("| **NO** |")
    assert any(line.startswith("| x_quant T=128 | 4.0 (2.00) | 5.0 (2.50)") for line in lines)
    assert sum(line.startswith("| gather TP8 |") for line in lines) == 2


def test_list_runs_without_gpu(capsys) -> None:
    assert sweep.main(["--list", "--only", "silu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("64x8" in line for line in out)
    assert sweep.main(["--list", "--only", "nothing"]) == 2


SMOKE = """
import json, sys
import lab.sweep_quant_gather as sweep
sweep.DEVICE = "cpu"
sweep.HIDDEN, sweep.GLOBAL_EXPERTS, sweep.TOPK = 256, 16, 2
sweep._time = lambda fn, rep_ms: (fn(), 1.0)[1]
sweep._floor_us = lambda nbytes, rep_ms: 0.5
shapes = [sweep.Shape("x", "quant_x", 5), sweep.Shape("silu", "silu_quant", 9, num_local=4, inter=384),
          sweep.Shape("gather", "gather", 9, num_local=4)]
out = [(sweep._run_gather if s.kind == "gather" else sweep._run_quant)(s, 1) for s in shapes]
print(sweep.render(out), file=sys.stderr)
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_run_functions_under_the_interpreter() -> None:
    """Both run functions at toy sizes on CPU: every candidate launches and matches its baseline."""
    results = interpreted_json(SMOKE)
    assert [r["equal"] for r in results] == [True, True, True]
    assert [len(r["configs"]) for r in results] == [12, 12, 15]
    assert [r["default"] for r in results] == ["8x4", "8x4", "1x4"]  # toy sizes: the smallest blocks
    x, silu, gather = results
    assert x["valid_rows"] == x["rows"] == 5
    assert 0 < silu["valid_rows"] <= 9 * 2 < silu["rows"] and 0 < gather["valid_rows"] <= 9 * 2 < gather["rows"]
