"""The CPU side of this session's lab scripts: lab/sweep_masked_hot.py's candidates and table,
lab/prefill_launch_gaps.py's variants and table, lab/contiguous_before_after.py's segments and
lab/_prebuild.py's renamed "before" kernel (both run on a GPU only)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lab import _prebuild, contiguous_before_after, prefill_launch_gaps, sweep_masked_hot
from moe_backend.cuda import launch
from moe_backend.cuda.config import ContiguousConfig


def _t(us: float) -> dict:
    return {"us": us, "lo": us, "hi": us}


def test_masked_hot_candidates_and_table(capsys) -> None:
    cands = sweep_masked_hot.candidates()
    assert cands["c2a:256:s3"] == ContiguousConfig(256, num_stages=3, group_m=1, cluster=2, multicast="a")
    assert all(c.group_m == 1 for c in cands.values())  # the masked layout's dense walk
    # `:h`: the same config with the padding halves' MMAs skipped
    skipping = {name for name, c in cands.items() if c.skip_padding_halves}
    assert skipping and all(name.endswith((":h", ":h2")) for name in skipping)
    assert {name for name, c in cands.items() if c.split_padding_halves} == {n for n in skipping if n.endswith(":h2")}
    assert cands["c2m:256:s3:h"] == dataclasses.replace(cands["c2m:256:s3"], skip_padding_halves=True)
    result = dict(
        cell="ep8 w13 zipf:1.2",
        describe="max/mean 10.3x, idle 0",
        max_m=2048,
        times={"shipped": _t(400.0), "c1:256": _t(420.0), "dg_masked": _t(380.0)},
        same={"shipped": True, "c1:256": False},
    )
    lines = sweep_masked_hot.render([result]).splitlines()
    assert lines[0] == "| cell | max_m | shipped | c1:256 | dg_masked | best ours / DG |"
    assert (
        lines[2]
        == "| ep8 w13 zipf:1.2 (max/mean 10.3x, idle 0) | 2048 | 400.0 | 420.0 (DIFFERS) | 380.0 | 0.950 (shipped) |"
    )
    assert sweep_masked_hot.main(["--list"]) == 0
    assert "c2a:128:s4" in capsys.readouterr().out


def test_max_m_is_the_hottest_rows_rounded_up_to_a_power_of_two() -> None:
    assert sweep_masked_hot.max_m_of(torch.tensor([3, 128])) == 128
    assert sweep_masked_hot.max_m_of(torch.tensor([1322, 5])) == 2048


def test_launch_gap_variants_and_table(capsys) -> None:
    assert prefill_launch_gaps.variants([2]) == ["plan", "pdl", "pipe:s2", "pdl+pipe:s2"]
    trace = dict(span_us=905.0, busy_us=897.0, gaps=[("a", 1.0), ("gemm", 2.5), ("b", 0.5)])
    result = dict(
        cell="ep8 uniform T=8192",
        times={"plan": _t(1000.0), "pdl": _t(990.0)},
        equal={"plan": True, "pdl": False},
        trace=trace,
    )
    lines = prefill_launch_gaps.render([result]).splitlines()
    gaps = "2.5 after gemm; 1.0 after a; 0.5 after b"
    assert lines[2] == f"| ep8 uniform T=8192 | 1000.0 | 990.0 (DIFFERS) | 905.0 / 897.0 | {gaps} |"
    assert prefill_launch_gaps.main(["--list", "--stages", "1,3"]) == 0
    assert "pdl+pipe:s3" in capsys.readouterr().out


def test_segments_are_padded_to_128_rows() -> None:
    ids = contiguous_before_after.segment_ids(torch.tensor([3, 0, 128, 129]))
    assert len(ids) == 128 + 128 + 256
    assert ids[:4] == [0, 0, 0, -1] and ids[128] == 2 and ids[256:258] == [3, 3] and ids[257 + 128] == -1


def test_the_before_kernel_builds_from_the_old_headers_under_its_own_name() -> None:
    spec = launch.kernel_spec(4096, 7168, ContiguousConfig(128, group_m=1, cluster=2, multicast="a"), masked_max_m=256)
    old = _prebuild.old_spec(spec, Path("/tmp/old_headers"))
    assert old.kernel_name == spec.kernel_name + "_before"
    assert old.include_dirs == (Path("/tmp/old_headers"),)
    assert spec.kernel_name not in old.source.replace(old.kernel_name, "")


def test_masked_hot_config_filter_and_slices() -> None:
    assert list(sweep_masked_hot.chosen("c2a:128,c1:64")) == ["c2a:128", "c1:64"]
    assert sweep_masked_hot.chosen(None) == sweep_masked_hot.candidates()
    with pytest.raises(SystemExit, match="unknown"):
        sweep_masked_hot.chosen("c2a:128,c9:1")
    assert sweep_masked_hot.SHAPES["tp8"] == {"w13": (256, 512, 7168), "w2": (256, 7168, 256)}
