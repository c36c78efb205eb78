"""Sweeps and launch rendering, fast: expansion, naming, errors naming the key, dry-run resources, the batch script.

The real SLURM and Ray runs are in test_launch_slurm.py and test_launch_ray.py (slow).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uniemo.cli import main as cli_main
from uniemo.errors import ConfigError, UserError
from uniemo.launchers.job import check_run_dirs, load_job_config, resolve_job, write_job_config
from uniemo.launchers.ray_jobs import CONFIG_ENV, UPLOAD_EXCLUDES, normalize_address, runtime_env_for
from uniemo.launchers.slurm import parse_scontrol, plan_resources, render_script, render_template
from uniemo.launchers.sweep import format_value, load_sweep, point_names, sanitize_name

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_stage1.yaml"
EXAMPLE = REPO / "configs" / "sweeps" / "tiny_stage1_lr.yaml"


def _write_sweep(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_grid_times_points_expands_in_order_with_names_dirs_and_group(tmp_path):
    path = _write_sweep(
        tmp_path,
        {
            "name": "abl",
            "base": str(TINY),
            "overrides": ["training.steps=4"],
            "grid": {"run.seed": [0, 1]},
            "points": [
                {"name": "full"},
                {"name": "no-scene", "model.understanding.use_scene_queries": False},
            ],
        },
    )
    sweep = load_sweep(path, [f"run.output_dir={tmp_path / 'runs'}"])
    names = [job.name for job in sweep.jobs]
    assert names == [
        "full,seed=0",
        "full,seed=1",
        "no-scene,seed=0,use_scene_queries=false",
        "no-scene,seed=1,use_scene_queries=false",
    ]
    assert sweep.output_dir == tmp_path / "runs" / "abl"
    assert len({job.run_dir for job in sweep.jobs}) == 4
    for job, point in zip(sweep.jobs, sweep.values, strict=True):
        cfg = job.config
        assert job.run_dir == tmp_path / "runs" / "abl" / job.name
        assert cfg.run.name == job.name and cfg.logging.wandb.group == "abl"
        assert cfg.training.steps == 4  # sweep overrides reach every point
        assert cfg.run.seed == point["run.seed"]
        assert cfg.model.understanding.use_scene_queries == point.get("model.understanding.use_scene_queries", True)
        assert cfg.training.stage == 1  # the rest comes from the base config


def test_mapping_values_merge_into_the_base_section(tmp_path):
    path = _write_sweep(tmp_path, {"base": str(TINY), "points": [{"model.understanding": {"depth": 2}},
                                                                  {"model": {"understanding": {"depth": 3}}}]})
    sweep = load_sweep(path)
    assert [job.config.model.understanding.depth for job in sweep.jobs] == [2, 3]
    assert all(job.config.model.understanding.preset == "tiny" for job in sweep.jobs)  # the rest is kept


def test_example_sweep_has_two_points_of_tiny_stage1():
    sweep = load_sweep(EXAMPLE)
    assert [job.name for job in sweep.jobs] == ["lr_queries=0.0005", "lr_queries=0.001"]
    assert [job.config.training.lr_queries for job in sweep.jobs] == [5e-4, 1e-3]
    assert all(job.config.distributed.num_workers == 1 for job in sweep.jobs)
    assert sweep.output_dir == REPO / "runs" / "tiny-stage1-lr"  # relative output_dir made absolute


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_expands(path):
    sweep = load_sweep(path)
    assert len(sweep.jobs) >= 2
    assert len({job.run_dir for job in sweep.jobs}) == len(sweep.jobs)
    assert all(job.config.logging.wandb.group == sweep.name for job in sweep.jobs)


def test_point_names_use_shortest_unique_key_suffix_and_stay_unique():
    values = [{"run.seed": 0, "data.synthetic.seed": 0}, {"run.seed": 1, "data.synthetic.seed": 0},
              {"run.seed": 1, "data.synthetic.seed": 2}]
    assert point_names(values, [None] * 3) == [
        "run.seed=0,synthetic.seed=0",
        "run.seed=1,synthetic.seed=0",
        "run.seed=1,synthetic.seed=2",
    ]
    # A key with one value does not distinguish points and is left out of the name.
    assert point_names([{"a.x": 1, "a.y": 5}, {"a.x": 2, "a.y": 5}], [None, None]) == ["x=1", "x=2"]
    # Names that collide after cleaning get the index appended.
    assert point_names([{"a.s": "p/q"}, {"a.s": "p q"}], [None, None]) == ["s=p_q-0", "s=p_q-1"]
    assert format_value(1e-5) == "1e-05" and format_value(True) == "true" and format_value(None) == "none"
    assert sanitize_name("a b/c$d") == "a_b_c_d"
    assert len(sanitize_name("x" * 300)) == 100


def test_unknown_key_in_grid_names_key_point_and_suggestion(tmp_path):
    path = _write_sweep(tmp_path, {"base": str(TINY), "grid": {"training.lr_qeries": [1e-3, 1e-4]}})
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    message = str(err.value)
    assert "training.lr_qeries" in message and "did you mean training.lr_queries" in message
    assert str(path) in message and "point lr_qeries=0.001" in message


def test_unknown_key_in_listed_point_and_wrong_type_name_the_key(tmp_path):
    path = _write_sweep(tmp_path, {"base": str(TINY), "points": [{"model.understanding.depht": 2}]})
    with pytest.raises(ConfigError, match=r"unknown config key model\.understanding\.depht"):
        load_sweep(path)
    path = _write_sweep(tmp_path, {"base": str(TINY), "grid": {"training.steps": ["many", 3]}})
    with pytest.raises(ConfigError, match=r"training\.steps must be an integer, got 'many'"):
        load_sweep(path)


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ({"gird": {"run.seed": [0, 1]}}, r"unknown key 'gird'.*name, base, overrides, grid, points"),
        ({"name": "x"}, r"neither 'grid' nor 'points'"),
        ({"grid": {"run.seed": 3}}, r"grid key run\.seed must be a non-empty list"),
        ({"grid": {"run.seed": [1, 1]}}, r"points 0 and 1 are the same"),
        ({"grid": {"run.seed": [0, 1]}, "points": [{"run.seed": 2}]}, r"run\.seed is both in 'grid'"),
        ({"base": "missing.yaml", "grid": {"run.seed": [0, 1]}}, r"base config .*missing\.yaml does not exist"),
        ({"overrides": "training.steps=3", "grid": {"run.seed": [0, 1]}}, r"'overrides' must be a list"),
    ],
)
def test_malformed_sweep_files_fail_with_one_line(tmp_path, body, pattern):
    with pytest.raises(UserError, match=pattern):
        load_sweep(_write_sweep(tmp_path, body))


def test_command_line_override_of_a_swept_key_is_refused(tmp_path):
    path = _write_sweep(tmp_path, {"base": str(TINY), "grid": {"run.seed": [0, 1]}})
    with pytest.raises(UserError, match=r"names run\.seed, which the sweep .* varies"):
        load_sweep(path, ["run.seed=3"])


def test_resolve_job_makes_paths_absolute_and_refuses_existing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # command-line paths and defaults are relative to the submitting folder
    job = resolve_job(TINY, ["run.output_dir=out", "data.shards=", "model.generator.path=gen"])
    assert job.run_dir == tmp_path / "out" / "tiny-stage1"
    assert job.config.data.cache_dir == str(tmp_path / ".cache" / "uniemo")
    assert job.config.data.shards == ""  # empty stays "not set"
    assert job.config.model.generator.path == str(tmp_path / "gen")

    check_run_dirs([job], resume=False)
    (job.run_dir / "checkpoints").mkdir(parents=True)
    (job.run_dir / "checkpoints" / "latest").write_text("step-000002\n")
    with pytest.raises(UserError, match="already has checkpoints; pass --resume"):
        check_run_dirs([job], resume=False)
    check_run_dirs([job], resume=True)
    with pytest.raises(UserError, match="share the run directory"):
        check_run_dirs([job, job], resume=True)

    written = write_job_config(job)
    assert written == job.run_dir / "launch" / "job.yaml"
    assert load_job_config(written) == job.config  # the job runs exactly the resolved config


def test_plan_resources_spreads_workers_and_sets_one_gpu_per_worker(tmp_path):
    job = resolve_job(TINY, [f"run.output_dir={tmp_path}"])
    fitted, res = plan_resources(job, nodes=2, gpus_per_node=4, partition="gpu", time="01:00:00")
    assert fitted.config.distributed.num_workers == 8 and fitted.config.distributed.gpus_per_worker == 1.0
    assert (res.nodes, res.gpus_per_node, res.cpus_per_node) == (2, 4, 4)
    assert job.config.distributed.num_workers == 2  # the input job is not changed
    _, res = plan_resources(job)  # the tiny config: 2 CPU workers on one node
    assert (res.nodes, res.gpus_per_node, res.cpus_per_node) == (1, 0, 2)
    with pytest.raises(UserError, match=r"num_workers=2 does not spread evenly over --nodes 3"):
        plan_resources(job, nodes=3)


def test_submit_slurm_dry_run_prints_resources_and_writes_nothing(tmp_path, capsys):
    rc = cli_main(
        [
            "submit", "slurm", "--config", str(TINY), f"run.output_dir={tmp_path}", "--nodes", "2",
            "--gpus-per-node", "4", "--partition", "gpu", "--time", "01:00:00", "--mem", "64G",
            "--sbatch=--constraint=a100", "--dry-run", "training.steps=7",
        ]
    )
    script = capsys.readouterr().out
    assert rc == 0
    for line in [
        "#SBATCH --job-name=uniemo-tiny-stage1",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:00:00",
        "#SBATCH --mem=64G",
        "#SBATCH --constraint=a100",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path}/tiny-stage1/launch/slurm-%j.out",
        f"CONFIGS=({tmp_path}/tiny-stage1/launch/job.yaml)",
        "GPUS_PER_NODE=4",
        "RESUME=0",
    ]:
        assert line in script.splitlines(), line
    assert "--array" not in script
    assert not (tmp_path / "tiny-stage1").exists()  # a dry run writes nothing


def test_sweep_slurm_dry_run_renders_one_array(tmp_path, capsys):
    rc = cli_main(["sweep", str(EXAMPLE), "--backend", "slurm", "--dry-run", f"run.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert "#SBATCH --array=0-1" in lines and "#SBATCH --cpus-per-task=1" in lines
    assert f"#SBATCH --output={tmp_path}/tiny-stage1-lr/launch/slurm-%A_%a.out" in lines
    sweep_dir = tmp_path / "tiny-stage1-lr"
    configs = f"CONFIGS=({sweep_dir}/lr_queries=0.0005/launch/job.yaml {sweep_dir}/lr_queries=0.001/launch/job.yaml)"
    assert configs in lines
    assert "REDIRECT_LOG=1" in lines
    assert not sweep_dir.exists()


def test_sweep_local_dry_run_lists_commands(tmp_path, capsys):
    assert cli_main(["sweep", str(EXAMPLE), "--dry-run", f"run.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.count("would run: uniemo train --config") == 2
    assert "[1] lr_queries=0.001: training.lr_queries=0.001" in out


def test_rendered_scripts_are_valid_bash(tmp_path):
    job, res = plan_resources(resolve_job(TINY, [f"run.output_dir={tmp_path}"]), nodes=2, gpus_per_node=2)
    sweep = load_sweep(EXAMPLE, [f"run.output_dir={tmp_path}"])
    for script in (
        render_script([job], res, job_name="j", output=str(tmp_path / "o.out")),
        render_script(sweep.jobs, res, job_name="a", output=str(tmp_path / "a.out"), array=True, resume=True),
    ):
        path = tmp_path / "s.sbatch"
        path.write_text(script)
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "{{" not in script


def test_render_template_refuses_unknown_placeholders():
    assert render_template("a={{ x }} b={{y}}", {"x": "1", "y": "2"}) == "a=1 b=2"
    with pytest.raises(UserError, match=r"\{\{zz\}\}"):
        render_template("{{zz}}", {})


def test_parse_scontrol_keeps_values_with_spaces():
    text = (
        "JobId=12 ArrayJobId=11 ArrayTaskId=1 JobName=uniemo-x JobState=RUNNING Reason=None Restarts=1 "
        "Command=/a b/c.sbatch WorkDir=/w\nJobId=13 JobState=COMPLETED ExitCode=0:0\n"
    )
    first, second = parse_scontrol(text)
    assert first["JobState"] == "RUNNING" and first["Restarts"] == "1" and first["Command"] == "/a b/c.sbatch"
    assert first["ArrayTaskId"] == "1" and second == {"JobId": "13", "JobState": "COMPLETED", "ExitCode": "0:0"}


def test_ray_runtime_env_carries_the_resolved_config_and_excludes_heavy_folders(tmp_path):
    job = resolve_job(TINY, [f"run.output_dir={tmp_path}"])
    env = runtime_env_for(job, REPO, resume=True)
    assert env["working_dir"] == str(REPO)
    assert {".venv", ".git", "runs", ".cache"} <= set(env["excludes"]) == set(UPLOAD_EXCLUDES)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(env["env_vars"][CONFIG_ENV])
    sent = load_job_config(cfg_path)
    assert sent.distributed.ray_address == "auto" and sent.run.output_dir == str(tmp_path)
    assert job.config.distributed.ray_address == ""  # the job itself is not changed
    assert env["env_vars"]["UNIEMO_JOB_RESUME"] == "1"
    assert normalize_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert normalize_address("https://h:1/") == "https://h:1"
    with pytest.raises(UserError, match="--address is empty"):
        normalize_address(" ")


def test_submit_ray_needs_an_address_and_config_or_logs(capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert cli_main(["submit", "ray", "--config", str(TINY)]) == 2
    assert "give --address" in capsys.readouterr().err
    assert cli_main(["submit", "ray", "--address", "127.0.0.1:1"]) == 2
    assert "give --config FILE" in capsys.readouterr().err


def test_submit_slurm_without_sbatch_names_the_install_script(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    rc = cli_main(["submit", "slurm", "--config", str(TINY), f"run.output_dir={tmp_path}"])
    assert rc == 2
    assert "slurm/dev/install.sh" in capsys.readouterr().err


def test_cli_help_lists_the_launch_commands():
    out = subprocess.run([sys.executable, "-m", "uniemo", "--help"], capture_output=True, text=True).stdout
    assert "submit" in out and "sweep" in out
