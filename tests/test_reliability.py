"""Runs never lose work: the faults of docs/RELIABILITY.md, each made to happen to a tiny CPU run.

Resume from the newest checkpoint that loads; one training per run directory; an older run moved aside,
never deleted; partial files of killed writes removed; divergence stopped before it is saved; SIGINT and
SIGTERM saving ``last.ckpt``; values that would run as a silent no-op refused at start-up.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from corpus import corpus_overrides

from glauber.commands.cli import main
from glauber.config import load_config
from glauber.training.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
CORPUS = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


def tiny(tmp: Path, run: Path, steps: int, *more: str) -> list[str]:
    """experiments/tiny.yaml on a small corpus (shared per test module), no validation unless asked."""
    return [
        *corpus_overrides(tmp, CORPUS),
        f"train.run_dir={run}",
        f"train.max_steps={steps}",
        "train.val_every_steps=1000",
        *more,
    ]


def run_train(tmp: Path, run: Path, steps: int, *more: str) -> Path:
    return train(load_config(TINY, tiny(tmp, run, steps, *more)))


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A directory with the corpus, its cache, and ``run3``: a run of 3 steps, a checkpoint at each."""
    tmp = tmp_path_factory.mktemp("reliability")
    run_train(tmp, tmp / "run3", 3)
    return tmp


@pytest.fixture
def run3(shared, tmp_path) -> Path:
    """A private copy of the 3-step run."""
    return Path(shutil.copytree(shared / "run3", tmp_path / "run"))


def csv_steps(run: Path) -> list[int]:
    lines = (run / "logs" / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("step")
    return [int(line.split(",")[col]) for line in lines[1:]]


# -- 1. resume from the newest checkpoint that loads -----------------------------------------------------
def test_missing_last_ckpt_resumes_from_the_newest_step_checkpoint(shared, run3, capsys):
    (run3 / "checkpoints" / "last.ckpt").unlink()
    before = csv_steps(run3)
    run_train(shared, run3, 5)
    err = capsys.readouterr().err
    assert re.search(r"resuming from \S+step00000003\.ckpt \(global step 3\).*last\.ckpt is missing", err), err
    assert "resumed from" in err and "at global step 3 of 5" in err
    assert step_of(run3 / "checkpoints" / "last.ckpt") == 5
    assert not list(run3.rglob("*-v1.ckpt"))  # no duplicates beside the old step checkpoints
    assert sorted(p.name for p in (run3 / "checkpoints").glob("step*.ckpt")) == [f"step{s:08d}.ckpt" for s in range(1, 6)]
    assert csv_steps(run3)[: len(before)] == before  # the old metrics are continued, not deleted


def test_truncated_last_ckpt_is_set_aside_and_named(shared, run3, capsys):
    last = run3 / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    run_train(shared, run3, 4)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"resuming from \S+step00000003\.ckpt .*last\.ckpt does not load \(RuntimeError: PytorchStreamReader", err)
    kept = list((run3 / "previous").glob("*/checkpoints/last.ckpt"))
    assert len(kept) == 1 and kept[0].stat().st_size == 1000  # moved aside, not deleted
    assert step_of(last) == 4


def test_step_checkpoint_written_without_its_last_ckpt_counts(shared, run3, capsys):
    """Killed between writing step00000003.ckpt and last.ckpt: last.ckpt still holds step 2."""
    shutil.copy(run3 / "checkpoints" / "step00000002.ckpt", run3 / "checkpoints" / "last.ckpt")
    run_train(shared, run3, 4)
    err = capsys.readouterr().err
    assert re.search(r"resuming from \S+step00000003\.ckpt \(global step 3\).*last\.ckpt is older \(global step 2\)", err)


def test_no_loadable_checkpoint_is_refused_not_restarted(shared, run3):
    for ckpt in (run3 / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"truncated")
    before = sorted(p.relative_to(run3) for p in run3.rglob("*"))
    with pytest.raises(ValueError, match=r"no checkpoint in .* loads .*train\.resume=never"):
        run_train(shared, run3, 4)
    assert sorted(p.relative_to(run3) for p in run3.rglob("*")) == before


# -- 2. one training per run directory --------------------------------------------------------------------
def test_second_training_on_a_run_dir_is_refused_and_a_killed_run_leaves_no_stale_lock(shared, run3, capsys):
    args = [
        sys.executable,
        "-m",
        "glauber.commands.cli",
        "train",
        str(TINY),
        *tiny(shared, run3, 100_000, "train.progress_bar=false"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in first.stderr:  # the lock is held from before this line until the process ends
            if "resumed from" in line:
                break
        before = (run3 / "config.yaml").read_text()
        assert main(["train", str(TINY), *tiny(shared, run3, 5, "train.resume=never")]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another training (pid {first.pid} on " in err and "another train.run_dir" in err
        assert not (run3 / "previous").exists() and (run3 / "config.yaml").read_text() == before
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with open(run3 / ".lock") as f:  # the kernel released the killed run's lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- 3. train.resume=never moves the old run aside, once the new one starts ------------------------------
def test_resume_never_moves_the_old_run_aside_after_validation(shared, run3, capsys):
    old = {rel: (run3 / rel).read_bytes() for rel in ("config.yaml", "logs/metrics.csv", "checkpoints/step00000003.ckpt")}
    assert main(["train", str(TINY), *tiny(shared, run3, 2, "train.resume=never", "train.max_time=soon")]) == 2
    assert "train.max_time must be DD:HH:MM:SS" in capsys.readouterr().err
    assert all((run3 / rel).read_bytes() == data for rel, data in old.items())  # untouched by the refused run
    run_train(shared, run3, 2, "train.resume=never")
    [previous] = (run3 / "previous").iterdir()
    assert all((previous / rel).read_bytes() == data for rel, data in old.items())
    assert step_of(run3 / "checkpoints" / "last.ckpt") == 2 and not (run3 / "checkpoints" / "step00000003.ckpt").exists()
    assert csv_steps(run3)[0] == 0 and max(csv_steps(run3)) < 2
    assert "moved the earlier run's files" in capsys.readouterr().err


# -- 4. partial files of killed checkpoint writes ---------------------------------------------------------
def test_partial_files_of_killed_writes_are_removed_on_start(shared, run3, capsys):
    partial = [run3 / "checkpoints" / ".last.ckpt.k9x_2abc.tmp", run3 / ".hpc_ckpt_2.ckpt.0a1b2c3d.tmp"]
    others = [run3 / "checkpoints" / "notes.tmp", run3 / ".my.tmp", run3 / "checkpoints" / ".x.ckpt.tmp"]
    for p in partial + others:
        p.write_bytes(b"partial")
    run_train(shared, run3, 4)
    assert not any(p.exists() for p in partial)
    assert all(p.exists() for p in others)  # only the project's own temporary-file pattern is touched
    assert "deleted 2 partial file(s)" in capsys.readouterr().err


# -- 5. divergence ---------------------------------------------------------------------------------------
def test_divergence_stops_with_a_clear_message_and_keeps_finite_checkpoints(shared, tmp_path, capsys):
    run = tmp_path / "diverge"
    code = main(["train", str(TINY), *tiny(shared, run, 12, "optim.lr=1000", "train.val_every_steps=3")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(r"training diverged: the \w+ loss at global step \d+ is not finite.*optim\.lr=1000.*lower optim\.lr", err)
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert ckpts and step_of(run / "checkpoints" / "last.ckpt") < 12
    for ckpt in ckpts:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        tensors = [*state["state_dict"].values(), *state["glauber"]["ema"]["shadow"]]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), ckpt.name


# -- 6. SIGINT / SIGTERM ---------------------------------------------------------------------------------
SIGNAL_STEPS = 30  # the signal comes after step 5, long before the end


@pytest.fixture(scope="module")
def straight(shared) -> Path:
    """The uninterrupted run a stopped-and-resumed one must equal."""
    return run_train(shared, shared / "straight", SIGNAL_STEPS, "train.ckpt_every_steps=5", "train.threads=1")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_ckpt_at_a_step_boundary_and_exits_nonzero(shared, straight, tmp_path, signum, code):
    run = tmp_path / "run"
    # one thread in every run (the subprocess, the straight and the resumed one): the same float summation
    overrides = tiny(shared, run, SIGNAL_STEPS, "train.ckpt_every_steps=5", "train.threads=1")
    args = [sys.executable, "-m", "glauber", "train", str(TINY), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        marker, deadline = run / "checkpoints" / "step00000005.ckpt", time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signum)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-3000:]
    saved = re.search(rf"{signum.name}: saved \S+last\.ckpt at global step (\d+); stopping \(exit code {code}\)", err)
    assert saved, err[-3000:]
    assert step_of(run / "checkpoints" / "last.ckpt") == int(saved.group(1)) > 5  # past the checkpoint seen
    train(load_config(TINY, overrides))  # resumed, it ends where the uninterrupted run ends, bit for bit
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=False) for r in (straight, run))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


# -- 7. silent no-ops refused at start-up ----------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=0", "optim.lr must be a finite number > 0"),
        ("optim.lr=inf", "optim.lr must be a finite number > 0"),
        ("optim.lr=nan", "optim.lr must be a finite number > 0"),
        ("train.log_every_steps=0", "train.log_every_steps must be >= 1"),
        ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1, or null"),
        ("train.devices=0", "train.devices must be auto, -1"),
        ("train.val_every_steps=0", "train.val_every_steps must be >= 1.*train.val_batches=0"),
        ("train.max_steps=0", "train.max_steps must be >= 1"),
        ("train.max_steps=-1", "train.max_steps must be >= 1"),
        ("train.max_time=soon", "train.max_time must be DD:HH:MM:SS"),
        ("train.max_time=00:00:00:00", "train.max_time=00:00:00:00 stops the run before its first step"),
        ("model.dropout=1.0", r"model.dropout must be in \[0, 1\)"),
        ("model.dropout=-0.1", r"model.dropout must be in \[0, 1\)"),
    ],
)
def test_silent_no_op_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, [override])


def test_empty_config_file_is_refused_naming_it(tmp_path):
    """Today's alternative: the full paper defaults (batch 512, L = 1024) training on the CPU."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match=f"config file {re.escape(str(empty))} is empty"):
        load_config(empty)
