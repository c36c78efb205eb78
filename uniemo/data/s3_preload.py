"""Imported by the loader workers' fork server when a rank reads ``s3://`` shards (:mod:`uniemo.data.workers`).

Importing it makes this process's botocore session and loads the S3 service model into it: every worker forked
from the server then makes its S3 client from that session (about 0.05 CPU seconds) instead of importing
botocore and loading the model itself (about 0.35 CPU seconds per worker and epoch). It does nothing else: no
credentials are read and no client is made here.
"""

from __future__ import annotations

import contextlib

import uniemo.config  # noqa: F401 - first: remote imports config, which imports remote (a cycle entered at config)
from uniemo.data import remote
from uniemo.errors import ConfigError

with contextlib.suppress(ConfigError):  # no botocore: the worker names the missing package when it reads s3://
    remote.s3_session().get_service_model("s3")
