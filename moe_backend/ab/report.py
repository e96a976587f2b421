"""The `compare` report: Markdown tables (every cell, winners, divergence flags) and PNG plots
(latency against tokens per backend, decode range shaded; worst error per backend)."""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import datetime, timezone

from moe_backend._json_file import write_text
from moe_backend.ab.plots import bar_plot, line_plot, matplotlib_missing
from moe_backend.ab.winners import cell_winners
from moe_backend.constants import BACKEND_NAME

__all__ = ["write_compare_report", "render_markdown"]


def _fmt(value, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def _pct(fraction) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def _plots(result: dict, out_dir: str) -> list[str]:
    rows = [r for r in result["rows"] if "time_us" in r]
    files = []
    decode_max = result["meta"]["policy"].get("decode_max_tokens")
    for slice_name in dict.fromkeys(r["slice"] for r in result["rows"]):
        series: dict[str, tuple[list, list]] = {}
        for r in rows:
            if r["slice"] == slice_name:
                xs, ys = series.setdefault(r["backend"], ([], []))
                xs.append(r["tokens"])
                ys.append(r["time_us"])
        if series:
            files.append(
                line_plot(
                    os.path.join(out_dir, f"latency_{slice_name}.png"),
                    f"{slice_name}: routed experts, time per call ({result['meta']['device']})",
                    "tokens",
                    "µs (median)",
                    series,
                    shade_below=decode_max,
                    shade_label=f"decode (≤ {decode_max} tokens)",
                )
            )
    slices = list(dict.fromkeys(r["slice"] for r in result["rows"]))
    worst: dict[str, list[float]] = {}
    for backend in dict.fromkeys(r["backend"] for r in result["rows"] if "rel_err" in r):
        worst[backend] = [
            max(
                [r["rel_err"] for r in result["rows"] if r["backend"] == backend and r["slice"] == s and "rel_err" in r]
                or [float("nan")]
            )
            for s in slices
        ]
    if worst:
        # Log scale cannot show an exact 0 (a backend identical to the reference): floor it.
        worst = {b: [max(v, 1e-7) for v in vs] for b, vs in worst.items()}
        files.append(
            bar_plot(
                os.path.join(out_dir, "error.png"),
                "worst relative error vs the reference, per slice (exact matches drawn at 1e-7)",
                "relative error (Frobenius)",
                slices,
                worst,
                hline=result["meta"]["tolerance"],
                hline_label="tolerance",
            )
        )
    return files


def render_markdown(result: dict, plot_files: list[str], plot_note: str | None = None) -> str:
    meta, rows, tol = result["meta"], result["rows"], result["meta"]["tolerance"]
    v = meta["versions"]
    lines = [
        "# MoE backend comparison",
        "",
        f"- device: **{meta['device']}**; {', '.join(f'{k} {val}' for k, val in v.items())}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; command: `{meta.get('command', '')}`",
        f"- routing: {meta['routing']}; seed {meta['seed']}; timing: median of {meta['rounds']} interleaved "
        f"round(s) per cell"
        + (
            ", each a CUDA-event median over ~50 ms (L2 flushed)"
            if meta["ceilings"]
            else ", wall clock (CPU: times are not representative of a GPU)"
        ),
        f"- active policy ({BACKEND_NAME}): `{meta['policy']}`",
    ]
    if meta.get("checkpoint"):
        lines.append(f"- weights: checkpoint `{meta['checkpoint']}`, layer {meta['layer']}")
    else:
        lines.append("- weights: random FP8 (normal draws / sqrt(K), 128x128 block scales)")
    if meta["ceilings"]:
        c = meta["ceilings"]
        lines.append(
            f"- ceilings measured in this run: copy {c['copy_gbs']:.0f} GB/s (read+write)"
            + (f", FP8 GEMM {c['fp8_tflops']:.0f} TFLOPS" if "fp8_tflops" in c else "")
            + "; floor = max(FLOPs / FP8 peak, bytes / copy bandwidth)"
        )
    if meta.get("not_run"):
        lines.append(
            f"- **incomplete**: the time budget ran out after {meta['elapsed_s']} s; cells not run: "
            + ", ".join(meta["not_run"])
        )
    lines += ["", "## Backends", "", "| backend | what | status |", "|---|---|---|"]
    for name in meta["backends"]:
        lines.append(f"| {name} | {meta['descriptions'][name]} | ran |")
    for name, reason in result["skipped"].items():
        lines.append(f"| {name} | | **skipped**: {reason} |")

    diverging = [r for r in rows if r.get("diverges")]
    failed = [r for r in rows if "error" in r]
    lines += ["", "## Divergence from the reference", ""]
    if diverging:
        by_backend = defaultdict(list)
        for r in diverging:
            by_backend[r["backend"]].append(r)
        for backend, rs in by_backend.items():
            worst = max(rs, key=lambda r: r["rel_err"])
            lines.append(
                f"- **DIVERGES: {backend}** — relative error above the tolerance {tol:g} (widened by "
                f"1 + 2/sqrt(routed pairs) in small cells) in {len(rs)} "
                f"cell(s); worst {worst['rel_err']:.3g} ({worst['slice']}, {worst['tokens']} tokens; "
                f"max abs {worst['max_abs']:.3g}, argmax agreement {worst['argmax_agreement']:.1%})"
            )
    else:
        lines.append(
            f"All backends that ran are within the tolerance (relative error ≤ {tol:g}, widened by "
            f"1 + 2/sqrt(routed pairs) in cells with few pairs)."
        )
    for r in failed:
        lines.append(f"- **FAILED: {r['backend']}** on {r['slice']} at {r['tokens']} tokens: `{r['error']}`")
    for r in (r for r in rows if "skipped" in r):
        lines.append(f"- skipped {r['backend']} on {r['slice']} at {r['tokens']} tokens: {r['skipped']}")
    lines += [
        "",
        f"Expected from FP8 rounding alone: ~1e-3 between correct kernels (they round GEMM1's output to "
        f"bf16 and re-quantize it to FP8 at different points); above {tol:g} is a bug or a wrong layout.",
        "",
    ]

    winners = cell_winners(rows)
    lines += [
        "## Winners (fastest within tolerance)",
        "",
        f"| slice | tokens | phase | winner | kernel | µs | vs {BACKEND_NAME} |",
        "|---|---|---|---|---|---|---|",
    ]
    ours = {(r["slice"], r["tokens"]): r for r in rows if r["backend"] == BACKEND_NAME and "time_us" in r}
    for (slice_name, tokens), w in winners.items():
        base = ours.get((slice_name, tokens))
        ratio = f"{base['time_us'] / w['time_us']:.2f}x" if base else "–"
        lines.append(
            f"| {slice_name} | {tokens} | {w['phase']} | **{w['backend']}** | {w['kernel'] or '–'} | "
            f"{w['time_us']:.1f} | {ratio} |"
        )

    for s in meta["slices"]:
        lines += [
            "",
            f"## {s['name']}: H {s['hidden']}, I {s['intermediate']}, {s['local_experts']} of "
            f"{s['num_experts']} experts held, top-{s['topk']}",
            "",
            "| tokens | phase | backend | kernel | µs | TFLOPS | GB/s | % floor | rel err | max abs | argmax agr. | |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["slice"] != s["name"]:
                continue
            flag = (
                "**DIVERGES**"
                if r.get("diverges")
                else ("**FAILED**" if "error" in r else ("skipped (memory)" if "skipped" in r else ""))
            )
            if winners.get((r["slice"], r["tokens"])) is r:
                flag = (flag + " winner").strip()
            lines.append(
                f"| {r['tokens']} | {r['phase']} | {r['backend']} | {r.get('kernel') or '–'} | "
                f"{_fmt(r.get('time_us'), '.1f')} | {_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('gbps'), '.0f')} | "
                f"{_fmt(r.get('floor_pct'), '.0f')} | {_fmt(r.get('rel_err'), '.2e')} | "
                f"{_fmt(r.get('max_abs'), '.2e')} | "
                f"{_pct(r.get('argmax_agreement'))} | {flag} |"
            )
    lines += ["", "## Plots", ""]
    lines += [f"![{f}]({f})" for f in plot_files] or [f"(none: {plot_note or 'no cell ran'})"]
    lines += [
        "",
        "TFLOPS count 2·pairs·3·I·H (pairs: routed (token, local expert) pairs); GB/s counts the fp8 "
        "activations and the active experts' weights read once and the bf16 output written once.",
        "",
    ]
    return "\n".join(lines)


def write_compare_report(result: dict, out_dir: str) -> list[str]:
    """Writes report.md and the plots into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    note = matplotlib_missing()
    plot_files = [] if note else _plots(result, out_dir)
    path = os.path.join(out_dir, "report.md")
    write_text(path, render_markdown(result, plot_files, note))
    return [path] + [os.path.join(out_dir, p) for p in plot_files]
