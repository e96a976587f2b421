"""PNG plots for the A/B reports. matplotlib is optional (`pip install -e '<moe-backend clone>[bench]'`): without
it the reports are written without plots and say how to get them."""

from __future__ import annotations

import os
from typing import Sequence

from moe_backend._install import extra_install_command

__all__ = ["matplotlib_missing", "line_plot", "bar_plot", "cdf_plot", "INSTALL_HINT"]

INSTALL_HINT = f"plots need matplotlib: {extra_install_command('bench')}"


def matplotlib_missing() -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers
    except ImportError:
        return INSTALL_HINT
    return None


def _figure(title: str, xlabel: str, ylabel: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return plt, fig, ax


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.path.basename(path)


def line_plot(
    path: str,
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    logx: bool = True,
    logy: bool = True,
    shade_below: float | None = None,
    shade_label: str = "",
) -> str:
    """One line per series {label: (xs, ys)}; shade_below shades x <= that value (e.g. decode)."""
    plt, fig, ax = _figure(title, xlabel, ylabel)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if shade_below is not None:
        ax.axvspan(ax.get_xlim()[0], shade_below, color="grey", alpha=0.12, label=shade_label)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def bar_plot(
    path: str,
    title: str,
    ylabel: str,
    groups: list[str],
    bars: dict[str, list[float]],
    *,
    logy: bool = True,
    hline: float | None = None,
    hline_label: str = "",
) -> str:
    """Grouped bars: for each label in `bars`, one bar per group."""
    plt, fig, ax = _figure(title, "", ylabel)
    width = 0.8 / max(1, len(bars))
    for i, (label, values) in enumerate(bars.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width=width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups)
    if logy:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="red", linestyle="--", label=hline_label)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def cdf_plot(path: str, title: str, xlabel: str, samples: dict[str, Sequence[float]]) -> str:
    """Empirical CDF per label."""
    plt, fig, ax = _figure(title, xlabel, "fraction of samples ≤ x")
    for label, xs in samples.items():
        xs = sorted(xs)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{label} (n={len(xs)})")
        else:
            ax.plot([], [], label=f"{label} (no samples)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
