"""The package's shape holds: layers import only downwards (import-linter), no project import hides inside
a function to dodge a circle, every subpackage ships in the wheel, and no module grows past ~450 lines."""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "src" / "glauber").rglob("*.py"), *(ROOT / "data_modules").rglob("*.py")])
PROJECT = ("glauber", "data_modules")
MAX_LINES = 450


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail(f"{exe} missing: the dev extra installs import-linter (pip install -e '.[dev]')")
    env = None
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True, env=env)


def test_layer_contract_is_kept():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_layer_contract_catches_an_upward_import(tmp_path):
    """The contract is not vacuous: the same tree with core importing training is refused."""
    shutil.copytree(ROOT / "src" / "glauber", tmp_path / "glauber", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copytree(ROOT / "data_modules", tmp_path / "data_modules", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    noise = tmp_path / "glauber" / "core" / "noise.py"
    noise.write_text(noise.read_text() + "\nfrom glauber.training import train  # noqa\n")
    out = lint_imports(tmp_path, pythonpath=tmp_path)
    assert out.returncode != 0
    assert "glauber.core.noise -> glauber.training.train" in out.stdout


def function_level_project_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                names = []
                if isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                    names = [inner.module]
                elif isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                found += [f"{path.relative_to(ROOT)}:{inner.lineno} {n}" for n in names if n.split(".")[0] in PROJECT]
    return found


def test_no_project_import_hides_inside_a_function():
    hidden = [hit for path in SOURCES for hit in function_level_project_imports(path)]
    assert not hidden, f"import these at the top of the module (the layers leave no circle to dodge): {hidden}"


def test_every_subpackage_is_in_the_wheel():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {"data_modules"} | {
        ".".join(("glauber", *p.parent.relative_to(ROOT / "src" / "glauber").parts)).rstrip(".")
        for p in (ROOT / "src" / "glauber").rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to setup.cfg [options] packages: {sorted(on_disk - listed)}"


def test_no_module_is_longer_than_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept (limit {MAX_LINES} lines): {long}"
