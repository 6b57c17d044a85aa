"""``glauber compare``: GGM against its baselines, each trained on the same config up to the largest budget and sampled
at several numbers of network calls (NFE) per budget; one judge scores every sample set (gen-PPL, NLL per byte, which
does not reward text split into many short tokens, entropy, time) in ``results.json``/``.md`` and plots."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from data_modules.text import TextDataModule
from glauber.commands.args import device_of
from glauber.config import load_config
from glauber.eval.inference import checkpoint_tokenizer, format_samples, generate, load_checkpoint
from glauber.eval.judges import evaluate_texts, load_judge
from glauber.eval.plots import plot_budgets, plot_comparison, plot_val_nll
from glauber.training.train import train

# name -> config overrides; every other key comes from the shared config
METHOD_OVERRIDES: dict[str, list[str]] = {
    "ggm": ["method=ggm", "process.loss=analytic", "process.normalized_classifier=false"],
    "ggm_weighted": ["method=ggm", "process.loss=weighted", "process.normalized_classifier=true"],
    "ggm_ce": ["method=ggm", "process.loss=cross_entropy"],
    "mdlm": ["method=mdlm"],
    "ar": ["method=ar"],
}
DEFAULT_METHODS = ",".join(METHOD_OVERRIDES)
LABELS = {
    "ggm": "GGM, paper's loss (binary classification)",
    "ggm_weighted": "GGM, weighted loss + normalised classifier (binary classification)",
    "ggm_ce": "GGM process, cross-entropy loss (ablation)",
    "mdlm": "MDLM (masked diffusion)",
    "ar": "autoregressive",
    "real": "held-out real text",
}


@dataclass
class Row:
    method: str
    budget: int  # training steps of the checkpoint sampled (0 for real text)
    nfe: float  # network evaluations per sample
    nominal_nfe: float  # the budget asked for: GGM's network calls, MDLM's steps (its cache calls fewer), AR's L
    setting: str
    gen_ppl: float
    gen_ppl_per_seq: float
    nll_per_byte: float  # the judge's NLL per UTF-8 byte of the decoded samples (nats)
    entropy: float
    sample_s: float  # wall-clock seconds to draw all samples of this row
    num_samples: int


def row_of(method: str, budget: int, nfe: float, nominal_nfe: float, setting: str, res: dict[str, Any], seconds: float) -> Row:
    keys = ("gen_ppl", "gen_ppl_per_seq", "nll_per_byte", "unigram_entropy", "num_samples")
    gen_ppl, per_seq, nll, entropy, n = (res.get(k, math.nan) for k in keys)
    return Row(method, budget, nfe, nominal_nfe, setting, gen_ppl, per_seq, nll, entropy, seconds, n)


def supervised_tokens_per_sequence(cfg: DictConfig) -> float:
    """Positions whose token is supervised per training sequence, in expectation: AR all ``L``; MDLM the
    masked ones (``L (1 - eps) / 2`` for t uniform on [0, 1]); GGM the hidden set (mean of its sizes)."""
    L = cfg.data.seq_len
    if cfg.method == "ar":
        return float(L)
    if cfg.method == "mdlm":
        return L * (1 - cfg.mdlm.eps) / 2
    sizes = list(cfg.process.positions_per_step) or [cfg.schedule.positions_per_step]
    return sum(sizes) / len(sizes)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train GGM and its baselines with one budget and compare their samples",
        description="Train each method (ggm: the paper's loss; ggm_weighted: weighted loss, normalised classifier; ggm_ce: "
        "the cross-entropy ablation; mdlm; ar) on one config, sample each at every training budget and several numbers of "
        "network calls, and score all samples with one judge (gen-PPL micro and per sequence, NLL per byte, unigram entropy, "
        "sampling time) beside AR samples and held-out real text. Re-running resumes the trainings from their run directories.",
    )
    p.add_argument("--config", default="experiments/compare_shakespeare.yaml", help="shared experiment YAML")
    p.add_argument("--out", default="runs/compare", help="output folder (one run directory per method inside)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated subset of {DEFAULT_METHODS}")
    budgets_help = "training steps to evaluate at, e.g. 300,1000,3000 (each trains once, to the largest; default: max_steps)"
    p.add_argument("--budgets", default=None, help=budgets_help)
    p.add_argument("--nfe", default="8,16,32,64,128", help="network-call budgets to sample diffusion models at")
    corrector_help = "GGM: corrector sweeps to also sample with at the largest NFE (comma-separated; 0 or '' = none)"
    p.add_argument("--corrector-sweeps", default="1", help=corrector_help)
    p.add_argument("--num-samples", type=int, default=64, help="samples per (method, NFE) (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="samples drawn at once (default 64)")
    p.add_argument("--judge", default=None, help="judge LM (HF name/dir or a .ckpt); default: the comparison's AR model")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for every method (default 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every method, e.g. train.max_steps=600")


def parse_budgets(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated step counts such as 300,1000,3000 (got {text!r})") from None
    if not budgets or budgets[0] < 1:
        raise ValueError(f"--budgets must be positive step counts (got {text!r})")
    return budgets


def method_config(config: str, name: str, out: Path, overrides: list[str], budgets: list[int] | None = None) -> DictConfig:
    """One method's config: the shared one, the overrides, the method's own keys and, with budgets, training to the
    largest with a checkpoint at each (every gcd of the budgets)."""
    if name not in METHOD_OVERRIDES:
        raise ValueError(f"--methods: unknown method {name!r} (choose from {', '.join(METHOD_OVERRIDES)})")
    extra = [f"train.max_steps={budgets[-1]}", f"train.ckpt_every_steps={math.gcd(*budgets)}"] if budgets else []
    return load_config(
        config, [*overrides, *extra, *METHOD_OVERRIDES[name], f"train.run_dir={out / name}", f"name=compare-{name}"]
    )


def budget_checkpoint(run_dir: Path, budget: int, max_steps: int) -> Path:
    """The checkpoint after ``budget`` optimizer steps (``last.ckpt`` at the end of training)."""
    path = run_dir / "checkpoints" / f"step{budget:08d}.ckpt"
    if budget == max_steps and not path.is_file():
        path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: re-run the comparison with the same --budgets to (re)create it")
    return path


def train_method(cfg: DictConfig, run_dir: Path) -> float:
    """Train (or finish training) one method; returns the training wall time, kept across re-runs."""
    record = run_dir / "train_time.json"
    done = json.loads(record.read_text()) if record.is_file() else None
    if done and done.get("max_steps") == cfg.train.max_steps:
        return float(done["seconds"])
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start + (done or {}).get("seconds", 0.0)
    record.write_text(json.dumps({"seconds": seconds, "max_steps": cfg.train.max_steps}) + "\n")
    return seconds


def sample_settings(module: Any, nfes: list[int], correctors: list[int]) -> list[tuple[int, str, dict[str, Any]]]:
    """``(nfe, label, sample options)`` per NFE budget the method can honour; for GGM also the largest NFE with correctors."""
    cfg, L = module.cfg, module.cfg.data.seq_len
    if cfg.method == "ar":
        return [(L, "one call per token", {})]
    if cfg.method == "mdlm":
        return [(n, f"steps={n}", {"steps": n}) for n in nfes]
    total = cfg.schedule.sweeps * L  # GGM: NFE = sweeps * L / m
    out = [(n, f"m={total // n}", {"positions_per_step": total // n}) for n in nfes if total % n == 0 and L % (total // n) == 0]
    if out:
        n, label, options = out[-1]
        out += [(n, f"{label} +{c} corrector", {**options, "corrector_sweeps": c}) for c in correctors if c > 0]
    return out


def real_text(cfg: DictConfig, num: int) -> tuple[list[str], torch.Tensor]:
    """``num`` held-out sequences spread evenly over the validation split: texts and token ids."""
    dm = TextDataModule(OmegaConf.to_object(cfg.data), batch_size=1)
    dm.prepare_data()
    dm.setup("validate")
    if dm.val_set is None:
        raise ValueError("the comparison needs a validation split for its real-text reference: set data.val_fraction > 0")
    n = len(dm.val_set)
    idx = [round(i * (n - 1) / max(1, num - 1)) for i in range(min(num, n))]
    ids = torch.stack([dm.val_set[i] for i in idx]).long()
    return [dm.decode(row.tolist()) for row in ids], ids


def run(args: argparse.Namespace) -> list[Row]:
    out = Path(args.out)
    device = device_of(args)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    nfes = sorted({int(n) for n in args.nfe.split(",")})
    correctors = sorted({int(c) for c in (args.corrector_sweeps or "0").split(",") if c.strip()})
    budgets_arg = parse_budgets(args.budgets)
    cfgs = {n: method_config(args.config, n, out, args.overrides, budgets_arg) for n in names}  # all validated first
    first = next(iter(cfgs.values()))
    budgets = budgets_arg or [first.train.max_steps]
    if args.judge is None and "ar" not in cfgs:
        raise ValueError("no --judge given and 'ar' is not among --methods: add ar or pass --judge")
    judge_name = str(out / "ar" / "checkpoints" / "last.ckpt") if args.judge is None else args.judge
    train_s = {n: train_method(cfg, out / n) for n, cfg in cfgs.items()}
    judge = load_judge(judge_name, device)

    rows: list[Row] = []
    samples_dir = out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    texts, ids = real_text(first, args.num_samples)
    res = evaluate_texts(texts, judge, sample_ids=ids)  # entropy over the model's tokens, as for samples
    rows.append(row_of("real", 0, 0, 0, "validation split", res, 0.0))
    (samples_dir / "real.txt").write_text(format_samples(texts))

    for budget in budgets:
        for name in names:
            module = load_checkpoint(budget_checkpoint(out / name, budget, cfgs[name].train.max_steps), device)
            tok = checkpoint_tokenizer(module)
            for nominal, label, options in sample_settings(module, nfes, correctors):
                start = time.perf_counter()
                draw = {"progress": False, "temperature": args.temperature, "float64": True, **options}
                ids = generate(module, args.num_samples, args.batch_size, args.seed, **draw)
                seconds = time.perf_counter() - start
                nfe = module.network_calls(**options)  # MDLM's cache calls the network less than its steps
                texts = [tok.decode(r.tolist()) for r in ids]
                rows.append(row_of(name, budget, nfe, nominal, label, evaluate_texts(texts, judge, sample_ids=ids), seconds))
                slug = label.replace("=", "").replace(" ", "_").replace("+", "")
                (samples_dir / f"{name}_{budget}_{slug}.txt").write_text(format_samples(texts))
                r = rows[-1]
                print(
                    f"{budget:6d} {name:12s} {label:22s} NFE {nfe:6.1f}  gen-PPL {r.gen_ppl:8.3f}  "
                    f"NLL/byte {r.nll_per_byte:.3f}  entropy {r.entropy:.3f}  {seconds:.1f}s"
                )

    meta = {
        "command": "glauber compare " + " ".join(_argv(args)),
        "judge": judge.name,
        "train_seconds": train_s,
        "budgets": budgets,
        "supervised_tokens_per_sequence": {n: supervised_tokens_per_sequence(c) for n, c in cfgs.items()},
        "temperature": args.temperature,
        "seed": args.seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "max_steps": budgets[-1],
        "global_batch_size": first.train.global_batch_size,
        "seq_len": first.data.seq_len,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    (out / "results.md").write_text(results_markdown(rows, meta))
    last = [asdict(r) for r in rows if r.budget in (0, budgets[-1]) and "corrector" not in r.setting]
    plot_comparison(last, LABELS, out / "compare.png")
    if len(budgets) > 1:
        plot_budgets([asdict(r) for r in rows], LABELS, first.data.seq_len, out / "budgets.png")
    curves = {n: out / n / "logs" / "metrics.csv" for n, c in cfgs.items() if c.method == "ggm"}
    plot_val_nll({n: p for n, p in curves.items() if p.is_file()}, LABELS, out / "val_nll.png")
    print(f"wrote {out / 'results.md'} and the plots beside it")
    return rows


def _argv(args: argparse.Namespace) -> list[str]:
    """The options of this comparison as a command line (recorded with its results)."""
    names = ("config", "out", "methods", "budgets", "nfe", "corrector_sweeps", "num_samples", "seed", "temperature", "judge")
    given = [(n, getattr(args, n)) for n in names if getattr(args, n) not in (None, "")]
    return [f"--{n.replace('_', '-')} {v}" for n, v in given] + list(args.overrides)


def results_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """A summary (each method at NFE = L per budget) and one full table per budget."""
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Judge: `{meta['judge']}`; budgets {', '.join(map(str, meta['budgets']))} training steps of batch "
        f"{meta['global_batch_size']}, L = {meta['seq_len']}; temperature {meta['temperature']}; final draws in float64; "
        f"device {meta['device']} ({meta['torch_threads']} threads).",
        "",
        "Supervised tokens per training sequence (in expectation): "
        + ", ".join(f"{LABELS.get(n, n)} {v:.1f}" for n, v in meta["supervised_tokens_per_sequence"].items())
        + ".",
        "",
    ]
    L = meta["seq_len"]
    summary = [r for r in rows if r.method != "real" and r.nominal_nfe == L and "corrector" not in r.setting]
    if summary and len(meta["budgets"]) > 1:
        lines += [
            f"### At a budget of {L} network calls (NFE = L; MDLM: {L} steps, fewer calls with its cache), by training "
            "budget: gen-PPL / NLL per byte",
            "",
            "| method | " + " | ".join(f"{b} steps" for b in meta["budgets"]) + " |",
            "| --- |" + " ---: |" * len(meta["budgets"]),
        ]
        for name in dict.fromkeys(r.method for r in summary):
            cells = []
            for b in meta["budgets"]:
                r = next((r for r in summary if r.method == name and r.budget == b), None)
                cells.append(f"{r.gen_ppl:.2f} / {r.nll_per_byte:.3f}" if r else "-")
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
        lines.append("")
    header = [
        "| method | setting | network calls | gen-PPL | gen-PPL (per-seq) | NLL per byte | unigram entropy | sampling s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    real = [r for r in rows if r.method == "real"]
    for b in meta["budgets"]:
        lines += [f"### {b} training steps", "", *header]
        for r in real + [r for r in rows if r.budget == b]:
            nfe = f"{r.nfe:.4g}" if r.nfe else "-"
            lines.append(
                f"| {LABELS.get(r.method, r.method)} | {r.setting} | {nfe} | {r.gen_ppl:.3f} | {r.gen_ppl_per_seq:.3f} | "
                f"{r.nll_per_byte:.3f} | {r.entropy:.3f} | {r.sample_s:.1f} |"
            )
        lines.append("")
    lines.append(
        "Training seconds (to the largest budget; not comparable when other jobs shared the machine): "
        + ", ".join(f"{LABELS.get(n, n)} {s:.0f}" for n, s in meta["train_seconds"].items())
    )
    return "\n".join(lines) + "\n"
