"""lab/copy_bandwidth.py's CPU side: `--list`, the table, and the Triton copy under the interpreter
(a size that is not a whole number of programs, every word copied, nothing past the end written)."""

from __future__ import annotations

import importlib.util

import pytest

from lab import copy_bandwidth as sweep
from tests.helpers.interpreter import interpreted_json


def test_list_runs_without_gpu(capsys) -> None:
    assert sweep.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "468" in out and "graph u8" in out and "triton" in out


def test_render_gives_every_method_in_tb_per_s() -> None:
    us = {m: 100.0 + i for i, m in enumerate(sweep.METHODS)}
    result = dict(
        shape="468 MB", bytes=468_000_000, us=us, tbs={m: 468e6 / t / 1e6 for m, t in us.items()}, equal=False
    )
    header, rule, row = sweep.render([result]).splitlines()
    assert header.count("TB/s") == len(sweep.METHODS) and rule.count("|") == len(sweep.METHODS) + 3
    assert row.startswith("| 468 | 4.68 (100.0) | 4.63 (101.0) |") and row.endswith("| **NO** |")


SMOKE = """
import json, torch
import lab.copy_bandwidth as sweep
sweep.BLOCK_WORDS = 16
n = 3 * 16 * 4 + 5  # three whole programs and a partial one
src = torch.randint(-2**31, 2**31 - 1, (n + 7,), dtype=torch.int32)
dst = torch.full((n + 7,), 7, dtype=torch.int32)
sweep.triton_copy(src[:n], dst[:n])
print(json.dumps([bool(torch.equal(dst[:n], src[:n])), bool((dst[n:] == 7).all())]))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_copy_under_the_interpreter() -> None:
    assert interpreted_json(SMOKE) == [True, True]
