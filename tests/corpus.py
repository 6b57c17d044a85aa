"""A small text corpus for tiny training runs."""

from pathlib import Path


def corpus_overrides(tmp: Path, text: str) -> list[str]:
    """``data.source`` (``text`` written once to ``tmp/corpus.txt``) and ``data.cache_dir`` under ``tmp``."""
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(text)
    return [f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}"]
