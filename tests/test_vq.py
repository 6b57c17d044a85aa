"""The VQ image tokenizer: taming checkpoints load (strictly, with clear errors), ids round-trip to images,
the straight-through estimator trains the encoder, dead codes are re-seeded, train-vq writes a loadable vq.ckpt."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from glauber.commands import train_vq as train_vq_command
from glauber.nn.vq_checkpoint import CONFIG_MISMATCH_HINT, load_vq, save_vq
from glauber.nn.vq_config import VQConfig
from glauber.nn.vq_model import VQModel, codebook_usage
from glauber.training.train_vq import load_vq_train_config
from glauber.training.vq_module import VQTrainModule

ROOT = Path(__file__).resolve().parents[1]

# f = 4 (16x16 -> 4x4 tokens, attention at the 8x8 level; taming's GroupNorm(32)) and f = 16 (32x32 -> 2x2 tokens,
# narrower with norm_groups=8); tiny channels.
TINY_F4 = VQConfig(
    embed_dim=8, n_embed=16, ch=32, ch_mult=[1, 1, 1], num_res_blocks=1, attn_resolutions=[8], z_channels=32, resolution=16
)
TINY_F16 = VQConfig(
    embed_dim=8,
    n_embed=16,
    ch=16,
    ch_mult=[1, 1, 1, 1, 1],
    num_res_blocks=1,
    attn_resolutions=[2],
    z_channels=16,
    resolution=32,
    norm_groups=8,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions are faster on one thread (and far faster on a busy machine than two spinning ones)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(cfg: VQConfig, seed: int = 0) -> VQModel:
    """A model whose every parameter (norms and codebook included) is random, so that a wrong load shows."""
    torch.manual_seed(seed)
    model = VQModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random float images [n, 3, size, size] in [-1, 1] (low-frequency, so a tiny VQ can fit them)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def taming_yaml(cfg: VQConfig) -> dict:
    d = cfg.to_dict()
    dd = {k: v for k, v in d.items() if k not in ("embed_dim", "n_embed", "norm_groups")}  # exactly taming's ddconfig keys
    return {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": cfg.embed_dim,
                "n_embed": cfg.n_embed,
                "ddconfig": dd,
                "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {}},
            },
        }
    }


def write_taming_checkpoint(tmp_path: Path, model: VQModel, layout: str = "configs_dir") -> Path:
    """taming's log layout: <run>/checkpoints/last.ckpt + <run>/configs/<time>-project.yaml (or the yaml beside it)."""
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.discriminator.main.0.bias"] = torch.randn(64)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, ckpt)
    yaml_dir = tmp_path / "configs" if layout == "configs_dir" else ckpt.parent
    yaml_dir.mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(taming_yaml(model.config)), yaml_dir / "2021-01-01T00-00-00-project.yaml")
    return ckpt


@pytest.mark.parametrize("layout", ["configs_dir", "beside"])
def test_taming_checkpoint_round_trips_to_identical_outputs(tmp_path, layout):
    model = random_model(TINY_F4)
    loaded = load_vq(write_taming_checkpoint(tmp_path, model, layout))
    assert loaded.config == TINY_F4 and not loaded.training
    x = images(3, 16)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.ids, b.ids)
    assert torch.equal(model.encode_to_ids(x), loaded.encode_to_ids(x))


def test_taming_checkpoint_with_explicit_config_and_without_yaml(tmp_path):
    model = random_model(TINY_F4)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**model.state_dict(), "loss.logvar": torch.zeros(())}}, ckpt)
    with pytest.raises(ValueError, match="no taming config .* pass config="):
        load_vq(ckpt)
    for config in (TINY_F4, TINY_F4.to_dict(), taming_yaml(TINY_F4)):
        assert torch.equal(load_vq(ckpt, config=config).quantize.embedding.weight, model.quantize.embedding.weight)


def test_wrong_key_fails_naming_missing_and_unexpected_keys(tmp_path):
    model = random_model(TINY_F4)
    state = dict(model.state_dict())
    state["encoder.conv_inn.weight"] = state.pop("encoder.conv_in.weight")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(ValueError) as e:
        load_vq(ckpt, config=TINY_F4)
    msg = str(e.value)
    assert "missing keys: encoder.conv_in.weight" in msg
    assert "unexpected keys: encoder.conv_inn.weight" in msg
    assert CONFIG_MISMATCH_HINT in msg and "loss." not in msg


def test_wrong_shape_fails_naming_the_shapes(tmp_path):
    ckpt = write_taming_checkpoint(tmp_path, random_model(TINY_F4))
    bigger_codebook = VQConfig(**{**TINY_F4.to_dict(), "n_embed": 32})
    with pytest.raises(ValueError) as e:
        load_vq(ckpt, config=bigger_codebook)
    msg = str(e.value)
    assert "shape mismatches: quantize.embedding.weight: checkpoint (16, 8) vs model (32, 8)" in msg
    assert CONFIG_MISMATCH_HINT in msg and "missing keys" not in msg
    # a different architecture: its extra/missing levels are listed as keys
    with pytest.raises(ValueError, match="missing keys: .*encoder.down.3"):
        load_vq(ckpt, config=VQConfig(**{**TINY_F4.to_dict(), "ch_mult": [1, 1, 1, 1], "resolution": 16}))


@pytest.mark.parametrize("cfg, grid", [(TINY_F4, (4, 4)), (TINY_F16, (2, 2))])
def test_encode_decode_shapes(cfg, grid):
    model = random_model(cfg)
    size = cfg.resolution
    assert model.downsample_factor == size // grid[0] and model.grid_shape == grid
    u8 = torch.randint(0, 256, (5, size, size, 3), dtype=torch.uint8)
    ids = model.encode_to_ids(u8, batch_size=2)
    assert ids.shape == (5, *grid) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < cfg.n_embed
    assert torch.equal(ids, model.encode_to_ids(u8.numpy()))  # numpy input, same ids
    out = model.decode_ids(ids)
    assert out.shape == (5, 3, size, size) and out.dtype == torch.float32
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    assert torch.equal(model.decode_ids(ids.reshape(5, -1), grid_shape=grid), out)
    assert model.to_uint8(out).shape == (5, size, size, 3) and model.to_uint8(out).dtype == torch.uint8
    # float input [-1, 1] NCHW gives the same ids as the uint8 NHWC form of the same pixels
    assert torch.equal(model.encode_to_ids(u8.permute(0, 3, 1, 2).float() / 127.5 - 1), ids)
    with pytest.raises(ValueError, match="uint8 images must be"):
        model.encode_to_ids(u8.permute(0, 3, 1, 2).contiguous())
    with pytest.raises(ValueError, match="do not fill"):
        model.decode_ids(ids.reshape(5, -1)[:, :-1])
    with pytest.raises(ValueError, match="must lie in"):
        model.decode_ids(ids + cfg.n_embed)


def test_decode_of_encoded_ids_equals_the_direct_quantised_reconstruction():
    model = random_model(TINY_F4)
    x = images(4, 16)
    with torch.no_grad():
        out = model(x)
        # by hand: nearest code per latent pixel, then post_quant_conv + decoder
        z = model.quant_conv(model.encoder(x))
        codes = model.quantize.embedding.weight
        d = ((z.permute(0, 2, 3, 1)[..., None, :] - codes) ** 2).sum(-1)
        assert torch.equal(d.argmin(-1), out.ids)
    ids = model.encode_to_ids(x)
    assert torch.equal(ids, out.ids)
    torch.testing.assert_close(model.decode_ids(ids), out.recon.clamp(-1, 1), rtol=0, atol=1e-5)


def test_straight_through_gradient_reaches_the_encoder():
    model = random_model(TINY_F4).train()
    out = model(images(2, 16))
    out.recon.pow(2).mean().backward()  # reconstruction only: no codebook or commitment term
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0
    # the codebook loss moves the codebook, the commitment loss the encoder
    model.zero_grad()
    out = model(images(2, 16))
    out.codebook_loss.backward(retain_graph=True)
    assert model.quantize.embedding.weight.grad.abs().sum() > 0 and model.encoder.conv_in.weight.grad is None
    out.commit_loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


TINY_TRAIN = VQConfig(
    embed_dim=8,
    n_embed=16,
    ch=16,
    ch_mult=[1, 1, 1],
    num_res_blocks=1,
    attn_resolutions=[],
    z_channels=16,
    resolution=16,
    norm_groups=8,
)


def tiny_train_cfg(**overrides) -> dict:
    cfg = load_vq_train_config(None, [f"vq.{k}={v}" for k, v in TINY_TRAIN.to_dict().items()])
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    return OmegaConf.to_container(cfg)


@pytest.mark.parametrize("codebook_ema", [0.0, 0.9])
def test_a_few_training_steps_reduce_the_reconstruction_loss(codebook_ema):
    torch.manual_seed(0)
    module = VQTrainModule(tiny_train_cfg(lr=3e-3, warmup_steps=0, dead_code_every=10, codebook_ema=codebook_ema, max_steps=40))
    opt = module.configure_optimizers()["optimizer"]
    x = images(8, 16, seed=1)
    losses = []
    for step in range(40):
        loss, stats = module.compute_loss(x, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(stats["l1"]))
        assert torch.isfinite(loss)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:2]), losses
    assert module.model.quantize.embedding.weight.requires_grad == (codebook_ema == 0)


def test_dead_code_reseeding_changes_only_dead_codes():
    module = VQTrainModule(tiny_train_cfg(dead_code_every=100))
    n = TINY_TRAIN.n_embed
    alive = torch.arange(n) < 10
    module.last_used[alive] = 95  # used 5 steps ago
    module.last_used[~alive] = -5  # unused for 105 steps
    before = module.codebook.detach().clone()
    z_e = torch.randn(2, TINY_TRAIN.embed_dim, 4, 4)
    idx = module.reseed_dead_codes(z_e, step=100)
    assert torch.equal(idx, torch.arange(10, n))
    after = module.codebook.detach()
    assert torch.equal(after[alive], before[alive])
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, TINY_TRAIN.embed_dim)
    for k in idx.tolist():  # each re-seeded code is one of the batch's encoder outputs
        assert (flat == after[k]).all(1).any()
    assert len({tuple(after[k].tolist()) for k in idx.tolist()}) == len(idx)
    assert (module.last_used[~alive] == 100).all() and (module.last_used[alive] == 95).all()
    assert module.reseed_dead_codes(z_e, step=150).numel() == 0  # nothing is dead 50 steps later


def test_our_vq_checkpoint_round_trips(tmp_path):
    model = random_model(TINY_F16)
    path = save_vq(tmp_path / "vq.ckpt", model, image_size=32, codebook_usage={"perplexity": 1.0})
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_vq(path)
    x = images(2, 32)
    with torch.no_grad():
        assert torch.equal(model(x).recon, loaded(x).recon)
    assert loaded.config == TINY_F16


def test_codebook_usage():
    u = codebook_usage(torch.bincount(torch.arange(8).repeat(3), minlength=16))
    assert u["perplexity"] == pytest.approx(8.0) and u["used_fraction"] == 0.5 and u["n_tokens"] == 24


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["vq.chh=3"], "unknown config key 'vq.chh'"),
        (["epochs=3"], "unknown config key 'epochs'"),
        (["max_steps=lots"], "bad value for config key 'max_steps'"),
        (["lr_schedule=linear"], "bad value for config key 'lr_schedule'"),
        (["vq.ch=20"], "multiple of vq.norm_groups=16"),
        (["image_size=64"], "image_size=64 differs from vq.resolution=32"),
        (["val_fraction=0"], "val_fraction must be in"),
        (["codebook_ema=1.5"], "codebook_ema"),
        (["vq.ch_mult=[1,1,1,1,1,1,1]"], "vq.resolution=32 is not divisible"),
    ],
)
def test_train_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_vq_train_config(ROOT / "experiments" / "vq_emoji.yaml", overrides)


def test_train_vq_command_writes_a_loadable_tokenizer(tmp_path):
    cfg = load_vq_train_config(ROOT / "experiments" / "vq_emoji.yaml")
    assert (cfg.image_size, cfg.vq.resolution // 2 ** (len(cfg.vq.ch_mult) - 1)) == (32, 8)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", images=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    yaml = tmp_path / "vq.yaml"
    OmegaConf.save(OmegaConf.create(tiny_train_cfg()), yaml)
    run_dir = tmp_path / "run"
    args = argparse.Namespace(
        config=str(yaml),
        overrides=[
            f"data={tmp_path / 'imgs.npz'}",
            f"run_dir={run_dir}",
            "max_steps=4",
            "val_every_steps=2",
            "batch_size=4",
            "val_fraction=0.25",
            "num_recon=3",
            "accelerator=cpu",
            "progress_bar=false",
            "log_every_steps=1",
            f"threads={torch.get_num_threads() + 1}",
        ],
    )
    threads = torch.get_num_threads()
    train_vq_command.run(args)
    assert torch.get_num_threads() == threads  # the caller's thread count is restored (it changes float sums)
    ckpt = torch.load(run_dir / "vq.ckpt", weights_only=False)
    assert set(ckpt) >= {"vq_config", "state_dict", "train_config", "codebook_usage", "image_size"}
    assert ckpt["image_size"] == 16 and ckpt["train_config"]["max_steps"] == 4
    assert ckpt["codebook_usage"]["n_tokens"] == 3 * 16  # 3 held-out images x 4x4 tokens
    model = load_vq(run_dir / "vq.ckpt")
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in model.state_dict().items())
    assert model.decode_ids(model.encode_to_ids(np.zeros((1, 16, 16, 3), np.uint8))).shape == (1, 3, 16, 16)
    from PIL import Image

    assert Image.open(run_dir / "recon.png").size[0] > 3 * 16
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert any(r.get("val/psnr") for r in rows) and any(r.get("train/loss") for r in rows)
