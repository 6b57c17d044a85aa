"""Load a trained checkpoint for sampling, with its tokenizer, and the ``glauber sample`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from data_modules.tokenizers import TextTokenizer, tokenizer_from_state
from glauber.config import with_defaults
from glauber.methods import GenerativeModule, method_class


def format_samples(texts: list[str]) -> str:
    """The one text layout of samples everywhere they are written: numbered, blank-line separated."""
    return "\n\n".join(f"--- sample {i} ---\n{t}" for i, t in enumerate(texts)) + "\n"


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> GenerativeModule:
    """The module of a ``glauber train`` checkpoint in eval mode (EMA weights by default); a bad file raises one ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder: give a .ckpt file, e.g. {path / 'checkpoints' / 'last.ckpt'}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (runs keep them in <run_dir>/checkpoints/)")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): a write that never finished? use another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # the readers raise RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"checkpoint {path} cannot be read: it is truncated, corrupt or not a torch checkpoint "
            f"({type(e).__name__}: {reason}); use another checkpoint (e.g. a checkpoints/step*.ckpt)"
        ) from None
    g = state.get("glauber") if isinstance(state, dict) else None
    if not isinstance(g, dict) or not all(k in g for k in ("config", "vocab_size", "extra")) or "state_dict" not in state:
        raise ValueError(
            f"{path} is not a glauber checkpoint (it loads, but lacks the 'glauber' record that `glauber train` writes): "
            "give a <run_dir>/checkpoints/*.ckpt"
        )
    cfg = with_defaults(g["config"])  # a checkpoint of an older version: renamed keys, defaults added since
    cfg["train"]["compile"] = False
    module = method_class(cfg["method"])(cfg)
    module.build(g["vocab_size"], g["extra"].get("data_info"))
    module.load_state_dict(state["state_dict"])
    module.on_load_checkpoint(state)
    if use_ema and module.ema is not None:
        module.ema.copy_to(module.model)
    module.ema = None
    return module.to(device).eval()


def checkpoint_tokenizer(module: GenerativeModule) -> TextTokenizer:
    info = module.data_info_.get("tokenizer")
    if info is None:
        raise ValueError("this checkpoint does not record its tokenizer")
    return tokenizer_from_state(info)


def infill_template(
    tok: TextTokenizer, L: int, wrap: str, prefix: str | None, suffix: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A template ``[L]`` and clamp mask ``[L]`` clamping BOS/EOS (in bos_eos mode), the prefix and the suffix."""
    head = ([tok.bos_id] if wrap == "bos_eos" and tok.bos_id is not None else []) + (tok.encode(prefix) if prefix else [])
    tail = (tok.encode(suffix) if suffix else []) + ([tok.eos_id] if wrap == "bos_eos" and tok.eos_id is not None else [])
    if len(head) + len(tail) >= L:
        raise ValueError(f"prefix and suffix take {len(head) + len(tail)} tokens; the model's length is {L}: shorten them")
    free = L - len(head) - len(tail)
    clamp = torch.tensor([True] * len(head) + [False] * free + [True] * len(tail))
    return torch.tensor(head + [0] * free + tail, dtype=torch.long), clamp


def generate(
    module: GenerativeModule,
    num: int,
    batch_size: int,
    seed: int,
    template: torch.Tensor | None = None,
    clamp: torch.Tensor | None = None,
    progress: bool = True,
    **options: Any,
) -> torch.Tensor:
    """``num`` samples in batches; infilling when a template and clamp mask are given."""
    gen = torch.Generator(device=module.device).manual_seed(seed)
    out = []
    for start in tqdm(range(0, num, batch_size), desc="batches", disable=not progress or num <= batch_size):
        b = min(batch_size, num - start)
        clamped = {} if template is None else {"template": template.expand(b, -1), "clamp_mask": clamp}
        out.append(module.sample(b, generator=gen, progress=progress, **clamped, **options))
    return torch.cat(out).cpu()
