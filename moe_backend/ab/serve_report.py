"""The `ab-serve` report: per-server latency and throughput, errors, and output agreement.

Agreement is measured on requests both servers completed: exact-match rate, and for the others the
first divergent character and the first divergent token (the index of the server-A stream chunk
holding that character; servers stream about one token per chunk). With greedy decoding, FP8
kernels that round differently still flip a near-tied token now and then, after which the texts
part ways: a low exact-match rate with late first divergences is rounding; early ones are a bug.
"""

from __future__ import annotations

import math
import os
import statistics

from moe_backend._json_file import write_text
from moe_backend.ab.plots import cdf_plot, matplotlib_missing

__all__ = ["server_stats", "agreement", "first_divergence", "write_serve_report"]


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile, interpolated between the two nearest ranks (numpy's default): p50 of an even
    count is the mean of the middle two, and p99 of 100 samples is not their maximum."""
    if not values:
        return None
    values = sorted(values)
    pos = q * (len(values) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def server_stats(run: dict, label: str) -> dict:
    mine = [r for r in run["results"] if r.server == label]
    ok = [r for r in mine if r.ok]
    errors: dict[str, int] = {}
    for r in mine:
        if not r.ok:
            kind = r.error.split(":")[0] if r.error else "unknown"
            errors[kind] = errors.get(kind, 0) + 1
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    e2e = [r.e2e_s for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    wall = run["wall_s"].get(label) or 0.0
    out = {
        "sent": len(mine),
        "ok": len(ok),
        "errors": errors,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        "requests_per_s": len(ok) / wall if wall else None,
    }
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{int(q * 100)}_ms"] = None if not xs else 1e3 * _pct(xs, q)
        out[f"{name}_mean_ms"] = 1e3 * statistics.fmean(xs) if xs else None
    return out


def first_divergence(a_chunks: list[str], b_text: str) -> tuple[int | None, int | None]:
    """(first differing character, A's chunk index holding it); (None, None) when identical."""
    a_text = "".join(a_chunks)
    if a_text == b_text:
        return None, None
    n = min(len(a_text), len(b_text))
    char = next((i for i in range(n) if a_text[i] != b_text[i]), n)
    seen = 0
    for token, chunk in enumerate(a_chunks):
        seen += len(chunk)
        if char < seen:
            return char, token
    return char, len(a_chunks)  # A ended where B went on


def agreement(run: dict, label_a: str, label_b: str) -> dict:
    by_index: dict[int, dict] = {}
    for r in run["results"]:
        if r.ok:
            by_index.setdefault(r.index, {})[r.server] = r
    pairs = [(d[label_a], d[label_b]) for d in by_index.values() if label_a in d and label_b in d]
    divergent = []
    for a, b in pairs:
        char, token = first_divergence(a.chunks, b.text)
        if char is not None:
            divergent.append(
                {
                    "index": a.index,
                    "char": char,
                    "token": token,
                    "a": a.text[max(0, char - 20) : char + 40],
                    "b": b.text[max(0, char - 20) : char + 40],
                }
            )
    tokens = [d["token"] for d in divergent]
    return {
        "compared": len(pairs),
        "exact": len(pairs) - len(divergent),
        "exact_rate": (len(pairs) - len(divergent)) / len(pairs) if pairs else None,
        "first_divergent_token_median": statistics.median(tokens) if tokens else None,
        "first_divergent_token_min": min(tokens) if tokens else None,
        "divergent": divergent,
    }


def _fmt(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def write_serve_report(run: dict, out_dir: str) -> tuple[list[str], str]:
    """Writes report.md (+ CDF plots); returns (paths, a few-line summary for the terminal)."""
    labels = list(run["settings"]["servers"])
    stats = {label: server_stats(run, label) for label in labels}
    agree = agreement(run, labels[0], labels[1])
    s = run["settings"]
    lines = [
        "# A/B serving comparison",
        "",
        *(f"- {label}: {info['url']} (model `{info['model']}`)" for label, info in s["servers"].items()),
        f"- {s['requests']} requests per server, {s['concurrency']} in flight per server, max_tokens "
        f"{s['max_tokens']}, temperature {s['temperature']}, timeout {s['timeout']:g} s, duration {s['duration']:g} s"
        + (f"; {run['not_started']} request(s) not started (duration reached)" if run["not_started"] else ""),
        "",
        "## Latency and throughput",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    rows = [
        ("completed / sent", lambda st: f"{st['ok']} / {st['sent']}"),
        ("errors", lambda st: ", ".join(f"{k}: {v}" for k, v in sorted(st["errors"].items())) or "none"),
    ]
    for name, what in (("ttft", "TTFT"), ("itl", "inter-token"), ("e2e", "request")):
        for q in ("p50", "p90", "p99"):
            rows.append((f"{what} {q} (ms)", lambda st, k=f"{name}_{q}_ms": _fmt(st[k])))
    rows += [
        ("output tokens/s", lambda st: _fmt(st["tokens_per_s"])),
        ("completed requests/s", lambda st: _fmt(st["requests_per_s"], ".2f")),
    ]
    lines += [f"| {title} | " + " | ".join(fn(stats[label]) for label in labels) + " |" for title, fn in rows]
    a_ttft, b_ttft = (stats[label]["ttft_p50_ms"] for label in labels)
    if a_ttft and b_ttft:
        lines += ["", f"{labels[1]} / {labels[0]} median TTFT: {b_ttft / a_ttft:.2f}x"]
    lines += [
        "",
        "## Output agreement",
        "",
        f"- compared (both completed): {agree['compared']}; identical: {agree['exact']}"
        + (f" ({agree['exact_rate']:.1%})" if agree["exact_rate"] is not None else ""),
    ]
    if agree["divergent"]:
        lines.append(
            f"- first divergent token: median {agree['first_divergent_token_median']}, earliest "
            f"{agree['first_divergent_token_min']}"
        )
        lines += ["", "| request | first divergent char | token | A around it | B around it |", "|---|---|---|---|---|"]
        for d in agree["divergent"][:20]:
            a, b = (repr(d[k]).replace("|", "\\|").replace("`", "'") for k in ("a", "b"))
            lines.append(f"| {d['index']} | {d['char']} | {d['token']} | `{a}` | `{b}` |")
    note = matplotlib_missing()
    paths = []
    if note is None:
        ok = [r for r in run["results"] if r.ok]
        for name, title, values in (
            ("ttft_cdf.png", "time to first token", lambda r: [1e3 * r.ttft_s] if r.ttft_s is not None else []),
            ("itl_cdf.png", "inter-token latency", lambda r: [1e3 * g for g in r.itl_s]),
            ("e2e_cdf.png", "request latency", lambda r: [1e3 * r.e2e_s]),
        ):
            samples = {label: [v for r in ok if r.server == label for v in values(r)] for label in labels}
            paths.append(os.path.join(out_dir, cdf_plot(os.path.join(out_dir, name), title, "ms", samples)))
    lines += ["", "## Plots", ""] + (
        [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths] or [f"(none: {note})"]
    )
    lines += [
        "",
        "TTFT: request sent to first streamed text; inter-token: gaps between streamed chunks; "
        "errors and timeouts are excluded from the latency figures and counted above.",
        "",
    ]
    path = os.path.join(out_dir, "report.md")
    write_text(path, "\n".join(lines))
    summary = "; ".join(
        f"{label}: {st['ok']}/{st['sent']} ok, TTFT p50 {_fmt(st['ttft_p50_ms'])} ms, {_fmt(st['tokens_per_s'])} tok/s"
        for label, st in stats.items()
    )
    summary += f"; identical outputs {agree['exact']}/{agree['compared']}"
    return [path] + paths, summary
