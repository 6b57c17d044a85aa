"""A small text corpus for tiny training runs."""

from pathlib import Path


def corpus_overrides(tmp: Path, text: str) -> list[str]:
    """``data.source`` (``text`` written once to ``tmp/corpus.txt``) and ``data.cache_dir`` under ``tmp``."""
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(text)
    return [f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}"]


def bare_trainer(tmp: Path, max_steps: int):
    """A one-CPU Lightning Trainer without loggers, checkpoints, validation or progress bars: for tests of
    the DataModules' own state (resume, fingerprints)."""
    import lightning as L

    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        default_root_dir=str(tmp),
    )
