"""YAML + dotted overrides → a validated :class:`Config` whose paths are absolute.

Order of precedence: schema defaults < YAML file < ``key=value`` overrides. YAML is read with
``yaml.safe_load`` only. Every error names the full key path and, for unknown keys, suggests the nearest valid
one. Relative paths follow the rule of :mod:`uniemo.config.paths`: a file's own against its folder (the
repository for the shipped configs), overrides and defaults against the current directory.

The pieces, for a caller that builds a config from several files (a sweep): :func:`read_config_file` (a file's
mapping, paths resolved), :func:`set_override` / :func:`apply_overrides` (dotted values, paths resolved against
a given folder), :func:`build_config` (check, validate, resolve what is left against the current directory).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from uniemo import __version__
from uniemo.atomic import atomic_write
from uniemo.config.paths import absolute, config_base, paths_for_run_file, resolve_paths
from uniemo.config.schema import Config
from uniemo.errors import ConfigError
from uniemo.run_layout import CONFIG_FILE

_MISSING = object()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config from defaults, an optional YAML file and dotted overrides, then validate it."""
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    return build_config(raw, overrides)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A new config: ``cfg`` with dotted overrides applied (checked and validated like the command line's)."""
    return build_config(to_dict(cfg), overrides)


MOVED_KEYS = {"evaluation.inception_weights": "evaluation.weights.inception"}
"""Keys that moved: old dotted key -> new one. Configs written before the move (a run's ``config.yaml``) still
load; their value is carried to the new key."""


def _move_keys(raw: dict[str, Any]) -> None:
    for old, new in MOVED_KEYS.items():
        *parents, leaf = old.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target: Any = raw
        for part in new_parents:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict) and target.get(new_leaf) not in (None, "") and value not in (None, ""):
            raise ConfigError(f"{old} moved to {new}, and both are set; keep only {new}")
        if value not in (None, ""):
            set_dotted(raw, new, value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file, its relative paths (a moved key's too) made absolute against
    :func:`config_base`."""
    base = config_base(path)
    raw = resolve_paths(read_yaml(path), base, Config)
    for old in MOVED_KEYS:  # moved later, by build_config, which refuses the old and the new key set together
        *parents, leaf = old.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = absolute(node[leaf], base)
    return raw


def set_override(raw: dict[str, Any], key: str, value: Any, base: str | Path | None = None) -> None:
    """Set dotted ``key`` of ``raw`` to ``value``; relative paths in it resolve against ``base`` (default: the
    current directory)."""
    scratch: dict[str, Any] = {}
    set_dotted(scratch, key, value)
    scratch = resolve_paths(scratch, Path.cwd() if base is None else base, Config)
    node: Any = scratch
    for part in key.split("."):
        node = node[part]
    set_dotted(raw, key, node)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], base: str | Path | None = None) -> None:
    """Apply ``key=value`` strings to ``raw`` in order (:func:`set_override`)."""
    for item in overrides:
        key, value = parse_override(item)
        set_override(raw, key, value, base)


def build_config(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """``raw`` plus command-line ``overrides``, checked (keys, types) and validated; paths still relative (the
    defaults) resolve against the current directory."""
    raw = copy.deepcopy(raw)
    apply_overrides(raw, overrides)
    _move_keys(raw)
    cfg = from_dict(Config, raw)
    cfg.validate()
    return resolve_paths(cfg, Path.cwd())


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=value`` → (``a.b.c``, value parsed as YAML: numbers, booleans, lists, strings)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. training.steps=10)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    keys = []
    for name, tp in get_type_hints(cls).items():
        full = f"{prefix}{name}"
        keys.append(full)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, full + "."))
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    candidates = valid_keys()
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not near:
        leaf = key.rsplit(".", 1)[-1]
        near = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean {near[0]}?" if near else "; see `uniemo config show` for the valid keys"
    return ConfigError(f"unknown config key {key}{hint}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, checking keys and types."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    for key in data:
        if key not in hints:
            raise _unknown_key_error(f"{prefix}{key}")
    kwargs = {}
    for name, tp in hints.items():
        if name in data:
            kwargs[name] = _convert(tp, data[name], f"{prefix}{name}")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-4` as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        if _CONTROL.search(value):
            # Names and paths end up in file names, batch scripts and log lines: a newline would start a new one.
            raise ConfigError(f"{key}={value!r} holds a control character (newline, tab, ...); remove it")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a schema bug, not a user error


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def code_version() -> str:
    """The git sha of the checkout (with ``-dirty`` when modified), else the package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"uniemo=={__version__}"


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``config.yaml`` (resolved config + ``code_version``) into the run directory, its paths into the run's
    parent folder relative to the run folder (:func:`uniemo.config.paths.paths_for_run_file`): the folder reads
    back the same wherever it is copied."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / CONFIG_FILE
    text = f"# code_version: {code_version()}\n" + dump_config(paths_for_run_file(cfg, run_dir))
    atomic_write(out, text)
    return out
