"""One job = one resolved config (STYLE 10): what every backend (local, SLURM, Ray) is handed.

:func:`resolve_job` loads a config (defaults < YAML < overrides), makes its paths absolute against the submitting
folder (a SLURM job or a Ray job runs elsewhere: a relative ``runs/`` would land in the job's scratch folder) and
checks the run directory: a fresh submission never continues an existing run unless ``--resume`` is given
(the same rule as ``uniemo train``, checked before anything is queued). :func:`write_job_config` writes the
resolved config a job runs (``<run_dir>/launch/job.yaml``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from uniemo.atomic import atomic_write
from uniemo.config.loader import dump_config, from_dict, parse_override, read_yaml, set_dotted
from uniemo.config.schema import Config
from uniemo.data.remote import is_url
from uniemo.errors import UserError
from uniemo.run_layout import CHECKPOINTS_DIR, LATEST_FILE, LAUNCH_DIR
from uniemo.run_layout import JOB_CONFIG_FILE as JOB_CONFIG

PATH_KEYS: tuple[str, ...] = (
    "run.output_dir",
    "data.shards",
    "data.cache_dir",
    "model.understanding.clip_path",
    "model.generator.path",
    "training.init_from",
    "distributed.ray_temp_dir",
    "feedback.from_run",
)
"""Config keys holding file system paths; made absolute on submission (plus ``data.extra_sources[*].path``)."""


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
        """``<run.output_dir>/<run.name>`` (absolute after :func:`resolve_job`)."""
        return Path(self.config.run.output_dir) / self.config.run.name

    @property
    def launch_dir(self) -> Path:
        return self.run_dir / LAUNCH_DIR

    @property
    def config_path(self) -> Path:
        """Where :func:`write_job_config` puts the config the job runs."""
        return self.launch_dir / JOB_CONFIG


def build_raw(config_path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The raw config mapping: YAML file, then ``key=value`` overrides (not yet validated)."""
    raw: dict = read_yaml(config_path) if config_path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return raw


def config_from_raw(raw: dict, base_dir: str | Path | None = None) -> Config:
    """Validate a raw mapping into a :class:`Config` (errors name the key) and make its paths absolute."""
    cfg = from_dict(Config, raw)
    cfg.validate()
    return absolutize_paths(cfg, Path.cwd() if base_dir is None else Path(base_dir))


def resolve_job(
    config_path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    base_dir: str | Path | None = None,
) -> Job:
    """Load ``config_path`` with ``overrides`` into a :class:`Job` whose paths are absolute against ``base_dir``
    (default: the current folder)."""
    cfg = config_from_raw(build_raw(config_path, overrides), base_dir)
    return Job(config=cfg, name=cfg.run.name, overrides=list(overrides))


def _absolute(value: str, base_dir: Path) -> str:
    if not value or is_url(value):
        return value  # empty means "not set" for every path key; a URL source (data.shards) is no path
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def absolutize_paths(cfg: Config, base_dir: Path) -> Config:
    """A copy of ``cfg`` whose :data:`PATH_KEYS` (and extra source paths) are absolute."""
    cfg = copy.deepcopy(cfg)
    for key in PATH_KEYS:
        *sections, leaf = key.split(".")
        node = cfg
        for part in sections:
            node = getattr(node, part)
        setattr(node, leaf, _absolute(getattr(node, leaf), base_dir))
    for src in cfg.data.extra_sources:
        src.path = _absolute(src.path, base_dir)
    return cfg


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
