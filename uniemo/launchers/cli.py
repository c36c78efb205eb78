"""``uniemo submit slurm|ray`` and ``uniemo sweep``: launch runs elsewhere. No training logic here.

::

    uniemo submit slurm --config FILE [key=value ...] [--nodes N] [--gpus-per-node G] [--partition P]
                        [--time T] [--account A] [--qos Q] [--mem M] [--sbatch ARG ...] [--resume]
                        [--dry-run] [--wait]
    uniemo submit ray   --address ADDRESS --config FILE [key=value ...] [--command train|feedback] [--resume]
                        [--wait]
    uniemo submit ray   --address ADDRESS --logs JOB_ID
    uniemo sweep FILE [key=value ...] --backend {local,slurm,ray} [--dry-run] [--resume] [--wait]
                      [SLURM options] [--address ADDRESS]

Every job runs one resolved config (``<run_dir>/launch/job.yaml``); a sweep is expanded here, by the submitter,
into one job per point (see :mod:`uniemo.launchers.sweep`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from uniemo.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from uniemo.launchers.ray_jobs import JOB_COMMANDS

    submit = sub.add_parser("submit", help="submit one training run to SLURM or to a Ray cluster")
    ssub = submit.add_subparsers(dest="submit_cmd", required=True, metavar="{slurm,ray}")

    s = ssub.add_parser("slurm", help="render the batch script from the resolved config and sbatch it")
    s.add_argument("--config", required=True, help="YAML config file")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=10")
    _add_slurm_options(s)
    s.add_argument("--resume", action="store_true", help="continue the run from its checkpoints/latest")
    s.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing, write nothing")
    s.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only when COMPLETED")
    s.set_defaults(func=_submit_slurm)
    _allow_intermixed(s)

    r = ssub.add_parser("ray", help="submit the run as a Ray job (job-submission API) to a running cluster")
    r.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS", ""),
        help="the cluster's dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    r.add_argument("--config", default=None, help="YAML config file")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=10")
    r.add_argument("--logs", metavar="JOB_ID", default=None, help="follow the logs of a submitted job until it ends")
    r.add_argument("--command", choices=list(JOB_COMMANDS), default="train",
                   help="what the job runs on the config: uniemo train (default) or uniemo feedback")
    _add_ray_options(r)
    r.add_argument("--resume", action="store_true", help="continue the run from its checkpoints/latest")
    r.add_argument("--wait", action="store_true", help="follow the job's logs until it ends; exit 0 on success")
    r.set_defaults(func=_submit_ray)
    _allow_intermixed(r)

    w = sub.add_parser("sweep", help="expand a sweep file into one run per point and launch them")
    w.add_argument("file", help="sweep file (configs/sweeps/*.yaml)")
    w.add_argument("overrides", nargs="*", help="dotted overrides applied to every point, e.g. training.steps=4")
    w.add_argument(
        "--backend",
        choices=["local", "slurm", "ray"],
        default="local",
        help="local: one after another here; slurm: one job array; ray: one Ray job per point (default local)",
    )
    w.add_argument("--dry-run", action="store_true", help="list the points (and print the SLURM script); run nothing")
    w.add_argument("--resume", action="store_true", help="continue every point from its checkpoints/latest")
    w.add_argument("--wait", action="store_true", help="slurm/ray: wait for every point to end")
    _add_slurm_options(w)
    w.add_argument("--max-parallel", type=int, default=0, help="slurm: at most this many array tasks at once")
    w.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS", ""),
        help="ray: the cluster's dashboard address (default: $RAY_API_SERVER_ADDRESS)",
    )
    _add_ray_options(w)
    w.set_defaults(func=_sweep)
    _allow_intermixed(w)


def _allow_intermixed(parser: argparse.ArgumentParser) -> None:
    """Let ``key=value`` overrides stand before and after options (``uniemo sweep F --backend slurm a=1``).

    Plain argparse stops collecting a ``nargs="*"`` positional at the first option and rejects what follows;
    ``parse_known_intermixed_args`` does not. The parent parser calls ``parse_known_args`` on the subparser,
    so that name is pointed at the intermixed variant (which itself calls ``parse_known_args``: re-entrant
    calls go to the plain method).
    """
    plain = parser.parse_known_args
    busy = False

    def parse_known_args(args=None, namespace=None):
        nonlocal busy
        if busy:
            return plain(args, namespace)
        busy = True
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            busy = False

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _add_slurm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLURM")
    g.add_argument("--nodes", type=int, default=1, help="nodes of the allocation (default 1)")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node; one worker per GPU (distributed.num_workers = nodes x G). Default: from the config",
    )
    g.add_argument("--partition", default="", help="SLURM partition")
    g.add_argument("--time", default="", help="time limit, e.g. 01:00:00 (a job near it requeues itself)")
    g.add_argument("--account", default="", help="SLURM account")
    g.add_argument("--qos", default="", help="SLURM QOS")
    g.add_argument("--mem", default="", help="memory per node, e.g. 64G")
    g.add_argument(
        "--sbatch", action="append", default=[], metavar="ARG", help="extra sbatch option, verbatim (repeatable)"
    )
    g.add_argument("--python", default=sys.executable, help="the Python the job runs (default: this one)")
    g.add_argument("--template", default=None, help="batch-script template (default slurm/templates/train.sbatch)")


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray job")
    g.add_argument(
        "--working-dir", default=".", help="folder uploaded as the job's working_dir (default: the current one)"
    )
    g.add_argument("--job-python", default="python", help="the Python command of the job's entry point")


def _slurm_resources(args: argparse.Namespace, job):
    from uniemo.launchers.slurm import plan_resources

    return plan_resources(
        job,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time=args.time,
        account=args.account,
        qos=args.qos,
        mem=args.mem,
        extra=list(args.sbatch),
        max_parallel=getattr(args, "max_parallel", 0),
    )


def _print_final(records: list[dict[str, str]]) -> int:
    for rec in records:
        name = rec.get("JobId")
        if rec.get("ArrayTaskId") not in (None, "", "N/A"):
            name = f"{rec.get('ArrayJobId')}_{rec['ArrayTaskId']}"
        print(f"  job {name}: {rec.get('JobState')} (exit {rec.get('ExitCode', '?')})")
    return 0 if records and all(r.get("JobState") == "COMPLETED" for r in records) else 1


def _submit_slurm(args: argparse.Namespace) -> int:
    from uniemo.launchers.job import check_run_dirs, resolve_job
    from uniemo.launchers.slurm import submit_jobs, wait_for_job

    job, resources = _slurm_resources(args, resolve_job(args.config, args.overrides))
    check_run_dirs([job], resume=args.resume)
    job_id, script = submit_jobs(
        [job],
        resources,
        script_dir=job.launch_dir,
        output=str(job.launch_dir / "slurm-%j.out"),
        job_name=f"uniemo-{job.name}",
        array=False,
        dry_run=args.dry_run,
        python=args.python,
        resume=args.resume,
        template=args.template,
    )
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    assert job_id is not None  # submit_jobs returns none only for a dry run
    print(f"submitted SLURM job {job_id}: run {job.run_dir}")
    print(f"  logs: {job.launch_dir}/slurm-{job_id}.out (launcher), {job.launch_dir}/train-{job_id}.log (driver)")
    sys.stdout.flush()
    if args.wait:
        return _print_final(wait_for_job(job_id, timeout=float("inf")))
    return 0


def _submit_ray(args: argparse.Namespace) -> int:
    from uniemo.distributed.ray_session import ray_auth_errors

    if not args.address:
        raise UserError("give --address (the Ray dashboard, e.g. http://127.0.0.1:8265) or set RAY_API_SERVER_ADDRESS")
    with ray_auth_errors(args.address):  # a token-auth cluster reached without its token: one line
        return _submit_ray_job(args)


def _submit_ray_job(args: argparse.Namespace) -> int:
    from uniemo.launchers.job import check_run_dirs, resolve_job, write_job_config
    from uniemo.launchers.ray_jobs import connect, follow_logs, submit_job

    if args.logs:
        if args.config or args.overrides:
            raise UserError("--logs JOB_ID follows a submitted job; do not give --config or overrides with it")
        status = follow_logs(connect(args.address), args.logs)
        print(f"Ray job {args.logs}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    if not args.config:
        raise UserError("give --config FILE (the run to submit) or --logs JOB_ID (a job to follow)")
    job = resolve_job(args.config, args.overrides)
    check_run_dirs([job], resume=args.resume)
    client = connect(args.address)
    job_id = submit_job(client, job, working_dir=args.working_dir, resume=args.resume, python=args.job_python,
                        command=args.command)
    write_job_config(job)
    print(f"submitted Ray job {job_id}: run {job.run_dir}")
    print(f"  follow: uniemo submit ray --address {args.address} --logs {job_id}")
    sys.stdout.flush()
    if args.wait:
        status = follow_logs(client, job_id)
        print(f"Ray job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from uniemo.launchers.job import check_run_dirs
    from uniemo.launchers.sweep import load_sweep, sweep_summary

    sweep = load_sweep(args.file, args.overrides)
    check_run_dirs(sweep.jobs, resume=args.resume)
    sys.stdout.write(sweep_summary(sweep))
    if sweep.command != "train" and args.backend != "local":
        raise UserError(
            f"sweep {sweep.name} runs `uniemo {sweep.command}` per point, which only the local backend does; "
            "use --backend local"
        )
    if args.backend == "local":
        return _sweep_local(sweep, args)
    if args.backend == "slurm":
        return _sweep_slurm(sweep, args)
    return _sweep_ray(sweep, args)


def _sweep_local(sweep, args: argparse.Namespace) -> int:
    from uniemo.launchers.job import write_job_config

    if args.dry_run:
        for job in sweep.jobs:
            print(f"would run: uniemo {sweep.command} --config {job.config_path}{' --resume' if args.resume else ''}")
        return 0
    failed = []
    for i, job in enumerate(sweep.jobs):
        path = write_job_config(job)
        cmd = [sys.executable, "-m", "uniemo", sweep.command, "--config", str(path)] + (["--resume"] if args.resume else [])
        print(f"[{i + 1}/{len(sweep.jobs)}] {job.name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(job.name)
    if failed:
        print(f"sweep {sweep.name}: {len(failed)} of {len(sweep.jobs)} point(s) failed: {', '.join(failed)}")
        return 1
    print(f"sweep {sweep.name}: all {len(sweep.jobs)} point(s) finished under {sweep.output_dir}")
    return 0


def _sweep_slurm(sweep, args: argparse.Namespace) -> int:
    from uniemo.launchers.slurm import submit_jobs, wait_for_job

    planned = [_slurm_resources(args, job) for job in sweep.jobs]
    jobs = [job for job, _ in planned]
    resources = planned[0][1]
    for job, res in planned[1:]:
        if (res.nodes, res.cpus_per_node, res.gpus_per_node) != (
            resources.nodes,
            resources.cpus_per_node,
            resources.gpus_per_node,
        ):
            raise UserError(
                f"sweep point {job.name} needs other resources than {jobs[0].name} (one job array has one "
                "allocation shape); keep distributed.* the same over the sweep or submit the points separately"
            )
    job_id, script = submit_jobs(
        jobs,
        resources,
        script_dir=sweep.launch_dir,
        output=str(sweep.launch_dir / "slurm-%A_%a.out"),
        job_name=f"uniemo-sweep-{sweep.name}",
        array=True,
        dry_run=args.dry_run,
        python=args.python,
        resume=args.resume,
        template=args.template,
        rendered_by="uniemo sweep --backend slurm",
    )
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    assert job_id is not None  # submit_jobs returns none only for a dry run
    print(f"submitted SLURM job array {job_id} ({len(jobs)} tasks): sweep {sweep.output_dir}")
    for i, job in enumerate(jobs):
        print(f"  task {job_id}_{i}: {job.run_dir}")
    sys.stdout.flush()
    if args.wait:
        return _print_final(wait_for_job(job_id, timeout=float("inf"), expect_tasks=len(jobs)))
    return 0


def _sweep_ray(sweep, args: argparse.Namespace) -> int:
    from uniemo.distributed.ray_session import ray_auth_errors

    if args.dry_run:
        for job in sweep.jobs:
            print(f"would submit a Ray job for {job.run_dir}")
        return 0
    if not args.address:
        raise UserError("--backend ray needs --address (the Ray dashboard, e.g. http://127.0.0.1:8265)")
    with ray_auth_errors(args.address):
        return _submit_sweep_jobs(sweep, args)


def _submit_sweep_jobs(sweep, args: argparse.Namespace) -> int:
    from uniemo.launchers.job import write_job_config
    from uniemo.launchers.ray_jobs import connect, submit_job, wait_for_status

    client = connect(args.address)
    ids = []
    for job in sweep.jobs:
        job_id = submit_job(
            client, job, working_dir=args.working_dir, resume=args.resume, python=args.job_python
        )
        write_job_config(job)
        ids.append(job_id)
        print(f"submitted Ray job {job_id}: run {job.run_dir}", flush=True)
    if not args.wait:
        return 0
    statuses = [wait_for_status(client, job_id) for job_id in ids]
    for job_id, status in zip(ids, statuses, strict=True):
        print(f"  Ray job {job_id}: {status}")
    return 0 if all(s == "SUCCEEDED" for s in statuses) else 1

