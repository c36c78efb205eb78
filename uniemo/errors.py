"""User-facing errors.

Anything the user can fix (a config typo, a missing folder, bad data with ``--on-error fail``) raises a
:class:`UserError`. The CLI prints its message as one line and exits with code 2; every other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""OSError numbers of a full disk, a quota or a file-size limit: the user frees space and re-runs (exit 2)."""


class UserError(Exception):
    """An error the user can fix. The message names the problem and what to do."""

    exit_code = 2


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type, or inconsistent values."""


class DataError(UserError):
    """Invalid or missing data: a missing folder, a malformed record, too few shards."""


class DiskFullError(DataError):
    """A write failed for lack of space (a full disk or a quota). The message names the path and the space still
    needed (:mod:`uniemo.diskspace`); what was complete before stays, so freeing space and re-running (``--resume``
    for a run) finishes the job. One message argument only: it crosses process boundaries (Ray, process pools)."""
