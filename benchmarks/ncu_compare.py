"""Our CUDA grouped GEMM against DeepGEMM under Nsight Compute, cell by cell: one launch of each on
the same inputs (`probe_cuda_gemm.py ncu|dg`), `--clock-control none` (the clocks stay as the board
sets them), and the counters that say what limits a cell: tensor-pipe activity, L2 and DRAM
throughput, DRAM bytes read, L2 sectors the SMs asked for, instructions. Prints a markdown table.

    python benchmarks/ncu_compare.py [--cells w13_512,w2_2048] [--variant h] [--log FILE]

Run on the GPU machine (`run_device.sh ncu`); needs `ncu` on the PATH and DeepGEMM importable.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
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


def measure(mode: str, cell: str, variant: str) -> dict[str, float]:
    """One profiled launch (the probe launches twice; the first compiles and warms up)."""
    kernel = "regex:phasemoe" if mode == "ncu" else "regex:sm90_fp8"
    cmd = ["ncu", "--clock-control", "none", "--kernel-name", kernel, "--launch-skip", "1", "--launch-count", "1",
           "--metrics", ",".join(m for _, m, _ in METRICS), "--csv", "--page", "raw", "--print-units", "base",
           sys.executable, str(HERE / "probe_cuda_gemm.py"), mode, cell, variant]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    # The CSV lines are the quoted ones (header, units, one row per profiled launch); ncu's own
    # "==PROF==" lines and the program's output are not.
    rows = list(csv.reader(line for line in run.stdout.splitlines() if line.startswith('"')))
    if len(rows) < 2:  # no report: the command's own output says why
        raise RuntimeError(f"ncu returned no metrics for {mode} {cell}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    values = dict(zip(rows[0], rows[-1]))
    return {title: float(values[metric].replace(",", "")) * scale for title, metric, scale in METRICS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS), help="comma-separated probe cells")
    ap.add_argument("--variant", default="h", help="our config, in probe_cuda_gemm.py's variant syntax")
    ap.add_argument("--log", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    if shutil.which("ncu") is None:
        raise SystemExit("ncu (Nsight Compute) is not on the PATH")
    head = "| cell | " + " | ".join(f"{t} ours / DG" for t, _, _ in METRICS) + " | speed vs DG (time) |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    print("\n".join(lines), flush=True)
    for cell in args.cells.split(","):  # each row as soon as its two profiles are in
        ours, dg = measure("ncu", cell, args.variant), measure("dg", cell, "h")
        cols = " | ".join(f"{ours[t]:.4g} / {dg[t]:.4g}" for t, _, _ in METRICS)
        lines.append(f"| {cell} | {cols} | {dg['µs'] / ours['µs']:.2f}× |")
        print(lines[-1], flush=True)
    if args.log:
        args.log.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
