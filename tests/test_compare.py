"""``glauber compare`` end to end on a tiny corpus: every method trains once to the largest of two training
budgets, is sampled at each budget's checkpoint and its NFE settings (GGM also with a corrector sweep),
and is scored by the comparison's own AR judge; tables and plots are written; a re-run reuses the training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from glauber.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("compare")
    (tmp / "corpus.txt").write_text(CORPUS)
    out = tmp / "out"
    argv = [
        "compare", "--config", str(ROOT / "experiments" / "tiny.yaml"), "--out", str(out), "--nfe", "4,16,64",
        "--num-samples", "4", "--batch-size", "4", "--methods", "ggm,ggm_weighted,ggm_ce,mdlm,ar", "--budgets", "2,4",
        "--corrector-sweeps", "1", f"data.source={tmp / 'corpus.txt'}", f"data.cache_dir={tmp / 'cache'}",
        "train.val_every_steps=2",
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_every_method_is_sampled_at_its_budgets_and_scored(compared):
    res = json.loads((compared / "results.json").read_text())
    rows = res["rows"]
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    assert set(by) == {"real", "ggm", "ggm_weighted", "ggm_ce", "mdlm", "ar"}
    assert res["meta"]["budgets"] == [2, 4]
    for budget in (2, 4):
        ggm = sorted((r for r in by["ggm"] if r["budget"] == budget), key=lambda r: (r["nfe"], r["setting"]))
        # tiny.yaml: L = 32, K = 2 -> GGM NFE = 64 / m for m dividing 32: all three, then m = 1 + one corrector sweep
        assert [r["setting"] for r in ggm] == ["m=16", "m=4", "m=1", "m=1 +1 corrector"]
        assert [r["nfe"] for r in ggm[:3]] == [4, 16, 64] and ggm[3]["nfe"] > 64
        assert [r["nfe"] for r in by["ar"] if r["budget"] == budget] == [32]  # one call per token
        mdlm = [r for r in by["mdlm"] if r["budget"] == budget]
        assert sorted(r["setting"] for r in mdlm) == ["steps=16", "steps=4", "steps=64"]
        assert all(0 < r["nfe"] <= int(r["setting"].split("=")[1]) == r["nominal_nfe"] for r in mdlm)  # the cache saves calls
    for r in rows:
        assert math.isfinite(r["gen_ppl"]) and r["gen_ppl"] >= 1 and r["entropy"] > 0 and r["num_samples"] == 4
        assert math.isfinite(r["nll_per_byte"]) and r["nll_per_byte"] > 0
    meta = res["meta"]
    assert meta["judge"].endswith("ar/checkpoints/last.ckpt")
    # tiny.yaml: L = 32, hidden sets 1, 2, 4 (mean 7/3); MDLM half the positions; AR all
    assert meta["supervised_tokens_per_sequence"]["ar"] == 32
    assert abs(meta["supervised_tokens_per_sequence"]["ggm"] - 7 / 3) < 1e-9
    assert abs(meta["supervised_tokens_per_sequence"]["mdlm"] - 16 * (1 - 1e-3)) < 1e-9
    table = (compared / "results.md").read_text()
    assert "### 2 training steps" in table and "### 4 training steps" in table and "NFE = L" in table
    for png in ("compare.png", "budgets.png", "val_nll.png"):
        assert (compared / png).stat().st_size > 10_000
    assert (compared / "samples" / "real.txt").is_file() and (compared / "samples" / "ggm_4_m4.txt").is_file()
    assert (compared / "ggm" / "checkpoints" / "step00000002.ckpt").is_file()


def test_rerun_reuses_finished_trainings(compared, tmp_path):
    before = json.loads((compared / "ggm" / "train_time.json").read_text())
    ckpt = compared / "ggm" / "checkpoints" / "last.ckpt"
    mtime = ckpt.stat().st_mtime
    tmp = compared.parent
    argv = [
        "compare", "--config", str(ROOT / "experiments" / "tiny.yaml"), "--out", str(compared), "--nfe", "16",
        "--num-samples", "2", "--methods", "ggm,ar", "--budgets", "2,4", "--corrector-sweeps", "0",
        f"data.source={tmp / 'corpus.txt'}", f"data.cache_dir={tmp / 'cache'}", "train.val_every_steps=2",
    ]  # fmt: skip
    assert main(argv) == 0
    assert ckpt.stat().st_mtime == mtime
    assert json.loads((compared / "ggm" / "train_time.json").read_text()) == before


def test_unknown_method_and_missing_judge_are_refused_before_training(tmp_path, capsys):
    assert main(["compare", "--methods", "ggm,gpt", "--out", str(tmp_path)]) == 2
    assert "unknown method 'gpt'" in capsys.readouterr().err
    assert main(["compare", "--methods", "ggm", "--out", str(tmp_path)]) == 2
    assert "--judge" in capsys.readouterr().err
    assert not (tmp_path / "ggm").exists()
