"""The ``uniemo`` console script: subcommand → a small main function.

Each command group registers its own parser (``register(subparsers)``) and sets ``func`` to a function of the
parsed arguments that returns an exit code. User errors (:class:`uniemo.errors.UserError`) print one line and
exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from uniemo import __version__
from uniemo.console import VERBOSE_ENV
from uniemo.errors import DISK_FULL_ERRNOS, UserError
from uniemo.logging import say


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _config_show(args: argparse.Namespace) -> int:
    from uniemo.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def _register_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or check configs")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="{show}")
    show = csub.add_parser("show", help="print the resolved config (defaults < YAML < overrides)")
    show.add_argument("--config", default=None, help="YAML config file")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=10")
    show.set_defaults(func=_config_show)


def build_parser() -> argparse.ArgumentParser:
    # Each command module registers its own parser. They are imported here rather than at the top so that
    # `import uniemo.cli` stays cheap; the command modules themselves import torch, Ray and DeepSpeed only inside
    # their commands, so `uniemo --help` never loads them.
    from uniemo import pipeline
    from uniemo.data import cli as data_cli
    from uniemo.evaluation import cli as evaluation_cli
    from uniemo.evaluation import metrics_cli, report_cli
    from uniemo.feedback import cli as feedback_cli
    from uniemo.inference import cli as inference_cli
    from uniemo.launchers import cli as launchers_cli
    from uniemo.models import convert_cli
    from uniemo.training import cli as training_cli

    parser = _Parser(
        prog="uniemo",
        description="Distributed training of UniEmo: emotion understanding + emotion-conditioned generation.",
    )
    parser.add_argument("--version", action="version", version=f"uniemo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    parser.add_argument("--verbose", action="store_true",
                        help="show other packages' output (Ray, warnings) on the console too, not only in the run's "
                             "uniemo.log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    _register_config(sub)
    pipeline.register(sub)  # uniemo run: the whole loop
    data_cli.register(sub)
    training_cli.register(sub)
    feedback_cli.register(sub)
    evaluation_cli.register(sub)  # train-judge, evaluate
    metrics_cli.register(sub)  # EmoGen's metrics of any image folder
    report_cli.register(sub)
    inference_cli.register(sub)  # export, generate, classify, transfer
    launchers_cli.register(sub)
    convert_cli.register(sub)  # uniemo convert: downloaded weights -> the folders uniemo loads
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--debug` and `--verbose` may stand anywhere on the line, not only before the subcommand.
    debug = "--debug" in argv
    if "--verbose" in argv:
        os.environ[VERBOSE_ENV] = "1"  # read by uniemo.console here and in Ray's workers, which inherit it
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow an option (`uniemo run --config F --resume a.b=1`): argparse leaves
    # those over; anything else left over is an error, as parse_args would say.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = debug
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        say(f"error: {exc}")
        return exc.exit_code
    except OSError as exc:  # a full disk wherever it strikes: one line, like a user error
        if args.debug or exc.errno not in DISK_FULL_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        say(f"error: cannot write{where} ({os.strerror(exc.errno)}); free some space and re-run the same command "
            "(use --resume for a run)")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
