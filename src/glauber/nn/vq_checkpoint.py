"""Loading and saving VQ tokenizers: our ``vq.ckpt`` (``glauber train-vq``) and taming-transformers
checkpoints (strictly, errors listing every wrong key; their discriminator/LPIPS ``loss.*`` is skipped)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from glauber.files import AtomicCheckpointIO
from glauber.nn.vq_config import VQConfig
from glauber.nn.vq_model import VQModel

CONFIG_MISMATCH_HINT = "this checkpoint was made with a different ddconfig: pass the right config"


def find_taming_config(ckpt_path: str | Path) -> Path | None:
    """The yaml of a taming checkpoint, beside it or in ``../configs/``; the last by name wins."""
    ckpt_path = Path(ckpt_path)
    candidates = [*sorted(ckpt_path.parent.glob("*.yaml")), *sorted((ckpt_path.parent.parent / "configs").glob("*.yaml"))]
    from omegaconf import OmegaConf

    found = []
    for p in candidates:
        try:
            d = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        except Exception:  # noqa: BLE001 - an unrelated or broken yaml is just not a candidate
            continue
        if isinstance(d, dict) and isinstance(d.get("model"), dict) and "ddconfig" in (d["model"].get("params") or {}):
            found.append(p)
    return found[-1] if found else None


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise one ``ValueError`` listing the missing, unexpected and wrongly shaped keys of ``state``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def listing(title: str, items: list[str]) -> str:
        if len(items) > 8 and title != "shape mismatches":  # many keys: group them by module (e.g. a whole level)
            groups = Counter(".".join(k.split(".")[:3]) for k in items)
            items = [f"{g}.* ({n} keys)" if n > 1 else g for g, n in groups.items()]
        shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        return f"{title}: {shown}"

    named = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
    parts = [listing(t, i) for t, i in named if i]
    gumbel = any(k.startswith(("quantize.embed.", "quantize.proj")) for k in unexpected)
    hint = " (quantize.embed/proj keys: a Gumbel-quantizer checkpoint, which is not supported)" if gumbel else ""
    raise ValueError(f"{source} does not fit the VQ model: {'; '.join(parts)}{hint}. {CONFIG_MISMATCH_HINT}")


def load_vq(
    path: str | Path, config: VQConfig | dict | str | Path | None = None, map_location: str | torch.device = "cpu"
) -> VQModel:
    """A VQ tokenizer in eval mode from our ``vq.ckpt`` or a taming checkpoint (``config``: the stored or found one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a VQ checkpoint (a {type(ckpt).__name__}, expected a dict)")
    config_source = "the given config"
    if "vq_config" in ckpt:  # ours
        state = ckpt["state_dict"]
        if config is None:
            config, config_source = VQConfig(**ckpt["vq_config"]), f"the config stored in {path.name}"
    else:
        state = ckpt.get("state_dict", ckpt)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{path} holds neither a glauber vq.ckpt nor a taming state_dict")
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        if config is None:
            yaml_path = find_taming_config(path)
            if yaml_path is None:
                raise ValueError(
                    f"no taming config (a yaml with model.params.ddconfig) found beside {path} or in "
                    f"{path.parent.parent / 'configs'}: pass config= (a VQConfig, dict or yaml path)"
                )
            config, config_source = yaml_path, str(yaml_path)
    if not isinstance(config, VQConfig):
        config = VQConfig.from_dict(config) if isinstance(config, dict) else VQConfig.from_yaml(config)
    model = VQModel(config)
    check_state_dict(model, state, source=f"{path} (architecture from {config_source})")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def save_vq(path: str | Path, model: VQModel, **extra: Any) -> Path:
    """Write ``{"vq_config", "state_dict", **extra}`` atomically."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    AtomicCheckpointIO().save_checkpoint({"vq_config": model.config.to_dict(), "state_dict": state, **extra}, path)
    return Path(path)
