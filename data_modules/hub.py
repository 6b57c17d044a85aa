"""Hugging Face hub datasets without waiting on the network: a fast reachability probe, and loading from
the local hub cache (the libraries' own cache-only calls, never their module globals) when huggingface.co
cannot be reached. ``HF_HUB_OFFLINE=1`` keeps its documented meaning."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any


class HubUnreachableError(ValueError):
    """Something must come from the Hugging Face hub, which cannot be reached, and nothing is cached."""


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to huggingface.co:443 opens within ``timeout_s``."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def cached_snapshot(name: str) -> Path | None:
    """The local hub-cache folder of dataset repository ``name`` (None when it was never downloaded)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def hf_cached(name: str) -> bool:
    return cached_snapshot(name) is not None


def load_hub_dataset(name: str, timeout_s: float, offline_message: str, split: str | None = None) -> Any:
    """``datasets.load_dataset(name, split=split)``, or its local hub-cache copy when huggingface.co does not
    answer within ``timeout_s``, else ``HubUnreachableError(offline_message)`` at once."""
    from datasets import load_dataset

    if hub_reachable(timeout_s):
        return load_dataset(name, split=split)
    snapshot = cached_snapshot(name)
    if snapshot is None:
        raise HubUnreachableError(offline_message)
    try:
        return load_dataset(str(snapshot), split=split)
    except Exception as e:  # datasets raises many kinds here
        raise HubUnreachableError(f"{offline_message} (offline load from the HF cache {snapshot} failed: {e})") from e
