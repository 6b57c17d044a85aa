"""``glauber sample``: draw samples, or infill between a prefix and a suffix, from a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from glauber.commands.args import add_draw_options, check_positions_per_step, device_of, draw_options, int_at_least
from glauber.eval.inference import checkpoint_tokenizer, format_samples, generate, infill_template, load_checkpoint
from glauber.files import check_output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples (or infill) from a checkpoint",
        description="Sample text from a checkpoint with reverse Glauber dynamics (EMA weights). With --prefix "
        "and/or --suffix the given text is clamped and the positions between are infilled.",
    )
    p.add_argument("checkpoint", help="a .ckpt written by glauber train")
    p.add_argument("--num", type=int_at_least(1), default=4, help="number of samples (default 4)")
    add_draw_options(p)
    p.add_argument("--prefix", default=None, help="text clamped at the start (infilling)")
    p.add_argument("--suffix", default=None, help="text clamped at the end (infilling)")
    p.add_argument("--float32", action="store_true", help="final categorical draw in float32 instead of float64")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", default=None, help="write the samples to this file (default: print)")


def run(args: argparse.Namespace) -> None:
    check_output_file(args.out, "--out")  # before the minutes of loading and sampling
    module = load_checkpoint(args.checkpoint, device_of(args), use_ema=not args.no_ema)
    if args.suffix and module.cfg.method == "ar":
        raise ValueError(
            f"--suffix: {args.checkpoint} is an autoregressive (AR) model, which draws left to right and can only "
            "condition on a prefix (--prefix): the suffix would be pasted after tokens that never saw it. Infill "
            "with a GGM or MDLM checkpoint, or drop --suffix"
        )
    check_positions_per_step(args.positions_per_step, module)
    tok = checkpoint_tokenizer(module)
    options = draw_options(args) | {"float64": not args.float32}
    template = clamp = None
    if args.prefix or args.suffix:
        template, clamp = infill_template(tok, module.cfg.data.seq_len, module.cfg.data.wrap, args.prefix, args.suffix)
    ids = generate(module, args.num, args.batch_size, args.seed, template, clamp, **options)
    texts = [tok.decode(row.tolist()) for row in ids]
    body = format_samples(texts)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(body)
        print(f"wrote {len(texts)} samples to {args.out}")
    else:
        print(body)
