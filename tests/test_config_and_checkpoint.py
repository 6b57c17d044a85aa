"""Typed configs fail early and clearly; checkpoints are atomic and tied to their config."""

from pathlib import Path

import pytest
import torch

from glauber.config import batch_layout, load_config
from glauber.files import AtomicCheckpointIO
from glauber.training.checkpoint import config_differences, scan_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["shakespeare.yaml", "tiny.yaml", "owt.yaml", "owt_small.yaml"])
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(ROOT / "experiments" / name)
    assert cfg.data.seq_len > 0


def test_paper_setting_gives_4096_sampling_steps():
    from glauber.core.schedule import GlauberSchedule

    cfg = load_config(ROOT / "experiments" / "owt.yaml")
    assert GlauberSchedule.from_config(cfg.schedule, cfg.data.seq_len).num_steps == 4096
    assert (cfg.model.size, cfg.data.tokenizer, cfg.train.global_batch_size, cfg.optim.ema) == ("medium", "gpt2", 512, 0.9999)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.sise=small"], "unknown config key 'model.sise'"),
        (["trian.max_steps=3"], "unknown config key 'trian'"),
        (["train.max_steps=lots"], "bad value for config key 'train.max_steps'"),
        (["schedule.positions_per_step=5"], "positions_per_step"),
        (["schedule.alpha_min=0"], "alpha_min"),
        (["process.positions_per_step=[3]"], "must divide data.seq_len"),
        (["process.train_positions_per_step=[2]"], "'process.train_positions_per_step' is now 'process.positions_per_step'"),
        (["process.loss=hinge"], "process.loss.*hinge.*analytic, single_sample, weighted"),
        (["schedule.order=zigzag"], "schedule.order.*round_robin, strided, random"),
        (["method=diffusion"], "'method'.*ggm, ar, mdlm"),
        (["model.size=huge"], "model.size"),
        (["max_steps"], "key=value"),
    ],
)
def test_bad_config_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(ROOT / "experiments" / "shakespeare.yaml", overrides)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="experiments"):
        load_config("experiments/nope.yaml")


def test_batch_layout_keeps_the_global_batch():
    assert batch_layout(512, 8, None) == (64, 1)
    assert batch_layout(512, 8, 32) == (32, 2)
    assert batch_layout(512, 32, 32) == (16, 1)
    with pytest.raises(ValueError, match="not divisible by devices x nodes = 3"):
        batch_layout(512, 3, None)
    with pytest.raises(ValueError, match="micro_batch_size=24"):
        batch_layout(512, 8, 24)


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_config_differences_and_latest_checkpoint(tmp_path):
    a = {"method": "ggm", "model": {"size": "tiny"}, "schedule": {"sweeps": 2}, "train": {"max_steps": 1}}
    b = {"method": "ggm", "model": {"size": "small"}, "schedule": {"sweeps": 2}, "train": {"max_steps": 9}}
    assert config_differences(a, b) == ["model.size: 'tiny' -> 'small'"]
    assert scan_checkpoints(tmp_path).newest is None
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 3}, tmp_path / "checkpoints" / "last.ckpt")
    assert scan_checkpoints(tmp_path).newest.name == "last.ckpt"
