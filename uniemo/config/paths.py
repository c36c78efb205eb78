"""Config paths: which fields hold file system paths, and how relative ones are made absolute."""

from __future__ import annotations

import copy
from pathlib import Path

from uniemo.config.schema import Config
from uniemo.data.remote import is_url


def _absolute(path: str) -> str:
    if not path or is_url(path):  # a URL source (data.shards, extra sources) is the same from every worker
        return path
    return str(Path(path).expanduser().resolve())


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose file and folder paths are absolute (relative ones are read from this process's
    working directory). Workers run elsewhere: Ray Train changes their working directory, and on a cluster they
    run on other machines (which then need the same paths, e.g. a shared file system)."""
    cfg = copy.deepcopy(cfg)
    cfg.run.output_dir = _absolute(cfg.run.output_dir)
    cfg.data.shards = _absolute(cfg.data.shards)
    cfg.data.cache_dir = _absolute(cfg.data.cache_dir)
    for source in cfg.data.extra_sources:
        source.path = _absolute(source.path)
    cfg.model.understanding.clip_path = _absolute(cfg.model.understanding.clip_path)
    cfg.model.generator.path = _absolute(cfg.model.generator.path)
    cfg.training.init_from = _absolute(cfg.training.init_from)
    return cfg
