"""Launchers: run one resolved config locally, as a SLURM job, or as a Ray job; expand sweeps (no training logic).

- :mod:`uniemo.launchers.job`: one job = one resolved config with absolute paths (``<run_dir>/launch/job.yaml``);
- :mod:`uniemo.launchers.slurm`: render ``slurm/templates/train.sbatch``, ``sbatch``, poll ``scontrol``;
- :mod:`uniemo.launchers.ray_jobs`: Ray job submission with this folder as ``working_dir``;
- :mod:`uniemo.launchers.sweep`: a sweep file → one job per point;
- :mod:`uniemo.launchers.cli`: ``uniemo submit slurm|ray`` and ``uniemo sweep``.
"""
