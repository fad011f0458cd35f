"""``onnxpipe auto``'s outputs: the Pareto front, the leaderboard (markdown, chart, live table), the recipe."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxpipe.pipeline.auto_candidates import AutoResult, Candidate

# -- outputs -------------------------------------------------------------------------------------

def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower x, higher y), by ascending x.

    Example:
        >>> pareto([(1.0, 0.9), (2.0, 0.95), (3.0, 0.94), (0.5, 0.5)])
        [3, 0, 1]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def leaderboard_md(result: AutoResult) -> str:
    o = result.objective
    lines = [f"# onnxpipe auto: {o.describe()}", "",
             f"Machine: {result.machine.get('cpu', '?')}. Budget {result.budget_s:g} s, used {result.elapsed_s:.1f} s "
             f"(after {result.prepare_s:.1f} s of conversion and baseline, not counted). "
             f"Metric: {result.metric_name} (max drop {o.max_drop:g}). Latency: median ms of one run at batch "
             f"{o.batch_size}, each candidate timed in {o.rounds} interleaved rounds with the baseline "
             f"({result.baseline.name}); speedup = 1 / median per-round ratio (± its noise).",
             f"Winner: **{result.winner.name}**" + (f", session {result.tuned_device}" if result.tuned_device else ""), "",
             "| # | candidate | latency | speedup | throughput | size | metric | kept / why not |",
             "|---|---|---|---|---|---|---|---|"]
    from onnxpipe.core.units import human_bytes

    for i, c in enumerate(result.candidates):
        lat = f"{c.latency_ms:.3f} ms" if c.latency_ms is not None else "-"
        sp = f"{1 / c.ratio:.2f}x ±{c.noise:.2f}" if c.ratio else "-"
        tp = f"{c.throughput:,.0f}/s" if c.throughput else "-"
        size = human_bytes(c.size_bytes) if c.size_bytes else "-"
        met = f"{c.metric:.4f}" if c.metric is not None else "-"
        fate = ("**winner**: " if c is result.winner else "yes: " if c.kept else f"{c.status}: " if c.status !=
                "measured" else "no: ") + c.why
        lines.append(f"| {i} | {c.name} | {lat} | {sp} | {tp} | {size} | {met} | {fate.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _pyplot(warm: bool = False) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if warm:  # the first figure loads the fonts: seconds on a loaded machine
        import io

        fig, ax = plt.subplots(figsize=(1, 1))
        ax.set_title("warm-up")
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    return plt


def chart(result: AutoResult, path: str | os.PathLike) -> Path:
    """Metric against latency for every measured candidate, the Pareto front marked (PNG, atomic)."""
    plt = _pyplot()

    from onnxpipe.core.files import save_figure

    pts = [c for c in result.candidates if c.status == "measured" and c.latency_ms is not None and c.metric is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs, ys = [c.latency_ms for c in pts], [c.metric for c in pts]
    ax.scatter(xs, ys, c=["#C44E52" if c is result.winner else "#4C72B0" for c in pts], s=28, zorder=3)
    front = pareto(list(zip(xs, ys)))
    if front:
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="#55A868", lw=1.5,
                label="Pareto front", zorder=2)
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], facecolors="none", edgecolors="#55A868", s=90,
                   zorder=4)
    for c, x, y in zip(pts, xs, ys):
        ax.annotate(c.name.replace("simplify + ", ""), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    floor = result.baseline.metric
    if floor is not None:
        ax.axhline(floor - result.objective.max_drop, color="grey", ls=":", lw=1, label="metric budget")
    ax.set_xlabel(f"latency (ms, median, batch {result.objective.batch_size}, {result.objective.device})")
    ax.set_ylabel(result.metric_name)
    ax.set_title(f"onnxpipe auto ({result.objective.goal}): winner {result.winner.name}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _live_table(candidates: list[Candidate], title: str) -> Any:
    from rich.table import Table

    from onnxpipe.core.units import human_bytes

    t = Table(title=title)
    for col in ("candidate", "latency", "speedup", "size", "metric", "status"):
        t.add_column(col, justify="left" if col in ("candidate", "status") else "right", overflow="fold")
    for c in candidates:
        t.add_row(c.name, f"{c.latency_ms:.3f} ms" if c.latency_ms is not None else "-",
                  f"{1 / c.ratio:.2f}x" if c.ratio else "-", human_bytes(c.size_bytes) if c.size_bytes else "-",
                  f"{c.metric:.4f}" if c.metric is not None else "-",
                  ("[green]kept[/] " if c.kept else "") + (c.why if c.status != "pending" else "measuring"))
    return t


def _recipe_yaml(result: AutoResult, source: str, data: str | None, evaluation: str | None, metric: str | None,
                 batch_size: int) -> str:
    import yaml

    o = result.objective
    passes = [{**({p: {}} if isinstance(p, str) else p), "keep": True} for p in result.winner.passes]
    doc: dict[str, Any] = {"model": {"source": source}}
    if data or evaluation:
        doc["data"] = {k: v for k, v in (("calibration", data), ("evaluation", evaluation)) if v}
        doc["data"]["batch_size"] = batch_size
    doc["target"] = {"device": o.device, "batch_size": o.batch_size}
    doc["objective"] = {"goal": o.goal, **({"max_drop": o.max_drop} if evaluation else {})}
    doc["passes"] = passes
    if result.tuned_device:
        doc["runtime"] = "tuned.json"
    doc["validate"] = {"providers": [o.device], **({"metric": metric} if evaluation and metric else {})}
    w, b = result.winner, result.baseline
    head = [f"# Written by `onnxpipe auto`: the winner of {len(result.candidates)} candidates "
            f"({result.objective.describe()}, {result.machine.get('cpu', '')}).",
            f"# {w.name}: " + (f"{1 / w.ratio:.2f}x the speed of {b.name}" if w.ratio else "")
            + (f", {w.size_bytes / b.size_bytes:.2f}x its size" if w.size_bytes and b.size_bytes else "")
            + (f", {result.metric_name} {w.metric:.4f} (float {b.metric:.4f})" if w.metric is not None and
               b.metric is not None else "") + ".",
            "# Every pass is `keep: true`: auto already measured them side by side; `onnxpipe run` reproduces",
            "# the model and reports the objective per stage again."]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False)
