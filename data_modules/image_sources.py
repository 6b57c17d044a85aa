"""Image sources: a folder of ``.png/.jpg/.jpeg/.webp`` images (searched recursively, sorted by relative
path), a ``.zip`` of such images (sorted by name), a ``.npz`` holding ``images`` uint8 ``[N, H, W, 3]``,
or a Hugging Face dataset ``hf:NAME[:split]`` (column ``image``, split ``train`` by default).

Every image is made RGB (transparency composited on white) and brought to ``image_size`` by
``fit_image``: ``PIL.ImageOps.fit`` (centre crop to a square and bicubic resize in one resampling), or a
bicubic squash to the square without ``center_crop``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from data_modules.fingerprint import file_sha256, json_digest
from data_modules.hub import load_hub_dataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
HF_PREFIX = "hf:"
HF_IMAGE_COLUMNS = ("image", "img")


def _to_rgb(img: Any) -> Any:
    """A PIL image in RGB; transparency (RGBA, LA, P with a transparent colour) is composited on white."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def fit_image(img: Any, image_size: int | None, center_crop: bool = True) -> np.ndarray:
    """uint8 ``[S, S, 3]`` of a PIL image or an array ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``: RGB on
    white, then ``PIL.ImageOps.fit`` to ``S x S`` (the centred square, bicubic; the filter reads the
    pixels just outside the square, and an odd margin is split evenly, to the half pixel), or squashed
    to ``S x S`` when ``center_crop`` is false. ``image_size=None``: RGB on white only, at its own size."""
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
    img = _to_rgb(img)
    if S is not None and img.size != (S, S):
        resize = ImageOps.fit if center_crop else Image.Image.resize
        img = resize(img, (S, S), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def resolve_source(source: str) -> Path:
    """The path a local source names (relative: the working directory, then the project root)."""
    p = Path(source).expanduser()
    bases = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for base in dict.fromkeys(bases):
        if base.exists():
            return base
    looked = " and ".join(str(b) for b in dict.fromkeys(bases))
    raise FileNotFoundError(
        f"image source {source!r} not found (looked for {looked}). Download the images and put them there, or point "
        f"data.source at them: a folder of {'/'.join(e[1:] for e in IMAGE_EXTS)} files (searched recursively), a .zip "
        "of such files, a .npz with an 'images' uint8 [N, H, W, 3] array, or hf:NAME[:split] for a Hugging Face "
        "dataset. The emoji set bundled with glauber is data/twemoji32.npz"
    )


def parse_hf(source: str) -> tuple[str, str]:
    """``hf:NAME[:split]`` -> ``(NAME, split)`` (split ``train`` by default)."""
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
    """The image files under ``root`` (searched recursively), sorted by relative path."""
    files = [f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file()]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def content_digest(path: Path) -> str:
    """sha256 of a local source's content: of the .zip/.npz file, or over the image files of a folder in
    sorted order (with their relative names). Part of the token cache's key and of meta.json."""
    if path.is_dir():
        return json_digest([[f.relative_to(path).as_posix(), file_sha256(f)] for f in folder_images(path)])
    return file_sha256(path)


class ImageSource(Dataset):
    """Random access to the images of a source, each returned as uint8 ``[S, S, 3]`` (``fit_image``;
    ``image_size=None``: RGB at their own sizes)."""

    kind = "?"

    def __init__(self, source: str, image_size: int | None, center_crop: bool = True):
        self.source, self.image_size, self.center_crop = source, image_size, center_crop

    def raw(self, i: int) -> Any:
        """Image ``i`` as found (a PIL image or an array)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> np.ndarray:
        try:
            return fit_image(self.raw(i), self.image_size, self.center_crop)
        except (OSError, ValueError) as e:
            raise ValueError(f"image {i} of {self.source!r} ({self.name(i)}) cannot be read: {e}") from e

    def name(self, i: int) -> str:
        return f"#{i}"

    def signature(self) -> list[Any]:
        """What identifies the source's content: a change invalidates its token cache."""
        return [self.kind, self.path.name, self.path.stat().st_size, content_digest(self.path)]


class FolderImages(ImageSource):
    kind = "folder"

    def __init__(self, root: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(source, image_size, center_crop)
        self.root = root
        self.files = folder_images(root)
        if not self.files:
            raise ValueError(f"image folder {root} holds no {'/'.join(IMAGE_EXTS)} files (searched recursively)")

    def __len__(self) -> int:
        return len(self.files)

    def raw(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            img.load()
            return img

    def name(self, i: int) -> str:
        return str(self.files[i])

    def signature(self) -> list[Any]:
        return ["folder", len(self.files), sum(f.stat().st_size for f in self.files), content_digest(self.root)]


class ZipImages(ImageSource):
    kind = "zip"

    def __init__(self, path: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(source, image_size, center_crop)
        self.path = path
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_EXTS and not n.startswith("__MACOSX/")]
        self.names = sorted(names)
        if not self.names:
            raise ValueError(f"zip file {path} holds no {'/'.join(IMAGE_EXTS)} files")
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.names)

    def raw(self, i: int) -> Any:
        from PIL import Image

        if self._zip is None:  # opened once per process (DataLoader workers get their own)
            self._zip = zipfile.ZipFile(self.path)
        with self._zip.open(self.names[i]) as f, Image.open(f) as img:
            img.load()
            return img

    def name(self, i: int) -> str:
        return f"{self.path}:{self.names[i]}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None}


class ArrayImages(ImageSource):
    kind = "npz"

    def __init__(self, path: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(source, image_size, center_crop)
        self.path = path
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ValueError(f"{path} has no 'images' array (arrays: {z.files}); save one as uint8 [N, H, W, 3]")
            self.images = z["images"]
        a = self.images
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[3] not in (1, 3, 4) or len(a) == 0:
            raise ValueError(f"{path}: 'images' must be a non-empty uint8 [N, H, W, 3] array (got {a.dtype} {a.shape})")

    @property
    def ready(self) -> bool:
        """Whether the array is already RGB at ``image_size`` (then it is used as it is)."""
        S = self.image_size
        return self.images.shape[3] == 3 and (S is None or self.images.shape[1:3] == (S, S))

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, i: int) -> Any:
        return self.images[i]


class HubImages(ImageSource):
    kind = "hf"

    def __init__(self, source: str, image_size: int | None, center_crop: bool = True, timeout_s: float = 3.0):
        super().__init__(source, image_size, center_crop)
        self.hf_name, self.split = parse_hf(source)
        ds = load_hub_dataset(self.hf_name, timeout_s, offline_message(self.hf_name), split=self.split)
        column = next((c for c in HF_IMAGE_COLUMNS if c in ds.column_names), None)
        if column is None:
            raise ValueError(f"Hugging Face dataset {self.hf_name!r} has no 'image' column (columns: {ds.column_names})")
        self.ds = ds.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.ds)

    def raw(self, i: int) -> Any:
        return self.ds[int(i)][self.column]

    def signature(self) -> list[Any]:
        return ["hf", self.hf_name, self.split, len(self.ds)]


def is_hub_source(source: str) -> bool:
    return source.startswith(HF_PREFIX)


def open_source(source: str, image_size: int | None, center_crop: bool = True, timeout_s: float = 3.0) -> ImageSource:
    """The ``ImageSource`` that ``source`` names (see the module docstring); FileNotFoundError when missing."""
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


def _stack(batch: list[np.ndarray]) -> np.ndarray:
    return np.stack(batch)


def load_images(source: str, image_size: int, center_crop: bool = True, progress: bool = True) -> np.ndarray:
    """Every image of ``source`` as uint8 ``[N, S, S, 3]`` (see ``fit_image``), with a progress bar
    for folders, zips and hub datasets."""
    src = open_source(source, image_size, center_crop)
    if isinstance(src, ArrayImages) and src.ready:
        return src.images
    from tqdm.auto import tqdm

    out = np.empty((len(src), image_size, image_size, 3), dtype=np.uint8)
    show = progress and not isinstance(src, ArrayImages)
    for i in tqdm(range(len(src)), desc=f"reading {source}", unit="img", disable=not show, mininterval=1.0):
        out[i] = src[i]
    return out
