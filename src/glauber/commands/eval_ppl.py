"""``glauber eval-ppl``: score a checkpoint's samples (float64 final draws) under a judge LM; the report records the protocol."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glauber.commands.args import add_draw_options, check_positions_per_step, device_of, draw_options, int_at_least
from glauber.eval.inference import checkpoint_tokenizer, format_samples, generate, load_checkpoint
from glauber.eval.judges import evaluate_texts, load_judge
from glauber.files import check_output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-ppl",
        help="generative perplexity, nll per byte and entropy of a checkpoint's samples under a judge LM",
        description="Draw samples (final categorical in float64), decode them, retokenise with the judge's tokenizer "
        "and report generative perplexity (micro-average over tokens, and SEDD's per-sequence average), the judge's "
        "nll per UTF-8 byte of the text (independent of how its tokenizer splits the text) with the samples' "
        "unigram entropy.",
    )
    p.add_argument("checkpoint", help="a .ckpt written by glauber train")
    p.add_argument("--judge", default="gpt2-large", help="HF hub name or local directory of a causal LM (default gpt2-large)")
    p.add_argument("--judge-gguf", default=None, help="a GGUF file inside --judge to load through transformers")
    p.add_argument("--num-samples", type=int_at_least(1), default=64, help="number of samples (default 64)")
    add_draw_options(p)
    p.add_argument("--out", default=None, help="write the JSON report (and the samples beside it) here")


def run(args: argparse.Namespace) -> dict:
    check_output_file(args.out, "--out")  # before the minutes of loading and sampling
    if args.out:
        check_output_file(Path(args.out).with_suffix(".samples.txt"), "--out (its samples file)")
    device = device_of(args)
    module = load_checkpoint(args.checkpoint, device)  # before the (large) judge: a bad checkpoint fails fast
    check_positions_per_step(args.positions_per_step, module)
    judge = load_judge(args.judge, device, args.judge_gguf)
    tok = checkpoint_tokenizer(module)
    if getattr(tok, "chars", None) is not None:  # a character model: its alphabet is all its samples can hold
        judge.check_covers(tok.chars, f"the samples of {args.checkpoint} (their characters)")
    options = draw_options(args)
    ids = generate(module, args.num_samples, args.batch_size, args.seed, float64=True, **options)
    texts = [tok.decode(row.tolist()) for row in ids]
    report = evaluate_texts(texts, judge, sample_ids=ids)
    report.update(
        checkpoint=str(args.checkpoint),
        method=module.cfg.method,
        network_calls=module.network_calls(**options),
        **{
            k: getattr(args, k)
            for k in ("positions_per_step", "sweeps", "corrector_sweeps", "steps", "temperature", "top_p", "seed")
        },
        final_draw="float64",
        averaging="gen_ppl = exp(total nll / scored tokens); gen_ppl_per_seq = mean of per-sample exp(mean nll); "
        "nll_per_byte = total nll / UTF-8 bytes of the text the scored tokens cover, bits_per_byte = nll_per_byte / ln 2, "
        "ppl_per_byte = exp(nll_per_byte)",
    )
    print(json.dumps(report, indent=1))
    print(
        f"gen-PPL {report['gen_ppl']:.3f} (per sequence {report['gen_ppl_per_seq']:.3f})  nll/byte "
        f"{report['nll_per_byte']:.4f} ({report['bits_per_byte']:.4f} bits, PPL/byte {report['ppl_per_byte']:.4f})  "
        f"entropy {report['unigram_entropy']:.3f}  judge {report['judge']}"
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".samples.txt").write_text(format_samples(texts))
    return report
