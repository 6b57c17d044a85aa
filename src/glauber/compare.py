"""``glauber compare``: GGM against its baselines on one corpus, backbone and training budget.

Each method is trained with the same config (model, data, batch, steps; only ``method`` and its own
section differ), then sampled at several numbers of network calls (NFE). Every sample set is scored
by one judge (by default the comparison's own autoregressive model) for generative perplexity, beside
its unigram entropy and the wall-clock sampling time. The AR model's samples and held-out real text
are the references. Writes ``results.json``, ``results.md`` and ``compare.png`` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from glauber.plots import plot_comparison

# name -> config overrides; every other key comes from the shared config
METHOD_OVERRIDES: dict[str, list[str]] = {
    "ggm": ["method=ggm", "process.loss=analytic"],
    "ggm_ce": ["method=ggm", "process.loss=cross_entropy"],
    "mdlm": ["method=mdlm"],
    "ar": ["method=ar"],
}
LABELS = {
    "ggm": "GGM (binary classification)",
    "ggm_ce": "GGM process, cross-entropy loss (ablation)",
    "mdlm": "MDLM (masked diffusion)",
    "ar": "autoregressive",
    "real": "held-out real text",
}


@dataclass
class Row:
    method: str
    nfe: float  # network evaluations per sample
    setting: str
    gen_ppl: float
    gen_ppl_per_seq: float
    entropy: float
    sample_s: float  # wall-clock seconds to draw all samples of this row
    num_samples: int


def row_of(method: str, nfe: int, setting: str, res: dict[str, Any], seconds: float) -> Row:
    return Row(method, nfe, setting, res["gen_ppl"], res["gen_ppl_per_seq"], res["unigram_entropy"], seconds, res["num_samples"])


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train GGM and its baselines with one budget and compare their samples",
        description="Train each method (ggm, ggm_ce, mdlm, ar) on the same config and budget, sample each at several "
        "numbers of network calls, and score the samples with one judge: generative perplexity (micro and per-sequence), "
        "unigram entropy and sampling time, against AR samples and held-out real text. Re-running resumes finished "
        "or interrupted trainings from their run directories.",
    )
    p.add_argument("--config", default="experiments/compare_shakespeare.yaml", help="shared experiment YAML")
    p.add_argument("--out", default="runs/compare", help="output folder (one run directory per method inside)")
    p.add_argument("--methods", default="ggm,ggm_ce,mdlm,ar", help="comma-separated subset of ggm,ggm_ce,mdlm,ar")
    p.add_argument("--nfe", default="8,16,32,64,128", help="network-call budgets to sample diffusion models at")
    p.add_argument("--num-samples", type=int, default=64, help="samples per (method, NFE) (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="samples drawn at once (default 64)")
    p.add_argument("--judge", default=None, help="judge LM (HF name/dir or a .ckpt); default: the comparison's AR model")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for every method (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every method, e.g. train.max_steps=600")


def method_config(config: str, name: str, out: Path, overrides: list[str]) -> DictConfig:
    from glauber.config import load_config

    if name not in METHOD_OVERRIDES:
        raise ValueError(f"--methods: unknown method {name!r} (choose from {', '.join(METHOD_OVERRIDES)})")
    return load_config(config, [*overrides, *METHOD_OVERRIDES[name], f"train.run_dir={out / name}", f"name=compare-{name}"])


def train_method(cfg: DictConfig, run_dir: Path) -> float:
    """Train (or finish training) one method; returns the training wall time, kept across re-runs."""
    from glauber.train import train

    record = run_dir / "train_time.json"
    done = json.loads(record.read_text()) if record.is_file() else None
    if done and done.get("max_steps") == cfg.train.max_steps:
        return float(done["seconds"])
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start + (done or {}).get("seconds", 0.0)
    record.write_text(json.dumps({"seconds": seconds, "max_steps": cfg.train.max_steps}) + "\n")
    return seconds


def sample_settings(module: Any, nfes: list[int]) -> list[tuple[int, str, dict[str, Any]]]:
    """``(nfe, label, sample options)`` per budget the method can honour."""
    cfg, L = module.cfg, module.cfg.data.seq_len
    if cfg.method == "ar":
        return [(L, "one call per token", {})]
    if cfg.method == "mdlm":
        return [(n, f"steps={n}", {"steps": n}) for n in nfes]
    out = []
    for n in nfes:  # GGM: NFE = sweeps * L / m
        total = cfg.schedule.sweeps * L
        if total % n == 0 and L % (total // n) == 0:
            m = total // n
            out.append((n, f"m={m}", {"positions_per_step": m}))
    return out


def real_text(cfg: DictConfig, num: int) -> tuple[list[str], torch.Tensor]:
    """``num`` held-out sequences spread evenly over the validation split: texts and token ids."""
    from omegaconf import OmegaConf

    from data_modules.text import TextDataModule

    dm = TextDataModule(OmegaConf.to_object(cfg.data), batch_size=1)
    dm.prepare_data()
    dm.setup("validate")
    if dm.val_set is None:
        raise ValueError("the comparison needs a validation split for its real-text reference: set data.val_fraction > 0")
    n = len(dm.val_set)
    idx = [round(i * (n - 1) / max(1, num - 1)) for i in range(min(num, n))]
    ids = torch.stack([dm.val_set[i] for i in idx]).long()
    return [dm.decode(row.tolist()) for row in ids], ids


def run_compare(args: argparse.Namespace) -> list[Row]:
    from glauber.inference import checkpoint_tokenizer, format_samples, generate, load_checkpoint
    from glauber.judges import evaluate_texts, load_judge

    out = Path(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    nfes = sorted({int(n) for n in args.nfe.split(",")})
    cfgs = {n: method_config(args.config, n, out, args.overrides) for n in names}  # all validated before any training
    judge_name = args.judge
    if judge_name is None:
        if "ar" not in cfgs:
            raise ValueError("no --judge given and 'ar' is not among --methods: add ar or pass --judge")
        judge_name = str(out / "ar" / "checkpoints" / "last.ckpt")
    train_s = {n: train_method(cfg, out / n) for n, cfg in cfgs.items()}
    judge = load_judge(judge_name, device)

    rows: list[Row] = []
    samples_dir = out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(cfgs.values()))
    texts, ids = real_text(first, args.num_samples)
    res = evaluate_texts(texts, judge, sample_ids=ids)  # entropy over the model's tokens, as for samples
    rows.append(row_of("real", 0, "validation split", res, 0.0))
    (samples_dir / "real.txt").write_text(format_samples(texts))

    for name in names:
        module = load_checkpoint(out / name / "checkpoints" / "last.ckpt", device)
        tok = checkpoint_tokenizer(module)
        for nfe, label, options in sample_settings(module, nfes):
            start = time.perf_counter()
            ids = generate(
                module,
                args.num_samples,
                args.batch_size,
                args.seed,
                progress=False,
                temperature=args.temperature,
                float64=True,
                **options,
            )
            seconds = time.perf_counter() - start
            nfe = module.network_calls(**options)  # MDLM's cache calls the network less than its steps
            texts = [tok.decode(r.tolist()) for r in ids]
            res = evaluate_texts(texts, judge, sample_ids=ids)
            rows.append(row_of(name, nfe, label, res, seconds))
            (samples_dir / f"{name}_{label.replace('=', '').replace(' ', '_')}.txt").write_text(format_samples(texts))
            r = rows[-1]
            print(f"{name:7s} {label:20s} NFE {nfe:6.1f}  gen-PPL {r.gen_ppl:8.3f}  entropy {r.entropy:.3f}  {seconds:.1f}s")

    meta = {
        "command": "glauber compare " + " ".join(_argv(args)),
        "judge": judge.name,
        "train_seconds": train_s,
        "temperature": args.temperature,
        "seed": args.seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "max_steps": first.train.max_steps,
        "global_batch_size": first.train.global_batch_size,
        "seq_len": first.data.seq_len,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    (out / "results.md").write_text(results_markdown(rows, meta))
    plot_comparison([asdict(r) for r in rows], LABELS, out / "compare.png")
    print(f"wrote {out / 'results.md'} and {out / 'compare.png'}")
    return rows


def _argv(args: argparse.Namespace) -> list[str]:
    parts = [
        f"--config {args.config}",
        f"--out {args.out}",
        f"--methods {args.methods}",
        f"--nfe {args.nfe}",
        f"--num-samples {args.num_samples}",
        f"--seed {args.seed}",
        f"--temperature {args.temperature}",
    ]
    if args.judge:
        parts.append(f"--judge {args.judge}")
    return parts + list(args.overrides)


def results_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Judge: `{meta['judge']}`; {meta['max_steps']} training steps of batch {meta['global_batch_size']}, "
        f"L = {meta['seq_len']}; temperature {meta['temperature']}; final draws in float64; device {meta['device']} "
        f"({meta['torch_threads']} threads).",
        "",
        "| method | setting | network calls | gen-PPL | gen-PPL (per-seq) | unigram entropy | sampling s | train s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        train_s = meta["train_seconds"].get(r.method)
        nfe = f"{r.nfe:.4g}" if r.nfe else "-"
        lines.append(
            f"| {LABELS.get(r.method, r.method)} | {r.setting} | {nfe} | {r.gen_ppl:.3f} | {r.gen_ppl_per_seq:.3f} | "
            f"{r.entropy:.3f} | {r.sample_s:.1f} | {f'{train_s:.0f}' if train_s else '-'} |"
        )
    return "\n".join(lines) + "\n"


def compare_command(args: argparse.Namespace) -> None:
    run_compare(args)
