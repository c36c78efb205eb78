"""One job = one resolved config (STYLE 10): what every backend (local, SLURM, Ray) is handed.

:func:`resolve_job` loads a config (defaults < YAML < overrides; :func:`uniemo.config.load_config`, whose paths
are absolute by the rule of :mod:`uniemo.config.paths`: a SLURM job or a Ray job runs elsewhere, where a relative
``runs/`` would land in the job's scratch folder) and :func:`check_run_dirs` checks the run directory: a fresh
submission never continues an existing run unless ``--resume`` is given (the same rule as ``uniemo train``,
checked before anything is queued). :func:`write_job_config` writes the resolved config a job runs
(``<run_dir>/launch/job.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from uniemo.atomic import atomic_write
from uniemo.config.loader import dump_config, from_dict, load_config, read_yaml
from uniemo.config.schema import Config
from uniemo.errors import UserError
from uniemo.run_layout import CHECKPOINTS_DIR, LATEST_FILE, LAUNCH_DIR, run_dir_of
from uniemo.run_layout import JOB_CONFIG_FILE as JOB_CONFIG


@dataclass
class Job:
    """One run to launch: a resolved config and where it lives."""

    config: Config
    name: str
    """``run.name``; also the point name in a sweep."""
    overrides: list[str] = field(default_factory=list)
    """The dotted overrides the user gave (kept for messages; already applied to ``config``)."""

    @property
    def run_dir(self) -> Path:
        """``<run.output_dir>/<run.name>`` (:func:`uniemo.run_layout.run_dir_of`)."""
        return run_dir_of(self.config)

    @property
    def launch_dir(self) -> Path:
        return self.run_dir / LAUNCH_DIR

    @property
    def config_path(self) -> Path:
        """Where :func:`write_job_config` puts the config the job runs."""
        return self.launch_dir / JOB_CONFIG


def resolve_job(config_path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Job:
    """Load ``config_path`` with ``overrides`` into a :class:`Job` (its paths absolute)."""
    cfg = load_config(config_path, overrides)
    return Job(config=cfg, name=cfg.run.name, overrides=list(overrides))


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` already holds a checkpoint (``checkpoints/latest``)."""
    return (Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE).is_file()


def check_run_dirs(jobs: list[Job], resume: bool) -> None:
    """A fresh submission must not meet an existing run; ``--resume`` needs one. One-line errors."""
    names = [str(job.run_dir) for job in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two jobs would share the run directory {dupes[0]}; give each job its own run.name")
    for job in jobs:
        if not resume and has_checkpoint(job.run_dir):
            raise UserError(
                f"{job.run_dir} already has checkpoints; pass --resume to continue that run, "
                "or choose another run.name"
            )


def job_config_text(job: Job) -> str:
    """The YAML a job runs: the whole resolved config (every key), so the job does not depend on the files
    the submitter read."""
    return (
        f"# Written by the uniemo launcher for run {job.name}: the resolved config this job runs.\n"
        + dump_config(job.config)
    )


def write_job_config(job: Job) -> Path:
    """Write :func:`job_config_text` to ``<run_dir>/launch/job.yaml`` (atomically) and return its path."""
    job.launch_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(job.config_path, job_config_text(job))
    return job.config_path


def load_job_config(path: str | Path) -> Config:
    """Read back a ``job.yaml`` (used by the Ray job entry point and tests)."""
    return from_dict(Config, read_yaml(path))
