"""The report's page: each section's HTML from the collected data, the images and the plots, then
``index.html`` around them.

A section whose data does not exist raises :class:`~uniemo.evaluation.report_collect.NotAvailable` with the
reason, and the page shows that one line instead of the section (``report.json`` records it as the section's
state). Every link is relative to the report folder, nothing is fetched from the network and the page needs no
JavaScript; :func:`check_links` verifies the first two of these on the written page.
"""

from __future__ import annotations

import html
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from uniemo.config.schema import EMOTIONS
from uniemo.errors import UserError
from uniemo.evaluation.report_collect import (
    CHANCE,
    NotAvailable,
    ReportData,
    accuracy_by_round,
    duration,
    last_val_accuracy,
    number,
    stage_times,
    summarize,
    total_seconds,
)
from uniemo.evaluation.report_images import (
    EXAMPLES_PER_EMOTION,
    generated_images,
    read_examples,
    shard_folder,
    tiles,
)
from uniemo.evaluation.report_plots import (
    plot_attention,
    plot_confusion,
    plot_funnel,
    plot_kept_share,
    plot_losses,
    plot_val_rounds,
    plot_val_steps,
)
from uniemo.feedback.filtering import REJECTIONS
from uniemo.logging import image_grid
from uniemo.run_layout import EVALUATION_FILE, PIPELINE_FILE, STEP_METRICS_FILE

__all__ = ["ATTENTION_IMAGES", "Log", "Section", "build_sections", "check_links", "render_page"]

ATTENTION_IMAGES = 4
"""Test images whose query attention is shown."""

Log = Callable[[str], None]


@dataclass
class Section:
    """One section of the page: its anchor, its heading, its HTML and its state (``ok`` or why it is missing)."""

    key: str
    title: str
    body: str = ""
    state: str = "ok"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .na { color: #777; font-style: italic; } .meta { color: #666; font-size: 0.9em; }
.pair td { vertical-align: top; } .pair img { image-rendering: pixelated; }
nav a { margin-right: 1em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(src: str, alt: str) -> str:
    return f'<img src="{_e(src)}" alt="{_e(alt)}">'


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


class _Builder:
    """Writes the plots and images of each section into ``out`` and returns the sections' HTML."""

    def __init__(self, data: ReportData, out: Path, log: Log):
        self.data = data
        self.out = out
        self.log = log
        self.images_dir = out / "images"
        self.examples: dict[str, list[Image.Image]] = {}
        self.examples_split: str | None = None
        self.examples_why = ""

    # -- sections ---------------------------------------------------------------------------------------------
    def summary(self) -> str:
        data, ev = self.data, self.data.evaluation
        rows = [["runs", ", ".join(f"{label} ({path.name})" for label, path in data.runs.items())]]
        if data.evaluated is not None:
            rows.append(["evaluated run", data.run_label(data.evaluated)])
        top1 = "not evaluated"
        if "top1" in ev:
            top1 = _pct(ev["top1"]) + (f" ({ev['understanding_model']})" if "understanding_model" in ev else "")
        rows.append(["top-1 accuracy (test)", top1])
        for label in data.runs:
            acc = last_val_accuracy(data, label)
            if acc is not None:
                rows.append([f"last validation accuracy, {label}", _pct(acc)])
        if data.judge:
            accuracy = number(data.judge["val_accuracy"])
            rows.append(["judge (uniemo train-judge)", f"{data.judge['name']}, validation accuracy {_pct(accuracy)}"])
        emo_a = f"{ev['emo_a']:.1%} (judged by {ev.get('judge', 'an unnamed model')}; chance {CHANCE:.1%})" if "emo_a" in ev else "not evaluated"
        rows.append(["Emo-A", emo_a])
        fid = f"{ev['fid']:.2f} (features: {ev.get('fid_extractor', 'unnamed extractor')})" if "fid" in ev else "not evaluated"
        rows.append(["FID", fid])
        features = f" (features: {ev['diversity_extractor']})" if "diversity_extractor" in ev else ""
        for name, value in ev.get("diversity", {}).items():
            rows.append([f"diversity: {name}", f"{value:.4g}{features}"])
        if "generated_per_emotion" in ev:
            rows.append(["generated images per emotion (evaluation)", str(ev["generated_per_emotion"])])
        for report in data.rounds:
            totals = report["totals"]
            rows.append([f"kept images, round {report['round']}",
                         f"{totals['kept']} of {totals['candidates']} candidates"])
        times = stage_times(data.pipeline_state)
        for name, seconds, status in times:
            rows.append([f"time, {name}", f"{duration(seconds)}{'' if status in ('', 'done') else f' ({status})'}"])
        if times:
            rows.append(["time, total", duration(total_seconds(data.pipeline_state, times))])
        elif data.pipeline:
            rows.append(["time", f"not recorded (no {PIPELINE_FILE})"])
        rows += [["note (evaluation)", note] for note in ev.get("notes", [])]
        lines = "".join(f"<li>{_e(line)}</li>" for line in summarize(data))
        return _table(["", "value"], rows, numeric_from=9) + f"<ul class='meta'>{lines}</ul>"

    def losses(self) -> str:
        parts, missing = [], []
        for label, records in self.data.metrics.items():
            name = plot_losses(label, records, self.out / f"loss_{label}.png")
            if name:
                parts.append(_img(name, f"loss curves of {label}"))
            elif not (self.data.runs[label] / STEP_METRICS_FILE).is_file():
                missing.append(f"{label}: no {STEP_METRICS_FILE}")
            else:
                missing.append(f"{label}: no loss lines in {STEP_METRICS_FILE}")
        if not parts:
            raise NotAvailable(f"no run logged a loss ({'; '.join(missing)})")
        if missing:
            parts.append(f"<p class='na'>not available: {_e('; '.join(missing))}</p>")
        return "\n".join(parts)

    def validation(self) -> str:
        parts = []
        over_steps = plot_val_steps(self.data, self.out / "val_accuracy_steps.png")
        if over_steps:
            parts.append(_img(over_steps, "validation accuracy over steps"))
        else:
            parts.append("<p class='na'>over steps, not available: no run logged val/accuracy</p>")
        if not self.data.rounds:
            if not over_steps:
                raise NotAvailable("no run logged val/accuracy and there are no feedback rounds")
            parts.append("<p class='na'>over rounds, not available: no feedback rounds (rounds/round-*.json)</p>")
            return "\n".join(parts)
        points = accuracy_by_round(self.data)
        if points:
            name = plot_val_rounds(points, self.out / "val_accuracy_rounds.png")
            parts.append(_img(name, "validation accuracy over rounds"))
            parts.append(
                "<p class='meta'>Round r: the validation accuracy of the checkpoint round r generated from (the "
                "newest validation at or before its step, in the run that wrote it); final: the feedback run's "
                "last validation.</p>"
            )
        else:
            parts.append("<p class='na'>over rounds, not available: no val/accuracy at or before the rounds' "
                         "checkpoints</p>")
        return "\n".join(parts)

    def confusion(self) -> str:
        ev = self.data.evaluation
        if self.data.evaluated is None:
            raise NotAvailable(f"no run holds {EVALUATION_FILE}; run `uniemo evaluate --run <run>` first")
        if "confusion" not in ev:
            raise NotAvailable(f"{self.data.run_label(self.data.evaluated)}/{EVALUATION_FILE} holds no confusion matrix")
        matrix, labels = ev["confusion"]
        name = plot_confusion(matrix, labels, self.out / "confusion.png")
        parts = [_img(name, "confusion matrix")]
        per = ev.get("per_emotion") or {}
        if per:
            parts.append(_table(["emotion", "accuracy"], [[k, _pct(v)] for k, v in per.items()]))
        return "\n".join(parts)

    def _load_examples(self) -> None:
        folder, why = shard_folder(self.data)
        if folder is None:
            self.examples_why = why
            return
        self.examples_split, self.examples = read_examples(folder, EXAMPLES_PER_EMOTION)
        if self.examples_split is None:
            self.examples_why = f"{folder} has no test or val shards"

    def images(self) -> str:
        self.images_dir.mkdir(exist_ok=True)
        source, generated = generated_images(self.data)
        real = {e: v for e, v in self.examples.items() if v}
        if not generated and not real:
            raise NotAvailable(
                "no generated images (eval/generated/ or samples/ of a stage-2 run) and no real test images ("
                f"{self.examples_why or 'none found'})"
            )
        rows = []
        for emotion in EMOTIONS:
            cells = [f"<th>{_e(emotion)}</th>"]
            if real.get(emotion):
                name = f"images/real_{emotion}.png"
                Image.fromarray(image_grid(tiles(real[emotion]))).save(self.out / name)
                cells.append(f"<td>{_img(name, f'real {emotion} images')}</td>")
            else:
                cells.append("<td class='na'>no real image</td>")
            item = generated.get(emotion)
            if isinstance(item, Path):
                name = f"images/generated_{emotion}.png"
                shutil.copyfile(item, self.out / name)
                cells.append(f"<td>{_img(name, f'generated {emotion} images')}</td>")
            elif item:
                name = f"images/generated_{emotion}.png"
                Image.fromarray(image_grid(tiles(item))).save(self.out / name)
                cells.append(f"<td>{_img(name, f'generated {emotion} images')}</td>")
            else:
                cells.append("<td class='na'>no generated image</td>")
            rows.append(f"<tr>{''.join(cells)}</tr>")
        real_note = (f"real: the {self.examples_split} split of the run's shards" if real
                     else f"real images not available: {self.examples_why}")
        gen_note = f"generated: {source}" if generated else "generated images not available: none found"
        head = "<tr><th>emotion</th><th>real</th><th>generated</th></tr>"
        return (f"<p class='meta'>{_e(real_note)}; {_e(gen_note)}.</p>"
                f"<table class='pair'>{head}{''.join(rows)}</table>")

    def funnel(self) -> str:
        rounds = self.data.rounds
        if not rounds:
            raise NotAvailable("no feedback rounds (rounds/round-*.json in the feedback run)")
        name = plot_funnel(rounds, self.out / "funnel.png")
        reasons = ["lost_in_flight", *REJECTIONS]
        rows = []
        for report in rounds:
            totals = report["totals"]
            rows.append([f"round {report['round']}", totals["candidates"],
                         *[totals["lost_in_flight"] if r == "lost_in_flight" else totals["rejections"][r]
                           for r in reasons],
                         totals["kept"]])
        table = _table(["round", "candidates", *reasons, "kept"], rows)
        parts = [_img(name, "filter funnel per round"), table,
                 _img(plot_kept_share(rounds, self.out / "kept_share.png"), "kept share per emotion")]
        for report in rounds:  # how the kept share differs by emotion, and at which filter step it is lost
            emotion_rows = []
            for e in EMOTIONS:
                row = report["emotions"][e]
                emotion_rows.append([e, row["candidates"], *[row["passed"][step] for step in REJECTIONS],
                                     row["kept"], _pct(row["kept_share"])])
            parts.append(_table([f"round {report['round']}: emotion", "candidates",
                                 *[f"passed {step}" for step in REJECTIONS], "kept", "kept share"], emotion_rows))
        return "\n".join(parts)

    def attention(self) -> str:
        run = self.data.model_run
        if run is None:
            raise NotAvailable("no run has a checkpoint (checkpoints/latest)")
        picks = [(e, images[0]) for e, images in self.examples.items() if images][:ATTENTION_IMAGES]
        if not picks:
            raise NotAvailable(f"no test images to look at ({self.examples_why or 'the shards hold none'})")
        try:
            name = plot_attention(run, picks, self.out / "attention.png")
        except UserError as e:
            raise NotAvailable(f"the model of {run.name} cannot be loaded: {e}") from None
        return (_img(name, "query attention maps") +
                "<p class='meta'>Cross-attention of the interactive blocks (METHOD §2.2), averaged over heads and "
                "queries, over the patch grid; brighter is more attention.</p>")

    # -- assembly ---------------------------------------------------------------------------------------------
    def build(self) -> list[Section]:
        plan = [
            ("summary", "Summary", self.summary),
            ("losses", "Loss curves", self.losses),
            ("validation", "Validation accuracy", self.validation),
            ("confusion", "Confusion matrix", self.confusion),
            ("images", "Generated and real images per emotion", self.images),
            ("funnel", "Filter funnel per round", self.funnel),
            ("attention", "Attention maps of the expert queries", self.attention),
        ]
        self._load_examples()
        sections = []
        for key, title, make in plan:
            self.log(f"{title.lower()} ...")
            section = Section(key, title)
            try:
                section.body = make()
            except NotAvailable as e:
                section.state = f"not available: {e}"
                section.body = f"<p class='na'>{_e(section.state)}</p>"
            sections.append(section)
        return sections


def build_sections(data: ReportData, out: Path, log: Log) -> list[Section]:
    """Every section of the report of ``data``, its files written into ``out``; ``log`` gets a line per section."""
    return _Builder(data, out, log).build()


def render_page(data: ReportData, sections: list[Section]) -> str:
    """``index.html``: the title, a link to each section, then the sections."""
    kind = "pipeline" if data.pipeline else "run"
    title = f"uniemo report: {data.target.resolve().name}"
    nav = "".join(f'<a href="#{s.key}">{_e(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.key}"><h2>{_e(s.title)}</h2>\n{s.body}\n</section>' for s in sections)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n<p class='meta'>{kind} folder, report written {when}</p>\n"
        f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


_LINK = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


def check_links(index: Path) -> list[str]:
    """Problems with the links of a report page: absolute, remote, or missing files ([] when all is well)."""
    problems = []
    for link in _LINK.findall(index.read_text(encoding="utf-8")):
        if link.startswith("#"):
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE) or link.startswith(("/", "\\")):
            problems.append(f"not a relative link: {link}")
        elif ".." in Path(link).parts or not (index.parent / link).is_file():
            problems.append(f"missing file: {link}")
    return problems

