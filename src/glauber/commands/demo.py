"""``glauber demo`` / ``make demo``: train on bundled tiny Shakespeare on the CPU and write a report to ``runs/demo``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_modules.paths import PROJECT_ROOT
from glauber.config import load_config
from glauber.eval.inference import checkpoint_tokenizer, format_samples, generate, infill_template, load_checkpoint
from glauber.eval.plots import read_metrics
from glauber.files import check_output_dir
from glauber.training.train import train

DEFAULT_CONFIG = PROJECT_ROOT / "experiments" / "shakespeare.yaml"


def shown_path(path: Path) -> Path:
    """``path`` relative to the repository (or the working folder) when inside, so reports name no absolute paths."""
    for base in (PROJECT_ROOT, Path.cwd()):
        try:
            return path.resolve().relative_to(base.resolve())
        except ValueError:
            continue
    return path


def run(args: argparse.Namespace) -> Path:
    check_output_dir(args.out, "--out")
    cfg_path = Path(args.config) if args.config else DEFAULT_CONFIG
    if not cfg_path.is_file():
        cfg_path = Path("experiments/shakespeare.yaml")
    cfg = load_config(cfg_path, [f"train.run_dir={args.out}", *args.overrides])
    t0 = time.time()
    run_dir = train(cfg)
    train_s = time.time() - t0
    module = load_checkpoint(run_dir / "checkpoints" / "last.ckpt", "cpu")
    tok = checkpoint_tokenizer(module)
    L = cfg.data.seq_len
    opts = {k: cfg.sample[k] for k in ("positions_per_step", "corrector_sweeps", "temperature", "top_p")}
    t1 = time.time()
    uncond = generate(module, 4, 4, seed=1, **opts)
    sample_s = time.time() - t1

    text = Path(cfg.data.source).read_text()
    val_text = text[int(len(text) * (1 - cfg.data.val_fraction)) :]
    infills = []
    for k, start in enumerate((1000, 20000)):
        passage = val_text[start : start + L]
        prefix, middle, suffix = passage[: L // 3], passage[L // 3 : L - L // 3], passage[L - L // 3 :]
        template, clamp = infill_template(tok, L, cfg.data.wrap, prefix, suffix)
        ids = generate(module, 1, 1, seed=10 + k, template=template, clamp=clamp, **opts)
        filled = tok.decode(ids[0].tolist())
        infills.append((prefix, middle, suffix, filled[len(prefix) : L - len(suffix)]))

    samples = [tok.decode(r.tolist()) for r in uncond]
    (run_dir / "samples.txt").write_text(format_samples(samples))
    metrics = read_metrics(run_dir / "logs" / "metrics.csv")
    last = lambda k: metrics[k][-1] if metrics.get(k) else (None, float("nan"))
    step, train_loss = last("train/loss")
    _, val_loss = last("val/loss")
    block = lambda title, text: [title, "", "```", text, "```", ""]
    lines = [
        "# glauber demo: GGM on tiny Shakespeare (character level, CPU)",
        "",
        f"- command: `glauber demo` (config `{shown_path(cfg_path)}`), run directory `{run_dir}`",
        f"- model: {cfg.model.size} ({module.model.num_parameters() / 1e6:.2f}M non-embedding parameters), L = {L}, "
        f"V = {module.vocab_size}, K = {cfg.schedule.sweeps} sweeps",
        f"- trained {step} optimizer steps, batch {cfg.train.global_batch_size}, in {train_s / 60:.1f} min on "
        f"{torch.get_num_threads()} CPU threads; final train loss {train_loss:.4f}, validation loss (EMA) {val_loss:.4f}",
        f"- sampling: m = {opts['positions_per_step']} positions per network call, {module.network_calls(**opts):.0f} "
        f"network calls per sample ({cfg.sample.corrector_sweeps} corrector sweeps), temperature {cfg.sample.temperature}, "
        f"top-p {cfg.sample.top_p}; 4 samples in {sample_s:.1f} s",
        "",
        "![loss](plots/loss.png)",
        "",
        "![validation loss by noise level](plots/val_loss_by_noise.png)",
        "",
        "## Unconditional samples",
        "",
    ]
    for i, s in enumerate(samples):
        lines += block(f"Sample {i}:", s)
    lines += ["## Infilling (the middle third is generated; prefix and suffix are given)", ""]
    for i, (prefix, middle, suffix, filled) in enumerate(infills):
        lines += block(f"Passage {i}, original:", prefix + middle + suffix)
        lines += block(f"Passage {i}, infilled (between the given prefix and suffix):", prefix + filled + suffix)
    lines += ["Config:", "", "```yaml", OmegaConf.to_yaml(cfg).rstrip(), "```", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    print(f"\nreport: {report}\nsamples: {run_dir / 'samples.txt'}\nplots: {run_dir / 'plots'}")
    print("\n" + samples[0])
    return report


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train on bundled tiny Shakespeare (CPU, ~10 min) and write a report",
        description="Train GGM on the bundled tiny Shakespeare (character level) on the CPU, then write samples "
        "(unconditional and infilled), the loss curve and report.md to the output directory.",
    )
    p.add_argument("--config", default=None, help="experiment YAML (default: experiments/shakespeare.yaml)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("overrides", nargs="*", help="config overrides as dotted key=value pairs")
