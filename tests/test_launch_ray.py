"""Ray job submission for real: a `ray start --head` cluster on 127.0.0.1 started here, a tiny stage-1 job.

The cluster runs with RAY_AUTH_MODE=disabled (Ray 2.60 would otherwise require its token from every client), its
own temp folder and ports, and is stopped by the pid of its `ray start --block` process (never `ray stop`, which
stops every Ray on the machine). Needs ray[default] (the dashboard serves the job API); without it the test
skips, except under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from _ports import free_ports  # tests/_ports.py

from uniemo.training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_stage1.yaml"
TIMEOUT = 420  # seconds for the job; generous, other CPU-heavy tests may run beside this one


def _ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep every Ray address on 127.0.0.1
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_USAGE_STATS_ENABLED="0",
        # The job's entry point runs `python`: this interpreter's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_cluster():
    """Dashboard address of a fresh one-node Ray cluster on 127.0.0.1 (2 CPUs)."""
    try:
        import aiohttp  # noqa: F401  (ray[default]: the dashboard and its job API)
    except ImportError:
        reason = "Ray job submission needs ray[default] (pip install 'ray[default]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the Ray launcher test must run)")
        pytest.skip(reason)
    temp = Path(tempfile.mkdtemp(prefix="uray-t-"))  # short: Ray puts unix sockets in it
    gcs, dash, client, agent = free_ports(4)
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--min-worker-port=0",
         "--max-worker-port=0", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=_ray_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, (temp / "head.log").read_text()
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the Ray dashboard did not answer in 180 s"
            time.sleep(0.5)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_ray_runs_tiny_stage1_job_to_success(ray_cluster, tmp_path):
    env = _ray_env()
    overrides = [
        f"run.output_dir={tmp_path}", "run.name=rayjob", "training.steps=4", "training.eval_every=0",
        "logging.wandb.mode=disabled", "logging.progress=false", "distributed.num_workers=2",
    ]
    submit = subprocess.run(
        [sys.executable, "-m", "uniemo", "submit", "ray", "--address", ray_cluster, "--config", str(TINY),
         *overrides],
        capture_output=True, text=True, timeout=180, cwd=REPO, env=env,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted Ray job (\S+): run (\S+)", submit.stdout).group(1)
    assert job_id.startswith("uniemo-rayjob-")
    run_dir = tmp_path / "rayjob"
    assert (run_dir / "launch" / "job.yaml").is_file()  # the submitted config, kept on this side too

    logs = subprocess.run(
        [sys.executable, "-m", "uniemo", "submit", "ray", "--address", ray_cluster, "--logs", job_id],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env,
    )
    assert logs.returncode == 0, logs.stdout[-4000:] + logs.stderr[-4000:]
    assert f"Ray job {job_id}: SUCCEEDED" in logs.stdout
    assert f"uniemo: run {run_dir}: step 4" in logs.stdout  # the driver's own output, followed
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step-000004"

    missing = subprocess.run(
        [sys.executable, "-m", "uniemo", "submit", "ray", "--address", ray_cluster, "--logs", "no-such-job"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )
    assert missing.returncode == 2 and "has no Ray job no-such-job" in missing.stderr
