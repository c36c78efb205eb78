"""SLURM for real: a one-node cluster on localhost and a two-node cluster of network namespaces on this machine
(slurm/dev/start-local-cluster.sh [--nodes 2]), tiny stage-1 jobs.

Needs the SLURM packages (bash slurm/dev/install.sh) and root (slurmd starts job processes); the two-node cluster
also needs network namespaces (iproute2, veth, bridge). Without them the tests skip with that message, except
under CI=true, where they fail: CI installs SLURM and must run them. Each cluster lives in its own temp folder with
its own ports and is stopped (by pid, then its namespaces removed) at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _ports import free_ports  # tests/_ports.py

from uniemo.distributed.placement import read_placement
from uniemo.launchers.slurm import job_records, wait_for_job
from uniemo.training.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_stage1.yaml"
JOB_TIMEOUT = 420.0  # seconds per job; generous, other CPU-heavy tests may run beside these


def _missing_reason() -> str | None:
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue") if shutil.which(t) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): run `bash slurm/dev/install.sh`"
    if os.geteuid() != 0:
        return "the local SLURM cluster (slurm/dev/start-local-cluster.sh) needs root"
    return None


def _skip_or_fail(reason: str | None) -> None:
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the SLURM tests must run)")
        pytest.skip(reason)


def _local_cluster(nodes: int):
    """Start a fresh cluster of ``nodes`` nodes (clean state, own ports), point SLURM_CONF at it, yield its state
    folder; stop it (and check that its daemons and, for several nodes, its namespaces are gone)."""
    state = Path(tempfile.mkdtemp(prefix="uslurm-"))  # short: munge's socket lives in it
    # Job ids start at 1 on every fresh cluster: a Ray temp folder already here (an earlier, killed session's job 2)
    # is not this cluster's, and _ray_leftovers does not count it.
    _OLDER_RAY_TEMP.update(str(p) for p in Path(tempfile.gettempdir()).glob("uray-*"))
    ctld, slurmd = free_ports(2)
    start = subprocess.run(
        ["bash", str(REPO / "slurm/dev/start-local-cluster.sh"), "--dir", str(state), "--nodes", str(nodes),
         "--ctld-port", str(ctld), "--slurmd-port", str(slurmd)],
        capture_output=True, text=True, timeout=180,
    )
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    created = state / "net" / "created"
    made = created.read_text().split() if created.is_file() else []
    try:
        assert start.returncode == 0, start.stderr
        assert start.stdout.strip() == f"export SLURM_CONF={state}/slurm.conf"
        # Idempotent: a second start finds the daemons running and only prints the export line.
        again = subprocess.run(
            ["bash", str(REPO / "slurm/dev/start-local-cluster.sh"), "--dir", str(state), "--nodes", str(nodes)],
            capture_output=True, text=True, timeout=60,
        )
        assert again.returncode == 0 and "already running" in again.stderr, again.stderr
        yield state
    finally:
        pids = {p.name: p.read_text().strip() for p in (state / "pids").glob("*.pid")}
        stop = subprocess.run(
            ["bash", str(REPO / "slurm/dev/stop-local-cluster.sh"), "--dir", str(state)],
            capture_output=True, text=True, timeout=120,
        )
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids.values()), pids
        namespaces = [name for kind, name in zip(made[::2], made[1::2], strict=True) if kind == "netns"]
        assert not [n for n in namespaces if Path(f"/run/netns/{n}").exists()], namespaces


@pytest.fixture(scope="module")
def slurm_cluster():
    """A fresh one-node cluster on localhost; SLURM_CONF points at it for the module."""
    _skip_or_fail(_missing_reason())
    yield from _local_cluster(1)


def _netns_missing_reason() -> str | None:
    if shutil.which("ip") is None:
        return "the two-node SLURM cluster needs iproute2 (ip)"
    probe = subprocess.run(
        ["bash", "-c", f"source {REPO / 'slurm/dev/local-nodes.sh'} && net_check"],
        capture_output=True, text=True, timeout=60,
    )
    if probe.returncode != 0:
        return f"the two-node SLURM cluster needs network namespaces: {probe.stdout.strip() or probe.stderr.strip()}"
    return None


@pytest.fixture
def slurm_two_nodes():
    """A fresh two-node cluster (node1, node2: network namespaces) for one test; SLURM_CONF points at it during the
    test and back at what it was (e.g. the one-node cluster) afterwards."""
    _skip_or_fail(_missing_reason() or _netns_missing_reason())
    yield from _local_cluster(2)


@pytest.fixture(scope="module")
def tiny_data():
    """The tiny config's synthetic shards, made once before any job (jobs then only read them)."""
    from uniemo.config import load_config
    from uniemo.data.shards import ensure_synthetic_shards

    cfg = load_config(TINY, [f"data.cache_dir={REPO / '.cache' / 'uniemo'}"])
    ensure_synthetic_shards(cfg.data)
    return cfg.data.cache_dir


def _overrides(out: Path, cache: str, *extra: str) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"data.cache_dir={cache}",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        "training.eval_every=0",
        *extra,
    ]


def _uniemo(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "uniemo", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _logs(run_dir: Path) -> str:
    """Launcher and driver logs of a run, for failure messages."""
    parts = []
    for path in sorted((run_dir / "launch").glob("*")):
        if path.suffix in (".out", ".log"):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


_OLDER_RAY_TEMP: set[str] = set()  # Ray temp folders that were there before the current cluster started


def _ray_leftovers(job_ids: list[str]) -> list[str]:
    """Processes or temp folders of these jobs' Ray clusters that outlived the job."""
    marks = [f"/uray-{j}-" for j in job_ids]
    left = [str(p) for p in Path(tempfile.gettempdir()).glob("uray-*")
            if any(m in f"/{p.name}" for m in marks) and str(p) not in _OLDER_RAY_TEMP]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in marks):
            left.append(f"pid {proc.name}: {cmd[:120]}")
    return left


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _step_of(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0: none yet)."""
    latest = latest_checkpoint(run_dir)
    return int(latest.name.split("-")[1]) if latest is not None else 0


def _requeue_after_checkpoint(job_id: str, run_dir: Path, past: int, deadline: float) -> str:
    """Once the running job has checkpointed a step after ``past``, ``scontrol requeue`` it, let it start again at
    once (SLURM holds a requeued job back ~2 minutes), and wait for it to complete. Returns its launcher log."""
    while _step_of(run_dir) <= past:
        assert time.monotonic() < deadline, _logs(run_dir)
        assert job_records(job_id)[0]["JobState"] in ("PENDING", "RUNNING"), _logs(run_dir)
        time.sleep(0.2)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    while True:
        (rec,) = job_records(job_id)
        if rec["JobState"] == "PENDING" and rec["Restarts"] == "1":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=60)
            break
        assert time.monotonic() < deadline and rec["JobState"] in ("RUNNING", "COMPLETING", "PENDING"), rec
        time.sleep(0.2)
    (record,) = wait_for_job(job_id, timeout=max(1.0, deadline - time.monotonic()))
    log = (run_dir / "launch" / f"slurm-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", _logs(run_dir)
    assert "SIGTERM: job preempted, cancelled or requeued" in log
    return log


def test_submit_slurm_tiny_stage1_runs_to_completed_with_checkpoint(slurm_cluster, tiny_data, tmp_path):
    out = _uniemo(
        "submit", "slurm", "--config", str(TINY),
        *_overrides(tmp_path, tiny_data, "training.steps=4", "distributed.num_workers=2"),
    )
    job_id = re.search(r"submitted SLURM job (\d+): run (\S+)", out).group(1)
    run_dir = tmp_path / "tiny-stage1"
    assert f"run {run_dir}" in out
    (record,) = wait_for_job(job_id, timeout=JOB_TIMEOUT)
    assert record["JobState"] == "COMPLETED", _logs(run_dir)
    assert record["NumCPUs"] == "2"  # 2 workers x 1 CPU, from the config
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step-000004", _logs(run_dir)
    launch = run_dir / "launch"
    assert (launch / "job.yaml").is_file() and (launch / f"slurm-{job_id}.out").is_file()
    assert "step 4" in (launch / f"train-{job_id}.log").read_text()
    assert "Ray head at 127.0.0.1:" in (launch / f"slurm-{job_id}.out").read_text()
    assert _ray_leftovers([job_id]) == []


def test_sweep_runs_as_job_array_with_distinct_run_dirs(slurm_cluster, tiny_data, tmp_path):
    sweep_file = REPO / "configs" / "sweeps" / "tiny_stage1_lr.yaml"
    out = _uniemo("sweep", str(sweep_file), "--backend", "slurm", *_overrides(tmp_path, tiny_data, "training.steps=4"))
    array_id = re.search(r"submitted SLURM job array (\d+) \(2 tasks\)", out).group(1)
    records = wait_for_job(array_id, timeout=JOB_TIMEOUT, expect_tasks=2)
    sweep_dir = tmp_path / "tiny-stage1-lr"
    run_dirs = [sweep_dir / "lr_queries=0.0005", sweep_dir / "lr_queries=0.001"]
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    assert all(r["JobState"] == "COMPLETED" for r in records), "\n".join(_logs(d) for d in run_dirs)
    for task, run_dir in enumerate(run_dirs):
        latest = latest_checkpoint(run_dir)
        assert latest is not None and latest.name == "step-000004", _logs(run_dir)
        cfg_text = (run_dir / "config.yaml").read_text()
        assert f"lr_queries: {[0.0005, 0.001][task]}" in cfg_text and "group: tiny-stage1-lr" in cfg_text
        assert (run_dir / "launch" / f"slurm-{array_id}_{task}.out").is_file()  # per-task log in its run
    assert _ray_leftovers([r["JobId"] for r in records]) == []


def _trainer_hosts(run_dir: Path) -> list[tuple[int, str, str]]:
    """(rank, host, address) of every start of a trainer, from workers/placement.jsonl."""
    return [(r["rank"], r["host"], r["node_ip"]) for r in read_placement(run_dir) if r.get("role") == "trainer"]


def test_two_node_job_one_rank_per_node_converts_resumes_and_requeues(slurm_two_nodes, tiny_data, tmp_path):
    """`uniemo submit slurm --nodes 2 --wait` on node1 + node2: the Ray head on node1, a Ray worker on node2, one
    training rank per node (recorded in workers/placement.jsonl); zero_to_fp32 reads the checkpoint; --resume
    continues it as a second two-node job, and a `scontrol requeue` of that job resumes it again."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    nodes = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, check=True).stdout
    addrs = dict(re.findall(r"NodeName=(\S+) .*?NodeAddr=(\S+)", nodes))
    assert sorted(addrs) == ["node1", "node2"] and len(set(addrs.values())) == 2, nodes
    assert not any(a.startswith("127.") for a in addrs.values()), addrs  # each node its own address

    run_dir = tmp_path / "two-node"
    common = _overrides(tmp_path, tiny_data, "distributed.num_workers=2", "run.name=two-node",
                        "training.checkpoint_every=2", "logging.every=1")
    submit = [sys.executable, "-m", "uniemo", "submit", "slurm", "--nodes", "2", "--config", str(TINY)]
    proc = subprocess.run([*submit, *common, "training.steps=4", "--wait"],
                          capture_output=True, text=True, timeout=JOB_TIMEOUT, cwd=REPO)
    job_id = re.search(r"submitted SLURM job (\d+)", proc.stdout).group(1)
    assert proc.returncode == 0 and f"job {job_id}: COMPLETED" in proc.stdout, proc.stdout + _logs(run_dir)
    (record,) = job_records(job_id)
    assert record["NumNodes"] == "2" and record["NodeList"] == "node[1-2]", record
    log = (run_dir / "launch" / f"slurm-{job_id}.out").read_text()
    assert f"Ray head at {addrs['node1']}:" in log and "all 2 nodes joined the Ray cluster" in log, log
    assert (run_dir / "launch" / f"ray-{job_id}-r0-node2.log").is_file()  # the Ray worker of node2
    placed = _trainer_hosts(run_dir)
    assert sorted(r for r, _, _ in placed) == [0, 1], placed
    assert sorted((h, ip) for _, h, ip in placed) == sorted(addrs.items()), placed  # one rank per node
    assert re.search(r"rank 0 on node\d \(.*\), rank 1 on node\d", log), log
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step-000004", _logs(run_dir)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(latest))  # DeepSpeed's own converter, both shards
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())

    # --resume as a second two-node job, requeued once it has checkpointed past the first job's step 4. (This is
    # also the suite's requeue test: the one-node template takes the same SIGTERM / requeue / resume path.)
    steps = 10
    out = _uniemo("submit", "slurm", "--nodes", "2", "--config", str(TINY), "--resume", *common,
                  f"training.steps={steps}")
    job2 = re.search(r"submitted SLURM job (\d+)", out).group(1)
    _requeue_after_checkpoint(job2, run_dir, 4, time.monotonic() + 2 * JOB_TIMEOUT)
    train_log = (run_dir / "launch" / f"train-{job2}.log").read_text()
    resumed = [int(k) for k in re.findall(r"resumed at step (\d+)", train_log)]
    assert resumed[0] == 4 and 4 < resumed[-1] < steps, resumed  # --resume, then the requeued start
    assert _step_of(run_dir) == steps
    assert _steps(run_dir) == list(range(1, steps + 1))  # no step lost, none trained or logged twice
    placed = _trainer_hosts(run_dir)
    assert len(placed) == 6 and all(sorted(h for _, h, _ in placed[i:i + 2]) == ["node1", "node2"]
                                    for i in (0, 2, 4)), placed  # every start: one rank per node
    assert _ray_leftovers([job_id, job2]) == []
