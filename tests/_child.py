"""Running DeepSpeed in a child process with a one-rank gloo group (tests of a real engine without Ray).

A gloo process group must not live in the pytest process (gloo can abort at interpreter exit), and DeepSpeed's
process-wide state stays out of the other tests. The child ends with ``os._exit``; its exit code is 0 only when
the body ran to its end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_PROLOGUE = """
import math, os, socket, sys, traceback
import torch
try:
    import torch.distributed as dist
    from uniemo.distributed.env import DistEnv, export_torch_env

    torch.set_num_threads(1)
    export_torch_env(DistEnv(0, 1, 0, 1, 0, "single"))  # DeepSpeed asserts LOCAL_RANK
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
"""

_EPILOGUE = """
    code = 0
except BaseException:
    traceback.print_exc()
    code = 1
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""


def run_gloo_child(body: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``body`` (Python at top level, arguments in ``sys.argv[1:]``) after the one-rank gloo set-up."""
    script = _PROLOGUE + textwrap.indent(textwrap.dedent(body), "    ") + _EPILOGUE
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
