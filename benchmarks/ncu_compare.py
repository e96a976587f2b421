"""Our CUDA grouped GEMM against DeepGEMM under Nsight Compute, cell by cell: one launch of each on
the same inputs (`probe_cuda_gemm.py ncu|dg`), `--clock-control none` (the clocks stay as the board
sets them), and the counters that say what limits a cell: tensor-pipe activity, L2 and DRAM
throughput, DRAM bytes read, L2 sectors the SMs asked for, instructions. Prints a markdown table.

    python -m benchmarks.ncu_compare [--cells w13_512,w2_2048] [--variant h] [--log FILE]
    python -m benchmarks.ncu_compare --ceiling [--cells ...] [--configs "h;192,0,0,8,2,0,1,0,1,0,1"]

--ceiling: for each of our configs, cycles and tensor-pipe activity as built and without the
promotion FFMAs (the `@1` ablation: results wrong, MMAs kept), next to DeepGEMM's: how much of
each config's idle time the promotion accounts for, and what is left without it.

Run on the GPU machine (`run_device.sh ncu`); needs `ncu` on the PATH and DeepGEMM importable.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # `python -m benchmarks.probe_cuda_gemm` runs from here
CELLS = ("w13_512", "w13_2048", "w13_4096", "w2_512", "w2_2048", "w2_4096", "tp8w13", "tp8w2")
# (column title, metric, scale applied to the base-unit value)
METRICS = (
    ("µs", "gpu__time_duration.sum", 1e-3),
    ("M cycles", "gpc__cycles_elapsed.max", 1e-6),
    ("tensor %", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("L2 %", "lts__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("DRAM read GB", "dram__bytes_read.sum", 1e-9),
    ("L2 sectors M", "lts__t_sectors_srcunit_tex.sum", 1e-6),
    ("instructions M", "smsp__inst_executed.sum", 1e-6),
)


# --ceiling: the configs profiled with and without the promotion (probe variant syntax): the
# heuristic's, 256 wide in 64-wide units two in flight, 192 wide as one unit (DeepGEMM's tile),
# 128 wide as two whole units in flight.
CEILING_CONFIGS = "h;256,0,0,8,2,0,1,0,1,64,2;192,0,0,8,2,0,1,0,1,0,1;128,0,0,8,2,0,2,0,1,0,2"
CEILING_METRICS = METRICS[1:3]


def measure(mode: str, cell: str, variant: str, metrics=METRICS) -> dict[str, float]:
    """One profiled launch (the probe launches twice; the first compiles and warms up)."""
    kernel = "regex:phasemoe" if mode == "ncu" else "regex:sm90_fp8"
    cmd = ["ncu", "--clock-control", "none", "--kernel-name", kernel, "--launch-skip", "1", "--launch-count", "1",
           "--metrics", ",".join(m for _, m, _ in metrics), "--csv", "--page", "raw", "--print-units", "base",
           sys.executable, "-m", "benchmarks.probe_cuda_gemm", mode, cell, variant]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    # The CSV lines are the quoted ones (header, units, one row per profiled launch); ncu's own
    # "==PROF==" lines and the program's output are not.
    rows = list(csv.reader(line for line in run.stdout.splitlines() if line.startswith('"')))
    if len(rows) < 2:  # no report: the command's own output says why
        raise RuntimeError(f"ncu returned no metrics for {mode} {cell}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    values = dict(zip(rows[0], rows[-1]))
    return {title: float(values[metric].replace(",", "")) * scale for title, metric, scale in metrics}


def compare_row(cell: str, variant: str) -> str:
    """Ours (`variant`) and DeepGEMM on one cell, each metric as 'ours / DG'."""
    ours, dg = measure("ncu", cell, variant), measure("dg", cell, "h")
    cols = " | ".join(f"{ours[t]:.4g} / {dg[t]:.4g}" for t, _, _ in METRICS)
    return f"| {cell} | {cols} | {dg['µs'] / ours['µs']:.2f}× |"


def ceiling_rows(cell: str, configs: str):
    """One row per config (and DeepGEMM): M cycles and tensor % as built and with `@1`."""
    def fmt(r):
        return f"{r['M cycles']:.3f}, {r['tensor %']:.1f}"
    for config in configs.split(";"):
        built = measure("ncu", cell, config, CEILING_METRICS)
        bare = measure("ncu", cell, f"{config}@1", CEILING_METRICS)
        yield f"| {cell} | {config} | {fmt(built)} | {fmt(bare)} |"
    yield f"| {cell} | DeepGEMM | {fmt(measure('dg', cell, 'h', CEILING_METRICS))} | – |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS), help="comma-separated probe cells")
    ap.add_argument("--variant", default="h", help="our config, in probe_cuda_gemm.py's variant syntax")
    ap.add_argument("--log", type=Path, help="also write the table here")
    ap.add_argument("--ceiling", action="store_true", help="configs with and without the promotion (see above)")
    ap.add_argument("--configs", default=CEILING_CONFIGS, help="--ceiling: ';'-separated probe variants")
    args = ap.parse_args(argv)
    if shutil.which("ncu") is None:
        raise SystemExit("ncu (Nsight Compute) is not on the PATH")
    cells = args.cells.split(",")
    if args.ceiling:
        header = ["| cell | config | M cycles, tensor % | without promotion (`@1`) |", "|---|---|---|---|"]
        rows = (row for cell in cells for row in ceiling_rows(cell, args.configs))
    else:
        header = ["| cell | " + " | ".join(f"{t} ours / DG" for t, _, _ in METRICS) + " | speed vs DG (time) |",
                  "|" + "---|" * (len(METRICS) + 2)]
        rows = (compare_row(cell, args.variant) for cell in cells)
    lines = list(header)
    print("\n".join(lines), flush=True)
    for row in rows:  # each row as soon as its profiles are in
        lines.append(row)
        print(row, flush=True)
    if args.log:
        args.log.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
