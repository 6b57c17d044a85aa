"""Content fingerprints of data files, shared by the text and image token caches, and the newest
complete cache of a source whose files are gone."""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed (remembered per path, size and mtime in this process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _SHA256_MEMO[key] = h.hexdigest()
    return _SHA256_MEMO[key]


def files_signature(files: list[Path]) -> list[list[Any]]:
    """Names, sizes and content sha256 of data files: an edited file invalidates its cache."""
    return [[f.name, f.stat().st_size, file_sha256(f)] for f in files]


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def newest_cache(root: Path, base: str, usable: Callable[[Path], bool]) -> tuple[Path | None, int]:
    """The most recently completed (by meta.json's mtime) ``usable`` cache ``<root>/<base>-<12 hex digits>``,
    and how many usable ones there are."""
    pattern = re.compile(re.escape(base) + r"-[0-9a-f]{12}")
    found = [
        ((d / "meta.json").stat().st_mtime_ns, d)
        for d in root.glob(f"{glob.escape(base)}-*")
        if pattern.fullmatch(d.name) and (d / "meta.json").is_file() and usable(d)
    ]
    return (max(found)[1] if found else None), len(found)
