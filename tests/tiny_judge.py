"""A tiny random GPT-2 judge with the bundled tokenizer, saved offline (for the gen-PPL tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_judge(d: Path) -> Path:
    """Save the judge in ``d`` (once) and return ``d``; 1 layer, context 16, GPT-2 vocabulary."""
    import transformers

    from data_modules.tokenizers import bundled_gpt2_path

    if not (d / "config.json").exists():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=50257)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(bundled_gpt2_path()), eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
        tok.save_pretrained(d)
    return d
