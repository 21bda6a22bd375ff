"""Plots for the benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"streaming": "#1f77b4", "barrier": "#d62728"}


def _finite(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_streaming(result: dict[str, Any], path: Path) -> Path:
    """Latency (p50, p99) and completed throughput against offered load, both modes."""
    agg = result["aggregate"]
    slo = result["headline"]["slo_s"]
    unit = "simulated s" if result.get("calibration") else "s"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    top = 0.0
    for mode in ("streaming", "barrier"):
        rows = [r for r in agg if r["mode"] == mode]
        xs = [r["rate"] for r in rows]
        for q, style in (("p50", "--"), ("p99", "-")):
            fx, fy = _finite(xs, [r["latency"][q] for r in rows])
            top = max([top, *fy])
            ax1.plot(fx, fy, style, marker="o", color=COLORS[mode], label=f"{mode} {q}")
        ax2.plot(xs, [r["throughput"] for r in rows], "-", marker="o", color=COLORS[mode],
                 label=mode)
    ax1.axhline(slo, color="grey", linestyle=":", label=f"SLO {slo:g} s")
    ax1.set_xlabel("offered load (req/s)")
    ax1.set_ylabel(f"end-to-end latency ({unit})")
    ax1.set_ylim(0, max(top, slo) * 1.1 if top else slo * 1.5)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    rates = sorted({r["rate"] for r in agg})
    if rates:
        ax2.plot(rates, rates, ":", color="grey", label="offered")
    ax2.set_xlabel("offered load (req/s)")
    ax2.set_ylabel("completed (req/s)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{result['name']}: streaming vs barrier "
                 f"({result['config']['transport']}, time_scale {result['time_scale']:g})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
