"""A script of launchers/ loaded as a module (the scripts are not a package), for the tests of its functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

LAUNCHERS = Path(__file__).resolve().parents[1] / "launchers"


def load_launcher(name: str) -> ModuleType:
    """``launchers/<name>.py`` imported under ``name``."""
    spec = importlib.util.spec_from_file_location(name, LAUNCHERS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
