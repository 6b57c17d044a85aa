"""FID with clean-fid's protocol ("clean" resize to 299 x 299, the 2015 TF Inception-v3's 2048 pool features). References:
an image folder or ``.zip``, a ``.npz`` of images or statistics, ``hf:NAME[:split]`` or a clean-fid ``name:resolution:split``.
Under 2048 images the covariances are singular and FID is biased upwards: report ``n_generated``/``n_reference``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.image_sources import fit_image, open_source
from data_modules.paths import find_path
from glauber.eval.inception import feature_extractor, reachable, resolve_route
from glauber.files import atomic_write

STATS_HOST = ("www.cs.cmu.edu", 443)  # clean-fid's reference statistics


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` in float64: the mean and the unbiased covariance (rows = samples)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be [N >= 2, D] (got shape {f.shape})")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` in float64, the root's trace from the symmetric
    ``A sigma2 A``, ``A = sigma1^(1/2)``: unlike clean-fid's ``sqrtm``, fast at D = 2048 and fine when singular (~1e-6 apart)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


class _Resized(Dataset):
    """Images resized by clean-fid's resizer for ``mode``, as float ``[3, 299, 299]`` (what its ResizeDataset gives)."""

    def __init__(self, images: Any, mode: str):
        from cleanfid.resize import build_resizer  # public: clean-fid's resize helpers

        self.images, self.fn_resize = images, build_resizer(mode)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.fn_resize(np.asarray(self.images[i]))
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(2, 0, 1))).float()


def _is_builtin(ref: str) -> bool:
    parts = ref.split(":")
    return len(parts) == 3 and not ref.startswith("hf:") and all(parts) and find_path(ref) is None


def builtin_stats(ref: str, mode: str = "clean") -> tuple[np.ndarray, np.ndarray]:
    """clean-fid's precomputed ``(mu, sigma)`` for ``name:resolution:split`` (downloaded once; a clear error offline)."""
    import cleanfid
    from cleanfid.fid import get_reference_statistics

    name, res, split = ref.split(":")
    file = f"{name}_{mode}_{split}_{'na' if split == 'custom' else res}.npz".lower()
    local = Path(cleanfid.__file__).parent / "stats" / file
    if not local.is_file() and not reachable(STATS_HOST):
        raise ValueError(
            f"FID reference {ref!r}: clean-fid's statistics file {file} is not in {local.parent} and "
            f"https://{STATS_HOST[0]}/~clean-fid/stats/ cannot be reached (no internet?). Download {file} from there on a "
            f"machine with internet into {local.parent}, or pass reference images (a folder, .zip or .npz) or a statistics "
            ".npz made with `glauber eval-fid --make-stats`"
        )
    mu, sigma = get_reference_statistics(name, int(res) if res.isdigit() else res, mode=mode, split=split)
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


def source_features(
    source: Any,
    route: str = "auto",
    mode: str = "clean",
    image_size: int | None = None,
    batch_size: int = 64,
    device: Any = None,
    num_workers: int = 0,
    inception_weights: str | Path | None = None,
    verbose: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(features [N, 2048], info)`` of uint8 ``[N, H, W, 3]`` images, a ``.npz``, folder, ``.zip`` or ``hf:NAME[:split]``."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    model, info = feature_extractor(route, device, mode, inception_weights)
    desc = "FID features"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        imgs: Any = source.cpu().numpy() if isinstance(source, torch.Tensor) else source
        if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[3] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3] (got {imgs.dtype} {imgs.shape})")
        if image_size is not None and imgs.shape[1:3] != (image_size, image_size):
            imgs = np.stack([fit_image(im, image_size) for im in imgs])
    else:
        source = str(source)
        desc = f"FID features of {source}"
        path = find_path(source)
        if image_size is None and path is not None and (path.is_dir() or path.suffix.lower() == ".zip"):
            from cleanfid.fid import get_folder_features

            kw = dict(num_workers=num_workers, batch_size=batch_size, device=device, mode=mode, verbose=verbose)
            return get_folder_features(str(path), model, description=desc, **kw), info
        imgs = open_source(source, image_size)
    if len(imgs) < 2:
        raise ValueError(f"FID needs at least 2 images (got {len(imgs)} from {desc})")
    from cleanfid.fid import get_batch_features
    from tqdm.auto import tqdm

    loader = DataLoader(_Resized(imgs, mode), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = [get_batch_features(b, model, device) for b in tqdm(loader, desc=desc, disable=not verbose, unit="batch")]
    return np.concatenate(feats), info


def load_stats(path: str | Path) -> dict[str, Any] | None:
    """The statistics in a ``.npz`` (what ``make_reference_stats`` writes), or None when it holds images."""
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            return None
        out: dict[str, Any] = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
        for k in ("n", "route", "mode", "source", "image_size"):
            if k in z.files:
                out[k] = z[k].item()
    return out


_REF_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray, int | None, dict[str, Any]]] = {}


def reference_stats(reference: Any, **options: Any) -> tuple[np.ndarray, np.ndarray, int | None, dict[str, Any]]:
    """``(mu, sigma, n, info)`` of a reference (``options``: ``source_features``'s); those of images cached per process."""
    if isinstance(reference, (np.ndarray, torch.Tensor)):
        feats, info = source_features(reference, **options)
        return (*feature_stats(feats), len(feats), {**info, "reference": f"array {tuple(reference.shape)}"})
    ref, mode = str(reference), options["mode"]
    if _is_builtin(ref):
        mu, sigma = builtin_stats(ref, mode)
        return mu, sigma, None, {"route": "clean-fid builtin statistics", "mode": mode, "reference": ref}
    path = find_path(ref)
    if path is not None and path.suffix.lower() == ".npz" and path.is_file():
        if (stats := load_stats(path)) is not None:
            if stats.get("mode", mode) != mode:
                raise ValueError(f"reference statistics {path} were made in FID mode {stats['mode']!r}, not {mode!r}")
            info = {"route": stats.get("route", "unknown"), "mode": mode, "reference": str(path)}
            return stats["mu"], stats["sigma"], stats.get("n"), info
    stamp = path.stat().st_mtime_ns if path is not None else None
    key = (ref, stamp, options["route"], mode, options["image_size"], str(options["inception_weights"]))
    if key not in _REF_CACHE:
        feats, info = source_features(ref, **options)
        _REF_CACHE[key] = (*feature_stats(feats), len(feats), {**info, "reference": ref})
    return _REF_CACHE[key]


def compute_fid(
    generated: Any,
    reference: Any,
    route: str | None = "auto",
    mode: str = "clean",
    batch_size: int = 64,
    device: Any = None,
    num_workers: int = 0,
    image_size: int | None = None,
    inception_weights: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """FID of ``generated`` (any ``source_features`` source) against ``reference`` (see the module docstring)."""
    t0 = time.time()
    route = resolve_route(route, inception_weights)
    options = {
        "route": route,
        "mode": mode,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": device,
        "num_workers": num_workers,
        "inception_weights": inception_weights,
        "verbose": verbose,
    }
    mu_r, sigma_r, n_ref, ref_info = reference_stats(reference, **options)
    feats, info = source_features(generated, **options)
    ref_route = ref_info.get("route")
    if ref_route not in (route, "clean-fid builtin statistics", "unknown"):
        msg = f"the reference statistics were made with route {ref_route!r}, the generated features with {route!r}"
        print(f"[glauber.fid] {msg}", file=sys.stderr, flush=True)
    return {
        "fid": frechet_distance(*feature_stats(feats), mu_r, sigma_r),
        "n_generated": len(feats),
        "n_reference": n_ref,
        "route": route,
        "mode": mode,
        "inception": info["inception"],
        "reference": ref_info["reference"],
        "reference_route": ref_route,
        "image_size": image_size,
        "seconds": round(time.time() - t0, 2),
    }


def make_reference_stats(
    source: Any,
    out_path: str | Path,
    route: str | None = "auto",
    mode: str = "clean",
    image_size: int | None = None,
    batch_size: int = 64,
    device: Any = None,
    num_workers: int = 0,
    inception_weights: str | Path | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Write the statistics of ``source`` and how they were made to the ``.npz`` ``out_path``; returns all but the arrays."""
    route = resolve_route(route, inception_weights)
    feats, info = source_features(source, route, mode, image_size, batch_size, device, num_workers, inception_weights, verbose)
    mu, sigma = feature_stats(feats)
    desc = f"array {tuple(source.shape)}" if isinstance(source, (np.ndarray, torch.Tensor)) else str(source)
    size = -1 if image_size is None else image_size
    record = {"n": len(feats), "route": route, "mode": mode, "source": desc, "image_size": size}
    atomic_write(out_path, lambda f: np.savez(f, mu=mu, sigma=sigma, **{k: np.array(v) for k, v in record.items()}))
    return {**record, "inception": info["inception"], "out": str(Path(out_path))}
