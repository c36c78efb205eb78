"""Ray job submission: one resolved config → one Ray job on an existing cluster (Ray's job-submission API).

``uniemo submit ray --address ADDRESS --config FILE [--command train|feedback] [key=value ...]``:

- ADDRESS is the cluster's dashboard (job API) address, ``http://HOST:8265`` (``HOST:8265`` is accepted);
- the current folder is the job's ``working_dir`` (uploaded by Ray; ``.venv``, ``.git``, ``runs``, ``.cache``,
  ``wandb`` and caches are left out), so the cluster runs this checkout's code;
- the resolved config travels in the job's environment (``UNIEMO_JOB_CONFIG``), with absolute paths and
  ``distributed.ray_address=auto`` (the driver joins the cluster it runs on). Paths must be visible to the
  cluster (one machine, or a shared file system);
- the entry point, ``python -m uniemo.launchers.ray_job_entry``, writes that config to ``<run_dir>/launch/job.yaml``
  and runs ``uniemo train`` on it (``--command feedback``: ``uniemo feedback``, the feedback loop, e.g. async with
  its pool on other nodes than the trainers: ``feedback.actor_resource``, ``distributed.worker_resource``).

Ray 2.60 clusters started with ``ray start`` use token authentication: the client sends the token Ray finds
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). Right after ``ray start`` the API can
answer "No available agent"; submission retries for a while.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from uniemo.errors import UserError
from uniemo.launchers.job import Job, job_config_text

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ray.job_submission import JobSubmissionClient

CONFIG_ENV = "UNIEMO_JOB_CONFIG"
"""Environment variable carrying the job's resolved config (YAML)."""
RESUME_ENV = "UNIEMO_JOB_RESUME"
COMMAND_ENV = "UNIEMO_JOB_COMMAND"
"""Environment variable naming the ``uniemo`` command the job runs (one of :data:`JOB_COMMANDS`)."""
JOB_COMMANDS = ("train", "feedback")
"""What a Ray job can run on its config: a training run, or the feedback loop."""

UPLOAD_EXCLUDES = [".venv", ".git", "runs", ".cache", "wandb", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
                   ".ruff_cache"]
"""Never uploaded with the working directory (virtualenvs, history, outputs, caches)."""

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def normalize_address(address: str) -> str:
    """``HOST:PORT`` → ``http://HOST:PORT`` (the job API is HTTP); ``http(s)://`` and ``ray://`` stay."""
    address = address.strip().rstrip("/")
    if not address:
        raise UserError("--address is empty; give the Ray dashboard address, e.g. http://127.0.0.1:8265")
    return address if "://" in address else f"http://{address}"


def connect(address: str) -> JobSubmissionClient:
    """A job-submission client of the cluster at ``address``; a one-line error when it cannot be reached."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:  # pragma: no cover - depends on the installation
        raise UserError("Ray job submission needs ray[default]: pip install 'ray[default]'") from None
    url = normalize_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot reach the Ray job API at {url} ({first}); start the cluster with `ray start --head` "
            "(dashboard on) and pass its dashboard address, e.g. http://127.0.0.1:8265"
        ) from None


def job_entrypoint(python: str = "python") -> str:
    """The shell command a Ray job runs."""
    return f"{python} -m uniemo.launchers.ray_job_entry"


def submission_id_for(job: Job) -> str:
    """A readable, unique Ray submission id: ``uniemo-<run name>-<random>``."""
    return f"uniemo-{job.name}-{secrets.token_hex(3)}"


def runtime_env_for(job: Job, working_dir: str | Path, resume: bool = False, command: str = "train") -> dict:
    """The job's runtime environment: this folder as ``working_dir``, the resolved config and the command in the
    environment."""
    if command not in JOB_COMMANDS:
        raise UserError(f"a Ray job runs one of {', '.join(JOB_COMMANDS)}, not {command!r}")
    cfg = copy.deepcopy(job.config)
    cfg.distributed.ray_address = "auto"  # the driver joins the cluster the job runs on
    text = job_config_text(Job(config=cfg, name=job.name))
    return {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": list(UPLOAD_EXCLUDES),
        "env_vars": {CONFIG_ENV: text, RESUME_ENV: "1" if resume else "0", COMMAND_ENV: command},
    }


def submit_job(
    client: JobSubmissionClient,
    job: Job,
    *,
    working_dir: str | Path = ".",
    resume: bool = False,
    python: str = "python",
    retry_s: float = 60.0,
    command: str = "train",
) -> str:
    """Submit ``job`` (``uniemo <command>`` on its config); retry while the cluster has "No available agent" (just
    after ``ray start``). Returns the Ray job (submission) id."""
    runtime_env = runtime_env_for(job, working_dir, resume, command)
    submission_id = submission_id_for(job)
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(
                entrypoint=job_entrypoint(python),
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata={"uniemo_run": job.name, "uniemo_run_dir": str(job.run_dir)},
            )
        except RuntimeError as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"Ray job submission failed: {first}") from None


def follow_logs(client: JobSubmissionClient, job_id: str, out: TextIO | None = None) -> str:
    """Print the job's logs as they come until it ends; returns its final status (``SUCCEEDED``, ...)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        client.get_job_status(job_id)
    except RuntimeError:
        raise UserError(f"the cluster has no Ray job {job_id}; see `ray job list`") from None
    asyncio.run(tail())
    return wait_for_status(client, job_id, timeout=60.0)


def wait_for_status(client: JobSubmissionClient, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray job {job_id} is still {status} after {timeout:.0f} s")
        time.sleep(poll)
