"""One masked GEMM of a hot-expert cell (lab/sweep_masked_hot.py's operands: EP8, a mean of 128 rows
per expert under Zipf routing), ours or DeepGEMM's, launched twice (the first compiles), for Nsight
Compute to profile the second; `--ncu` runs both under ncu itself and prints the counters of
lab/ncu_compare.py side by side with the launch shapes.

    python -m lab.probe_masked_hot ours|dg [--gemm w13] [--routing zipf:1.2]
    python -m lab.probe_masked_hot --ncu [--gemm w13] [--routing zipf:1.2]

GPU only (DeepGEMM importable, `ncu` on the PATH for --ncu).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

from lab.ncu_compare import METRICS

LAUNCH = (
    ("grid", "launch__grid_size", 1.0),
    ("block", "launch__block_size", 1.0),
    ("cluster", "launch__cluster_dim_x", 1.0),
    ("smem KB", "launch__shared_mem_per_block_dynamic", 1e-3),
    ("regs", "launch__registers_per_thread", 1.0),
)


def run_once(who: str, gemm: str, routing: str) -> None:
    import torch

    from benchmarks._peers import load_deep_gemm
    from lab.sweep_masked_hot import MEAN_ROWS, hot_operands
    from moe_backend.cuda.grouped_gemm_masked import grouped_gemm_masked

    operands = hot_operands(gemm, routing)
    e, n, k, max_m = (operands[key] for key in ("e", "n", "k", "max_m"))
    counts_dev, a, a_s, b, bs = (operands[key] for key in ("masked_m", "a", "a_s", "b", "bs"))
    out = torch.empty(e, max_m, n, dtype=torch.bfloat16, device="cuda")
    if who == "ours":
        fn = lambda: grouped_gemm_masked(a, a_s, b, bs, counts_dev, out)  # noqa: E731
    else:
        dg = load_deep_gemm()
        sfa = dg.transform_sf_into_required_layout(a_s, max_m, k, (1, 128, 128), e, True)
        sfb = dg.transform_sf_into_required_layout(bs, n, k, (1, 128, 128), e, False)
        fn = lambda: dg.m_grouped_fp8_fp4_gemm_nt_masked((a, sfa), (b, sfb), out, counts_dev, MEAN_ROWS)  # noqa: E731
    for _ in range(2):
        fn()
    torch.cuda.synchronize()


def profile(who: str, gemm: str, routing: str) -> dict:
    metrics = METRICS + LAUNCH
    kernel = "regex:phasemoe" if who == "ours" else "regex:sm90_fp8"
    cmd = ["ncu", "--clock-control", "none", "--kernel-name", kernel, "--launch-skip", "1", "--launch-count", "1",
           "--metrics", ",".join(m for _, m, _ in metrics), "--csv", "--page", "raw", "--print-units", "base",
           sys.executable, "-m", "lab.probe_masked_hot", who, "--gemm", gemm, "--routing", routing]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DG_PRINT_CONFIGS": "1"})
    print("\n".join(line for line in run.stdout.splitlines() if not line.startswith('"'))[-1500:])
    rows = list(csv.reader(line for line in run.stdout.splitlines() if line.startswith('"')))
    if len(rows) < 2:
        raise RuntimeError(f"ncu returned no metrics for {who}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    values = dict(zip(rows[0], rows[-1]))
    out = {"kernel": values.get("Kernel Name", "?")[:60]}
    for title, metric, scale in metrics:
        try:
            out[title] = float(values[metric].replace(",", "")) * scale
        except (KeyError, ValueError):
            out[title] = float("nan")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("who", nargs="?", choices=("ours", "dg"))
    p.add_argument("--gemm", default="w13")
    p.add_argument("--routing", default="zipf:1.2")
    p.add_argument("--ncu", action="store_true")
    args = p.parse_args(argv)
    if not args.ncu:
        run_once(args.who, args.gemm, args.routing)
        return 0
    results = {who: profile(who, args.gemm, args.routing) for who in ("ours", "dg")}
    titles = [t for t, _, _ in METRICS + LAUNCH]
    print(f"ep8 {args.gemm} {args.routing}")
    print("| who | kernel | " + " | ".join(titles) + " |")
    print("|---|---|" + "---:|" * len(titles))
    for who, r in results.items():
        print(f"| {who} | {r['kernel']} | " + " | ".join(f"{r[t]:.3g}" for t in titles) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
