"""The one way uniemo joins or starts Ray: :func:`ray_session`.

It joins the caller's Ray when ``ray.init`` already ran in this process (tests share one cluster), the cluster at
``distributed.ray_address``, or an embedded local cluster started here with ``address="local"`` and an own temp
folder (never a stale cluster a ``ray_current_cluster`` file points to), without dashboard unless asked (then bound
to ``distributed.bind_host``, 127.0.0.1); stopped again at the end (only what this process started). Ray 2.60
itself resolves a loopback node address to the machine's address, and its core gRPC servers listen on the node's
interfaces; they are protected by Ray's token authentication, which is on by default.

Every Ray worker process of a uniemo job runs :func:`quiet_ray_internals` first (``worker_process_setup_hook``):
Ray-internal noise and the tracebacks of user errors stay out of the console.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from uniemo.console import route_loggers, route_worker_output, unroute_worker_output
from uniemo.errors import UserError
from uniemo.logging import say

if TYPE_CHECKING:  # pragma: no cover - typing only
    from uniemo.config.schema import DistributedConfig

# Ray Train's PlacementGroupCleaner polls Ray's state API, which a minimal Ray (ray[train], no dashboard) does
# not serve: it logs a warning every few seconds for the whole run, or its thread dies with a traceback when
# another Ray instance runs on the machine. It only acts when the controller dies ungracefully, and our
# embedded cluster is shut down as a whole anyway.
_QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
_QUIET_THREADS = ("PlacementGroupCleanerMonitor",)


# Ray Train logs the traceback of any exception a worker's function raises, before the driver sees it.
_WORKER_ERROR_LOGGERS = ("ray.train.v2._internal.util",)


def _not_a_user_error(record: object) -> bool:
    """Logging filter: drop a record logged while a :class:`UserError` is being handled (the driver prints it as
    its one line; its traceback is noise)."""
    return not isinstance(sys.exc_info()[1], UserError)


def quiet_ray_internals() -> None:
    """Ray ``worker_process_setup_hook``: silence Ray-internal noise (see ``_QUIET_LOGGERS``) and the tracebacks
    of user errors (``_WORKER_ERROR_LOGGERS``)."""
    import logging
    import threading

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in _WORKER_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if _not_a_user_error not in logger.filters:
            logger.addFilter(_not_a_user_error)
    previous = threading.excepthook

    def excepthook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name in _QUIET_THREADS:
            return
        previous(args)

    threading.excepthook = excepthook


def job_runtime_env() -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init`` of a uniemo job (also for a caller that starts Ray itself)."""
    return {"worker_process_setup_hook": f"{__name__}.quiet_ray_internals"}


def keep_embedded_ray_on_loopback(dist_cfg: DistributedConfig) -> None:
    """Ray resolves a loopback node address to the machine's own address (so other nodes could reach it) unless
    its "local-only cluster" switch is off; an embedded one-machine cluster stays on loopback. Ray reads the
    switch when it is first imported: call this before any ``import ray``."""
    if not dist_cfg.ray_address and _is_loopback(dist_cfg.bind_host):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def ray_session(dist_cfg: DistributedConfig, extra_cpus: float = 0.0, extra_gpus: float = 0.0) -> Iterator[str]:
    """Be connected to Ray inside the block (module docstring). Yields how: caller/address/embedded.

    The one way uniemo joins or starts Ray: training, the feedback rounds, evaluation, the pipeline, benchmarks
    and tests all use it. ``extra_cpus`` / ``extra_gpus``: what an embedded cluster needs beside the trainers
    (e.g. the feedback pool's actors); with any GPU asked for, the embedded cluster gets the visible GPUs.
    """
    keep_embedded_ray_on_loopback(dist_cfg)
    import logging

    import ray

    route_loggers()  # `import ray` gave Ray's logger a console handler: inside quiet_console, the log file only

    if ray.is_initialized():
        yield "caller"  # the caller's cluster: theirs to stop
        return
    if dist_cfg.ray_address:
        with ray_auth_errors(dist_cfg.ray_address):
            ray.init(address=dist_cfg.ray_address, log_to_driver=True, runtime_env=job_runtime_env())
        route_worker_output()
        try:
            yield "address"
        finally:
            unroute_worker_output()
            ray.shutdown()  # disconnects; the cluster keeps running
        return
    own_temp = not dist_cfg.ray_temp_dir
    # Short path: Ray puts unix sockets in it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="uniemo-ray-") if own_temp else dist_cfg.ray_temp_dir
    needed = dist_cfg.num_workers * dist_cfg.cpus_per_worker + extra_cpus
    ok = named = False
    try:
        ray.init(
            address="local",
            _temp_dir=temp_dir,
            _node_ip_address=dist_cfg.bind_host,
            include_dashboard=dist_cfg.dashboard,
            dashboard_host=dist_cfg.bind_host,
            num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
            num_gpus=_visible_gpus() if dist_cfg.gpus_per_worker > 0 or extra_gpus > 0 else 0,
            log_to_driver=True,
            logging_level=logging.WARNING,
            runtime_env=job_runtime_env(),
        )
        route_worker_output()  # other packages' lines of the workers to the run's log file (uniemo.console)
        try:
            yield "embedded"
        except UserError as exc:
            if own_temp:  # name the logs in the error's one line
                exc.args = (f"{exc}; Ray's logs of this run are kept in {temp_dir}",)
                named = True
            raise
        ok = True
    finally:
        unroute_worker_output()
        if ray.is_initialized():
            ray.shutdown()  # stops the processes this ray.init started, nothing else
        if own_temp and ok:
            for _ in range(3):  # a log writer may still be exiting: retry briefly
                shutil.rmtree(temp_dir, ignore_errors=True)
                if not os.path.exists(temp_dir):
                    break
                time.sleep(0.5)
        elif own_temp and not named:
            say(f"Ray's logs of this run are kept in {temp_dir}")


@contextmanager
def ray_auth_errors(address: str) -> Iterator[None]:
    """Ray's ``AuthenticationError`` (a cluster with token authentication, Ray 2.60's default for
    ``ray start --head``, reached without the token) as one line saying what to set."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise UserError(
            f"the Ray cluster at {address} uses token authentication (Ray's default for `ray start --head`) and "
            "refused this client: set RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token, "
            "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, as on the head node) and run the command again"
        ) from None


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


