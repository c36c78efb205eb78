"""SLURM submission: render ``slurm/templates/train.sbatch`` for one job or a job array, ``sbatch`` it, poll it.

The batch script (see the template's header) starts a Ray cluster over the allocation, runs ``uniemo train``
against it and stops Ray by pid; ``--requeue`` plus a SIGTERM trap make a preempted or requeued job resume from
``checkpoints/latest``. Resources come from the resolved config and the command line:

- ``--nodes N``: Ray workers are spread evenly, ``distributed.num_workers / N`` per node (must divide);
- ``--gpus-per-node G`` (G > 0): one GPU per worker, ``distributed.num_workers = N x G``; without it, G is
  derived from ``distributed.gpus_per_worker``;
- CPUs per node: workers per node x ``distributed.cpus_per_worker`` (one task per node, ``--cpus-per-task``).

Job states come from ``scontrol show job`` (no accounting database needed; ``sbatch --wait`` polls too slowly).
The template is rendered with plain string replacement of ``{{name}}`` placeholders (no template engine).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from uniemo.errors import UserError
from uniemo.launchers.job import Job, write_job_config

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "templates" / "train.sbatch"
"""The batch-script template of this checkout."""

INSTALL_HINT = (
    "on one machine: install SLURM with `bash slurm/dev/install.sh` and start a cluster with "
    "`eval \"$(bash slurm/dev/start-local-cluster.sh)\"`, which exports SLURM_CONF"
)

TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
"""Job states after which a job does not run again by itself (a requeued job goes back to PENDING)."""

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass
class SlurmResources:
    """What one job (or every task of an array) asks SLURM for."""

    nodes: int = 1
    cpus_per_node: int = 1
    gpus_per_node: int = 0
    partition: str = ""
    time: str = ""
    """Time limit in any sbatch format (``30``, ``01:00:00``, ``1-00:00:00``); empty: the partition's default."""
    account: str = ""
    qos: str = ""
    mem: str = ""
    """Memory per node (``64G``); empty: the partition's default."""
    extra: list[str] = field(default_factory=list)
    """Further sbatch options, verbatim (``--constraint=a100``)."""
    max_parallel: int = 0
    """Arrays: at most this many tasks at once (``--array=0-3%2``); 0: no limit."""


def plan_resources(
    job: Job, nodes: int = 1, gpus_per_node: int | None = None, **options: object
) -> tuple[Job, SlurmResources]:
    """The job with its ``distributed`` section fitted to the allocation, and the allocation (module docstring).

    Raises :class:`UserError` when the workers cannot be spread evenly over the nodes.
    """
    if nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {nodes}")
    cfg = dataclasses.replace(job.config, distributed=dataclasses.replace(job.config.distributed))
    dist = cfg.distributed
    if gpus_per_node is not None:
        if gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
        if gpus_per_node > 0:
            dist.num_workers = nodes * gpus_per_node  # one worker (rank) per GPU
            dist.gpus_per_worker = 1.0
        else:
            dist.gpus_per_worker = 0.0
    if dist.num_workers % nodes:
        raise UserError(
            f"distributed.num_workers={dist.num_workers} does not spread evenly over --nodes {nodes}; "
            "give a multiple of the node count"
        )
    per_node = dist.num_workers // nodes
    gpus = gpus_per_node if gpus_per_node is not None else math.ceil(per_node * dist.gpus_per_worker - 1e-9)
    cpus = max(1, math.ceil(per_node * dist.cpus_per_worker - 1e-9))
    resources = SlurmResources(nodes=nodes, cpus_per_node=cpus, gpus_per_node=int(gpus), **options)  # type: ignore[arg-type]
    return Job(config=cfg, name=job.name, overrides=job.overrides), resources


def sbatch_directives(
    resources: SlurmResources, job_name: str, output: str, chdir: str, array_size: int = 0, signal_before: int = 300
) -> list[str]:
    """The ``#SBATCH`` lines of a job (or of an array of ``array_size`` tasks)."""
    lines = [
        f"--job-name={job_name}",
        f"--nodes={resources.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={resources.cpus_per_node}",
    ]
    if resources.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={resources.gpus_per_node}")
    for flag, value in (
        ("partition", resources.partition),
        ("time", resources.time),
        ("account", resources.account),
        ("qos", resources.qos),
        ("mem", resources.mem),
    ):
        if value:
            lines.append(f"--{flag}={value}")
    if array_size:
        limit = f"%{resources.max_parallel}" if resources.max_parallel else ""
        lines.append(f"--array=0-{array_size - 1}{limit}")
    lines += [
        f"--output={output}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{signal_before}",
        f"--chdir={chdir}",
        *resources.extra,
    ]
    for line in lines:
        _check_no_control(line, "an sbatch option")
    return [f"#SBATCH {shlex.quote(line)}" for line in lines]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_no_control(value: str, what: str) -> None:
    """A newline in a value rendered into the batch script would end its line: the rest would run as a command."""
    if _CONTROL.search(value):
        raise UserError(f"{what} {value!r} holds a control character (newline, tab, ...); remove it")


def render_template(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{name}}``; a placeholder without a value is an error (a template/renderer mismatch)."""

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise UserError(f"the SLURM template uses {{{{{name}}}}}, which uniemo does not fill; check the template")
        return values[name]

    for name, value in values.items():
        if name != "sbatch_directives":  # several lines on purpose, each checked by sbatch_directives
            _check_no_control(value, f"the value of {{{{{name}}}}}")

    return _PLACEHOLDER.sub(value_of, template)


def render_script(
    jobs: list[Job],
    resources: SlurmResources,
    *,
    job_name: str,
    output: str,
    python: str = sys.executable,
    resume: bool = False,
    chdir: str | None = None,
    array: bool = False,
    stop_grace: int = 20,
    signal_before: int = 300,
    template: str | Path | None = None,
    rendered_by: str = "uniemo submit slurm",
) -> str:
    """The batch script for one job (``array=False``, one job) or a job array (one task per job)."""
    if not jobs:
        raise UserError("nothing to submit: no jobs")
    if not array and len(jobs) != 1:
        raise UserError(f"a single SLURM job runs one config, got {len(jobs)}; submit them as an array")
    template_path = Path(template) if template is not None else TEMPLATE
    if not template_path.is_file():
        raise UserError(f"SLURM template {template_path} not found; pass --template FILE or run from a checkout")
    directives = sbatch_directives(
        resources,
        job_name=job_name,
        output=output,
        chdir=chdir or os.getcwd(),
        array_size=len(jobs) if array else 0,
        signal_before=signal_before,
    )
    values = {
        "sbatch_directives": "\n".join(directives),
        "rendered_by": shlex.quote(rendered_by),
        "python": shlex.quote(python),
        "configs": " ".join(shlex.quote(str(job.config_path)) for job in jobs),
        "run_dirs": " ".join(shlex.quote(str(job.run_dir)) for job in jobs),
        "resume": "1" if resume else "0",
        "gpus_per_node": str(resources.gpus_per_node),
        "stop_grace": str(int(stop_grace)),
        "redirect_log": "1" if array else "0",
    }
    return render_template(template_path.read_text(), values)


def _sbatch() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise UserError(f"sbatch not found: {INSTALL_HINT}")
    return path


def submit_script(script: str, script_path: Path) -> str:
    """Write ``script`` to ``script_path`` and ``sbatch`` it. Returns the job id."""
    sbatch = _sbatch()
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    script_path.chmod(0o755)
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"sbatch failed: {detail[-1] if detail else f'exit {proc.returncode}'} ({INSTALL_HINT})")
    return proc.stdout.strip().split(";")[0]  # "<id>[;<cluster>]"


def submit_jobs(
    jobs: list[Job],
    resources: SlurmResources,
    *,
    script_dir: Path,
    output: str,
    job_name: str,
    array: bool,
    dry_run: bool = False,
    **render_options: object,
) -> tuple[str | None, str]:
    """Render, and unless ``dry_run`` write every job's ``job.yaml`` and the script, then ``sbatch`` it.

    Returns ``(job id or None, script text)``.
    """
    script = render_script(jobs, resources, job_name=job_name, output=output, array=array, **render_options)  # type: ignore[arg-type]
    if dry_run:
        return None, script
    _sbatch()  # no SLURM here: say so before writing anything
    for job in jobs:
        write_job_config(job)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    job_id = submit_script(script, script_dir / f"{job_name}.sbatch")
    return job_id, script


# -- job states -------------------------------------------------------------------------------------------------


def parse_scontrol(text: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` output (one line per job or array task) → one mapping per line."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record: dict[str, str] = {}
        key = None
        for token in line.split(" "):
            if "=" in token and re.match(r"^[A-Za-z][\w:/]*=", token):
                key, value = token.split("=", 1)
                record[key] = value
            elif key is not None and token:
                record[key] += " " + token  # a value with spaces (Command=, Comment=, ...)
        records.append(record)
    return records


def job_records(job_id: str) -> list[dict[str, str]]:
    """The job's (or every array task's) ``scontrol show job`` record; empty when SLURM no longer knows it."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise UserError(f"scontrol not found: {INSTALL_HINT}")
    proc = subprocess.run([scontrol, "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return []
    return parse_scontrol(proc.stdout)


def wait_for_job(
    job_id: str, timeout: float = 3600.0, poll: float = 0.5, expect_tasks: int = 1
) -> list[dict[str, str]]:
    """Poll ``scontrol show job`` until the job (every task of an array) is in a terminal state.

    Returns the final records. Raises :class:`TimeoutError` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    records: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        records = job_records(job_id)
        # An array shows one pending record for not-yet-started tasks; wait until every task has its own.
        tasks = [r for r in records if r.get("JobState")]
        if len(tasks) >= expect_tasks and all(r["JobState"] in TERMINAL_STATES for r in tasks):
            return tasks
        time.sleep(poll)
    states = ", ".join(f"{r.get('JobId')}={r.get('JobState')}" for r in records) or "unknown"
    raise TimeoutError(f"SLURM job {job_id} did not finish in {timeout:.0f} s (states: {states})")
