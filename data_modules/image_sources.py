"""Image sources: a folder of ``.png/.jpg/.jpeg/.webp`` images (searched recursively, sorted by relative path), a
``.zip`` of such images (sorted by name), a ``.npz`` holding ``images`` uint8 ``[N, H, W, 3]``, or a Hugging Face dataset
``hf:NAME[:split]`` (column ``image``, split ``train`` by default). ``fit_image`` makes each RGB on white at ``image_size``."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from data_modules.fingerprint import file_sha256, json_digest
from data_modules.hub import load_hub_dataset
from data_modules.paths import candidates, find_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
HF_PREFIX = "hf:"
HF_IMAGE_COLUMNS = ("image", "img")


def fit_image(img: Any, image_size: int | None, center_crop: bool = True) -> np.ndarray:
    """uint8 ``[S, S, 3]`` of a PIL image or a uint8 array ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``: RGB, transparency
    composited on white, then ``PIL.ImageOps.fit`` to ``S x S`` (centre crop and bicubic resize in one resampling), or
    squashed without ``center_crop``. ``image_size=None``: RGB on white only, at its own size."""
    from PIL import Image, ImageOps

    S = image_size
    if isinstance(img, np.ndarray):
        if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and (S is None or img.shape[:2] == (S, S)):
            return img
        if img.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (got {img.dtype})")
        if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4))):
            raise ValueError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4] (got shape {img.shape})")
        img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA")).convert("RGB")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if S is not None and img.size != (S, S):
        resize = ImageOps.fit if center_crop else Image.Image.resize
        img = resize(img, (S, S), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def resolve_source(source: str) -> Path:
    """The path a local source names (relative: the working directory, then the project root)."""
    path = find_path(source)
    if path is not None:
        return path
    raise FileNotFoundError(
        f"image source {source!r} not found (looked for {' and '.join(map(str, candidates(source)))}). Download the "
        f"images and put them there, or point data.source at them: a folder of {'/'.join(e[1:] for e in IMAGE_EXTS)} "
        "files (searched recursively), a .zip of such files, a .npz with an 'images' uint8 [N, H, W, 3] array, or "
        "hf:NAME[:split] for a Hugging Face dataset. The emoji set bundled with glauber is data/twemoji32.npz"
    )


def is_hub_source(source: str) -> bool:
    return source.startswith(HF_PREFIX)


def parse_hf(source: str) -> tuple[str, str]:
    name, _, split = source[len(HF_PREFIX) :].partition(":")
    if not name:
        raise ValueError(f"data.source={source!r}: write hf:NAME or hf:NAME:split")
    return name, split or "train"


def offline_message(name: str) -> str:
    return (
        f"Hugging Face dataset {name!r} is needed but huggingface.co is unreachable (no internet?) and the HF cache "
        "does not hold it. Pass data.source=/path/to/a/local/image/folder (or a .zip / .npz of images), or build "
        "the token cache on a machine with internet and copy it to the same data.cache_dir here"
    )


def folder_images(root: Path) -> list[Path]:
    files = [f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file()]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def content_digest(path: Path) -> str:
    """sha256 of a local source's content (the .zip/.npz file, or a folder's image files with their relative names)."""
    if path.is_dir():
        return json_digest([[f.relative_to(path).as_posix(), file_sha256(f)] for f in folder_images(path)])
    return file_sha256(path)


def _read(file: Any) -> Any:
    from PIL import Image

    with Image.open(file) as img:
        img.load()
        return img


class ImageSource(Dataset):
    """Random access to the ``items`` of a source, each image as uint8 ``[S, S, 3]`` (see ``fit_image``)."""

    kind = "?"
    items: Any

    def __init__(self, path: Path | None, source: str, image_size: int | None, center_crop: bool = True):
        self.path, self.source, self.image_size, self.center_crop = path, source, image_size, center_crop

    def raw(self, i: int) -> Any:
        return self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        try:
            return fit_image(self.raw(i), self.image_size, self.center_crop)
        except (OSError, ValueError) as e:
            raise ValueError(f"image {i} of {self.source!r} ({self.name(i)}) cannot be read: {e}") from e

    def name(self, i: int) -> str:
        return f"#{i}"

    def signature(self) -> list[Any]:
        return [self.kind, self.path.name, self.path.stat().st_size, content_digest(self.path)]


class FolderImages(ImageSource):
    kind = "folder"

    def __init__(self, root: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(root, source, image_size, center_crop)
        self.items = folder_images(root)
        if not self.items:
            raise ValueError(f"image folder {root} holds no {'/'.join(IMAGE_EXTS)} files (searched recursively)")

    def raw(self, i: int) -> Any:
        return _read(self.items[i])

    def name(self, i: int) -> str:
        return str(self.items[i])

    def signature(self) -> list[Any]:
        return ["folder", len(self.items), sum(f.stat().st_size for f in self.items), content_digest(self.path)]


class ZipImages(ImageSource):
    kind = "zip"

    def __init__(self, path: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(path, source, image_size, center_crop)
        with zipfile.ZipFile(path) as z:
            self.items = sorted(n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_EXTS and not n.startswith("__MACOSX/"))
        if not self.items:
            raise ValueError(f"zip file {path} holds no {'/'.join(IMAGE_EXTS)} files")
        self._zip: zipfile.ZipFile | None = None

    def raw(self, i: int) -> Any:
        if self._zip is None:  # opened once per process (DataLoader workers get their own)
            self._zip = zipfile.ZipFile(self.path)
        with self._zip.open(self.items[i]) as f:
            return _read(f)

    def name(self, i: int) -> str:
        return f"{self.path}:{self.items[i]}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None}


class ArrayImages(ImageSource):
    kind = "npz"

    def __init__(self, path: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(path, source, image_size, center_crop)
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ValueError(f"{path} has no 'images' array (arrays: {z.files}); save one as uint8 [N, H, W, 3]")
            a = self.items = z["images"]
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[3] not in (1, 3, 4) or len(a) == 0:
            raise ValueError(f"{path}: 'images' must be a non-empty uint8 [N, H, W, 3] array (got {a.dtype} {a.shape})")


class HubImages(ImageSource):
    kind = "hf"

    def __init__(self, source: str, image_size: int | None, center_crop: bool = True, timeout_s: float = 3.0):
        super().__init__(None, source, image_size, center_crop)
        self.hf_name, self.split = parse_hf(source)
        ds = load_hub_dataset(self.hf_name, timeout_s, offline_message(self.hf_name), split=self.split)
        self.column = next((c for c in HF_IMAGE_COLUMNS if c in ds.column_names), None)
        if self.column is None:
            raise ValueError(f"Hugging Face dataset {self.hf_name!r} has no 'image' column (columns: {ds.column_names})")
        self.items = ds.select_columns([self.column])

    def raw(self, i: int) -> Any:
        return self.items[int(i)][self.column]

    def signature(self) -> list[Any]:
        return ["hf", self.hf_name, self.split, len(self.items)]


def open_source(source: str, image_size: int | None, center_crop: bool = True, timeout_s: float = 3.0) -> ImageSource:
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 (got {image_size})")
    if not source:
        raise ValueError("data.source is empty: set it to an image folder, a .zip or .npz of images, or hf:NAME[:split]")
    if is_hub_source(source):
        return HubImages(source, image_size, center_crop, timeout_s)
    path = resolve_source(source)
    if path.is_dir():
        return FolderImages(path, source, image_size, center_crop)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return ZipImages(path, source, image_size, center_crop)
    if suffix == ".npz":
        return ArrayImages(path, source, image_size, center_crop)
    raise ValueError(f"image source {path}: expected a folder, a .zip or a .npz (got a {suffix or 'extension-less'} file)")


def load_images(source: str, image_size: int, center_crop: bool = True, progress: bool = True) -> np.ndarray:
    """Every image of ``source`` as uint8 ``[N, S, S, 3]`` (see ``fit_image``); a progress bar unless it is a .npz."""
    from tqdm.auto import tqdm

    src, S = open_source(source, image_size, center_crop), image_size
    if isinstance(src, ArrayImages) and src.items.shape[3] == 3 and (S is None or src.items.shape[1:3] == (S, S)):
        return src.items
    out = np.empty((len(src), image_size, image_size, 3), dtype=np.uint8)
    show = progress and not isinstance(src, ArrayImages)
    for i in tqdm(range(len(src)), desc=f"reading {source}", unit="img", disable=not show, mininterval=1.0):
        out[i] = src[i]
    return out
