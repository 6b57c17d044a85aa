"""Image sources, the VQ-token cache and the image DataModule (loaders, ranks, resume, refusals)."""

import hashlib
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data_modules.hub as hub
import data_modules.images as images
from data_modules.images import ImageDataConfig, ImageTokenDataModule, fit_image, load_images
from data_modules.tokenizers import HubUnreachableError

S, F = 16, 4  # image size, downsampling factor of the fake tokenizer: 4x4 = 16 tokens per image
PALETTE = np.array(
    [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255], [255, 255, 255]]
)


class PaletteVQ:
    """A stand-in for ``glauber.nn.vq_model.VQModel``: F x F average pooling, then the nearest palette colour."""

    downsample_factor = F

    def __init__(self, palette: np.ndarray = PALETTE, name: str = "palette"):
        self.palette = torch.tensor(palette, dtype=torch.float32)
        self.name = name
        self.sha256 = hashlib.sha256(np.asarray(palette, np.int64).tobytes()).hexdigest()
        self.vocab_size = len(palette)
        self.grid_shape = (S // F, S // F)
        self.calls = 0

    def encode_to_ids(self, imgs, batch_size: int = 64) -> torch.Tensor:
        self.calls += 1
        x = torch.as_tensor(np.ascontiguousarray(imgs)).float()
        n, h, w, _ = x.shape
        pooled = x.reshape(n, h // F, F, w // F, F, 3).mean((2, 4))
        return ((pooled[..., None, :] - self.palette) ** 2).sum(-1).argmin(-1)

    def decode_ids(self, ids, grid_shape=None) -> torch.Tensor:
        ids = torch.as_tensor(ids).long()
        if ids.ndim == 2:
            ids = ids.reshape(len(ids), *(grid_shape or self.grid_shape))
        rgb = self.palette[ids].repeat_interleave(F, 1).repeat_interleave(F, 2)
        return rgb.permute(0, 3, 1, 2) / 127.5 - 1

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def blocky(n: int, seed: int = 0) -> np.ndarray:
    """``n`` images of S x S made of F x F blocks of palette colours (the fake tokenizer encodes them exactly)."""
    ids = np.random.default_rng(seed).integers(0, len(PALETTE), (n, S // F, S // F))
    return PALETTE[ids].repeat(F, 1).repeat(F, 2).astype(np.uint8)


@pytest.fixture()
def npz(tmp_path) -> tuple[Path, np.ndarray]:
    arr = blocky(40)
    path = tmp_path / "imgs.npz"
    np.savez(path, images=arr)
    return path, arr


def make_dm(tmp_path: Path, source: Path, tok=None, batch_size: int = 4, max_train_samples=None, **cfg) -> ImageTokenDataModule:
    cfg.setdefault("cache_dir", str(tmp_path / "cache"))
    cfg.setdefault("image_size", S)
    cfg.setdefault("seq_len", (S // F) ** 2)
    cfg.setdefault("val_size", 8)
    c = ImageDataConfig(source=str(source), **cfg)
    return ImageTokenDataModule(c, batch_size, max_train_samples=max_train_samples, tokenizer=tok or PaletteVQ())


def ready(dm: ImageTokenDataModule) -> ImageTokenDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


# -- sources -------------------------------------------------------------------------------------------
def test_folder_zip_and_npz_sources_give_the_same_array(tmp_path):
    arr = blocky(6, seed=1)
    folder = tmp_path / "folder"
    names = [f"{i:03d}.png" if i < 3 else f"sub/{i:03d}.png" for i in range(6)]  # recursive search, sorted by path
    (folder / "sub").mkdir(parents=True)
    for name, img in zip(names, arr):
        Image.fromarray(img).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for name in reversed(names):
            z.write(folder / name, name)
    np.savez(tmp_path / "imgs.npz", images=arr)
    for src in ("folder", "imgs.zip", "imgs.npz"):
        got = load_images(str(tmp_path / src), S, progress=False)
        assert got.dtype == np.uint8 and got.shape == (6, S, S, 3)
        np.testing.assert_array_equal(got, arr, err_msg=src)


def test_centre_crop_resize_and_transparency():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = wide[:, 30:] = (0, 0, 255)  # blue outer bands
    wide[:, 10:30] = (255, 0, 0)  # red centre square
    out = fit_image(wide, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[:, 1:-1] == (255, 0, 0)).all()  # the crop kept the centre square
    assert (out[:, [0, -1], 0] > 200).all() and (out[:, [0, -1], 2] < 30).all()  # ImageOps.fit's filter reads just past it
    squashed = fit_image(wide, 10, center_crop=False)
    assert squashed.shape == (10, 10, 3) and (squashed[:, 0, 2] > 200).all()  # blue band kept
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent: white
    assert (fit_image(rgba, 8) == 255).all()
    up = fit_image(np.full((4, 4, 3), 77, np.uint8), 12)
    assert up.shape == (12, 12, 3) and (up == 77).all()


def test_missing_source_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nowhere/imgs.*data\.source"):
        load_images(str(tmp_path / "nowhere" / "imgs"), S)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setattr(hub, "cached_snapshot", lambda name: None)
    with pytest.raises(HubUnreachableError, match=r"unreachable.*local/image/folder"):
        load_images("hf:someone/some-images:train", S)


# -- the cache ------------------------------------------------------------------------------------------
def test_cache_is_built_once_reused_and_refused_for_another_tokenizer(tmp_path, npz, monkeypatch):
    source, arr = npz
    tok = PaletteVQ()
    dm = ready(make_dm(tmp_path, source, tok))
    cache = dm.cache_path
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == tok.sha256 and meta["grid"] == [4, 4] and meta["dtype"] == "uint16"
    assert meta["rows"] == {"train": 32, "val": 8} and meta["image_size"] == S and meta["hflip"] is False
    assert (cache / "train.bin").stat().st_size == 32 * 16 * 2
    assert dm.vocab_size == len(PALETTE) and dm.tokenizer_state()["sha256"] == tok.sha256
    # rows are the tokens of the train images, in source order
    train_idx, val_idx = images.split_indices(40, dm.cfg)
    expected = tok.encode_to_ids(arr[train_idx]).reshape(32, 16)
    assert torch.equal(torch.stack([dm.train_set[i] for i in range(32)]), expected)
    assert torch.equal(dm.val_tokens(3), tok.encode_to_ids(arr[val_idx[:3]]).reshape(3, 16))
    np.testing.assert_array_equal(dm.decode_images(dm.val_tokens(8)), arr[val_idx])
    # a second module reuses the cache without tokenising
    monkeypatch.setattr(images, "build_cache", lambda *a, **k: pytest.fail("rebuilt a complete cache"))
    again = PaletteVQ()
    ready(make_dm(tmp_path, source, again))
    assert again.calls == 0
    # the same name but other weights (a retrained VQ): refused, not mixed
    other = PaletteVQ(PALETTE[::-1].copy())
    with pytest.raises(ValueError, match="another VQ tokenizer.*delete"):
        make_dm(tmp_path, source, other).prepare_data()


def test_seq_len_must_match_the_token_grid(tmp_path, npz):
    with pytest.raises(ValueError, match=r"4x4 = 16 tokens: set data.seq_len=16"):
        make_dm(tmp_path, npz[0], seq_len=64).prepare_data()
    dm = make_dm(tmp_path, npz[0], seq_len=64)
    with pytest.raises(ValueError, match="data.seq_len=16"):
        dm.check_available()


def test_hflip_stores_each_train_image_and_its_mirror(tmp_path, npz):
    source, arr = npz
    tok = PaletteVQ()
    dm = ready(make_dm(tmp_path, source, tok, hflip=True))
    assert "hflip" in dm.cache_path.name and len(dm.train_set) == 64 and len(dm.val_set) == 8
    train_idx, _ = images.split_indices(40, dm.cfg)
    i = train_idx[5]
    assert torch.equal(dm.train_set[10], tok.encode_to_ids(arr[i : i + 1]).reshape(16))
    assert torch.equal(dm.train_set[11], tok.encode_to_ids(arr[i : i + 1, :, ::-1]).reshape(16))


# -- loaders, ranks, resume ---------------------------------------------------------------------------
def test_loader_yields_long_token_rows_in_range(tmp_path, npz):
    dm = ready(make_dm(tmp_path, npz[0], batch_size=4))
    batches = list(dm.train_dataloader())
    assert len(batches) == 8
    for b in batches:
        assert b.dtype == torch.int64 and b.shape == (4, 16) and 0 <= b.min() and b.max() < len(PALETTE)
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == 8 and val[0].shape[1] == 16
    assert dm.token_counts().sum() == 32 * 16


def test_two_ranks_get_disjoint_data_and_resume_continues_the_stream(tmp_path, npz):
    source, _ = npz
    samplers = []
    for rank in range(2):
        d = make_dm(tmp_path, source)
        d.trainer = SimpleNamespace(global_rank=rank, world_size=2, training=False)
        d.prepare_data()
        d.setup("fit")
        samplers.append((list(d.train_dataloader().sampler), list(d.val_dataloader().sampler)))
    (t0, v0), (t1, v1) = samplers
    assert len(t0) == len(t1) == 16 and not set(t0) & set(t1) and len(set(t0) | set(t1)) == 32
    assert len(v0) == len(v1) == 4 and not set(v0) & set(v1)

    def dm():
        return ready(make_dm(tmp_path, source, max_train_samples=40))

    full = [b.clone() for b in dm().train_dataloader()]
    assert len(full) == 10
    resumed = dm()
    resumed.set_consumed(12)
    fresh = dm()
    fresh.load_state_dict(resumed.state_dict())
    assert fresh.consumed == 12
    assert all(torch.equal(a, b) for a, b in zip(fresh.train_dataloader(), full[3:], strict=True))
    fresh.trainer = None
    fresh.load_state_dict({"consumed_train_samples": 10, "world_size": 2})  # 2 ranks resumed on 1
    assert fresh.consumed == 20


def test_a_real_vq_checkpoint_by_path(tmp_path, npz):
    """The path route: ``glauber.nn.vq_checkpoint.load_vq``, sha256 of the file in the checkpoint state, decoding."""
    from glauber.nn.vq_checkpoint import save_vq
    from glauber.nn.vq_config import VQConfig
    from glauber.nn.vq_model import VQModel

    torch.manual_seed(0)
    vq = VQModel(
        VQConfig(
            embed_dim=8, n_embed=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8, resolution=S
        )
    )
    ckpt = save_vq(tmp_path / "vq.ckpt", vq)
    cfg = ImageDataConfig(
        source=str(npz[0]),
        tokenizer=str(ckpt),
        image_size=S,
        seq_len=64,
        val_size=8,
        cache_dir=str(tmp_path / "cache"),
        encode_device="cpu",
    )
    dm = ImageTokenDataModule(cfg, batch_size=4)
    dm.check_available()
    ready(dm)
    state = dm.tokenizer_state()
    assert state["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest() and state["path"] == str(ckpt.resolve())
    assert state["grid"] == [8, 8] and dm.vocab_size == 32
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 64) and batch.max() < 32
    pics = dm.decode_images(batch)
    assert pics.shape == (4, S, S, 3) and pics.dtype == np.uint8
    missing = ImageTokenDataModule(ImageDataConfig(source=str(npz[0]), tokenizer=str(tmp_path / "no.ckpt")), batch_size=4)
    with pytest.raises(FileNotFoundError, match="no.ckpt"):
        missing.check_available()
