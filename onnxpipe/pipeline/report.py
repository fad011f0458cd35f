"""The run's report: one table (terminal and Markdown), the JSON, and a chart per stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.table import Table

from onnxpipe.core.files import save_figure
from onnxpipe.core.units import human_bytes

COLUMNS = ("stage", "nodes", "params", "size", "max diff", "metric", "latency", "kept")
OBJECTIVE_COLUMNS = ("objective", "change")


def _columns(stages: list[Any]) -> tuple[str, ...]:
    if any(getattr(s, "objective", None) for s in stages):
        return COLUMNS[:-1] + OBJECTIVE_COLUMNS + COLUMNS[-1:]
    return COLUMNS


def _objective_cells(s: Any) -> list[str]:
    o = getattr(s, "objective", None)
    if not o:
        return ["-", "-"]
    unit, value = o.get("unit"), o.get("after")
    text = (human_bytes(value) if unit == "bytes" else f"{value:.3f} ms" if unit == "ms"
            else f"{value:,.1f}/s") if value is not None else "-"
    text = f"{o['goal']} {text}"
    if o.get("before") is None:
        return [text, "(input)"]
    change = f"x{o['after'] / o['before']:.3f}" if o.get("before") else "-"
    noise = f" ±{o['noise']:.3f}" if o.get("rounds") else ""
    return [text, f"{change}{noise} {o.get('verdict', '')}".strip()]


def _rows(stages: list[Any], metric_name: str | None) -> list[list[str]]:
    with_objective = len(_columns(stages)) > len(COLUMNS)
    rows = []
    for s in stages:
        diff = "-" if s.max_abs is None else f"{s.max_abs:.2g}"
        metric = "-" if s.metric is None else f"{s.metric:.4f}"
        latency = "-" if s.latency_ms is None else f"{s.latency_ms:.3f} ms"
        why = getattr(s, "why", None)
        notes = s.notes or {}
        if s.kept:
            # a pass's one-line account of what it did (or chose not to), then why the pipeline kept it
            parts = [p for p in (notes.get("outcome"), why if s.index > 0 else None) if p]
            kept = "yes: " + "; ".join(parts) if parts else "yes"
            if notes.get("warning"):  # kept, but the pass says it did not do its job
                kept += f"; warning: {notes['warning']}"
        else:
            kept = f"no: {s.reason}"
        row = [f"{s.index:02d} {s.name}", str(s.nodes), f"{s.params:,}", human_bytes(s.size_bytes),
               diff, metric, latency]
        if with_objective:
            row += _objective_cells(s)
        rows.append(row + [kept])
    return rows


def table(stages: list[Any], metric_name: str | None = None, title: str = "stages") -> Table:
    """A rich table of the stages, for the terminal."""
    t = Table(title=title)
    for col in _columns(stages):
        header = f"{col} ({metric_name})" if col == "metric" and metric_name else col
        t.add_column(header, justify="left" if col in ("stage", "kept", "change") else "right",
                     overflow="fold", no_wrap=col != "kept", max_width=60 if col == "kept" else None)
    for row, s in zip(_rows(stages, metric_name), stages):
        if not s.kept:
            row[-1] = f"[red]{row[-1]}[/]"
        t.add_row(*row)
    return t


def markdown(stages: list[Any], metric_name: str | None = None, title: str = "onnxpipe report",
             objective: Any = None) -> str:
    """The same table in Markdown, with each stage's notes below it (and the objective above it)."""
    header = [f"{c} ({metric_name})" if c == "metric" and metric_name else c for c in _columns(stages)]
    lines = [f"# {title}", ""]
    if objective is not None:
        how = ("Each stage's size is compared with the one before it; a stage that grows the model is rolled back"
               if objective.goal == "size" else
               f"Each stage is timed side by side with the one before it ({objective.rounds} interleaved rounds; "
               "change = median of the per-round ratios, ± its standard error from their spread); a stage worse "
               f"by more than max({objective.min_change:.0%}, 2x that noise) is rolled back")
        lines += [f"Objective: **{objective.describe()}**"
                  + (f", metric drop at most {objective.max_drop:g}" if objective.max_drop is not None else "")
                  + f". {how} unless marked `keep: true`.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _rows(stages, metric_name):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    lines.append("")
    for s in stages:
        if s.index == 0:
            if getattr(s, "tokens_per_s", None):
                lines.append(f"- **00 {s.name}**: decode {s.tokens_per_s:.0f} tokens/s (KV cache, batch 1, "
                             "one token after 64 cached)")
            continue
        lines.append(f"- **{s.index:02d} {s.name}** `{s.description}`: {s.seconds:.2f} s"
                     + (f", tolerance atol={s.atol:g} rtol={s.rtol:g}" if s.atol is not None else "")
                     + (f", ops {', '.join(f'{k} {v:+d}' for k, v in sorted(s.op_delta.items()))}" if s.op_delta else "")
                     + (f", decode {s.tokens_per_s:.0f} tokens/s" if getattr(s, "tokens_per_s", None) else ""))
        lines.extend(f"  - {line}" for line in (s.notes or {}).get("summary", []))
    return "\n".join(lines) + "\n"


def chart(stages: list[Any], path: str | os.PathLike, metric_name: str | None = None) -> Path:
    """Size, latency and metric per kept stage, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [s for s in stages if s.kept]
    labels = [f"{s.index:02d}\n{s.name}" for s in kept]
    panels = [("size (kB)", [s.size_bytes / 1000 for s in kept]),
              ("latency (ms, median)", [s.latency_ms or 0 for s in kept])]
    if any(s.metric is not None for s in kept):
        panels.append((metric_name or "metric", [s.metric or 0 for s in kept]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (name, values) in zip(axes, panels):
        bars = ax.bar(labels, values, color="#4C72B0")
        ax.set_title(name)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


