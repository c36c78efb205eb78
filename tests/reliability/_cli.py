"""How the reliability tests run the real ``uniemo`` console script."""

from __future__ import annotations

import sys
from pathlib import Path


def uniemo_command() -> list[str]:
    """The console script next to the interpreter (a venv), else ``python -m uniemo``."""
    script = Path(sys.executable).with_name("uniemo")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "uniemo"]
