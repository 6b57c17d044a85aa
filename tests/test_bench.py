"""``glauber bench``: the GPU report's tiny CPU path (what ``make bench-gpu`` runs without a GPU), the peak-memory
estimate's counting, and the options' help. No timed assertions: the numbers only have to exist, be finite and
positive."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from glauber.commands.cli import main
from glauber.config import load_config
from glauber.eval.peak_memory import PeakMemory, estimate_training_memory

ROOT = Path(__file__).resolve().parents[1]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_gpu_tiny_path_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(["bench", "--suite", "gpu", "--tiny", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "bench_gpu.json").read_text())
    md = (out / "bench_gpu.md").read_text()
    assert report["tiny"] is True and "TINY" in report["note"] and "TINY" in md
    rows = report["rows"]
    got = {(r["kind"], r["target"], r["compile"]) for r in rows}
    for target in ("small", "medium"):
        for kind in ("train", "sampler"):
            assert {(kind, target, "eager"), (kind, target, "compiled")} <= got
        assert ("sampler", target, "cuda-graphs") in got
    measured = [r for r in rows if "skipped" not in r]
    assert len(measured) == 4  # eager train + sampler, both stand-ins
    for r in measured:
        keys = (
            ("train_tok_s", "train_step_ms", "peak_GiB") if r["kind"] == "train" else ("call_ms", "sample_s_T", "samples_per_s")
        )
        assert all(_positive(r[k]) for k in keys), r
        assert "fraction_of_sol" not in r  # a stand-in is never compared with the GPU targets
    for r in rows:
        if "skipped" in r:
            assert r["skipped"]  # says why
    for header in ("## Training", "## Sampler", "| small | tiny | eager |", "| medium | tiny | compiled |"):
        assert header in md
    assert "TINY stand-in run" in capsys.readouterr().out


def test_peak_memory_counts_live_storages_once():
    with PeakMemory() as tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes
        view = a[:10]  # same storage: not counted again
        b = a * 2  # 4,000 more
        del b
        c = torch.empty(250, dtype=torch.float64)  # 2,000: the peak stays at 8,000
        tracker.reset_peak()
    assert tracker.peak == 6000 and tracker.current == 6000
    assert view.shape == (10,) and c.numel() == 250


def test_memory_estimate_of_a_config_is_consistent():
    est = estimate_training_memory(load_config(ROOT / "experiments" / "tiny.yaml"), "tiny", vocab=65)
    row = est.row()
    persistent = est.weights_GiB + est.grads_GiB + est.optimizer_GiB + est.ema_GiB
    assert est.grads_GiB == pytest.approx(est.weights_GiB) and est.optimizer_GiB == pytest.approx(2 * est.weights_GiB)
    assert est.peak_GiB == pytest.approx(persistent + est.activations_GiB)
    assert all(_positive(row[k]) for k in ("params_M", "peak_GiB", "activations_GiB", "sampling_peak_GiB"))
    assert row["micro_batch"] == 4 and row["accumulate"] == 1 and row["precision"] == "32-true"
    # the parameters, counted from the network itself
    n = est.weights_GiB * 2**30 / 4
    assert n == pytest.approx(est.params_M * 1e6, abs=0.05e6)  # params_M has one decimal


def test_bench_help_explains_every_option(capsys):
    assert main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    for option in (
        "--suite",
        "--compile",
        "--cuda-graphs",
        "--config",
        "--set",
        "--repeats",
        "--sample-calls",
        "--tiny",
        "--out",
    ):
        assert option in text
    for suite in ("throughput", "overhead", "sampling", "memory", "gpu"):
        assert suite in text


def test_makefile_has_bench_gpu_with_a_tiny_switch():
    text = (ROOT / "Makefile").read_text()
    assert "bench-gpu:" in text and "--suite gpu" in text and "$(if $(TINY),--tiny)" in text
