"""What ``onnxpipe tune`` shows: a summary table, a table of candidates, and ``tune.png``."""

from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from onnxpipe.runtimes.tune import TuneReport

STYLE = {"default": "bold", "kept": "green", "no gain": "dim", "slower": "yellow", "rejected": "red", "error": "red"}


def summary_table(report: TuneReport) -> Table:
    """One row per device: chosen setup and batch, tuned and default latency side by side, speedup.

    Example:
        >>> summary_table(report).row_count  # doctest: +SKIP
        1
    """
    t = Table(title=f"tune {escape(report.model)} · objective {report.objective} · "
                    f"{report.elapsed_s:.1f} s of {report.budget_s:g} s budget")
    for col in ("device", "chosen setup", "batch", "default p50", "tuned p50", "samples/s (default -> tuned)",
                "speedup", "max batch", "knee"):
        t.add_column(col, justify="left" if col in ("device", "chosen setup") else "right")
    for d in report.devices:
        def tput(ms: float, batch: int = d.batch) -> str:
            return f"{batch / (ms / 1e3):,.0f}" if ms else "-"

        speed = (f"[green]{d.speedup:.2f}x[/] (± {d.confirm.noise:.1%})" if d.significant and d.confirm
                 else "[dim]1.00x (default kept)[/]")
        t.add_row(d.default.label, escape(str(d.chosen)), str(d.batch), f"{d.default_ms:.3f} ms",
                  f"{d.tuned_ms:.3f} ms", f"{tput(d.default_ms)} -> {tput(d.tuned_ms)}", speed,
                  "-" if d.max_batch is None else str(d.max_batch), "-" if d.knee_batch is None else str(d.knee_batch))
    return t


def candidates_table(report: TuneReport) -> Table:
    """Every candidate tried and skipped, with its latency, its ratio to the incumbent and why.

    Example:
        >>> candidates_table(report).columns[0].header  # doctest: +SKIP
        'device'
    """
    t = Table(title="candidates (ratio: latency against the best setup at that moment; below 1 is faster)")
    for col in ("device", "change", "result", "p50", "ratio", "why"):
        t.add_column(col, justify="right" if col in ("p50", "ratio") else "left")
    for d in report.devices:
        for tr in d.trials:
            style = STYLE.get(tr.status, "")
            t.add_row(d.default.label, escape(tr.change), f"[{style}]{tr.status}[/]" if style else tr.status,
                      "-" if tr.latency_ms is None else f"{tr.latency_ms:.3f} ms",
                      "-" if tr.ratio is None else f"{tr.ratio:.3f}", escape(tr.reason))
        for s in d.skipped:
            t.add_row(d.default.label, escape(f"{s.dimension}: {s.label}"), "[dim]skipped[/]", "-", "-", escape(s.why))
    return t


def chart(report: TuneReport, path: str | os.PathLike) -> Path:
    """Latency vs throughput of every measured candidate per device, the default and the chosen marked.

    Example:
        >>> chart(report, "tune.png")  # doctest: +SKIP
        PosixPath('tune.png')
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxpipe.core.files import save_figure

    n = max(1, len(report.devices))
    fig, axes = plt.subplots(1, n, figsize=(6.0 * n, 4.6), squeeze=False)
    for ax, d in zip(axes[0], report.devices):
        measured = [t for t in d.trials if t.latency_ms]
        colors = {"kept": "#55A868", "no gain": "#8C8C8C", "slower": "#DD8452", "default": "#4C72B0"}
        for status in ("no gain", "slower", "kept"):
            pts = [t for t in measured if t.status == status]
            if pts:
                ax.scatter([t.latency_ms for t in pts], [t.samples_per_s for t in pts], s=28, c=colors[status],
                           label=status, alpha=0.8)
        for t in measured:
            ax.annotate(t.change, (t.latency_ms, t.samples_per_s), fontsize=6, alpha=0.7,
                        xytext=(3, 3), textcoords="offset points")
        if d.default_ms:
            ax.scatter([d.default_ms], [d.batch / (d.default_ms / 1e3)], marker="s", s=90, c="#4C72B0",
                       edgecolors="black", label=f"default {d.default_ms:.3f} ms", zorder=5)
        if d.tuned_ms:
            ax.scatter([d.tuned_ms], [d.batch / (d.tuned_ms / 1e3)], marker="*", s=220, c="#C44E52",
                       edgecolors="black", zorder=6,
                       label=f"chosen {d.tuned_ms:.3f} ms ({d.speedup:.2f}x)" if d.significant else "chosen = default")
        ax.set_xlabel(f"latency per run, ms (median, batch {d.batch})")
        ax.set_ylabel("throughput, samples/s")
        ax.set_title(f"{d.default.label}: {len(measured)} setups measured", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"tune {Path(report.model).name} ({report.objective})", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
