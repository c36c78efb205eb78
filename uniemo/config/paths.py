"""Config paths: which fields hold file system paths, and the one function that makes relative ones absolute.

A path field is tagged in the schema (``field(..., metadata=PATH)``, :data:`uniemo.config.schema.PATH`);
:func:`path_keys` lists them. The rule, applied when a config is loaded (:mod:`uniemo.config.loader`):

- a path written in a config file is relative to that file's folder (:func:`config_base`); the shipped configs
  (the repository's ``configs/`` folder, sweeps included) are relative to the repository, so
  ``generators/cpu-world`` in ``configs/demo.yaml`` is the repository's wherever the command runs;
- a path given on the command line (a dotted ``key=value``) and a default the config leaves alone are relative to
  the current directory;
- ``~`` is expanded; an empty value means "not set" and stays empty; a URL source (``https://``, ``s3://``,
  ``pipe:``) is no path and stays as it is.

So every path of a loaded :class:`~uniemo.config.schema.Config` is absolute, and workers on other machines or in
other folders read the same files. :func:`resolve_paths` is the one function that applies a base folder, to a
loaded config or to the raw mapping of a file.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from uniemo.config.schema import PATH_FIELD, Config
from uniemo.data.remote import is_url
from uniemo.run_layout import path_for_run_file

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this uniemo runs from (the folder holding ``uniemo/``)."""
SHIPPED_CONFIGS = REPO_ROOT / "configs"
"""The shipped configs: their paths are relative to :data:`REPO_ROOT`."""


def config_base(config_file: str | Path) -> Path:
    """The folder the relative paths of ``config_file`` are relative to: the repository for a shipped config (a
    file under :data:`SHIPPED_CONFIGS`), else the file's own folder."""
    path = Path(config_file).expanduser().resolve()
    if SHIPPED_CONFIGS in path.parents:
        return REPO_ROOT
    return path.parent


def absolute(value: Any, base: str | Path) -> Any:
    """One path value made absolute against ``base`` (empty values, URLs and non-strings are returned as they
    are: the loader reports a wrong type by key)."""
    if not isinstance(value, str) or not value or is_url(value):
        return value
    return str((Path(base) / Path(value).expanduser()).resolve())  # an absolute value replaces base


def _dataclass_of(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _list_item_dataclass(tp: Any) -> type | None:
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        return _dataclass_of(item)
    return None


def path_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """The dotted keys of every path field of the schema (``data.extra_sources[].path`` for list items)."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.metadata.get(PATH_FIELD):
            keys.append(prefix + f.name)
        elif (sub := _dataclass_of(tp)) is not None:
            keys.extend(path_keys(sub, f"{prefix}{f.name}."))
        elif (item := _list_item_dataclass(tp)) is not None:
            keys.extend(path_keys(item, f"{prefix}{f.name}[]."))
    return keys


def _walk(cls: type, node: Any, change: Callable[[Any], Any]) -> None:
    """Replace each path field's value of ``node`` (a ``cls`` instance or the raw mapping of one) by
    ``change(value)``, in place."""
    is_raw = isinstance(node, dict)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_raw and f.name not in node:
            continue
        value = node[f.name] if is_raw else getattr(node, f.name)
        tp = hints[f.name]
        if f.metadata.get(PATH_FIELD):
            value = change(value)
            if is_raw:
                node[f.name] = value
            else:
                setattr(node, f.name, value)
        elif (sub := _dataclass_of(tp)) is not None and (isinstance(value, dict) or not is_raw):
            _walk(sub, value, change)
        elif (item := _list_item_dataclass(tp)) is not None and isinstance(value, list):
            for element in value:
                if isinstance(element, dict) or dataclasses.is_dataclass(element):
                    _walk(item, element, change)


def resolve_paths(tree: Any, base: str | Path, cls: type = Config) -> Any:
    """A copy of ``tree`` (a :class:`Config`, another schema section given as ``cls``, or the raw mapping of one)
    whose relative path fields are absolute against ``base`` (the module docstring's rule)."""
    tree = copy.deepcopy(tree)
    _walk(cls, tree, partial(absolute, base=Path(base)))
    return tree


def paths_for_run_file(cfg: Config, folder: str | Path) -> Config:
    """A copy of ``cfg`` (absolute paths) as a run folder's ``config.yaml`` stores it: paths into ``folder``'s
    parent relative to ``folder``, the others absolute (:func:`uniemo.run_layout.path_for_run_file`). Read back
    with the loader, whose rule makes them absolute against ``folder`` again, wherever the folder was moved."""

    def stored(value: Any) -> Any:
        if not isinstance(value, str) or not value or is_url(value) or not Path(value).is_absolute():
            return value
        return path_for_run_file(value, folder)

    cfg = copy.deepcopy(cfg)
    _walk(Config, cfg, stored)
    return cfg


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every relative path made absolute against the current directory: what a driver does to a config
    it did not load itself (a config built in code; a loaded one is absolute already)."""
    return resolve_paths(cfg, Path.cwd())
