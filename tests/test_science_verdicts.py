"""The science checks' verdicts (launchers/science_checks.py): shown / not shown / contradicted against twice the
pooled seed std, and no verdict from one seed."""

import pytest
from _launchers import load_launcher  # tests/_launchers.py


@pytest.fixture(scope="module")
def checks():
    return load_launcher("science_checks")


@pytest.mark.parametrize(("method", "other", "sign", "expected"), [
    ([0.60, 0.62, 0.61], [0.50, 0.51, 0.52], +1, "shown"),
    ([0.60, 0.62, 0.61], [0.50, 0.51, 0.52], -1, "contradicted"),
    ([0.60, 0.40, 0.61], [0.50, 0.51, 0.52], +1, "not shown"),  # the spread swallows the difference
    ([0.60], [0.50], +1, "one seed: no verdict"),
    ([], [0.50, 0.51], +1, "not run"),
])
def test_verdict(checks, method, other, sign, expected):
    assert checks.verdict(method, other, sign)["verdict"] == expected


def test_controls_in_the_verdicts_and_the_table(checks):
    runs = {f"seed-{s}": {"d_no_feedback": 0.60 + 0.01 * s, "d_wrong_labels": 0.40 + 0.01 * s,
                          "d_real_extra": 0.61 + 0.01 * s} for s in range(3)}
    results = {"world": "hard", "per_emotion": 16, "runs": runs}
    results["verdicts"] = checks.verdicts(results)
    assert results["verdicts"]["control_wrong_labels"]["verdict"] == "shown"
    assert results["verdicts"]["control_real_extra"]["verdict"] == "not shown"  # +0.01 against a std of 0.01
    table = checks.table(results)
    assert "world hard, 16 labelled train images per emotion" in table
    assert "| CONTROL: wrong labels lower top-1 (vs no feedback) | -0.200 |" in table


def test_tau_variants_get_rows_and_a_verdict(checks):
    """``--taus``: each stricter filter's run gets its rows beside filtered feedback, and its own verdict."""
    runs = {f"seed-{s}": {"d_no_feedback": 0.60 + 0.01 * s, "d_filtered": 0.55 + 0.01 * s,
                          checks.tau_key(0.9): 0.70 + 0.01 * s, f"{checks.tau_key(0.9)}_kept": 40 + s,
                          f"{checks.tau_key(0.9)}_judge_agrees": 0.9} for s in range(3)}
    results = {"world": "hard", "per_emotion": 4, "runs": runs}
    results["verdicts"] = checks.verdicts(results)
    assert results["verdicts"]["d_filtered_tau_0.9_vs_none"]["verdict"] == "shown"
    assert results["verdicts"]["d_filtered_tau_0.9_vs_none"]["difference"] == pytest.approx(0.10)
    table = checks.table(results)
    assert "| (d) + filtered feedback, tau 0.9: test top-1 | 0.700 | 0.710 | 0.720 | 0.710 ± 0.010 |" in table
    assert "| (d) synthetic images kept, tau 0.9 | 40 | 41 | 42 |" in table
    assert "| filtered feedback, tau 0.9, helps understanding (vs no feedback) | +0.100 |" in table


@pytest.mark.parametrize("world", ["easy", "hard"])
def test_every_kind_of_job_plans_on_the_shipped_config(checks, world, tmp_path):
    """Each job the checks run is planned (every stage's config checked, nothing run) from the shipped demo
    config: a key the demo gains (as the pinned async loop did) cannot break the checks unnoticed."""
    from uniemo.pipeline import plan

    base = checks.base_config("configs/demo.yaml", tmp_path, world, checks.DEFAULT_PER_EMOTION)
    run = checks.Checks(base, tmp_path, world, checks.DEFAULT_PER_EMOTION, early_steps=40)
    s2 = [f"training.init_from={tmp_path / 'stage2'}"]
    feedback = [f"feedback.from_run={tmp_path / 'stage2'}", *checks.FEEDBACK, *run.regime]
    jobs = [("stage1", []), ("stage1", checks.NO_QUERIES), ("stage1", ["training.steps=40"]),
            *[("stage2", s2 + extra) for extra in checks.STAGE2_VARIANTS.values()],
            ("stage2", run.no_feedback_overrides(tmp_path / "stage2")),
            ("feedback", feedback), ("feedback", feedback + checks.UNFILTERED),
            ("feedback", feedback + ["feedback.tau=0.9"]),
            ("feedback", feedback + ["feedback.control=wrong_labels", f"feedback.control_of={tmp_path / 'f'}"]),
            ("feedback", feedback + ["feedback.control=real_extra", f"feedback.control_of={tmp_path / 'f'}"])]
    for stage, extra in jobs:
        plan(run.job_config("job", stage, extra, checks.SHORT_EVAL))
    # Check (d) compares like with like: the no-feedback job trains what the feedback jobs train, as long.
    plain = run.job_config("job", "stage2", run.no_feedback_overrides(tmp_path / "stage2"))
    loop = run.job_config("job", "feedback", feedback)
    from uniemo.config import with_overrides

    plain_stage2 = with_overrides(plain, list(plain.pipeline.stage2))
    loop_feedback = with_overrides(loop, list(loop.pipeline.feedback))
    assert plain_stage2.training.steps == loop_feedback.feedback.rounds * loop_feedback.feedback.steps_per_round
    assert plain_stage2.training.stage2_whole_understanding == loop_feedback.training.stage2_whole_understanding \
        == (world == "hard")
