"""The report's plots, each one PNG file: loss curves, validation accuracy, confusion matrix, filter funnel,
kept share per emotion and the attention maps of the expert queries (METHOD §2.2).

Figures are drawn on matplotlib's Agg canvas through :class:`matplotlib.figure.Figure`, never pyplot, so no
global figure state is kept between reports. Each ``plot_*`` writes its file and returns the file's name (the
page links it relatively); one with nothing to draw returns None.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from uniemo.config.schema import EMOTIONS
from uniemo.data.images import to_rgb
from uniemo.data.transforms import resize_center_crop
from uniemo.evaluation.report_collect import CHANCE, NotAvailable, ReportData, series
from uniemo.inference.runs import load_run
from uniemo.run_files import RoundReport

__all__ = [
    "FUNNEL_STEPS",
    "funnel",
    "plot_attention",
    "plot_confusion",
    "plot_funnel",
    "plot_kept_share",
    "plot_losses",
    "plot_val_rounds",
    "plot_val_steps",
]


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, format="png")
    return path.name


def plot_losses(label: str, records: list[dict[str, Any]], path: Path) -> str | None:
    """The run's ``loss``, each ``loss/<term>`` and ``val/loss`` over steps (log scale when all are positive)."""
    terms = sorted({k for r in records for k in r if k == "loss" or (k.startswith("loss/"))})
    val_terms = sorted({k for r in records for k in r if k == "val/loss"})
    if not terms and not val_terms:
        return None
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    positive = True
    for key in terms + val_terms:
        steps, values = series(records, key)
        if not steps:
            continue
        positive &= min(values) > 0
        style: dict[str, Any] = dict(linewidth=2.2, color="black") if key == "loss" else dict(linewidth=1.2)
        if key == "val/loss":
            style = dict(linewidth=1.6, color="tab:red", linestyle="--", marker="o", markersize=3)
        ax.plot(steps, values, label=key, **style)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{label}: training loss by term")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_val_steps(data: ReportData, path: Path) -> str | None:
    """``val/accuracy`` of every run over its steps, with the chance level."""
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot()
    drawn = False
    for label, records in data.metrics.items():
        steps, values = series(records, "val/accuracy")
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, label=label)
            drawn = True
    if not drawn:
        return None
    ax.axhline(CHANCE, color="grey", linestyle=":", label="chance (1/8)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step (of each run)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy over steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_val_rounds(points: list[dict[str, Any]], path: Path) -> str:
    """Validation accuracy over feedback rounds (the points of :func:`~.report_collect.accuracy_by_round`)."""
    labels = [f"{p['label']}\n{p['run']} step {p['step']}" for p in points]
    values = [p["accuracy"] for p in points]
    fig = _figure(6.5, 3.2)
    ax = fig.add_subplot()
    x = np.arange(len(values))
    ax.plot(x, values, marker="o", color="tab:green")
    for xi, v in zip(x, values, strict=True):
        ax.annotate(f"{v:.1%}", (xi, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.axhline(CHANCE, color="grey", linestyle=":")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy over feedback rounds")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path) -> str:
    """Counts in the cells, coloured by the share of their row (rows true, columns predicted)."""
    rows = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig = _figure(6.2, 5.4)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    k = len(labels)
    for i in range(k):
        for j in range(k):
            count = matrix[i, j]
            text = f"{int(count)}" if float(count).is_integer() else f"{count:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split; colour: share of the row)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


FUNNEL_STEPS = (
    ("lost_in_flight", "scored"),
    ("fidelity_argmax", "argmax = k"),
    ("fidelity_threshold", "p_k >= tau"),
    ("duplicate", "not a duplicate"),
    ("attribute_cap", "under attribute cap"),
    ("not_selected", "selected (kept)"),
)
"""(rejection counted, what remains after it), in the order of the filter steps (METHOD §5)."""


def funnel(report: RoundReport) -> list[tuple[str, int]]:
    """(stage, candidates remaining) from candidates down to kept."""
    totals = report["totals"]
    remaining = totals["candidates"]
    rows = [("candidates", remaining)]
    for reason, after in FUNNEL_STEPS:
        remaining -= totals["lost_in_flight"] if reason == "lost_in_flight" else totals["rejections"][reason]
        rows.append((after, remaining))
    return rows


def plot_kept_share(rounds: list[RoundReport], path: Path) -> str:
    """The kept share (kept / candidates) of each emotion, one bar per round: how unevenly the filter keeps."""
    fig = _figure(8.0, 3.2)
    ax = fig.add_subplot()
    width = 0.8 / len(rounds)
    x = np.arange(len(EMOTIONS))
    for i, report in enumerate(rounds):
        shares = [report["emotions"][e]["kept_share"] or 0.0 for e in EMOTIONS]
        ax.bar(x + (i - (len(rounds) - 1) / 2) * width, shares, width, label=f"round {report['round']}")
    ax.set_xticks(x, EMOTIONS, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("kept / candidates")
    ax.set_ylim(0, 1)
    ax.set_title("Kept share per emotion")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_funnel(rounds: list[RoundReport], path: Path) -> str:
    """Images remaining after each filter step, one bar per round."""
    funnels = [funnel(r) for r in rounds]
    names = [name for name, _ in funnels[0]]
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(funnels)
    x = np.arange(len(names))
    for i, (report, steps) in enumerate(zip(rounds, funnels, strict=True)):
        values = [v for _, v in steps]
        bars = ax.bar(x + (i - (len(funnels) - 1) / 2) * width, values, width, label=f"round {report['round']}")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("images remaining")
    ax.set_title("Filter funnel per round: candidates -> each filter step -> kept")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_attention(run_dir: Path, examples: list[tuple[str, Image.Image]], path: Path) -> str:
    """Cross-attention of the scene and object queries over the patches of ``examples`` ((true emotion,
    image) pairs), through the run's latest checkpoint (METHOD §2.2).

    Raises:
        NotAvailable: the model has both query types switched off (D13).
        UserError: the run's model cannot be loaded.
    """
    loaded = load_run(run_dir, device="cpu", compute_missing_emotion_space=False)
    model = loaded.understanding
    if model.scene_queries is None and model.object_queries is None:
        raise NotAvailable(f"the model of {run_dir.name} has both query types switched off (D13)")
    rng = random.Random(0)
    batch = torch.stack([loaded.transform(image, rng)["image"] for _, image in examples])
    with torch.no_grad():
        out = model(batch.to(next(model.parameters()).dtype), return_attention=True)
    probs = out.emotion_logits.float().softmax(dim=-1)
    size = loaded.config.data.image_size
    columns = [("image", None), ("scene queries", out.scene_attention), ("object queries", out.object_attention)]
    fig = _figure(2.3 * len(columns), 2.4 * len(examples))
    axes = fig.subplots(len(examples), len(columns), squeeze=False)
    for row, (emotion, image) in enumerate(examples):
        shown = np.asarray(resize_center_crop(to_rgb(image), size))
        top = int(probs[row].argmax())
        for col, (name, maps) in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(shown, extent=(0, size, size, 0))
            if col == 0:
                ax.set_title(f"true {emotion}\npredicted {EMOTIONS[top]} ({float(probs[row, top]):.0%})", fontsize=8)
            elif maps is None:
                ax.set_title(f"{name}: off", fontsize=8)
            else:
                heat = maps[row].float().numpy()
                ax.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, size, size, 0), interpolation="bilinear")
                ax.set_title(name, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"Query attention over the patches ({run_dir.name}, step {loaded.step})", fontsize=9)
    return _save(fig, path)
