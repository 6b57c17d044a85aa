"""Metrics logs and the plots saved as PNG where users look: the loss curve, the validation loss per noise
level, the comparison figures."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import matplotlib

from glauber.files import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

START_STEP = "start_step"  # in logs/version_N/: the global step that start of the run began at


def merge_metric_logs(logs_dir: str | Path) -> Path | None:
    """Join ``logs/version_N/metrics.csv`` into ``logs/metrics.csv``, a resume replacing rows from its step on (bar evals)."""
    logs = Path(logs_dir)
    versions = sorted(logs.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.removeprefix("version_") or 0))
    if not versions:
        return None
    fields: list[str] = []
    rows: list[dict[str, str]] = []
    for path in versions:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            new = list(reader)
        fields += [k for k in reader.fieldnames or [] if k not in fields]
        start_file = path.parent / START_STEP
        start = int(start_file.read_text()) if start_file.is_file() else min((_step(r) for r in new), default=0)
        rows = [r for r in rows if _step(r) < start or (_step(r) == start and _only_evaluations(r))] + new
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(logs / "metrics.csv", lambda f: f.write(text.getvalue().encode()))
    return logs / "metrics.csv"


def _step(row: dict[str, str]) -> int:
    return int(float(row.get("step") or 0))


def _only_evaluations(row: dict[str, str]) -> bool:
    return all(k.startswith("eval/") for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch"))


def read_metrics(csv_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series ``name -> [(step, value)]`` from Lightning's CSV logger file."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = Path(csv_path)
    if not path.is_file():
        return series
    with path.open() as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k not in ("step", "epoch") and v not in ("", None):
                    series.setdefault(k, []).append((_step(row), float(v)))
    return series


def _save(fig: plt.Figure, out_png: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_loss_curves(csv_path: str | Path, out_png: str | Path) -> Path | None:
    """Training and validation loss against optimizer steps."""
    s = read_metrics(csv_path)
    if not s.get("train/loss"):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, vals = zip(*s["train/loss"])
    ax.plot(steps, vals, lw=0.8, alpha=0.6, label="train")
    if len(vals) >= 20:  # a running mean makes the trend readable
        k = max(5, len(vals) // 30)
        smooth = [sum(vals[max(0, i - k) : i + 1]) / len(vals[max(0, i - k) : i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, lw=1.6, label=f"train (mean of {k + 1})")
    if s.get("val/loss"):
        ax.plot(*zip(*s["val/loss"]), "o-", lw=1.6, label="validation (EMA)")
    ax.set(xlabel="optimizer step", ylabel="loss per hidden position")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_png)


def plot_loss_by_noise(bucket_losses: dict[int, float], num_buckets: int, step: int, out_png: str | Path) -> Path:
    """Validation loss per tenth of the noising time ``t/T`` (0 = clean, 1 = pure noise)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ks = sorted(k for k, v in bucket_losses.items() if math.isfinite(v))
    ax.bar([(k + 0.5) / num_buckets for k in ks], [bucket_losses[k] for k in ks], width=0.8 / num_buckets)
    ax.set(xlabel="noising time t/T", ylabel="validation loss", title=f"validation loss by noise level (step {step})")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_png)


def plot_comparison(rows: list[dict], labels: dict[str, str], out_png: str | Path) -> Path:
    """Gen-PPL and entropy against network calls, gen-PPL against sampling time; AR and real text as references."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == name), key=lambda r: r["nfe"])
        label = labels.get(name, name)
        if name in ("real", "ar"):
            style = dict(color="k" if name == "real" else "tab:gray", ls="--" if name == "real" else ":", lw=1.4)
            for ax, key in ((axes[0], "gen_ppl"), (axes[1], "entropy"), (axes[2], "gen_ppl")):
                ax.axhline(pts[0][key], label=f"{label} (NFE {pts[0]['nfe']})" if name == "ar" else label, **style)
            continue
        nfe = [r["nfe"] for r in pts]
        axes[0].plot(nfe, [r["gen_ppl"] for r in pts], "o-", label=label)
        axes[1].plot(nfe, [r["entropy"] for r in pts], "o-", label=label)
        axes[2].plot([r["sample_s"] / r["num_samples"] for r in pts], [r["gen_ppl"] for r in pts], "o-", label=label)
    xlabels = ("network calls", "network calls", "sampling seconds per sample")
    for ax, xl, yl in zip(axes, xlabels, ("generative perplexity", "unigram entropy (nats)", "generative perplexity")):
        ax.set(xscale="log", xlabel=xl, ylabel=yl)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    return _save(fig, out_png)


def plot_budgets(rows: list[dict], labels: dict[str, str], nfe: int, out_png: str | Path) -> Path:
    """Generative perplexity and NLL per byte at ``nfe`` network calls (AR: its own) against training steps."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == name and "corrector" not in r["setting"]]
        if name == "real":
            for ax, key in zip(axes, ("gen_ppl", "nll_per_byte")):
                ax.axhline(pts[0][key], color="k", ls="--", lw=1.4, label=labels.get(name, name))
            continue
        if name != "ar":
            pts = [r for r in pts if r["nominal_nfe"] == nfe]
        pts.sort(key=lambda r: r["budget"])
        for ax, key in zip(axes, ("gen_ppl", "nll_per_byte")):
            ax.plot([r["budget"] for r in pts], [r[key] for r in pts], "o-", label=labels.get(name, name))
    for ax, yl in zip(axes, (f"generative perplexity (NFE = {nfe})", "judge NLL per byte (nats)")):
        ax.set(xscale="log", xlabel="training steps", ylabel=yl)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    return _save(fig, out_png)


def plot_val_nll(csv_paths: dict[str, str | Path], labels: dict[str, str], out_png: str | Path) -> Path:
    """``val/nll`` (the implied conditional's cross-entropy, comparable across GGM losses) against steps."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, path in csv_paths.items():
        pts = read_metrics(path).get("val/nll", [])
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", ms=3, label=labels.get(name, name))
    ax.set(xlabel="optimizer step", ylabel="validation NLL of the denoising conditional (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_png)
