"""The masked layout's walk of live tile pairs for CTA pairs sharing B (scheduler.cuh:
PairedTiles), the very header the kernel includes, built for the host by nvcc and run on the CPU
(`paired_live_walk_check.cu`): over expert counts up to the kernel's 1024, live tiles per expert
from none to max_m's all, idle experts, odd and even totals, and the clusters of a Hopper GPU,
every cluster's pairs are consecutive tiles of the live list (the odd last one alone), every live
tile is walked once, and the packed tile indices decode to what was packed up to the launcher's
limit (65535 M tiles). The mixed pairs' walk (MixedUnits) of the same tiles at 2, 3, 7, 32 and 56 N
tiles: every unit's tiles lie among its expert's live tiles and every (live tile, N tile) is stored
by exactly one CTA. Skips without a toolkit."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from moe_backend.cuda import jit
from moe_backend.cuda.launch import MAX_PAIRED_TILES

HERE = Path(__file__).parent
HEADERS = Path(jit.__file__).parent

try:
    NVCC = jit.find_nvcc()
except jit.JITError:
    NVCC = None


def _cases() -> list[str]:
    rng = random.Random(0)
    lines = []
    for clusters in (1, 2, 5, 66):
        for experts, tiles in ((1, 1), (1, 16), (8, 2), (32, 16), (256, 1), (256, 8), (1024, 4)):
            for fill in ("zipf", "random", "full", "none", "one"):
                if fill == "zipf":
                    live = [min(tiles, int(tiles * 2 / (1 + rank))) for rank in range(experts)]
                    rng.shuffle(live)
                elif fill == "random":
                    live = [rng.choice((0, 0, 1, tiles, rng.randint(0, tiles))) for _ in range(experts)]
                elif fill == "full":
                    live = [tiles] * experts
                elif fill == "none":
                    live = [0] * experts
                else:  # a single live tile, in the last expert
                    live = [0] * (experts - 1) + [1]
                lines.append(f"{clusters} {tiles} {experts} " + " ".join(map(str, live)))
    # the largest tile space the launcher lets through, every tile live: tile indices up to 65534
    experts, tiles = 1023, MAX_PAIRED_TILES // 1023
    lines.append(f"66 {tiles} {experts} " + " ".join([str(tiles)] * experts))
    return lines


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit)")
def test_paired_live_walk_covers_every_live_tile_once(tmp_path):
    exe = tmp_path / "paired_live_walk_check"
    build = subprocess.run(
        [str(NVCC), "-std=c++17", "--expt-relaxed-constexpr", "-I", str(HEADERS), "-o", str(exe),
         str(HERE / "paired_live_walk_check.cu")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    cases = _cases()
    run = subprocess.run([str(exe)], input="\n".join(cases) + "\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == f"ok {len(cases)}", run.stdout + run.stderr
