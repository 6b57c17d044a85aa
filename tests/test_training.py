"""End to end on CPU: train a tiny GGM, kill it mid-run, resume to the same weights; CLI commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glauber.commands.cli import main
from glauber.config import load_config
from glauber.eval.inference import checkpoint_tokenizer, load_checkpoint
from glauber.training.train import train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


def tiny_overrides(tmp: Path, run: str, steps: int = 6) -> list[str]:
    """experiments/tiny.yaml on a small generated corpus, in a temporary run and cache directory."""
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(CORPUS)
    return [f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}", f"train.run_dir={tmp / run}", f"train.max_steps={steps}"]


TINY = ROOT / "experiments" / "tiny.yaml"


def state_of(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_tiny_training_run_writes_everything(tmp_path):
    cfg = load_config(TINY, tiny_overrides(tmp_path, "run"))
    run = train(cfg)
    for rel in [
        "config.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "checkpoints/step00000006.ckpt",
        "logs/metrics.csv",
        "plots/loss.png",
        "plots/val_loss_by_noise.png",
        "samples/step_00000006.txt",
    ]:
        assert (run / rel).is_file(), rel
    module = load_checkpoint(run / "checkpoints" / "last.ckpt")
    tok = checkpoint_tokenizer(module)
    ids = module.sample(2, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 32) and int(ids.max()) < module.vocab_size
    assert len(tok.decode(ids[0].tolist())) == 32  # character level
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["glauber"]["micro_batches_seen"] == 6


def test_killed_run_resumes_to_identical_weights(tmp_path):
    """Uninterrupted 12 steps vs. a process SIGKILLed after step 5 and restarted with the same command."""
    straight = load_config(TINY, tiny_overrides(tmp_path, "straight", 12))
    train(straight)
    args = [
        sys.executable,
        "-m",
        "glauber.commands.cli",
        "train",
        str(TINY),
        *tiny_overrides(tmp_path, "killed", 12),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "killed" / "checkpoints" / "step00000005.ckpt"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    assert not (tmp_path / "killed" / "checkpoints" / "step00000012.ckpt").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = state_of(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = state_of(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)["glauber"]["ema"]["shadow"]
    eb = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)["glauber"]["ema"]["shadow"]
    assert all(torch.equal(x, y) for x, y in zip(ea, eb))


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    train(load_config(TINY, tiny_overrides(tmp_path, "run", 2)))
    other = load_config(TINY, [*tiny_overrides(tmp_path, "run", 4), "model.blocks=3"])
    with pytest.raises(ValueError, match="another configuration.*model.blocks"):
        train(other)


def test_cli_help_train_sample_and_infill(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "glauber", "--help"], capture_output=True, text=True).stdout
    for word in ("train", "sample", "demo", "bench", "config-help"):
        assert word in out
    out = subprocess.run([sys.executable, "-m", "glauber", "sample", "--help"], capture_output=True, text=True).stdout
    for opt in ("--num", "--positions-per-step", "--prefix", "--suffix", "--temperature", "--top-p", "--out", "--seed"):
        assert opt in out
    assert main(["config-help"]) == 0
    text = capsys.readouterr().out
    assert "schedule.alpha_min: float = 0.001" in text
    # every key says what it does (its docstring paragraph or inline comment), for both config roots
    assert "(in proportion to 1 / (1 - Pi_t(phi)))" in text and "(undocumented)" not in text
    assert main(["config-help", "--modality", "image"]) == 0
    text = capsys.readouterr().out
    assert "image.fid_route: str = 'auto'" in text and "(undocumented)" not in text

    # the per-position signal-level input, through training, sampling and "clamped = clean" infilling
    assert main(["train", str(TINY), *tiny_overrides(tmp_path, "cli", 2), "model.condition_on_alpha=true"]) == 0
    ckpt = tmp_path / "cli" / "checkpoints" / "last.ckpt"
    out_file = tmp_path / "s.txt"
    assert main(["sample", str(ckpt), "--num", "2", "--out", str(out_file), "--device", "cpu"]) == 0
    assert out_file.read_text().count("--- sample") == 2
    assert (
        main(
            [
                "sample",
                str(ckpt),
                "--num",
                "1",
                "--prefix",
                "Line 1",
                "--suffix",
                "dog.",
                "--out",
                str(out_file),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    body = out_file.read_text().split("\n", 1)[1].rstrip("\n")
    assert body.startswith("Line 1") and body.endswith("dog.") and len(body) == 32
    assert main(["train", str(TINY), "model.sise=1"]) == 2
    assert "unknown config key 'model.sise'" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing.ckpt")]) == 2


def test_train_stops_at_once_when_a_hub_dataset_is_unreachable(tmp_path, monkeypatch):
    import data_modules.text as text

    monkeypatch.setattr(text, "hub_reachable", lambda timeout_s=3.0: False)
    cfg = load_config(
        ROOT / "experiments" / "owt_small.yaml",
        [f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={tmp_path / 'owt'}", "data.source=nobody/no-such-dataset"],
    )
    start = time.time()
    with pytest.raises(ValueError, match="unreachable.*data.source=/path/to/local/files"):
        train(cfg)
    assert time.time() - start < 5 and not (tmp_path / "owt").exists()
