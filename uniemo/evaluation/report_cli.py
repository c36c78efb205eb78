"""``uniemo report``: the HTML report of a pipeline or run folder.

::

    uniemo report --run DIR [--out DIR]

``--run`` is a pipeline folder (``runs/<name>`` with ``stage1/``, ``stage2/``, ``feedback/``, ``judge/``) or one
training run folder; the report goes to ``<run>/report/index.html`` unless ``--out`` names another folder.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` command."""
    p = sub.add_parser("report", help="write the HTML report (plots, images, summary) of a pipeline or run folder")
    p.add_argument("--run", required=True, help="pipeline folder (runs/<name>) or a training run folder")
    p.add_argument("--out", default=None,
                   help="report folder: new, empty, or an earlier report to replace (default <run>/report)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from uniemo.evaluation.report import summary_lines, write_report

    index = write_report(args.run, args.out)
    print(f"report: {index}")
    for line in summary_lines(args.run):
        print(f"  {line}")
    return 0
