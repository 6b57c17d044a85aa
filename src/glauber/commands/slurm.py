"""``glauber slurm``: check a training config (and its batch over nodes x GPUs), fill in ``experiments/slurm/train.sbatch``,
write it to ``<run_dir>/job.sbatch`` and submit it with ``sbatch`` (``--dry-run`` prints it); see docs/SCALING.md."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data_modules.paths import PROJECT_ROOT
from glauber.config import batch_layout, load_config

TEMPLATE = PROJECT_ROOT / "experiments" / "slurm" / "train.sbatch"
_FIELD = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class SlurmJob:
    """What a rendered job script holds; ``gpus_per_node`` tasks per node, CPU processes with ``cpu`` (tests and CI)."""

    config: str
    run_dir: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 8
    cpu: bool = False
    time: str = "48:00:00"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int = 8
    job_name: str = "glauber"
    signal_seconds: int = 90
    environment: list[str] = field(default_factory=list)  # KEY=VALUE, exported before srun
    sbatch_options: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --qos=high
    python: str = sys.executable
    workdir: str = str(PROJECT_ROOT)


def render(job: SlurmJob, template: str | Path = TEMPLATE) -> str:
    """The job script: the template with every ``{{field}}`` filled in (an unknown field is an error)."""
    if job.nodes < 1 or job.gpus_per_node < 1 or job.cpus_per_task < 1:
        raise ValueError(
            "--nodes, --gpus-per-node and --cpus-per-task must be >= 1 "
            f"(got {job.nodes}, {job.gpus_per_node}, {job.cpus_per_task})"
        )
    if re.search(r"\s", job.run_dir) or not Path(job.run_dir).is_absolute():
        raise ValueError(f"run directory {job.run_dir!r} must be an absolute path without spaces (it is also the log path)")
    for kv in job.environment:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", kv):
            raise ValueError(f"--env {kv!r}: expected KEY=VALUE")
    options = [] if job.cpu else [f"--gres=gpu:{job.gpus_per_node}"]
    options += [f"--partition={job.partition}"] * bool(job.partition) + [f"--account={job.account}"] * bool(job.account)
    options += list(job.sbatch_options)
    values = {
        "job_name": job.job_name,
        "nodes": str(job.nodes),
        "tasks_per_node": str(job.gpus_per_node),
        "cpus_per_task": str(job.cpus_per_task),
        "time": job.time,
        "signal_seconds": str(job.signal_seconds),
        "run_dir": job.run_dir,
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in options),
        "workdir": shlex.quote(job.workdir),
        "environment": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in (kv.split("=", 1) for kv in job.environment)),
        "python": shlex.quote(job.python),
        "config": shlex.quote(job.config),
        "overrides": " ".join(shlex.quote(o) for o in job.overrides),
        "train_overrides": " train.accelerator=cpu" if job.cpu else "",
    }
    text = Path(template).read_text()
    unknown = sorted(set(_FIELD.findall(text)) - set(values))
    if unknown:
        raise ValueError(f"template {template} has unknown fields {unknown}")
    return _FIELD.sub(lambda m: values[m.group(1)], text)


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    """Check the config as `glauber train` would (and the batch layout for nodes x GPUs) and build the job."""
    cfg = load_config(args.config, list(args.overrides))
    # a clear error now, not on the cluster
    batch_layout(cfg.train.global_batch_size, args.nodes * args.gpus_per_node, cfg.train.micro_batch_size)
    run_dir = Path(args.run_dir or cfg.train.run_dir).expanduser()
    as_given = ("nodes", "gpus_per_node", "cpu", "time", "partition", "account", "cpus_per_task", "signal_seconds", "python")
    return SlurmJob(
        config=str(Path.cwd() / args.config),  # an absolute path stays as it is
        run_dir=str((Path.cwd() / run_dir).resolve()),
        overrides=list(args.overrides),
        job_name=re.sub(r"[^A-Za-z0-9._-]+", "_", args.job_name or cfg.name) or "glauber",
        environment=list(args.env),
        sbatch_options=list(args.sbatch_option),
        workdir=str(Path.cwd()),
        **{k: getattr(args, k) for k in as_given},
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm",
        help="render the SLURM job script for a config and submit it (sbatch)",
        description="Fill in experiments/slurm/train.sbatch for a training config (one srun task per GPU, SIGUSR1 90 s "
        "before the time limit -> checkpoint and requeue, a log in the run directory) and submit it with sbatch, or print "
        "it with --dry-run. A requeued or resubmitted job continues from its run directory's newest checkpoint.",
    )
    p.add_argument("config", help="path to an experiment YAML file")
    p.add_argument("overrides", nargs="*", help="config overrides as dotted key=value pairs")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node = tasks per node (default 8)")
    p.add_argument("--cpu", action="store_true", help="CPU processes instead of GPUs: no --gres, train.accelerator=cpu")
    p.add_argument("--time", default="48:00:00", help="time limit per job, as sbatch --time (default 48:00:00)")
    p.add_argument("--partition", default=None, help="sbatch --partition")
    p.add_argument("--account", default=None, help="sbatch --account")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (data workers + 1; default 8)")
    p.add_argument("--run-dir", default=None, help="run directory (default: the config's train.run_dir)")
    p.add_argument("--job-name", default=None, help="job name (default: the config's name)")
    p.add_argument("--signal-seconds", type=int, default=90, help="SIGUSR1 this many seconds before the limit (default 90)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job, e.g. NCCL_DEBUG=WARN")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT", help="another #SBATCH option, e.g. --qos=high")
    p.add_argument("--python", default=sys.executable, help="the Python the job runs (default: this one, %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the job script, submit nothing")


def run(args: argparse.Namespace) -> None:
    job = job_from_args(args)
    script = render(job)
    if args.dry_run:
        sys.stdout.write(script)
        return
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch not found: run this on a SLURM login node (or use --dry-run to see the script)")
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # SLURM opens the log there and does not create directories
    path = run_dir / "job.sbatch"
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"sbatch {path} failed: {(done.stderr or done.stdout).strip()}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {job.nodes} node(s) x {job.gpus_per_node} {'CPU process' if job.cpu else 'GPU'}(s)")
    print(f"script {path}; log {run_dir / f'slurm-{job_id}.out'}")
