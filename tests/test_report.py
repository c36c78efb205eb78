"""The report (``uniemo report``): a pipeline folder from real pieces -> ``report/index.html`` + PNGs.

The pipeline folder is put together from what the real code writes, made small:

- ``stage1/`` and ``stage2/``: real DeepSpeed checkpoints of the tiny presets at 32 px (one optimizer step each),
  written by ``tests/test_export.py`` run as a script (its own gloo process group, in a subprocess); their
  ``metrics.jsonl`` and stage 2's sample grids are written by the real :class:`uniemo.logging.RunLogger`;
- ``feedback/``: a metrics.jsonl continuing stage 2, two round reports built from real
  :func:`uniemo.feedback.filtering.filter_pool` results with the round module's own totals and count check,
  generated PNGs under ``eval/generated/<emotion>/`` and a ``metrics.json`` shaped like the numbers of
  :mod:`uniemo.evaluation.metrics`;
- ``judge/judge.json`` and ``pipeline.json``.

The headless-browser test opens the page in Debian's ``chromium``: it skips with a message when chromium is
not installed, except under ``CI=true`` (``.ci/run`` installs it), where it fails.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uniemo.config.schema import EMOTIONS

TESTS = Path(__file__).parent


# ---------------------------------------------------------------------------------------------------------
# Building the pipeline folder
# ---------------------------------------------------------------------------------------------------------
def _logger(run_dir: Path, resume_step: int = 0):
    from uniemo.config import load_config
    from uniemo.logging import RunLogger

    cfg = load_config(run_dir / "config.yaml")
    cfg.logging.wandb.mode = "disabled"
    return RunLogger(cfg, run_dir, resume_step=resume_step)  # keeps the metrics lines up to resume_step


def _log_training(run_dir: Path, steps: range, terms: tuple[str, ...], start_loss: float, val_every: int,
                  val_start: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logger = _logger(run_dir)
    try:
        for i, step in enumerate(steps):
            decay = np.exp(-i / 8)
            metrics = {"loss": start_loss * (0.3 + 0.7 * decay) + 0.02 * rng.random()}
            for j, term in enumerate(terms):
                metrics[f"loss/{term}"] = (start_loss / (j + 1)) * (0.3 + 0.7 * decay)
            metrics.update({"accuracy": 0.2 + 0.5 * (1 - decay), "lr/queries": 5e-4, "samples_per_s": 40.0})
            if step % val_every == 0:
                metrics.update({"val/accuracy": min(0.95, val_start + 0.02 * i), "val/loss": metrics["loss"] * 1.1,
                                "val/samples": 50})
            logger.log(step, metrics)
    finally:
        logger.close()


def _round_report(round_index: int, checkpoint: str, seed: int) -> dict:
    """A round report as :func:`uniemo.feedback.rounds.run_round` writes it, from real filter results."""
    from uniemo.feedback.filtering import REJECTIONS, filter_pool
    from uniemo.feedback.rounds import _check_counts, _totals
    from uniemo.run_files import ROUND_REPORT_VERSION, passed_after_each_step

    rng = np.random.default_rng(seed)
    emotions = {}
    for k, emotion in enumerate(EMOTIONS):
        n = 12
        logits = rng.normal(size=(n, 8))
        logits[:, k] += 2.0
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        features = rng.normal(size=(n, 4))
        features[1] = features[0]  # one near-duplicate
        similarity = rng.uniform(-1, 1, size=(n, 3))
        result = filter_pool(k, probs, features, similarity, tau=0.3, delta=0.95, keep=4, cap_fraction=0.5,
                             seed=seed + k)
        emotions[emotion] = {
            "candidates": n, "scored": n, "passed": passed_after_each_step(n, result.rejections, REJECTIONS),
            "kept": len(result.kept), "kept_share": len(result.kept) / n, "rejections": dict(result.rejections),
            "lost_in_flight": 0, "mean_p_k": float(result.p_k[result.kept].mean()) if len(result.kept) else None,
        }
    report = {"version": ROUND_REPORT_VERSION, "round": round_index, "checkpoint": checkpoint,
              "emotions": emotions, "totals": _totals(emotions), "filter": {}}
    _check_counts(report)
    report["samples"] = report["totals"]["kept"]
    return report


def _evaluation(feedback: Path, rng: np.random.Generator) -> None:
    """``metrics.json`` as :func:`uniemo.evaluation.evaluate.evaluate_run` composes it, from the real metric
    functions on random predictions and features (the judge's name as it would be)."""
    from uniemo.evaluation import metrics as M
    from uniemo.evaluation.evaluate import summarize_rounds

    judge = "judge:cnn4-w8-32px-0123abcd"
    labels = np.repeat(np.arange(8), 6)
    preds = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, 8, len(labels)))
    confusion = M.confusion_matrix(labels, preds)
    targets = np.repeat(np.arange(8), 3)
    probs = rng.dirichlet(np.ones(8), size=len(targets))
    real, fake = rng.normal(size=(48, 5)), rng.normal(0.3, 1.0, size=(len(targets), 5))
    result = {
        "version": 1,
        "run": {"dir": str(feedback), "name": "feedback", "stage": 2, "step": 40},
        "evaluated_at": "2026-01-01T00:00:00+00:00",
        "evaluation": {},
        "emotions": list(EMOTIONS),
        "understanding": {"model": "run:feedback@step-40", "split": "test", **M.confusion_summary(confusion),
                          "loss": 1.7, "confusion": confusion.tolist()},
        "generation": {
            "images_per_emotion": 3,
            "images_dir": "eval/generated",
            "emo_a": {"judge": judge, **M.emotion_accuracy(probs, targets)},
            "fid": {"extractor": judge, **M.fid_per_emotion(real, labels, fake, targets)},
            "diversity": {"extractor": judge, **M.diversity_per_emotion(fake, targets, 10, 0),
                          "pairs_per_emotion": 10, "seed": 0},
        },
        "judge": {"name": judge, "val_accuracy": 0.41, "test_accuracy": 0.39},
        "feedback_rounds": summarize_rounds(feedback),
        "left_out": [],
        "notes": [],
    }
    (feedback / "metrics.json").write_text(json.dumps(result))


def _png(path: Path, color: tuple[int, int, int], size: int = 32) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size, size, 3), np.uint8) + np.array(color, np.uint8)
    array[size // 4 : size // 2, size // 4 : size // 2] = 255
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def tiny_runs(synth_shards, tmp_path_factory) -> Path:
    """``s1`` (stage 1) and ``s2`` (stage 2 from s1): real one-step DeepSpeed runs (see tests/test_export.py)."""
    root = tmp_path_factory.mktemp("report_runs")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(TESTS / "test_export.py"), str(synth_shards), str(root)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def pipeline(tiny_runs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "demo"
    root.mkdir()
    shutil.copytree(tiny_runs / "s1", root / "stage1")
    shutil.copytree(tiny_runs / "s2", root / "stage2")
    shutil.copyfile(root / "stage1" / "config.yaml", root / "config.yaml")
    _log_training(root / "stage1", range(1, 41), ("cls", "scene", "object"), 2.2, 10, 0.3, seed=1)
    _log_training(root / "stage2", range(1, 31), ("cls", "scene", "object", "diffusion"), 1.5, 10, 0.5, seed=2)
    logger = _logger(root / "stage2", resume_step=30)
    rng = np.random.default_rng(0)
    logger.log_images(30, {e: rng.integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8) for e in EMOTIONS})
    logger.close()

    feedback = root / "feedback"
    feedback.mkdir()
    shutil.copyfile(root / "stage2" / "config.yaml", feedback / "config.yaml")
    _log_training(feedback, range(1, 41), ("cls", "scene", "object", "diffusion"), 1.2, 5, 0.55, seed=3)
    (feedback / "rounds").mkdir()
    # Round 0 generates from the finished stage-2 run, round 1 from the feedback run's own step 20.
    for r, checkpoint in ((0, root / "stage2" / "checkpoints" / "step-000030"),
                          (1, feedback / "checkpoints" / "step-000020")):
        report = _round_report(r, str(checkpoint), seed=10 * r)
        (feedback / "rounds" / f"round-{r}.json").write_text(json.dumps(report))
    for k, emotion in enumerate(EMOTIONS):
        for i in range(3):
            _png(feedback / "eval" / "generated" / emotion / f"{emotion}_{i}.png", (30 * k, 100 + 20 * i, 60))
    _evaluation(feedback, rng)

    (root / "judge").mkdir()
    (root / "judge" / "judge.json").write_text(json.dumps({"name": "cnn4-w8-32px-0123abcd", "val_accuracy": 0.41}))
    stages = {name: {"status": "done", "started": "2026-01-01T00:00:00", "finished": "2026-01-01T00:01:00",
                     "seconds": seconds}
              for name, seconds in (("data", 12.0), ("stage1", 95.5), ("stage2", 130.2), ("feedback", 240.0),
                                    ("judge", 30.0), ("evaluate", 44.0), ("report", 0.0))}
    (root / "pipeline.json").write_text(json.dumps({"stages": stages, "seconds": 560.4}))
    return root


@pytest.fixture(scope="module")
def report(pipeline) -> Path:
    from uniemo.evaluation.report import write_report

    return write_report(pipeline)


# ---------------------------------------------------------------------------------------------------------
# The folder and its page
# ---------------------------------------------------------------------------------------------------------
_SRC = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


@pytest.mark.slow  # the tiny DeepSpeed runs and the shards of the fixtures
def test_report_folder_is_complete_and_self_contained(pipeline, report):
    from PIL import Image

    assert report == pipeline / "report" / "index.html" and report.is_file()
    state = json.loads((report.parent / "report.json").read_text())
    assert state["sections"] == {k: "ok" for k in
                                 ("summary", "losses", "validation", "confusion", "images", "funnel", "attention")}
    assert state["evaluated"] == "feedback"  # relative to the pipeline folder: a copied pipeline reports on its own
    by_round = [(p["label"], p["run"], p["step"]) for p in state["validation_by_round"]]
    assert by_round == [("round 0", "stage2", 30), ("round 1", "feedback", 20), ("final", "feedback", 40)]
    page = report.read_text()
    links = [link for link in _SRC.findall(page) if not link.startswith("#")]
    # losses of stage1/stage2/feedback, val over steps and rounds, confusion, 8 x (real, generated), funnel and
    # kept share per emotion, attention
    assert len(links) == 3 + 2 + 1 + 16 + 2 + 1
    for link in links:
        assert not re.match(r"^[a-z]+:", link) and not link.startswith("/") and ".." not in link, link
        assert (report.parent / link).is_file(), link
        with Image.open(report.parent / link) as image:
            assert image.width > 10 and image.height > 10
    assert str(pipeline) not in page and str(pipeline.parent) not in page  # no absolute path in the page
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    for name in ("loss_stage1.png", "loss_stage2.png", "loss_feedback.png", "val_accuracy_steps.png",
                 "val_accuracy_rounds.png", "confusion.png", "funnel.png", "attention.png",
                 "images/real_awe.png", "images/generated_sadness.png"):
        assert (report.parent / name).is_file(), name
    # Real examples are test images of the shards, tiled at 96 px (up to 6 per emotion).
    with Image.open(report.parent / "images" / "real_awe.png") as real:
        assert real.height == 96 and real.width % 96 == 0


@pytest.mark.slow  # the tiny DeepSpeed runs and the shards of the fixtures
def test_report_numbers(pipeline, report):
    from uniemo.evaluation.report import read_evaluation, summary_lines

    ev = read_evaluation(pipeline / "feedback")
    raw = json.loads((pipeline / "feedback" / "metrics.json").read_text())
    assert ev["top1"] == pytest.approx(raw["understanding"]["top1"])
    assert ev["emo_a"] == pytest.approx(raw["generation"]["emo_a"]["top1"])
    assert ev["fid"] == pytest.approx(raw["generation"]["fid"]["pooled"])
    assert ev["diversity"] == pytest.approx({k: raw["generation"]["diversity"][k]
                                             for k in ("mean_pairwise_distance", "sem_d")})
    assert ev["judge"] == ev["fid_extractor"] == "judge:cnn4-w8-32px-0123abcd"
    matrix, labels = ev["confusion"]
    assert labels == list(EMOTIONS) and matrix.sum() == 48 and ev["test_samples"] == 48

    lines = summary_lines(pipeline)
    assert len(lines) == 5
    assert lines[0].startswith(f"understanding: top-1 {raw['understanding']['top1']:.1%}")
    assert "judge:cnn4-w8-32px-0123abcd" in lines[1] and "Emo-A" in lines[1]
    assert lines[2].startswith("FID ") and "judge:cnn4" in lines[2]
    kept = [json.loads((pipeline / "feedback" / "rounds" / f"round-{r}.json").read_text())["totals"]["kept"]
            for r in (0, 1)]
    assert lines[3] == f"feedback: 2 round(s), images kept round 0: {kept[0]}, round 1: {kept[1]}"
    assert lines[4].startswith("time: 9 min 20 s (data 12 s, stage1 1 min 36 s")
    assert "cnn4-w8-32px-0123abcd, validation accuracy 41.0%" in report.read_text()  # judge/judge.json
    page = report.read_text()
    for line in lines:
        assert html.escape(line, quote=True) in page


@pytest.mark.slow  # the tiny DeepSpeed runs and the shards of the fixtures
def test_report_of_a_single_run_says_what_is_missing(tiny_runs, tmp_path):
    """A stage-1 run without metrics, evaluation or rounds: each missing section says why; --out elsewhere."""
    from uniemo.cli import main
    from uniemo.evaluation.report import write_report

    run = tmp_path / "s1"
    shutil.copytree(tiny_runs / "s1", run)
    out = tmp_path / "elsewhere"
    assert main(["report", "--run", str(run), "--out", str(out)]) == 0
    state = json.loads((out / "report.json").read_text())
    sections = state["sections"]
    assert sections["attention"] == "ok" and sections["images"] == "ok"  # checkpoint + the run's test shards
    assert sections["confusion"].startswith("not available: no run holds metrics.json")
    assert sections["funnel"].startswith("not available: no feedback rounds")
    assert sections["losses"] == "not available: no run logged a loss (run: no metrics.jsonl)"
    page = (out / "index.html").read_text()
    assert "not available: no run holds metrics.json" in page
    # A second report replaces the first (nothing of it is left); a folder holding something else is refused.
    (out / "stale.png").write_bytes(b"old")
    write_report(run, out)
    assert not (out / "stale.png").exists() and (out / "index.html").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["report", "--run", str(run), "--out", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "mine"
    assert main(["report", "--run", str(tmp_path / "nothing")]) == 2


def test_read_evaluation_reads_its_own_keys_and_refuses_old_files(pipeline, tmp_path):
    """The one reader of metrics.json reads exactly the keys the evaluation writes; a file of an older uniemo
    (``format`` instead of ``version``) is one clear line, not a guess."""
    from uniemo.errors import UserError
    from uniemo.evaluation.report import read_evaluation

    assert read_evaluation(tmp_path) == {}
    ev = read_evaluation(pipeline / "feedback")
    raw = json.loads((pipeline / "feedback" / "metrics.json").read_text())
    assert ev["top1"] == raw["understanding"]["top1"] and ev["judge"] == raw["generation"]["emo_a"]["judge"]
    assert ev["fid"] == raw["generation"]["fid"]["pooled"] and ev["confusion"][0].shape == (8, 8)
    (tmp_path / "metrics.json").write_text(json.dumps({"format": 1, "understanding": {"top_1": 0.5}}))
    with pytest.raises(UserError, match=r"version None, this uniemo reads version 1 .*evaluate the run again"):
        read_evaluation(tmp_path)


def test_read_evaluation_leaves_out_numbers_the_evaluation_could_not_compute(tmp_path):
    """A metric written as null (FID without enough images, Emo-A without a judge's verdict) is absent from
    the report's numbers, and the summary says "not evaluated" instead of printing a number."""
    from uniemo.evaluation.report import read_evaluation
    from uniemo.evaluation.report_collect import collect_report_data, summarize

    run = tmp_path / "run"
    run.mkdir()
    _evaluation(run, np.random.default_rng(1))
    raw = json.loads((run / "metrics.json").read_text())
    raw["generation"]["fid"]["pooled"] = None
    raw["generation"]["emo_a"]["top1"] = None
    raw["generation"]["diversity"]["sem_d"] = None
    raw["notes"] = ["FID needs 2 images per emotion"]
    (run / "metrics.json").write_text(json.dumps(raw))
    ev = read_evaluation(run)
    assert "fid" not in ev and "emo_a" not in ev and list(ev["diversity"]) == ["mean_pairwise_distance"]
    assert ev["top1"] == raw["understanding"]["top1"] and ev["notes"] == raw["notes"]
    assert ev["fid_extractor"] == ev["judge"] == "judge:cnn4-w8-32px-0123abcd"
    lines = summarize(collect_report_data(run))
    assert lines[1] == "generation: Emo-A not evaluated" and lines[2] == "FID not evaluated"
    assert lines[0].startswith("understanding: top-1 ") and lines[0].endswith(" on 48 test images (run)")


def test_report_of_a_pipeline_in_progress_reads_pipeline_json_as_written(tmp_path):
    """``pipeline.json`` as :mod:`uniemo.pipeline` writes it while a stage runs (no ``seconds`` for it yet, no
    total): the summary times what has finished, shows the running stage as such, and every section without
    data says why; the whole report is written without a model, shards or runs."""
    from uniemo.evaluation.report import summary_lines, write_report

    root = tmp_path / "demo"
    root.mkdir()
    state = {"stages": {"data": {"status": "done", "started": "2026-01-01T00:00:00",
                                 "finished": "2026-01-01T00:00:12", "seconds": 12.0, "result": {}},
                        "stage1": {"status": "running", "started": "2026-01-01T00:00:12"}},
             "root": str(root), "order": ["data", "stage1", "stage2"]}
    (root / "pipeline.json").write_text(json.dumps(state))
    assert summary_lines(root)[3:] == ["feedback: no rounds", "time: 12 s (data 12 s, stage1 -)"]
    index = write_report(root, log=lambda line: None)
    page = index.read_text()
    assert "<td>time, stage1</td><td>- (running)</td>" in page and "<td>time, total</td><td>12 s</td>" in page
    sections = json.loads((index.parent / "report.json").read_text())["sections"]
    assert sections["summary"] == "ok"
    assert sections["attention"] == "not available: no run has a checkpoint (checkpoints/latest)"
    assert sections["images"].startswith("not available: no generated images") and "config.yaml" in sections["images"]
    assert all(why.startswith("not available: ") for key, why in sections.items() if key != "summary")


def test_round_report_funnel_per_emotion_and_kept_share(pipeline, report):
    """Issue 12: per emotion, the round report records candidates, survivors of each filter step, kept and the
    kept share; the report shows how the kept share differs by emotion (a plot and a table per round)."""
    from uniemo.feedback.filtering import REJECTIONS
    from uniemo.run_files import read_round_reports, upgrade_round_report

    for r in read_round_reports(pipeline / "feedback"):
        for row in r["emotions"].values():
            assert list(row["passed"]) == list(REJECTIONS) and row["passed"][REJECTIONS[-1]] == row["kept"]
            assert row["kept_share"] == row["kept"] / row["candidates"]
            assert row["scored"] - sum(row["rejections"].values()) == row["kept"]
    page = report.read_text()
    assert "kept_share.png" in page and (report.parent / "kept_share.png").is_file()
    assert page.count("kept share</th>") == 2  # one table per round
    assert "passed fidelity_threshold" in page
    # A version-1 report (no passed, no kept_share) still reads: both are derived from what it has.
    old = {"round": 0, "emotions": {"awe": {"candidates": 4, "scored": 3, "kept": 1, "lost_in_flight": 1,
                                            "rejections": {s: (1 if s in ("duplicate", "not_selected") else 0)
                                                           for s in REJECTIONS}}},
           "totals": {"candidates": 4, "scored": 3, "kept": 1, "lost_in_flight": 1,
                      "rejections": {s: 0 for s in REJECTIONS}}}
    row = upgrade_round_report(old)["emotions"]["awe"]
    assert row["kept_share"] == 0.25 and row["passed"]["duplicate"] == 2 and row["passed"]["not_selected"] == 1


# ---------------------------------------------------------------------------------------------------------
# Headless Chromium
# ---------------------------------------------------------------------------------------------------------
_CHECK_SCRIPT = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t !== window && (t.src || t.href) ? "failed to load " + (t.src || t.href) : "error " + e.message);
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("rejection " + e.reason); });
  ["error", "warn"].forEach(function (level) {
    var original = console[level];
    console[level] = function () {
      errors.push("console." + level + " " + Array.prototype.join.call(arguments, " "));
      return original.apply(console, arguments);
    };
  });
  window.addEventListener("load", function () {
    var bad = [];
    for (var i = 0; i < document.images.length; i++) {
      var img = document.images[i];
      if (!img.complete || img.naturalWidth === 0) bad.push(img.getAttribute("src"));
    }
    var out = document.createElement("pre");
    out.id = "uniemo-check";
    out.textContent = JSON.stringify({images: document.images.length, broken: bad, errors: errors,
                                      sections: document.querySelectorAll("section h2").length});
    document.body.appendChild(out);
  });
})();
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed (apt-get install chromium); the browser test of the report is skipped"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run installs chromium and this test must run)")
    pytest.skip(reason)


def _browse(page: Path, tmp_path: Path) -> dict:
    """Open a copy of the page with the check script (first thing in <head>) and read its verdict from the DOM."""
    text = page.read_text(encoding="utf-8")
    assert "<head>" in text
    probe = page.parent / "browser-check.html"  # beside the page, so relative links resolve the same way
    probe.write_text(text.replace("<head>", "<head>\n" + _CHECK_SCRIPT, 1), encoding="utf-8")
    try:
        proc = subprocess.run(
            [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
             "--dump-dom", probe.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        probe.unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'<pre id="uniemo-check">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert match, f"the check script did not run; chromium printed:\n{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


def _screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    from PIL import Image

    shot = tmp_path / "page.png"
    proc = subprocess.run(
        [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile-shot'}", "--hide-scrollbars", "--window-size=1200,1600",
         "--virtual-time-budget=10000", f"--screenshot={shot}", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow  # the tiny DeepSpeed runs and the shards of the fixtures
def test_report_renders_in_headless_chromium(report, tmp_path):
    result = _browse(report, tmp_path)
    assert result["errors"] == [], result
    assert result["broken"] == [], result
    links = [link for link in _SRC.findall(report.read_text()) if link.endswith(".png")]
    assert result["images"] == len(links) and result["images"] > 20
    assert result["sections"] == 7
    # It painted: the screenshot holds the plots' colours, not a blank page.
    pixels = _screenshot(report, tmp_path)
    assert pixels.shape[:2] == (1600, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


@pytest.mark.slow  # the tiny DeepSpeed runs and the shards of the fixtures
def test_browser_check_catches_a_broken_image(report, tmp_path):
    """The check can fail: a copy of the report with one image removed shows it as broken, with a load error."""
    copy = tmp_path / "copy"
    shutil.copytree(report.parent, copy)
    (copy / "confusion.png").unlink()
    result = _browse(copy / "index.html", tmp_path)
    assert result["broken"] == ["confusion.png"]
    assert any("confusion.png" in error for error in result["errors"]), result


def test_missing_chromium_skips_but_fails_under_ci(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        _chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        _chromium()
