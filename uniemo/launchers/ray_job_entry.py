"""The entry point a Ray job runs (``python -m uniemo.launchers.ray_job_entry``, :mod:`uniemo.launchers.ray_jobs`):
write the resolved config from the job's environment into ``<run_dir>/launch/job.yaml``, then ``uniemo train`` (or
the command the job was submitted with, ``uniemo feedback``).

Apart from :mod:`uniemo.launchers.ray_jobs` because it runs the console script (:func:`uniemo.cli.main`), which
itself reaches the submitter through ``uniemo submit``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from uniemo.cli import main as cli_main
from uniemo.config.loader import from_dict
from uniemo.config.schema import Config
from uniemo.errors import ConfigError, UserError
from uniemo.launchers.job import Job, write_job_config
from uniemo.launchers.ray_jobs import COMMAND_ENV, CONFIG_ENV, JOB_COMMANDS, RESUME_ENV
from uniemo.logging import say


def main() -> int:
    """Write the config from the environment into the run, then ``uniemo train`` or ``uniemo feedback``
    (``--resume`` when asked)."""
    text = os.environ.get(CONFIG_ENV)
    command = os.environ.get(COMMAND_ENV) or "train"
    if not text or command not in JOB_COMMANDS:
        say(f"error: {CONFIG_ENV} is not set or {COMMAND_ENV} is not one of {', '.join(JOB_COMMANDS)}; submit jobs "
            "with `uniemo submit ray`")
        return 2
    try:
        config_path = _write_job_config(text)
    except UserError as exc:
        say(f"error: {exc}")
        return 2
    argv = [command, "--config", str(config_path)]
    if os.environ.get(RESUME_ENV) == "1":
        argv.append("--resume")
    return cli_main(argv)


def _write_job_config(text: str) -> Path:
    """``<run_dir>/launch/job.yaml`` from the job's config text, checked before anything is written: the run
    folder comes from ``run.output_dir`` and ``run.name``, which the config's checks keep to a plain name."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{CONFIG_ENV} is not valid YAML; submit jobs with `uniemo submit ray`") from None
    cfg = from_dict(Config, raw if raw is not None else {})  # the key named if it does not fit this checkout
    cfg.validate()
    return write_job_config(Job(config=cfg, name=cfg.run.name))  # the run folder of uniemo.run_layout


if __name__ == "__main__":
    sys.exit(main())
