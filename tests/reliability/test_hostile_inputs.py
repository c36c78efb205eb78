"""Hostile inputs: no code runs from data, checkpoints or configs, and no input can exhaust the machine.

Each case builds an input someone else could hand a user (a shard folder, a URL source, a checkpoint folder, a
config, a batch-script value, a state folder of the local SLURM cluster) and checks that it is refused: exit code 2
and one ``uniemo: error:`` line naming the problem, or (for bad content found while streaming) a counted, skipped
shard. Where the input would run a command, the command is ``touch <marker>`` and the marker must never appear.

The headline cases run the real ``uniemo`` console script in a subprocess; the rest call :func:`uniemo.cli.main`
in this process (the same code, without paying the interpreter start every time) or the module that owns the
check. HTTP sources are real servers on 127.0.0.1 that record every request. The checkpoint loads run a real
DeepSpeed ZeRO-2 engine in a one-rank gloo child. No case starts Ray. RELIABILITY.md has the table.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from _child import run_gloo_child  # tests/_child.py
from _cli import uniemo_command  # tests/reliability/_cli.py

from uniemo.cli import main
from uniemo.config.schema import DataConfig, LimitsConfig
from uniemo.data.loader import build_loader
from uniemo.data.shards import MANIFEST_FILE, mirror_source, read_manifest
from uniemo.data.transforms import SampleTransform
from uniemo.errors import DataError

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny_stage1.yaml")
EVAL = SampleTransform(image_size=24)


# -- helpers ----------------------------------------------------------------------------------------------------


def _one_line(code: int, err: str) -> str:
    """The single error line of a refused command (exit code 2, nothing else on stderr, no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("uniemo: error: "), (code, err[-3000:])
    assert "Traceback" not in err
    return lines[0]


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    """The real console script in a subprocess; returns its one error line."""
    out = subprocess.run([*uniemo_command(), *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    return _one_line(out.returncode, out.stderr)


def _main(capsys, *args: str) -> str:
    """:func:`uniemo.cli.main` in this process; returns its one error line."""
    capsys.readouterr()
    code = main(list(args))
    return _one_line(code, capsys.readouterr().err)


def _train_args(tmp: Path, shards: str, *extra: str) -> list[str]:
    return ["train", "--config", TINY, f"run.output_dir={tmp / 'runs'}", f"data.shards={shards}",
            f"data.cache_dir={tmp / 'cache'}", "logging.wandb.mode=disabled", *extra]


def _copy_shards(synth_shards: Path, dest: Path) -> Path:
    shutil.copytree(synth_shards, dest)
    return dest


def _rename_entry(folder: Path, index: int, name: object) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["shards"][index]["name"] = name
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


class _Server:
    """A real HTTP server on 127.0.0.1 (a thread of this process). ``routes`` maps a path to bytes or to a function
    ``(handler, method)`` that answers; every request is recorded in ``requests`` as ``(method, path)``."""

    def __init__(self, routes: dict[str, bytes | Callable]):
        self.routes = routes
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - the base class's name
                pass

            def _answer(self, method: str) -> None:
                server.requests.append((method, self.path))
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                elif callable(route):
                    route(self, method)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(route)))
                    self.end_headers()
                    if method == "GET":
                        self.wfile.write(route)

            def do_GET(self):  # noqa: N802 - http.server's name
                self._answer("GET")

            def do_HEAD(self):  # noqa: N802
                self._answer("HEAD")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve_folder(self, prefix: str, folder: Path) -> None:
        for path in folder.iterdir():
            if path.is_file():
                self.routes[f"{prefix}/{path.name}"] = path.read_bytes()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _default_caps():
    """Commands run in this process leave their config's caps as the process's (uniemo.data.limits.use_limits):
    put the defaults back for the next test (and the rest of the session)."""
    from uniemo.data.limits import DEFAULT_LIMITS, use_limits

    yield
    use_limits(DEFAULT_LIMITS)


@pytest.fixture
def server():
    s = _Server({})
    yield s
    s.close()


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _sample(key: str, synth_shards: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """A well-formed sample (the first of the session's val shards, under another key)."""
    first = sorted(synth_shards.glob("val-*.tar"))[0]
    with tarfile.open(first) as tar:
        names = tar.getnames()
        stem = names[0].split(".")[0]
        return [_file(f"{key}.{n.split('.', 1)[1]}", tar.extractfile(n).read()) for n in names if n.startswith(stem)]


def _shard_folder(folder: Path, synth_shards: Path, shards: dict[str, bytes], samples: int = 1) -> Path:
    """A shard folder holding ``shards`` (name -> tar bytes, all val) with a manifest that lists their true sizes."""
    folder.mkdir(parents=True)
    shutil.copy(synth_shards / "attributes.json", folder)
    entries = []
    for name, data in shards.items():
        (folder / name).write_bytes(data)
        entries.append({"name": name, "split": "val", "source": "real", "samples": samples, "bytes": len(data)})
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": 1, "shards": entries}))
    return folder


def _read_all(folder: Path, limits: LimitsConfig | None = None, num_workers: int = 0):
    """Every val batch of ``folder`` (one pass) and the loader's counts."""
    loader = build_loader(folder, "val", rank=0, world_size=1, batch_size=4, num_workers=num_workers,
                          transform=EVAL, training=False, limits=limits or LimitsConfig())
    batches = list(loader)
    return batches, loader.stats()["skipped"]["by_reason"]


class _Evil:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint from a stranger would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _fake_run(tmp: Path, name: str) -> tuple[Path, Path]:
    """A run folder with config.yaml and a published step folder (no tensors yet): ``(run_dir, step_dir)``."""
    from uniemo.config import load_config, save_resolved
    from uniemo.training.checkpoint import (
        STATE_VERSION,
        TRAINER_STATE_FILE,
        compat_keys,
        publish,
        step_dir_name,
    )

    cfg = load_config(TINY, [f"run.output_dir={tmp / 'runs'}", f"run.name={name}", f"data.cache_dir={tmp / 'cache'}",
                             "logging.wandb.mode=disabled"])
    run_dir = tmp / "runs" / name
    step = run_dir / "checkpoints" / step_dir_name(4)
    step.mkdir(parents=True)
    state = {"version": STATE_VERSION, "step": 4, "compat": compat_keys(cfg, cfg.distributed.num_workers),
             "loader_positions": [{}] * cfg.distributed.num_workers}
    (step / TRAINER_STATE_FILE).write_text(json.dumps(state))
    save_resolved(cfg, run_dir)
    publish(run_dir, step)
    return run_dir, step


# -- 1. a shard name in a manifest is a name, never a command, a path or a URL ---------------------------------


def test_shard_name_that_is_a_command_is_refused(synth_shards, tmp_path):
    """The reported case: ``pipe:touch MARKER; cat train-000000.tar`` as a shard name, `uniemo train` (real script)."""
    marker = tmp_path / "MARKER"
    folder = _copy_shards(synth_shards, tmp_path / "shards")
    _rename_entry(folder, 0, f"pipe:touch {marker}; cat train-000000.tar")
    line = _cli(*_train_args(tmp_path, str(folder)))
    assert f"{folder / MANIFEST_FILE} entry 0: shard name 'pipe:touch {marker}; cat train-000000.tar' is not a plain" \
           " file name" in line
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_shard_names_from_an_http_server_are_names_too(synth_shards, tmp_path, server, capsys):
    """The same manifest served over HTTP, and names that are paths or URLs (a cloud metadata address stands in as a
    second local server): refused before any shard is asked for."""
    marker = tmp_path / "MARKER"
    other = _Server({})
    try:
        bad_names = [f"pipe:touch {marker}; cat train-000000.tar", "/etc/passwd.tar", "../../secret.tar",
                     f"{other.url}/latest/meta-data.tar", "-x.tar", "a b.tar", "train-000000.tar\ntouch x"]
        for i, name in enumerate(bad_names):
            folder = _copy_shards(synth_shards, tmp_path / f"served{i}")
            _rename_entry(folder, 3, name)
            server.serve_folder(f"/s{i}", folder)
            line = _main(capsys, *_train_args(tmp_path, f"{server.url}/s{i}"))
            assert f"{server.url}/s{i}/manifest.json entry 3: shard name {name!r} is not a plain file name" in line
        assert not marker.exists() and other.requests == []
        assert {method for method, _ in server.requests} == {"GET"}  # the manifests; no shard was asked for
    finally:
        other.close()


def test_remote_json_outside_uniemo_mirrors_is_refused(synth_shards, tmp_path, server, capsys):
    """A ``remote.json`` dropped into a local dataset folder would redirect every shard; only uniemo's own mirror
    folders (``<cache>/remote/<hash of the URL>/``) honour one."""
    folder = _copy_shards(synth_shards, tmp_path / "shards")
    (folder / "remote.json").write_text(json.dumps({"location": f"{server.url}/elsewhere"}))
    line = _main(capsys, *_train_args(tmp_path, str(folder)))
    assert f"{folder / 'remote.json'}: a remote.json redirects shard reads and is honoured only in uniemo's own " \
           "mirror folders" in line
    # ... also when the folder is named like a mirror but for another URL
    fake = _copy_shards(synth_shards, tmp_path / "remote" / "0123456789abcdef")
    (fake / "remote.json").write_text(json.dumps({"location": f"{server.url}/elsewhere"}))
    with pytest.raises(DataError, match="honoured only in uniemo's own mirror folders"):
        _read_all(fake)
    assert server.requests == []


def test_pipe_substitution_is_quoted():
    from uniemo.data.remote import join_location

    assert join_location("pipe:cat /data/{name}", "train-000000.tar") == "pipe:cat /data/train-000000.tar"
    for bad in ("a;b.tar", "$(touch x).tar", "../x.tar", "http://h/x.tar", "-rf.tar", ""):
        with pytest.raises(ValueError, match="not a plain file name"):
            join_location("pipe:cat /data/{name}", bad)


# -- 2. checkpoints: loaded with the restricted unpickler, no link out of the step folder ----------------------


def test_checkpoint_whose_ds_folder_links_elsewhere_is_refused(tmp_path, capsys):
    """A step folder whose ``ds/`` is a symlink to a folder holding a malicious pickle: `uniemo export` (real script)
    and `uniemo train --resume` refuse it; the pickle never runs."""
    import torch

    marker = tmp_path / "MARKER"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save({"module": _Evil(marker)}, elsewhere / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": _Evil(marker)}, elsewhere / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    run_dir, step = _fake_run(tmp_path, "linked")
    (step / "ds").symlink_to(elsewhere, target_is_directory=True)

    line = _cli("export", "--run", str(run_dir), "--out", str(tmp_path / "export"))
    assert f"refusing to load {step / 'ds'}: it is a symbolic link to {elsewhere}, outside the step folder" in line
    line = _main(capsys, *_train_args(tmp_path, "", "run.name=linked"), "--resume")
    assert f"refusing to load {step / 'ds'}: it is a symbolic link" in line
    assert not marker.exists() and not (tmp_path / "export").exists()


LOADS = r"""
import json, shutil, sys
from pathlib import Path
import deepspeed
from uniemo.distributed.env import DistEnv
from uniemo.training.checkpoint import Checkpointer, consolidated_state_dict
from uniemo.training.engine import prepare_deepspeed
from uniemo.training.safe_pickle import CheckpointFileError, check_checkpoint_folder

class Evil:
    def __reduce__(self):
        return (__import__("os").system, ("touch " + sys.argv[2],))

def plant(path):
    torch.save({"module": Evil(), "optimizer_state_dict": Evil()}, path)

def refused(call, name):
    try:
        call()
    except CheckpointFileError as exc:
        print("REFUSED", exc)
        assert "\n" not in str(exc) and name in str(exc) and "would run code when unpickled" in str(exc), str(exc)
        return
    raise AssertionError(f"{name}: not refused")

prepare_deepspeed()
run = Path(sys.argv[1])
step = run / "checkpoints" / "step-000001"
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
          "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
loss = engine(torch.ones(2, 4)).sum()
engine.backward(loss)
engine.step()
engine.save_checkpoint(str(step), tag="ds")
(step / "rng").mkdir()
torch.save({"torch": torch.get_rng_state(), "python": [3, [0] * 625, None], "numpy": ["MT19937", [0] * 624, 0, 0, 0.0]},
           step / "rng" / "rank-00000.pt")
(step / "trainer_state.json").write_text(json.dumps({"version": 1, "step": 1, "compat": {}, "loader_positions": [{}]}))
(step / "COMPLETE").write_text("x\n")
(run / "checkpoints" / "latest").write_text("step-000001\n")
clean = run / "clean"
shutil.copytree(step / "ds", clean)
checkpointer = Checkpointer(run, DistEnv(0, 1, 0, 1, 0, "single"), keep=3)

# A clean folder passes the driver's early check and loads (the safe engine reads DeepSpeed's real files).
check_checkpoint_folder(step)
weights = consolidated_state_dict(step)
assert set(weights) == {"0.weight", "0.bias", "1.weight", "1.bias"}, sorted(weights)
checkpointer.load(engine, step, {})

# Swapped after the check: the loads themselves refuse, each naming the file.
model_file = step / "ds" / "mp_rank_00_model_states.pt"
optim_file = step / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
plant(model_file)
refused(lambda: consolidated_state_dict(step), model_file.name)      # zero_to_fp32's own torch.load
refused(lambda: checkpointer.load(engine, step, {}), model_file.name)  # DeepSpeed's engine
shutil.copy(clean / model_file.name, model_file)
plant(optim_file)
refused(lambda: consolidated_state_dict(step), optim_file.name)        # uniemo's own load
refused(lambda: checkpointer.load(engine, step, {}), optim_file.name)  # DeepSpeed's ZeRO shard load
shutil.copy(clean / optim_file.name, optim_file)
plant(step / "rng" / "rank-00000.pt")
refused(lambda: checkpointer.load(engine, step, {}), "rank-00000.pt")  # the RNG file

# A file linked from outside the step folder (clean content) is refused too.
shutil.copy(clean / optim_file.name, run / "outside.pt")
optim_file.unlink()
optim_file.symlink_to(run / "outside.pt")
for call in (lambda: consolidated_state_dict(step), lambda: checkpointer.load(engine, step, {})):
    try:
        call()
        raise AssertionError("a link out of the step folder was followed")
    except CheckpointFileError as exc:
        assert "outside the step folder" in str(exc), str(exc)
print("DONE")
"""


def test_checkpoint_loads_themselves_refuse_code_after_the_check(tmp_path):
    """No check-then-load window: a real ZeRO-2 checkpoint passes the early check, then a file is swapped for a
    malicious pickle; DeepSpeed's engine load, zero_to_fp32, uniemo's own loads and the RNG load each refuse it."""
    marker = tmp_path / "MARKER"
    out = run_gloo_child(LOADS, str(tmp_path / "run"), str(marker), timeout=300)
    assert out.returncode == 0 and "DONE" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("REFUSED") == 5
    assert not marker.exists()


# -- 3. identifiers and the batch script ------------------------------------------------------------------------


def test_newline_in_run_name_never_reaches_the_batch_script(tmp_path, capsys):
    """The reported case: a newline in ``run.name`` would end an ``#SBATCH`` comment and run the next line."""
    marker = tmp_path / "MARKER"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run:\n  name: \"x\\ntouch {marker}\"\n  output_dir: {tmp_path / 'runs'}\n")
    line = _cli("submit", "slurm", "--dry-run", "--config", str(config))
    assert f"run.name='x\\ntouch {marker}' holds a control character (newline, tab, ...); remove it" in line
    line = _main(capsys, "submit", "slurm", "--dry-run", "--config", TINY, f"run.output_dir={tmp_path}/a\tb")
    assert "run.output_dir=" in line and "holds a control character" in line
    line = _main(capsys, "submit", "slurm", "--dry-run", "--config", TINY, f"run.output_dir={tmp_path}",
                 "--sbatch", "--comment=a\ntouch x")
    assert "an sbatch option '--comment=a\\ntouch x' holds a control character" in line
    for name in ("../escape", "a/b", ".hidden", "x y", "-rf"):
        line = _main(capsys, "submit", "slurm", "--dry-run", "--config", TINY, f"run.name={name}")
        assert f"run.name={name!r} is not a plain name" in line
    assert not marker.exists()


def test_batch_script_values_are_quoted_for_the_shell(tmp_path, capsys):
    """A path with shell syntax in it (legal in a folder name) is rendered quoted: the script's own assignments,
    run by bash, give back the path and run nothing."""
    marker = tmp_path / "MARKER"
    out_dir = tmp_path / f"runs $(touch {marker}) `touch {marker}`; touch {marker}"
    capsys.readouterr()
    assert main(["submit", "slurm", "--dry-run", "--config", TINY, f"run.output_dir={out_dir}", "--partition",
                 "p;touch x"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH '--partition=p;touch x'" in script
    header = script[: script.index('TASK="${SLURM_ARRAY_TASK_ID')]
    probe = subprocess.run(["bash", "-c", header + '\nprintf "%s\\n" "${RUN_DIRS[0]}"'], capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.strip() == str(out_dir / "tiny-stage1"), probe.stderr
    assert not marker.exists()


def test_sweep_point_names_are_plain_names(tmp_path):
    from uniemo.launchers.sweep import load_sweep, sanitize_name

    for text in ("../../etc", "a\nb", "-rf /", ".", "..", "x" * 300):
        name = sanitize_name(text)
        assert name[0].isalnum() and "/" not in name and "\n" not in name and len(name) <= 100, name
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {TINY}\noverrides: [run.output_dir={tmp_path / 'runs'}]\n"
                     "points:\n  - {name: \"../../../escape\\nnext\", run.seed: 1}\n  - {name: ok, run.seed: 2}\n")
    jobs = load_sweep(sweep).jobs
    assert [j.name for j in jobs] == ["escape_next,seed=1", "ok,seed=2"]
    assert all(j.run_dir.parent == tmp_path / "runs" / "sweep" for j in jobs)


def test_ray_job_entry_checks_the_config_before_writing(tmp_path):
    """The Ray job's entry point writes ``<run_dir>/launch/job.yaml``; a hostile ``run.name`` in the job's config
    must not choose where."""
    from uniemo.launchers.ray_jobs import CONFIG_ENV

    escape = tmp_path / "escape"
    text = f"run:\n  name: ../../escape\n  output_dir: {tmp_path / 'a' / 'b'}\n"
    out = subprocess.run([sys.executable, "-m", "uniemo.launchers.ray_job_entry"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, CONFIG_ENV: text})
    line = _one_line(out.returncode, out.stderr)
    assert "run.name='../../escape' is not a plain name" in line
    assert not escape.exists() and not (tmp_path / "a").exists()


# -- 4. the local SLURM cluster's state folder -------------------------------------------------------------------


def _slurm_missing() -> str | None:
    missing = [t for t in ("slurmctld", "slurmd", "scontrol", "sinfo", "munged") if shutil.which(t) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): run `bash slurm/dev/install.sh`"
    if os.geteuid() != 0:
        return "the local SLURM cluster script needs root"
    return None


def _start_cluster(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm/dev/start-local-cluster.sh"), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_local_cluster_refuses_a_state_folder_someone_else_made(tmp_path):
    """The reported case: a local user who makes the (formerly fixed) state folder first would choose munge's key
    and slurm.conf of a root-run slurmd. The script refuses such a folder before writing anything into it."""
    reason = _slurm_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: this case must run)")
        pytest.skip(reason)
    import pwd

    nobody = pwd.getpwnam("nobody")
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "munge").mkdir()
    (planted / "munge" / "munge.key").write_bytes(b"the attacker's key" * 64)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (planted / "slurm.conf").symlink_to(victim)
    for path in (planted, planted / "munge", planted / "munge" / "munge.key"):
        os.lchown(path, nobody.pw_uid, nobody.pw_gid)
    cases = []
    out = _start_cluster("--dir", str(planted))
    cases.append((out, f"{planted} is owned by nobody, not root"))
    os.lchown(planted, 0, 0)
    planted.chmod(0o777)
    out = _start_cluster("--dir", str(planted))
    cases.append((out, f"{planted} can be written by others (mode 777)"))
    link = tmp_path / "link"
    link.symlink_to(planted)
    out = _start_cluster("--dir", str(link))
    cases.append((out, f"{link} is a symbolic link"))
    for out, expected in cases:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], out.stderr
        assert out.stdout == ""  # no export line: nothing started
    assert victim.read_text() == "untouched\n"
    assert (planted / "munge" / "munge.key").read_bytes() == b"the attacker's key" * 64
    assert not (planted / "pids").exists()


def test_local_cluster_never_falls_back_to_auth_none(tmp_path):
    """Without munged, the script stops and says how to go on, instead of silently starting without
    authentication; ``--auth none`` is taken only when given, with a warning."""
    reason = _slurm_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: this case must run)")
        pytest.skip(reason)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("slurmctld", "slurmd", "scontrol", "sinfo"):  # SLURM without munged
        (bin_dir / tool).symlink_to(shutil.which(tool))
    state = tmp_path / "state"
    out = _start_cluster("--dir", str(state), env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "munged is not installed" in lines[0], out.stderr
    assert "--auth none" in lines[0] and not state.exists()


# -- 5. caps: manifests, fetched and decompressed bytes, pixels --------------------------------------------------


def test_decompression_bombs_are_refused_by_the_caps(synth_shards, tmp_path):
    """A gzip tar whose one member inflates to 64 MiB (over a 1 MiB member cap), an xz tar of many small members
    (over a 2 MiB shard cap), and a tar header that claims a 1 TiB member (over the default cap, read from the header
    alone): each is one line naming the cap, not a read of gigabytes. Through a loader worker process as well."""
    bomb = _tar_bytes([*_sample("ok", synth_shards), _file("bomb.jpg", bytes(64 << 20))], mode="w:gz")
    assert len(bomb) < 1 << 20
    folder = _shard_folder(tmp_path / "gz", synth_shards, {"val-000000.tar": bomb}, samples=2)
    for workers in (0, 1):
        with pytest.raises(DataError) as info:
            _read_all(folder, LimitsConfig(max_member_bytes=1 << 20), num_workers=workers)
        message = str(info.value)
        assert "\n" not in message and "member 'bomb.jpg' holds 67,108,864 bytes: over data.limits.max_member_bytes" \
            " = 1.0 MiB; refused" in message, message

    many = [_file(f"k{i:03d}.bin", bytes(256 << 10)) for i in range(40)]
    folder = _shard_folder(tmp_path / "xz", synth_shards, {"val-000000.tar": _tar_bytes(many, mode="w:xz")})
    with pytest.raises(DataError, match=r"its members hold more than the cap: over data\.limits\.max_shard_bytes = "
                                        r"2\.0 MiB"):
        _read_all(folder, LimitsConfig(max_shard_bytes=2 << 20))

    info = tarfile.TarInfo("huge.jpg")
    info.size = 1 << 40
    header = gzip.compress(info.tobuf(tarfile.PAX_FORMAT) + bytes(10240))
    folder = _shard_folder(tmp_path / "liar", synth_shards, {"val-000000.tar": header})
    with pytest.raises(DataError, match=r"member 'huge\.jpg' holds 1,099,511,627,776 bytes: over data\.limits\."
                                        r"max_member_bytes = 256\.0 MiB"):
        _read_all(folder)


def test_manifest_caps_apply_before_any_request(synth_shards, tmp_path, server, capsys):
    """A manifest of 200,000 entries (over the default 100,000) from an HTTP server: refused after its one GET,
    without 200,000 HEAD requests; one over a byte cap, locally and over HTTP; an endless manifest from a ``pipe:``
    command is read no further than the cap."""
    shards = [{"name": f"train-{i:06d}.tar", "split": "train", "samples": 1, "bytes": 10240} for i in range(200_000)]
    manifest = {"format": 1, "shards": shards}
    server.routes["/huge/manifest.json"] = json.dumps(manifest).encode()
    server.routes["/huge/attributes.json"] = (synth_shards / "attributes.json").read_bytes()
    line = _main(capsys, *_train_args(tmp_path, f"{server.url}/huge"))
    assert f"{server.url}/huge/manifest.json lists 200,000 shards: over data.limits.max_manifest_entries = 100,000 " \
           "shards; refused" in line
    assert server.requests == [("GET", "/huge/manifest.json"), ("GET", "/huge/attributes.json")]

    folder = _copy_shards(synth_shards, tmp_path / "shards")
    line = _main(capsys, *_train_args(tmp_path, str(folder), "data.limits.max_manifest_bytes=1024"))
    assert f"{folder / MANIFEST_FILE} is larger than the cap: over data.limits.max_manifest_bytes = 1.0 KiB" in line
    server.serve_folder("/plain", folder)
    line = _main(capsys, *_train_args(tmp_path, f"{server.url}/plain", "data.limits.max_manifest_bytes=1024"))
    assert f"{server.url}/plain/manifest.json is larger than the cap: over data.limits.max_manifest_bytes" in line

    line = _main(capsys, *_train_args(tmp_path, "pipe:yes {name}", "data.limits.max_manifest_bytes=65536"))
    assert "pipe:yes manifest.json is larger than the cap: over data.limits.max_manifest_bytes = 64.0 KiB" in line


def _endless_tar(listed: int, sent: list[int]) -> Callable:
    """An HTTP answer that tells HEAD the listed size but streams, on GET, a tar member header of 100 MB and then
    zeros without end (until the reader hangs up); ``sent`` counts the bytes it got out."""

    def answer(handler: BaseHTTPRequestHandler, method: str) -> None:
        handler.send_response(200)
        if method == "HEAD":
            handler.send_header("Content-Length", str(listed))
            handler.end_headers()
            return
        handler.end_headers()
        info = tarfile.TarInfo("key.jpg")
        info.size = 100_000_000
        try:
            handler.wfile.write(info.tobuf(tarfile.PAX_FORMAT))
            while sent[0] < 1 << 30:
                handler.wfile.write(bytes(1 << 16))
                sent[0] += 1 << 16
        except OSError:
            pass

    return answer


def test_a_server_that_lies_about_sizes_is_read_no_further(synth_shards, tmp_path, server):
    """The manifest lists a shard of 10,240 bytes, the server's HEAD agrees, and its GET never ends: the loader
    stops one byte past the listed size and counts a corrupt shard. A ``pipe:`` command that never ends likewise."""
    manifest = {"format": 1, "shards": [{"name": "val-000000.tar", "split": "val", "source": "real", "samples": 1,
                                         "bytes": 10240}]}
    server.routes["/lie/manifest.json"] = json.dumps(manifest).encode()
    server.routes["/lie/attributes.json"] = (synth_shards / "attributes.json").read_bytes()
    sent = [0]
    server.routes["/lie/val-000000.tar"] = _endless_tar(10240, sent)
    data_cfg = DataConfig(shards=f"{server.url}/lie", cache_dir=str(tmp_path / "cache"))
    folder = mirror_source(data_cfg.shards, data_cfg, key="data.shards", require_attributes=True)
    batches, skipped = _read_all(folder)
    assert batches == [] and skipped == {"corrupt_shard": 1}
    assert sent[0] < 64 << 20  # what the socket buffers took before the reader hung up

    pipe_folder = tmp_path / "pipe-src"
    pipe_folder.mkdir()
    (pipe_folder / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(synth_shards / "attributes.json", pipe_folder)
    command = f"pipe:sh -c 'if [ \"$1\" = val-000000.tar ]; then yes; else cat {pipe_folder}/\"$1\"; fi' sh {{name}}"
    data_cfg = DataConfig(shards=command, cache_dir=str(tmp_path / "cache"))
    folder = mirror_source(command, data_cfg, key="data.shards", require_attributes=True)
    batches, skipped = _read_all(folder)
    assert batches == [] and skipped == {"corrupt_shard": 1}


def test_manifest_entries_that_lie_are_refused(synth_shards, tmp_path, capsys):
    folder = _copy_shards(synth_shards, tmp_path / "shards")
    good = json.loads((folder / MANIFEST_FILE).read_text())
    for field, value in (("bytes", -1), ("samples", -5), ("samples", True), ("bytes", "40960"), ("split", ["val"])):
        bad = json.loads(json.dumps(good))
        bad["shards"][2][field] = value
        (folder / MANIFEST_FILE).write_text(json.dumps(bad))
        line = _main(capsys, *_train_args(tmp_path, str(folder)))
        assert f"{folder / MANIFEST_FILE} entry 2 (" in line and "samples, bytes counts" in line
    (folder / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)  # nesting deep enough to exhaust the parser
    line = _main(capsys, *_train_args(tmp_path, str(folder)))
    assert f"{folder / MANIFEST_FILE}: unreadable manifest" in line


def test_images_over_the_pixel_cap_are_refused_from_their_header(synth_shards, tmp_path, capsys):
    """A 8193 x 8193 PNG (a few kilobytes; 67 megapixels decoded): `uniemo data shards --on-error fail` names the
    cap; by default it is skipped and counted; in a shard the loader skips it as ``image_too_large``."""
    from PIL import Image

    png = io.BytesIO()
    Image.new("1", (8193, 8193)).save(png, format="PNG")
    assert len(png.getvalue()) < 1 << 20
    root = tmp_path / "photos"
    (root / "awe").mkdir(parents=True)
    (root / "awe" / "bomb.png").write_bytes(png.getvalue())
    line = _main(capsys, "data", "shards", "--source", "folder", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--on-error", "fail", "--no-progress")
    assert f"{root / 'awe' / 'bomb.png'}: image is 8193x8193 = 67,125,249 pixels, over data.limits.max_image_pixels " \
           "= 67,108,864; resize it" in line

    members = [*_sample("ok", synth_shards)]
    image_member = next(i for i, (info, _) in enumerate(members) if info.name.endswith((".jpg", ".png")))
    info, _ = members[image_member]
    members[image_member] = _file(info.name.rsplit(".", 1)[0] + ".png", png.getvalue())
    folder = _shard_folder(tmp_path / "shard", synth_shards, {"val-000000.tar": _tar_bytes(members)})
    batches, skipped = _read_all(folder)
    assert batches == [] and skipped == {"image_too_large": 1}


# -- 6. and more: tar tricks, redirects, YAML tags, control characters, planted temporary files -----------------


def test_tar_path_tricks_and_links_make_a_corrupt_shard(synth_shards, tmp_path):
    """Members named ``../x``, ``/abs/x``, a symlink member to a secret and a hard link: nothing is extracted
    anywhere, and each such shard is counted corrupt; the good shard beside them is read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read\n")
    link = tarfile.TarInfo("key.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, str(secret)
    hard = tarfile.TarInfo("key.cls")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    shards = {
        "val-000000.tar": _tar_bytes(_sample("good", synth_shards)),
        "val-000001.tar": _tar_bytes([_file("../escape.jpg", b"x"), *_sample("a", synth_shards)]),
        "val-000002.tar": _tar_bytes([_file("/abs/path.jpg", b"x"), *_sample("b", synth_shards)]),
        "val-000003.tar": _tar_bytes([(link, None), *_sample("c", synth_shards)]),
        "val-000004.tar": _tar_bytes([(hard, None), *_sample("d", synth_shards)]),
    }
    folder = _shard_folder(tmp_path / "tricks", synth_shards, shards)
    batches, skipped = _read_all(folder)
    assert [k for b in batches for k in b["key"]] == ["good"]
    assert skipped == {"corrupt_shard": 4}
    assert not (tmp_path / "escape.jpg").exists() and not Path("/abs/path.jpg").exists()


def test_http_redirects_to_other_schemes_are_not_followed(synth_shards, tmp_path, server, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(read_manifest(synth_shards)))

    def redirect(to: str) -> Callable:
        def answer(handler: BaseHTTPRequestHandler, method: str) -> None:
            handler.send_response(302)
            handler.send_header("Location", to)
            handler.end_headers()
        return answer

    server.routes["/file/manifest.json"] = redirect(f"file://{secret}")
    server.routes["/ftp/manifest.json"] = redirect("ftp://127.0.0.1:1/manifest.json")
    line = _main(capsys, *_train_args(tmp_path, f"{server.url}/file"))
    assert f"cannot read {server.url}/file/manifest.json (HTTP 302" in line and f"file://{secret}" in line
    line = _main(capsys, *_train_args(tmp_path, f"{server.url}/ftp"))
    assert "redirected to 'ftp://127.0.0.1:1/manifest.json', which is not http(s)" in line
    assert not (tmp_path / "cache" / "remote").exists() or not any((tmp_path / "cache" / "remote").rglob("*.json"))


def test_yaml_tags_in_configs_and_sweeps_run_nothing(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    payload = f"!!python/object/apply:os.system [\"touch {marker}\"]"
    config = tmp_path / "evil.yaml"
    config.write_text(f"run:\n  name: {payload}\n")
    line = _cli("config", "show", "--config", str(config))
    assert f"config file {config} is not valid YAML at line 2; fix the syntax" in line
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {TINY}\ngrid:\n  training.lr_head: {payload}\n")
    line = _main(capsys, "sweep", str(sweep), "--dry-run")
    assert f"sweep {sweep}: is not valid YAML" in line
    line = _main(capsys, "config", "show", "--config", TINY, f"run.seed={payload}")
    assert "run.seed must be an integer" in line
    assert not marker.exists()


def test_control_characters_in_any_config_value_are_refused(tmp_path, capsys):
    for key in ("data.cache_dir", "data.shards", "training.init_from", "logging.wandb.project"):
        config = tmp_path / "c.yaml"
        section, *rest = key.split(".")
        nested = "".join(f"{'  ' * (i + 1)}{part}:\n" for i, part in enumerate(rest[:-1]))
        config.write_text(f"{section}:\n{nested}{'  ' * len(rest)}{rest[-1]}: \"a\\rb\"\n")
        line = _main(capsys, "config", "show", "--config", str(config))
        # A path is shown resolved against the config file's folder (uniemo.config.paths).
        assert f"{key}='" in line and "a\\rb' holds a control character" in line, line


def test_fixed_temporary_names_are_never_followed(tmp_path):
    """Writers used to go through fixed ``X.tmp`` names; a symlink planted there (group-writable storage) pointed
    their write at another file. Every writer now takes a fresh ``mkstemp`` name beside its target."""
    from uniemo.config import load_config, save_resolved
    from uniemo.launchers.job import resolve_job, write_job_config
    from uniemo.logging import truncate_metrics
    from uniemo.run_files import PIPELINE_VERSION, write_pipeline_state

    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    run = tmp_path / "runs" / "tiny-stage1"
    (run / "launch").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    for planted in ("config.yaml.tmp", ".config.yaml.tmp", "launch/job.yaml.tmp", ".metrics.jsonl.tmp",
                    "pipeline.json.tmp"):
        (run / planted).symlink_to(victim)
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'runs'}"])
    save_resolved(cfg, run)
    write_job_config(resolve_job(TINY, [f"run.output_dir={tmp_path / 'runs'}"]))
    truncate_metrics(run / "metrics.jsonl", 1)
    write_pipeline_state(run, {"stages": {}})
    assert victim.read_text() == "untouched\n"
    assert (run / "config.yaml").is_file() and not (run / "config.yaml").is_symlink()
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert json.loads((run / "pipeline.json").read_text()) == {"stages": {}, "version": PIPELINE_VERSION}
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()] == []


def test_limits_are_config_keys(capsys):
    line = _main(capsys, "config", "show", "--config", TINY, "data.limits.max_image_pixels=0")
    assert "data.limits.max_image_pixels must be > 0, got 0" in line
    capsys.readouterr()
    assert main(["config", "show", "--config", TINY, "data.limits.max_member_bytes=1048576"]) == 0
    assert "max_member_bytes: 1048576" in capsys.readouterr().out

