"""The CPU image pipeline end to end on a few steps: VQ tokenizer -> GGM on token grids -> samples,
infilling and FID (bundled Inception) -> report; and the image config root."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glauber.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "data" / "twemoji32.npz"

TINY_VQ = [
    "max_steps=25", "val_every_steps=25", "batch_size=16", "progress_bar=false", "vq.ch=16", "vq.n_embed=32",
    "vq.z_channels=16", "vq.embed_dim=8", "vq.norm_groups=8", "val_fraction=0.2",
]  # fmt: skip
TINY_GGM = [
    "model.size=tiny", "model.width=32", "model.blocks=1", "train.max_steps=6", "train.val_every_steps=3",
    "train.global_batch_size=8", "train.progress_bar=false", "train.loggers=[csv]", "sample.num_samples=4",
    "data.val_fraction=0.25",
]  # fmt: skip


@pytest.fixture(scope="module")
def emoji_subset(tmp_path_factory) -> Path:
    images = np.load(EMOJI)["images"][:96]
    path = tmp_path_factory.mktemp("emoji") / "emoji96.npz"
    np.savez(path, images=images)
    return path


@pytest.fixture(scope="module")
def demo_run(emoji_subset, tmp_path_factory, monkeypatch_module) -> Path:
    from glauber.commands import image_demo

    work = tmp_path_factory.mktemp("demo")
    monkeypatch_module.chdir(work)  # the cache directory is relative
    out = work / "emoji"
    args = argparse.Namespace(
        out=str(out), vq_config=str(ROOT / "experiments" / "vq_emoji.yaml"), config=str(ROOT / "experiments" / "emoji.yaml"),
        num_fid=24, positions_per_step=8, seed=0, temperature=1.0, top_p=1.0, vq_overrides=[*TINY_VQ, f"data={emoji_subset}"],
        overrides=[*TINY_GGM, f"data.source={emoji_subset}"],
    )  # fmt: skip
    image_demo.run(args)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_image_config_root_is_typed():
    cfg = load_config(ROOT / "experiments" / "emoji.yaml")
    assert cfg.modality == "image" and cfg.data.seq_len == 64 and cfg.image.infill_region == "center"
    with pytest.raises(ValueError, match="data.bogus"):
        load_config(ROOT / "experiments" / "emoji.yaml", ["data.bogus=1"])
    with pytest.raises(ValueError, match="image.infill_region"):
        load_config(ROOT / "experiments" / "emoji.yaml", ["image.infill_region=top"])
    with pytest.raises(ValueError, match="modality"):
        load_config(ROOT / "experiments" / "emoji.yaml", ["modality=audio"])
    with pytest.raises(ValueError, match="image"):  # a text config has no image section
        load_config(ROOT / "experiments" / "tiny.yaml", ["image.fid_every_steps=1"])


def test_demo_writes_report_grids_and_ordered_fids(demo_run):
    out = demo_run
    for name in ("report.md", "samples.png", "infill.png", "fid.json", "vq/vq.ckpt", "vq/recon.png"):
        assert (out / name).is_file(), name
    assert any((out / "cache").glob("*/meta.json"))  # the demo's token cache is its own: a rerun never meets another's
    res = json.loads((out / "fid.json").read_text())
    fids = res["fid"]
    assert len(fids) == 4 and all(math.isfinite(v) and v >= 0 for v in fids.values())
    floor = next(v for k, v in fids.items() if "floor" in k)
    ceiling = next(v for k, v in fids.items() if "ceiling" in k)
    assert floor < ceiling  # real-vs-real must beat decoded random tokens, even for a barely trained tokenizer
    assert res["n"] == 24 and res["network_calls"] == 2 * 64 // 8
    grid = np.asarray(Image.open(out / "infill.png"))
    assert grid.shape[0] > 3 * 32  # three rows of 32 px images: real, masked, infilled
    assert any((out / "ggm" / "samples").glob("step_*.png"))  # the validation callback's grids
    report = (out / "report.md").read_text()
    assert "CC-BY" in report
    vq = json.loads((out / "vq" / "summary.json").read_text())
    assert vq["steps"] == 25 and vq["codebook_size"] == 32 and 0 < vq["codes_used_fraction"] <= 1
    assert f"held-out PSNR {vq['val_psnr_db']:.2f} dB" in report and "VQ tokenizer: 32x32 -> 64 tokens" in report


def test_infilling_keeps_the_clamped_tokens(demo_run):
    from glauber.eval.images import CheckpointImages, region_mask
    from glauber.eval.inference import load_checkpoint

    module = load_checkpoint(demo_run / "ggm" / "checkpoints" / "last.ckpt")
    imgs = CheckpointImages(module)
    free = region_mask(imgs.grid, "center")
    assert int(free.sum()) == 16 and imgs.grid == (8, 8)
    ids = torch.randint(module.vocab_size, (3, 64), generator=torch.Generator().manual_seed(0))
    filled = imgs.infill_ids(ids, free, seed=1, positions_per_step=8)
    assert torch.equal(filled[:, ~free], ids[:, ~free])
    assert not torch.equal(filled[:, free], ids[:, free])


def test_eval_fid_from_checkpoint(demo_run):
    from glauber.commands.cli import main

    report = demo_run / "fid_ckpt.json"
    rc = main([
        "eval-fid", "--checkpoint", str(demo_run / "ggm" / "checkpoints" / "last.ckpt"), "--num-samples", "12",
        "--positions-per-step", "16",
        "--reference", str(demo_run / "fid_reference_half_b.npz"), "--route", "bundled", "--out", str(report),
    ])  # fmt: skip
    assert rc == 0
    res = json.loads(report.read_text())
    assert res["n_generated"] == 12 and res["network_calls"] == 8 and math.isfinite(res["fid"])
    assert (demo_run / "fid_ckpt.samples.png").is_file()


def test_paper_image_configs_stop_at_once_naming_what_to_download(tmp_path, monkeypatch, capsys):
    from glauber.commands.cli import main

    monkeypatch.chdir(tmp_path)  # no data/celeba_hq, no VQGAN checkpoint here
    for name, data in (("celeba_hq", "data/celeba_hq"), ("ffhq", "data/ffhq")):
        assert main(["train", str(ROOT / "experiments" / f"{name}.yaml")]) == 2
        err = capsys.readouterr().err
        assert "vqgan_imagenet_f16_16384" in err and data in err and "taming-transformers" in err
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
