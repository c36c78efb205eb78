"""Ray job submission for real: a `ray start --head` cluster on 127.0.0.1 started here, a tiny stage-1 job.

The cluster (tests/_ray_cluster.py) runs with RAY_AUTH_MODE=disabled, its own temp folder and ports, and is stopped
by the pid of its `ray start --block` process (never `ray stop`, which stops every Ray on the machine). Needs
ray[default] (the dashboard serves the job API); without it the test skips, except under CI=true.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _ray_cluster import RayCluster, need_ray_default  # tests/_ray_cluster.py

from uniemo.training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_stage1.yaml"
TIMEOUT = 420  # seconds for the job; generous, other CPU-heavy tests may run beside this one


@pytest.fixture(scope="module")
def ray_cluster():
    """A fresh one-node Ray cluster on 127.0.0.1 (2 CPUs)."""
    need_ray_default()
    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


def test_submit_ray_runs_tiny_stage1_job_to_success(ray_cluster, tmp_path):
    env, address = ray_cluster.env, ray_cluster.dashboard
    overrides = [
        f"run.output_dir={tmp_path}", "run.name=rayjob", "training.steps=4", "training.eval_every=0",
        "logging.wandb.mode=disabled", "logging.progress=false", "distributed.num_workers=2",
    ]
    submit = subprocess.run(
        [sys.executable, "-m", "uniemo", "submit", "ray", "--address", address, "--config", str(TINY),
         *overrides],
        capture_output=True, text=True, timeout=180, cwd=REPO, env=env,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted Ray job (\S+): run (\S+)", submit.stdout).group(1)
    assert job_id.startswith("uniemo-rayjob-")
    run_dir = tmp_path / "rayjob"
    assert (run_dir / "launch" / "job.yaml").is_file()  # the submitted config, kept on this side too

    logs = subprocess.run(
        [sys.executable, "-m", "uniemo", "submit", "ray", "--address", address, "--logs", job_id],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env,
    )
    assert logs.returncode == 0, logs.stdout[-4000:] + logs.stderr[-4000:]
    assert f"Ray job {job_id}: SUCCEEDED" in logs.stdout
    assert f"uniemo: run {run_dir}: step 4" in logs.stdout  # the driver's own output, followed
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step-000004"

    missing = subprocess.run(
        [sys.executable, "-m", "uniemo", "submit", "ray", "--address", address, "--logs", "no-such-job"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert missing.returncode == 2 and "has no Ray job no-such-job" in missing.stderr


def test_a_cluster_with_token_auth_reached_without_the_token_is_one_line(tmp_path):
    """`ray start --head` turns Ray 2.60's token authentication on; `uniemo submit ray` without RAY_AUTH_MODE=token
    is refused by the dashboard. That is one line saying what to set, not Ray's AuthenticationError traceback; with
    the variable set, the same command reaches the cluster."""
    import secrets

    need_ray_default()
    cluster = RayCluster()
    cluster.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    try:
        cluster.start_head(num_cpus=1)
        without = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        without["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")  # never the user's ~/.ray/auth_token
        argv = [sys.executable, "-m", "uniemo", "submit", "ray", "--address", cluster.dashboard, "--logs", "nojob"]
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=without)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.count("\n") == 1 and "RAY_AUTH_MODE=token" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        allowed = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=cluster.env)
        assert "RAY_AUTH_MODE" not in allowed.stdout + allowed.stderr  # past authentication (no such job)
    finally:
        cluster.stop()
