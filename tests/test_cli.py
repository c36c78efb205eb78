"""`uniemo --help` and `uniemo <cmd> ... --help` work for every (sub)command."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from uniemo.cli import build_parser, main


def _command_paths(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


COMMANDS = list(_command_paths(build_parser()))


def test_known_commands_exist():
    assert ("config", "show") in COMMANDS
    assert {("data", "synth"), ("data", "shards"), ("data", "inspect")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p))
def test_help_of_every_command(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    assert "usage: uniemo" in capsys.readouterr().out


def test_console_script_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "uniemo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: uniemo" in out.stdout


def test_usage_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice" in err
