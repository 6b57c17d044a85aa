"""``VQConfig``: the VQ tokenizer's architecture, from our flat ``vq`` keys or a taming yaml (``model.params``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class VQConfig:
    """taming's ``ddconfig``, ``embed_dim`` and ``n_embed`` (ImageNet f16 VQGAN defaults), plus ``norm_groups`` (32 in taming)."""

    embed_dim: int = 256
    n_embed: int = 1024
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    z_channels: int = 256
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self, prefix: str = "") -> VQConfig:
        """Raise ``ValueError`` naming the offending key (``prefix`` + field name)."""
        for name in "embed_dim n_embed ch num_res_blocks z_channels resolution in_channels out_ch norm_groups".split():
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}{name} must be >= 1 (got {getattr(self, name)})")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"{prefix}ch_mult must be a non-empty list of positive integers (got {list(self.ch_mult)})")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(
                    f"{prefix}ch x {prefix}ch_mult: every channel count must be a multiple of {prefix}norm_groups="
                    f"{self.norm_groups}; ch={self.ch} x {m} = {self.ch * m} is not"
                )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"{prefix}resolution={self.resolution} is not divisible by the downsampling factor "
                f"2**(len(ch_mult)-1) = {self.downsample_factor}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{prefix}dropout must be in [0, 1) (got {self.dropout})")
        if self.double_z:
            raise ValueError(f"{prefix}double_z=true is an option of KL autoencoders; a VQ model needs false")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> VQConfig:
        """From flat keys (our ``vq`` section) or a taming yaml (``model.params.{ddconfig,embed_dim,n_embed}``)."""
        params = d.get("model", {}).get("params") if isinstance(d.get("model"), dict) else None
        if params is not None:
            target = str(d["model"].get("target", ""))
            if "gumbel" in target.lower():
                raise ValueError(f"{source}: {target} (Gumbel quantizer) is not supported; only VQModel checkpoints are")
            if "ddconfig" not in params or "n_embed" not in params or "embed_dim" not in params:
                raise ValueError(f"{source}: model.params must hold ddconfig, embed_dim and n_embed (taming VQModel config)")
            dd = dict(params["ddconfig"])
            if dd.pop("tanh_out", False) or dd.pop("give_pre_end", False) or not dd.pop("resamp_with_conv", True):
                raise ValueError(f"{source}: tanh_out / give_pre_end / resamp_with_conv=false are not supported")
            flat = {**dd, "embed_dim": params["embed_dim"], "n_embed": params["n_embed"]}
        else:
            flat = dict(d.get("vq", d))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if params is None and unknown:
            raise ValueError(f"{source}: unknown VQ config keys {unknown} (known: {sorted(known)})")
        flat = {k: v for k, v in flat.items() if k in known}  # taming ddconfigs may carry keys its Encoder ignores
        for k in ("ch_mult", "attn_resolutions"):
            if k in flat:
                flat[k] = [int(v) for v in flat[k]]
        return cls(**flat).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> VQConfig:
        from omegaconf import OmegaConf

        return cls.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
