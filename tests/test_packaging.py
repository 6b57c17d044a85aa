"""The conda environment and setup.cfg list the same dependencies."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    setup_deps = [d.strip() for d in cfg["options"]["install_requires"].splitlines() if d.strip()]
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    conda_pip = [line.strip()[2:].strip() for line in lines[start + 1 :] if line.strip().startswith("- ")]
    assert sorted(conda_pip) == sorted(setup_deps)
