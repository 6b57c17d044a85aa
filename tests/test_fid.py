"""FID: the Fréchet distance against closed forms, the bundled Inception, references, routes and errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance
from PIL import Image

import glauber.eval.fid as fid
import glauber.eval.inception as inception
from glauber.commands import eval_fid
from glauber.eval.fid import compute_fid, feature_stats, frechet_distance, make_reference_stats

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "data" / "twemoji32.npz"
NVIDIA = inception.cleanfid_inception_dir() / inception.NVIDIA_FILE


def emoji(n: int) -> np.ndarray:
    return np.load(EMOJI)["images"][:n]


# -- the distance --------------------------------------------------------------------------------------
def test_frechet_distance_matches_closed_forms():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # sigma2 = c^2 sigma1 (full matrices): |mu1 - mu2|^2 + (1 - c)^2 tr(sigma1)
    m = np.random.default_rng(0).normal(size=(4, 4))
    s1, c = m @ m.T + np.eye(4), 3.0
    assert frechet_distance(mu1, s1, mu2, c**2 * s1) == pytest.approx(((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * np.trace(s1))


def test_feature_stats_and_the_distance_of_a_set_to_itself():
    f = np.random.default_rng(1).normal(size=(300, 8)) * np.arange(1, 9)
    mu, sigma = feature_stats(f.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (8, 8)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(f.T), rtol=1e-5)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy >= 1.16 deprecates sqrtm(disp=...)
def test_singular_products_and_agreement_with_cleanfids_sqrtm():

    a, b = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 0.0])  # singular
    mu1, mu2 = np.zeros(3), np.ones(3)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    (m1, s1), (m2, s2) = fid.feature_stats(x), fid.feature_stats(y)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(float(cleanfid_frechet_distance(m1, s1, m2, s2)), rel=1e-8)


# -- the networks ----------------------------------------------------------------------------------
def test_bundled_inception_gives_2048_features_per_image():
    imgs = emoji(3)
    feats, info = fid.source_features(np.concatenate([imgs, imgs[:1]]), route="bundled", device="cpu", batch_size=4)
    assert feats.shape == (4, 2048) and np.isfinite(feats).all() and (feats >= 0).all()  # after ReLU + average pool
    assert info["route"] == "bundled" and info["inception"].endswith("default_1.pt")
    np.testing.assert_allclose(feats[3], feats[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats[1], feats[0])


@pytest.mark.skipif(
    not NVIDIA.is_file(), reason=f"clean-fid's Inception {NVIDIA} is absent (downloaded by clean-fid with internet)"
)
def test_both_routes_give_the_same_features_and_fid():
    imgs = emoji(16)
    a, _ = fid.source_features(imgs, route="bundled", device="cpu", batch_size=8)
    b, _ = fid.source_features(imgs, route="clean-fid", device="cpu", batch_size=8)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    half = (a[:8], a[8:]), (b[:8], b[8:])
    fids = [frechet_distance(*feature_stats(x[:, :64]), *feature_stats(y[:, :64])) for x, y in half]
    assert fids[0] == pytest.approx(fids[1], rel=1e-3)


def test_routes_and_offline_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "cleanfid_inception_dir", lambda: tmp_path)
    for module in (inception, fid):
        monkeypatch.setattr(module, "reachable", lambda host, timeout_s=3.0: False)
    assert inception.resolve_route("auto") == "bundled"
    weights = tmp_path / "my-inception.pt"
    weights.write_bytes(b"x")
    assert inception.resolve_route("auto", weights) == "clean-fid" and inception.resolve_route(None) == "bundled"
    with pytest.raises(FileNotFoundError, match=r"--inception-weights .*route 'bundled'"):
        inception.feature_extractor("clean-fid", "cpu")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        inception.resolve_route("auto", tmp_path / "nowhere.pt")
    with pytest.raises(ValueError, match=r"cannot be reached.*--make-stats"):
        compute_fid(emoji(4), "nosuchset:256:train", route="bundled")
    with pytest.raises(ValueError, match="resizes inside"):
        inception.feature_extractor("bundled", "cpu", mode="legacy_tensorflow")


# -- references and the command line (a tiny feature network stands in for the Inception) ------------
class TinyFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).reshape(len(x), 12)


@pytest.fixture()
def tiny(monkeypatch):
    def extractor(route="auto", device="cpu", mode="clean", inception_weights=None):
        return TinyFeatures(), {"route": inception.resolve_route(route, inception_weights), "mode": mode, "inception": "tiny"}

    monkeypatch.setattr(fid, "feature_extractor", extractor)
    monkeypatch.setattr(fid, "_REF_CACHE", {})


def test_references_of_every_kind_agree(tmp_path, tiny):
    imgs = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    gen = imgs[:20]
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, im in enumerate(imgs[20:]):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    np.savez(tmp_path / "ref.npz", images=imgs[20:])
    stats = make_reference_stats(str(folder), tmp_path / "stats.npz", route="bundled", verbose=False)
    assert stats["n"] == 20 and stats["route"] == "bundled"
    results = [
        compute_fid(gen, ref, route="bundled")
        for ref in (imgs[20:], str(folder), str(tmp_path / "ref.npz"), str(tmp_path / "stats.npz"))
    ]
    for r in results:
        assert r["fid"] == pytest.approx(results[0]["fid"], rel=1e-5) and r["fid"] > 0
        assert r["n_generated"] == 20 and r["route"] == "bundled" and r["mode"] == "clean"
    assert [r["n_reference"] for r in results] == [20] * 4
    assert compute_fid(imgs, imgs, route="bundled")["fid"] == pytest.approx(0, abs=1e-6)
    # image_size: references are cropped and resized like the training data
    assert compute_fid(gen, str(folder), route="bundled", image_size=4)["image_size"] == 4


def test_eval_fid_command(tmp_path, tiny, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    eval_fid.add_parser(parser.add_subparsers(dest="command"))
    imgs = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", images=imgs[:15])
    np.savez(tmp_path / "gen.npz", images=imgs[15:])
    stats = tmp_path / "stats" / "real.npz"
    eval_fid.run(
        parser.parse_args(["eval-fid", "--make-stats", str(tmp_path / "real.npz"), "--out", str(stats), "--route", "bundled"])
    )
    assert stats.is_file()
    out = tmp_path / "report.json"
    args = ["eval-fid", "--generated", str(tmp_path / "gen.npz"), "--reference", str(stats), "--out", str(out)]
    eval_fid.run(parser.parse_args(args))
    report = json.loads(out.read_text())
    assert {"fid", "n_generated", "n_reference", "route", "mode"} <= set(report) and report["n_reference"] == 15
    with pytest.raises(ValueError, match="--generated .or --checkpoint. and --reference"):
        eval_fid.run(parser.parse_args(["eval-fid", "--generated", str(tmp_path / "gen.npz")]))
