"""``glauber slurm`` and the job script, on a real local SLURM (tests/slurm_cluster.py): a 2-task job trains
experiments/tiny.yaml with DDP on CPU (gloo) to the end; the same job, signalled with SIGUSR1 mid-run,
checkpoints, requeues itself, resumes from that checkpoint in the same run directory and ends with the same
weights. Skipped, with the reason, where the SLURM/munge binaries are missing or the tests do not run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import LocalSlurm

from glauber.commands.slurm import TEMPLATE, SlurmJob, add_parser, render, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
CORPUS = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
STEPS = 30
CKPT_EVERY = 5  # train.ckpt_every_steps of the jobs


def glauber_slurm(argv: list[str]) -> str:
    """What ``glauber slurm ARGV`` prints (the subcommand as cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="glauber")
    add_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(parser.parse_args(["slurm", *argv]))
    return out.getvalue()


# -- rendering (no cluster needed) -------------------------------------------------------------------
def test_rendered_script_for_a_multi_node_gpu_run(tmp_path):
    script = glauber_slurm(
        [
            "--nodes=4",
            "--gpus-per-node=8",
            "--partition=gpu",
            "--account=proj",
            "--time=12:00:00",
            "--env=NCCL_DEBUG=INFO",
            f"--run-dir={tmp_path / 'owt'}",
            "--dry-run",
            str(ROOT / "experiments" / "owt.yaml"),
            "optim.lr=1e-4",
        ]
    )
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --time=12:00:00",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path / 'owt'}/slurm-%j.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "export NCCL_DEBUG=INFO",
    ):
        assert line in script.splitlines(), line
    assert re.search(r"^srun --kill-on-bad-exit=1 .* -m glauber train \S*owt\.yaml optim\.lr=1e-4 ", script, re.M)
    assert "train.resume=auto" in script and 'train.num_nodes="${SLURM_NNODES}"' in script
    assert 'train.devices="${SLURM_NTASKS_PER_NODE}"' in script and "{{" not in script
    header = script.split("set -euo pipefail")[0]
    assert all(not ln.strip() or ln.startswith("#") for ln in header.splitlines())  # sbatch reads every option
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "owt").exists()  # --dry-run writes nothing


def test_bad_layouts_and_configs_are_refused_before_submitting(tmp_path):
    owt = str(ROOT / "experiments" / "owt.yaml")
    with pytest.raises(ValueError, match="not divisible by devices x nodes = 24"):
        glauber_slurm(["--nodes=3", "--gpus-per-node=8", "--dry-run", owt])  # global batch 512
    with pytest.raises(ValueError, match="unknown config key 'train.nodes'"):
        glauber_slurm(["--dry-run", owt, "train.nodes=2"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        render(SlurmJob(config=owt, run_dir=str(tmp_path), environment=["NCCL_DEBUG"]))
    with pytest.raises(ValueError, match="absolute path without spaces"):
        render(SlurmJob(config=owt, run_dir="runs/x"))
    assert "{{" not in render(SlurmJob(config=owt, run_dir=str(tmp_path), cpu=True)) and TEMPLATE.is_file()


def test_checkpoint_bookkeeping_for_requeued_runs(tmp_path, monkeypatch):
    from glauber.config import load_config
    from glauber.eval.plots import merge_metric_logs
    from glauber.training.guards import hpc_checkpoints
    from glauber.training.train import resume_path

    for n in (10, 9, 2):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_x.ckpt").write_bytes(b"")
    assert [p.name for p in hpc_checkpoints(tmp_path)] == ["hpc_ckpt_2.ckpt", "hpc_ckpt_9.ckpt", "hpc_ckpt_10.ckpt"]
    # resume=never inside a SLURM job would be overridden by Lightning's own hpc resume: refused
    cfg = load_config(TINY, [f"train.run_dir={tmp_path}", "train.resume=never"])
    assert resume_path(cfg, tmp_path) is None
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    with pytest.raises(ValueError, match="hpc_ckpt_"):
        resume_path(cfg, tmp_path)
    # a run resumed at step 4 (logs/version_1) replaces the rows version 0 logged from step 4 on, but for the
    # evaluation made at step 4, which the resumed run does not repeat
    logs = tmp_path / "logs"
    (logs / "version_0").mkdir(parents=True)
    (logs / "version_0" / "metrics.csv").write_text(
        "epoch,eval/gen_ppl,lr-AdamW,step,train/loss,val/loss\n"
        "0,,,3,0.5,\n0,,,3,,0.6\n,,0.001,4,,\n0,,,4,0.4,\n,12.5,,4,,\n0,,,4,,0.55\n0,,,5,0.3,\n"
    )
    (logs / "version_1").mkdir()
    (logs / "version_1" / "start_step").write_text("4\n")
    (logs / "version_1" / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n0,4,0.41,\n0,5,0.31,\n")
    assert merge_metric_logs(logs) == logs / "metrics.csv"
    assert (logs / "metrics.csv").read_text().splitlines() == [
        "epoch,eval/gen_ppl,lr-AdamW,step,train/loss,val/loss",
        "0,,,3,0.5,",
        "0,,,3,,0.6",
        ",12.5,,4,,",
        "0,,,4,0.41,",
        "0,,,5,0.31,",
    ]


# -- a real cluster ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = LocalSlurm.unavailable()
    if why:
        pytest.skip(why)
    c = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small corpus and its token cache, built once here (as a shared filesystem would hold it)."""
    from data_modules.text import TextDataModule
    from glauber.config import load_config

    d = tmp_path_factory.mktemp("slurm-data")
    (d / "corpus.txt").write_text(CORPUS)
    args = [f"data.source={d / 'corpus.txt'}", f"data.cache_dir={d / 'cache'}"]
    TextDataModule(load_config(TINY, args).data, batch_size=2).prepare_data()
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(cluster: LocalSlurm, run_dir: Path, data: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """``glauber slurm`` (not --dry-run) for 2 CPU tasks on the node; returns the job id."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    out = glauber_slurm(
        [
            "--cpu",
            "--gpus-per-node=2",
            "--cpus-per-task=1",
            "--time=15",
            f"--run-dir={run_dir}",
            f"--env=MASTER_PORT={_free_port()}",  # not the job-id port: other local clusters may use job 1 too
            str(TINY),
            *data,
            f"train.max_steps={STEPS}",
            f"train.ckpt_every_steps={CKPT_EVERY}",
            "train.val_every_steps=15",
        ]
    )
    m = re.match(r"submitted job (\d+)", out)
    assert m, out
    return m.group(1)


def log_of(run_dir: Path, job: str) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def straight(cluster, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("slurm-runs") / "straight"
    start = time.time()
    with pytest.MonkeyPatch.context() as mp:
        job = submit(cluster, run, data, mp)
    try:
        info = cluster.wait_job(job, ("COMPLETED",), timeout=300)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- job log ---\n{log_of(run, job)[-5000:]}") from None
    print(f"SLURM job {job} (2 tasks, {STEPS} steps): {time.time() - start:.1f} s")
    return {"run": run, "job": job, "info": info}


def test_slurm_job_trains_to_the_end(straight):
    run, job, info = straight["run"], straight["job"], straight["info"]
    log = log_of(run, job)
    assert info["ExitCode"] == "0:0" and info.get("Restarts") == "0", info
    assert f"[glauber.slurm] job {job} start" in log and "srun exited 0" in log
    assert "[glauber.train] starting at global step 0 of 30; 1 node(s) x 2 device(s) = 2 process(es)" in log
    assert _state(run / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    assert (run / "job.sbatch").is_file() and not list(run.glob("hpc_ckpt_*.ckpt"))
    assert (run / "samples" / "step_00000030.txt").read_text().count("--- sample") == 1


def test_slurm_requeue_resumes_from_its_checkpoint(cluster, data, straight, tmp_path_factory):
    run = tmp_path_factory.mktemp("slurm-runs") / "requeued"
    start = time.time()
    with pytest.MonkeyPatch.context() as mp:
        job = submit(cluster, run, data, mp)
    marker = run / "checkpoints" / "step00000005.ckpt"  # training is under way: signal it now
    deadline = time.time() + 240
    while not marker.exists():
        state = cluster.job(job).get("JobState", "")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before step 5:\n{log_of(run, job)[-5000:]}"
        assert time.time() < deadline, f"no {marker.name} after 240 s:\n{log_of(run, job)[-5000:]}"
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", job)  # what SLURM sends 90 s before the time limit
    try:
        cluster.wait_job(job, ("COMPLETED",), timeout=400, also=lambda i: int(i.get("Restarts", "0")) >= 1)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- job log ---\n{log_of(run, job)[-5000:]}") from None
    print(f"SLURM job {job} with a requeue: {time.time() - start:.1f} s")
    log = log_of(run, job)
    hpc = run / "hpc_ckpt_1.ckpt"
    assert hpc.is_file()
    saved_at = _state(hpc)["global_step"]
    assert 5 <= saved_at < STEPS
    # the first start, the checkpoint + requeue, the second start resuming from it, the end
    first, second = log.split(f"[glauber.slurm] job {job} start", 2)[1:]
    assert "restart 0" in first[:40] and "restart 1" in second[:40]
    assert f"[glauber.slurm] step {saved_at}: saved {hpc}; requeued job {job}, stopping" in first
    # it resumes from the SLURM checkpoint, or from last.ckpt when a periodic checkpoint fell on that same step
    # (the newest checkpoint that loads; at a tie last.ckpt): the same state either way
    same_step = [hpc] + ([run / "checkpoints" / "last.ckpt"] if saved_at % CKPT_EVERY == 0 else [])
    assert any(f"[glauber.train] resumed from {c} at global step {saved_at} of {STEPS}" in second for c in same_step)
    assert any(f"Restoring states from the checkpoint path at {c}" in second for c in same_step)
    assert "srun exited 0" in second
    # same final step, same weights and EMA as the job that ran straight through
    a, b = _state(straight["run"] / "checkpoints" / "last.ckpt"), _state(run / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["glauber"]["ema"]["shadow"], b["glauber"]["ema"]["shadow"]))
    # the CSV metrics continue across the requeue, each step once
    import csv

    rows = [r for r in csv.DictReader((run / "logs" / "metrics.csv").open()) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
