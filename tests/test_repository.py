"""The repository tracks no machine state: a fresh clone must run the README's commands as written.

A tracked ``.venv`` symlink to one machine's path once made ``make test`` and ``make demo`` fail in
0.1 s on every fresh clone while CI (which sets its own venv) stayed green.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Machine state that must never be committed: virtual environments, run outputs, caches, checkpoints.
FORBIDDEN_PARTS = {".venv", "venv", "env", "runs", "lightning_logs", "__pycache__", ".pytest_cache", ".ruff_cache", "cache"}
FORBIDDEN_SUFFIXES = (".ckpt", ".pyc", ".egg-info", ".lock")
# Absolute paths of a developer's machine (a user's clone lives elsewhere).
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|work|root|home/\w+|Users/\w+)/")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".cfg", ".toml", ".txt", ".sbatch", ".json", ""}


def tracked() -> list[tuple[str, str]]:
    """(mode, path) of every tracked file, from the index."""
    try:
        out = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # an sdist or a copy without git
        pytest.skip(f"not a git checkout: {e}")
    rows = []
    for line in out.splitlines():
        meta, path = line.split("\t", 1)
        rows.append((meta.split()[0], path))
    return rows


def test_no_symlinks_are_tracked():
    links = [p for mode, p in tracked() if mode == "120000"]
    assert not links, f"tracked symlinks point into one machine and break fresh clones: {links} (git rm --cached them)"


def test_no_machine_state_is_tracked():
    bad = [p for _, p in tracked() if FORBIDDEN_PARTS & set(Path(p).parts) or p.endswith(FORBIDDEN_SUFFIXES)]
    assert not bad, f"virtual environments, run outputs or checkpoints are tracked: {bad}"


def test_no_machine_paths_in_tracked_text():
    hits = []
    for _, p in tracked():
        path = ROOT / p
        if path.suffix not in TEXT_SUFFIXES or not path.is_file() or p.startswith("docs/compare/samples/"):
            continue
        if p == "tests/test_repository.py":
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{p}:{n}: {line.strip()[:100]}")
    assert not hits, "absolute paths of a machine in tracked files:\n" + "\n".join(hits)


def test_gitignore_covers_the_default_venv_as_file_or_folder():
    lines = (ROOT / ".gitignore").read_text().split()
    assert ".venv" in lines, ".gitignore must ignore `.venv` itself (a `.venv/` pattern misses a symlink)"
