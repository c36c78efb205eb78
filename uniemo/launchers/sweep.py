"""Sweeps: one YAML file → one resolved config per point (STYLE 10: a job runs one config).

A sweep file (``configs/sweeps/*.yaml``)::

    name: tiny-lr                   # optional; default: the file's stem
    base: ../tiny_stage1.yaml       # the config every point starts from (relative to the sweep file)
    overrides: [training.steps=4]   # optional, applied to every point
    grid:                           # optional: the cartesian product of these values
      training.lr_head: [1.0e-4, 1.0e-3]
    points:                         # optional: a list of points, each a mapping of dotted keys (+ optional name)
      - {name: no-scene, model.understanding.use_scene_queries: false}
      - {name: full}
    command: train                  # optional: what each point runs, `train` (default) or `run` (the whole
                                    # pipeline of `uniemo run`; local backend only)

With both ``grid`` and ``points`` the sweep is their product (every listed point at every grid value). Order of
precedence for one point: base YAML < ``overrides`` < the command line's ``key=value`` < the point's values.
Each point runs in ``<run.output_dir>/<sweep name>/<point name>/`` (``run.name`` = the point name, made of the
keys that vary: ``lr_head=0.001``) and logs to the wandb group ``<sweep name>`` (``logging.wandb.group``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from uniemo.config.loader import apply_overrides, build_config, parse_override, read_config_file, set_override
from uniemo.config.paths import config_base
from uniemo.config.schema import NAME_CHARS
from uniemo.errors import ConfigError, UserError
from uniemo.launchers.job import Job
from uniemo.run_layout import LAUNCH_DIR

SWEEP_KEYS = ("name", "base", "overrides", "grid", "points", "command")
SWEEP_COMMANDS = ("train", "run")
"""The top-level keys of a sweep file."""

_NAME_CHARS = re.compile(rf"[^{NAME_CHARS}]")
_MAX_NAME = 100


@dataclass
class Sweep:
    """An expanded sweep: its jobs in order, one per point."""

    name: str
    path: Path
    """The sweep file."""
    output_dir: Path
    """``<run.output_dir>/<name>``: the parent of every point's run directory."""
    jobs: list[Job]
    values: list[dict[str, Any]]
    """Each point's dotted keys and values (same order as ``jobs``)."""
    command: str = "train"
    """What each point runs: ``train`` (``uniemo train``) or ``run`` (the whole pipeline, ``uniemo run``)."""

    @property
    def launch_dir(self) -> Path:
        """Where backend-wide files go (the SLURM array script and its batch logs)."""
        return self.output_dir / LAUNCH_DIR


def _error(path: Path, message: str) -> ConfigError:
    return ConfigError(f"sweep {path}: {message}")


def _read_sweep_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist; see configs/sweeps/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise _error(path, "is not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise _error(path, f"must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in data:
        if key not in SWEEP_KEYS:
            raise _error(path, f"unknown key {key!r}; the keys of a sweep file are {', '.join(SWEEP_KEYS)}")
    if "grid" not in data and "points" not in data:
        raise _error(path, "has neither 'grid' nor 'points'; give at least one")
    if data.get("command", "train") not in SWEEP_COMMANDS:
        raise _error(path, f"command {data['command']!r} is not one of {', '.join(SWEEP_COMMANDS)}")
    return data


def _grid_values(path: Path, grid: Any) -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    if not isinstance(grid, dict) or not grid:
        raise _error(path, "'grid' must map dotted config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _error(path, f"grid key {key} must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _list_points(path: Path, points: Any) -> list[tuple[str | None, dict[str, Any]]]:
    if points is None:
        return [(None, {})]
    if not isinstance(points, list) or not points:
        raise _error(path, "'points' must be a non-empty list of mappings (dotted key: value)")
    out = []
    for i, entry in enumerate(points):
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise _error(path, f"points[{i}] must be a mapping of dotted keys, got {entry!r}")
        entry = dict(entry)
        name = entry.pop("name", None)
        out.append((None if name is None else str(name), entry))
    return out


def format_value(value: Any) -> str:
    """A value as it appears in a point name: ``true``, ``0.001``, ``1e-05``, ``vit-b16``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value) if value != "" else "empty"
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key → its shortest suffix that no other key shares (``training.lr_head`` → ``lr_head``)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        short[key] = suffix
    return short


def sanitize_name(text: str) -> str:
    """A name safe for a folder, a SLURM log pattern and a wandb run (a valid ``run.name``): ``[A-Za-z0-9._=,+-]``,
    starting with a letter or digit, at most 100 chars."""
    clean = _NAME_CHARS.sub("_", text).lstrip("._=,+-").rstrip("._") or "point"
    if len(clean) > _MAX_NAME:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        clean = f"{clean[: _MAX_NAME - 9]}-{digest}"
    return clean


def point_names(values: list[dict[str, Any]], explicit: list[str | None]) -> list[str]:
    """Names of the points: an explicit name, then ``key=value`` of every key whose value varies over the sweep
    (joined by ``,``). Unique: a clash after cleaning gets the point's index appended."""
    keys: list[str] = []
    for point in values:
        keys.extend(k for k in point if k not in keys)
    varying = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in values}) > 1]
    short = _short_keys(varying)
    names = []
    for point, given in zip(values, explicit, strict=True):
        parts = [given] if given else []
        parts += [f"{short[k]}={format_value(point[k])}" for k in varying if k in point]
        names.append(sanitize_name(",".join(parts)) if parts else "base")
    clashing = {name for name in names if names.count(name) > 1}
    return [sanitize_name(f"{name}-{i}") if name in clashing else name for i, name in enumerate(names)]


def _merge_dotted(raw: dict[str, Any], key: str, value: Any, base: Path) -> None:
    """Set ``key`` to ``value`` (relative paths against ``base``, the sweep file's); a mapping value is merged key
    by key, so ``model.understanding: {depth: 2}`` changes the depth and keeps the rest of the base config's
    section."""
    if isinstance(value, dict):
        for sub, sub_value in value.items():
            _merge_dotted(raw, f"{key}.{sub}", sub_value, base)
        return
    set_override(raw, key, value, base)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Expand the sweep file ``path`` (module docstring) into one resolved :class:`Job` per point.

    ``overrides`` are the command line's ``key=value``, applied to every point; they may not name a key the
    sweep varies (every point would be the same). Errors name the sweep file, the point and the key. Paths in the
    sweep file (its ``overrides`` and points) are relative to its folder (the repository for a shipped sweep),
    those of the command line to the current directory (:mod:`uniemo.config.paths`).
    """
    path = Path(path)
    data = _read_sweep_file(path)
    sweep_overrides = data.get("overrides") or []
    if not isinstance(sweep_overrides, list) or not all(isinstance(o, str) for o in sweep_overrides):
        raise _error(path, "'overrides' must be a list of key=value strings")
    grid = _grid_values(path, data.get("grid"))
    listed = _list_points(path, data.get("points"))
    values: list[dict[str, Any]] = []
    explicit: list[str | None] = []
    for name, entry in listed:
        for combo in grid:
            both = sorted(set(entry) & set(combo))
            if both:
                raise _error(path, f"{both[0]} is both in 'grid' and in a listed point; keep it in one place")
            values.append({**combo, **entry})
            explicit.append(name)
    swept = {k for point in values for k in point}
    for item in overrides:
        key, _ = parse_override(item)
        if key in swept:
            raise UserError(f"override {item} names {key}, which the sweep {path} varies; edit the sweep instead")
    seen: dict[str, int] = {}
    for i, point in enumerate(values):
        digest = json.dumps(point, sort_keys=True, default=str)
        if digest in seen:
            raise _error(path, f"points {seen[digest]} and {i} are the same ({digest}); remove one")
        seen[digest] = i

    base = data.get("base")
    base_path = None
    if base is not None:
        base_path = Path(str(base)).expanduser()
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        if not base_path.is_file():
            raise _error(path, f"base config {base_path} does not exist; 'base' is relative to the sweep file")
    sweep_base = config_base(path)
    try:
        common = read_config_file(base_path) if base_path is not None else {}
        apply_overrides(common, sweep_overrides, sweep_base)
        apply_overrides(common, list(overrides))
    except ConfigError as exc:
        raise _error(path, str(exc)) from None
    sweep_name = sanitize_name(str(data.get("name") or path.stem))
    names = point_names(values, explicit)

    jobs: list[Job] = []
    output_dir: Path | None = None
    for name, point in zip(names, values, strict=True):
        raw = copy.deepcopy(common)
        try:
            for key, value in point.items():
                _merge_dotted(raw, key, value, sweep_base)
            cfg = build_config(raw)
        except ConfigError as exc:
            raise _error(path, f"point {name}: {exc}") from None
        point_parent = Path(cfg.run.output_dir) / sweep_name
        output_dir = output_dir or point_parent
        cfg.run.output_dir = str(point_parent)
        cfg.run.name = name
        cfg.run.validate()  # sanitize_name makes it valid; a check here keeps it so
        cfg.logging.wandb.group = sweep_name
        jobs.append(Job(config=cfg, name=name, overrides=[f"{k}={format_value(v)}" for k, v in point.items()]))
    assert output_dir is not None  # at least one point (checked above)
    return Sweep(name=sweep_name, path=path, output_dir=output_dir, jobs=jobs, values=values,
                 command=str(data.get("command", "train")))


def sweep_summary(sweep: Sweep) -> str:
    """Human-readable list of the points: name, run directory, values."""
    lines = [f"sweep {sweep.name}: {len(sweep.jobs)} point(s) under {sweep.output_dir}"]
    for i, (job, point) in enumerate(zip(sweep.jobs, sweep.values, strict=True)):
        shown = ", ".join(f"{k}={format_value(v)}" for k, v in point.items()) or "(base config)"
        lines.append(f"  [{i}] {job.name}: {shown}")
    return "\n".join(lines) + "\n"

