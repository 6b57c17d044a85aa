"""The VQ image tokenizer: a VQGAN encoder/decoder with a nearest-neighbour vector quantizer.

Images become grids of token ids (``encode_to_ids``) and grids of ids become images (``decode_ids``),
so that the discrete diffusion models of this package can generate images as token sequences.

Parameter names and shapes follow the taming-transformers VQGAN (``encoder.*``, ``decoder.*``,
``quantize.embedding.weight``, ``quant_conv.*``, ``post_quant_conv.*``), so its released checkpoints
(e.g. the ImageNet f16 models: 256x256 images -> 16x16 tokens) load with ``load_vq``; the
discriminator/LPIPS part of those checkpoints (``loss.*``) is not needed and is skipped. ``load_vq``
also reads the ``vq.ckpt`` written by ``glauber train-vq`` (``glauber.training.train_vq``).

Architecture (``VQConfig``, taming's ``ddconfig`` plus ``embed_dim`` and ``n_embed``): ``len(ch_mult)``
resolution levels with ``num_res_blocks`` residual blocks each (GroupNorm(32) + swish + 3x3 conv),
self-attention blocks at the resolutions listed in ``attn_resolutions``, a 2x downsampling (encoder)
or upsampling (decoder) between levels, so the downsampling factor is ``2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glauber.files import AtomicCheckpointIO

TAMING_NORM_GROUPS = 32  # GroupNorm groups of the taming architecture
CONFIG_MISMATCH_HINT = "this checkpoint was made with a different ddconfig: pass the right config"


@dataclass
class VQConfig:
    """VQ tokenizer architecture (taming-transformers ``ddconfig`` + ``embed_dim`` + ``n_embed``).

    The defaults are the ImageNet f16 VQGAN (256x256 -> 16x16 tokens, codebook 1024).
    embed_dim: dimension of the codebook vectors. n_embed: codebook size (the token vocabulary).
    ch, ch_mult: base channels and their multiplier per resolution level (``len(ch_mult) - 1``
        2x downsamplings). attn_resolutions: feature-map sizes that get a self-attention block
        (relative to ``resolution``). z_channels: encoder output / decoder input channels.
    norm_groups: GroupNorm groups, 32 in taming (not a taming key; fewer allow narrower models, e.g. ch=16).
    """

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
    norm_groups: int = TAMING_NORM_GROUPS

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self, prefix: str = "") -> VQConfig:
        """Raise ``ValueError`` naming the offending key (``prefix`` + field name)."""
        names = (
            "embed_dim",
            "n_embed",
            "ch",
            "num_res_blocks",
            "z_channels",
            "resolution",
            "in_channels",
            "out_ch",
            "norm_groups",
        )
        for name in names:
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
            if "Gumbel" in target or "gumbel" in target.lower():
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


# -- building blocks (names as in taming's diffusionmodules/model.py) ----------------------------------
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t(y).reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (residual blocks), ``attn`` (possibly empty), then a resampling."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        n_levels = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i in range(n_levels):
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.norm_groups))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, cfg.norm_groups))
            level = _Level(blocks, attns)
            if i != n_levels - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(c_out, cfg.dropout, cfg.norm_groups)
        self.norm_out = _norm(c_out, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_out, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        n_levels = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, cfg.dropout, cfg.norm_groups)
        levels: list[_Level] = []
        for i in reversed(range(n_levels)):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.norm_groups))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, cfg.norm_groups))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by level (0 = full resolution), run from the last
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook vector (Euclidean) for every latent pixel; the codebook is ``embedding.weight``."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """``z`` [N, C, h, w] -> ids [N, h, w] (float32 distances, chunked to bound memory)."""
        n, c, h, w = z.shape
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.embedding.weight.detach().float()
        code_sq = (codes * codes).sum(1)
        chunk = max(1, (1 << 24) // self.n_embed)
        ids = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
        for s in range(0, flat.shape[0], chunk):
            part = flat[s : s + chunk]
            # |z|^2 is the same for every code: argmin of |e|^2 - 2 z.e
            ids[s : s + chunk] = torch.addmm(code_sq, part, codes.t(), beta=1.0, alpha=-2.0).argmin(1)
        return ids.view(n, h, w)

    def lookup(self, ids: Tensor) -> Tensor:
        """ids [N, h, w] -> codebook vectors [N, C, h, w]."""
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()


class VQOutput(NamedTuple):
    recon: Tensor  # [N, out_ch, H, W], not clamped
    ids: Tensor  # [N, h, w]
    z_e: Tensor  # encoder output after quant_conv, [N, embed_dim, h, w]
    z_q: Tensor  # the selected codebook vectors (with gradient to the codebook), [N, embed_dim, h, w]
    codebook_loss: Tensor  # mean |sg(z_e) - z_q|^2 (moves the codes)
    commit_loss: Tensor  # mean |z_e - sg(z_q)|^2 (weighted by beta in training)


class VQModel(nn.Module):
    """VQGAN tokenizer. Images are float [N, 3, H, W] in [-1, 1] (or uint8 [N, H, W, 3] where noted)."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    # -- geometry --------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an image of the configured ``resolution``."""
        side = self.config.resolution // self.downsample_factor
        return side, side

    @property
    def vocab_size(self) -> int:
        return self.config.n_embed

    # -- differentiable pieces (training) ----------------------------------------------------------
    def encode_latent(self, x: Tensor) -> Tensor:
        """Float images [N, C, H, W] in [-1, 1] -> pre-quantisation latents z_e [N, embed_dim, h, w]."""
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """Codebook vectors [N, embed_dim, h, w] -> images [N, out_ch, H, W] (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def quantise(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(z_st, ids, z_q, codebook_loss, commit_loss)``: ``z_st`` equals ``z_q`` in value and passes the
        decoder's gradient straight through to ``z_e`` (straight-through estimator)."""
        ids = self.quantize.nearest(z_e)
        z_q = self.quantize.lookup(ids).to(z_e.dtype)
        z32, q32 = z_e.float(), z_q.float()
        codebook_loss = F.mse_loss(q32, z32.detach())
        commit_loss = F.mse_loss(z32, q32.detach())
        z_st = z_e + (z_q - z_e).detach()
        return z_st, ids, z_q, codebook_loss, commit_loss

    def forward(self, x: Tensor) -> VQOutput:
        z_e = self.encode_latent(x)
        z_st, ids, z_q, codebook_loss, commit_loss = self.quantise(z_e)
        return VQOutput(self.decode_latent(z_st), ids, z_e, z_q, codebook_loss, commit_loss)

    # -- token API ------------------------------------------------------------------------------------
    def _param(self) -> Tensor:
        return next(self.parameters())

    def prepare(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 [N, H, W, C] (tensor or numpy) or float [N, C, H, W] in [-1, 1] -> float [N, C, H, W] on
        the model's device and dtype, checked against ``in_channels`` and the downsampling factor."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        c, f = self.config.in_channels, self.downsample_factor
        if images.ndim != 4:
            raise ValueError(
                f"images must be a batch [N, H, W, {c}] uint8 or [N, {c}, H, W] float (got shape {tuple(images.shape)})"
            )
        if images.dtype == torch.uint8:
            if images.shape[-1] != c:
                raise ValueError(f"uint8 images must be [N, H, W, {c}] (got shape {tuple(images.shape)})")
            images = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        elif images.is_floating_point():
            if images.shape[1] != c:
                raise ValueError(f"float images must be [N, {c}, H, W] in [-1, 1] (got shape {tuple(images.shape)})")
        else:
            raise ValueError(f"images must be uint8 or float (got {images.dtype})")
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not divisible by the downsampling factor {f}")
        p = self._param()
        return images.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def encode_to_ids(self, images: Tensor | np.ndarray, batch_size: int = 64) -> Tensor:
        """uint8 [N, H, W, 3] or float [N, 3, H, W] in [-1, 1] -> token ids, LongTensor [N, H/f, W/f].

        Runs in batches of ``batch_size`` on the model's device; the ids come back on the device of
        ``images`` (CPU for numpy input)."""
        out_device = images.device if isinstance(images, Tensor) else torch.device("cpu")
        parts = [
            self.quantize.nearest(self.encode_latent(self.prepare(images[s : s + batch_size]))).to(out_device)
            for s in range(0, len(images), batch_size)
        ]
        if not parts:
            h, w = (s // self.downsample_factor for s in (images.shape[1:3] if _is_uint8(images) else images.shape[2:4]))
            return torch.empty(0, h, w, dtype=torch.long, device=out_device)
        return torch.cat(parts)

    @torch.no_grad()
    def decode_ids(self, ids: Tensor | np.ndarray, grid_shape: Sequence[int] | None = None, batch_size: int = 64) -> Tensor:
        """Token ids [N, h, w], or [N, h*w] with ``grid_shape=(h, w)`` (default ``self.grid_shape``) ->
        float images [N, 3, h*f, w*f] clamped to [-1, 1], on the device of ``ids``."""
        ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"token ids must be integers (got {ids.dtype})")
        if ids.ndim == 2:
            h, w = tuple(grid_shape) if grid_shape is not None else self.grid_shape
            if h * w != ids.shape[1]:
                raise ValueError(
                    f"ids of length {ids.shape[1]} do not fill a {h}x{w} token grid; pass grid_shape=(h, w) with h*w = length"
                )
            ids = ids.reshape(ids.shape[0], h, w)
        elif ids.ndim != 3:
            raise ValueError(f"token ids must be [N, h, w] or [N, h*w] (got shape {tuple(ids.shape)})")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.n_embed):
            raise ValueError(f"token ids must lie in [0, {self.config.n_embed}) (got {int(ids.min())}..{int(ids.max())})")
        out_device, p = ids.device, self._param()
        parts = []
        for s in range(0, ids.shape[0], batch_size):
            z_q = self.quantize.lookup(ids[s : s + batch_size].to(p.device, torch.long)).to(p.dtype)
            parts.append(self.decode_latent(z_q).clamp(-1.0, 1.0).to(out_device))
        if not parts:
            f, c = self.downsample_factor, self.config.out_ch
            return torch.empty(0, c, ids.shape[1] * f, ids.shape[2] * f, device=out_device)
        return torch.cat(parts)

    @staticmethod
    def to_uint8(images: Tensor) -> Tensor:
        """Float images [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (rounded, clamped)."""
        return ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _is_uint8(images: Tensor | np.ndarray) -> bool:
    return images.dtype in (torch.uint8, np.uint8)


def to_uint8(images: Tensor) -> Tensor:
    """Float images [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return VQModel.to_uint8(images)


# -- checkpoints ----------------------------------------------------------------------------------------
def find_taming_config(ckpt_path: str | Path) -> Path | None:
    """The yaml that describes a taming checkpoint: beside it, or in ``../configs/`` (taming's log layout
    ``<run>/checkpoints/last.ckpt`` + ``<run>/configs/*-project.yaml``); the newest by name wins."""
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


def _as_config(config: VQConfig | dict | str | Path) -> VQConfig:
    if isinstance(config, VQConfig):
        return config.validate()
    if isinstance(config, dict):
        return VQConfig.from_dict(config)
    return VQConfig.from_yaml(config)


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Strict comparison of a state dict with the model: missing, unexpected and wrongly shaped keys are
    all listed in one ``ValueError``."""
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
            groups: dict[str, int] = {}
            for k in items:
                prefix = ".".join(k.split(".")[:3])
                groups[prefix] = groups.get(prefix, 0) + 1
            items = [f"{g}.* ({n} keys)" if n > 1 else g for g, n in groups.items()]
        shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        return f"{title}: {shown}"

    parts = [
        listing(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if i
    ]
    hint = ""
    if any(k.startswith("quantize.embed.") or k.startswith("quantize.proj") for k in unexpected):
        hint = " (quantize.embed/proj keys: a Gumbel-quantizer checkpoint, which is not supported)"
    raise ValueError(f"{source} does not fit the VQ model: {'; '.join(parts)}{hint}. {CONFIG_MISMATCH_HINT}")


def load_vq(
    path: str | Path, config: VQConfig | dict | str | Path | None = None, map_location: str | torch.device = "cpu"
) -> VQModel:
    """Load a VQ tokenizer (eval mode) from a ``glauber train-vq`` ``vq.ckpt`` or a taming-transformers
    checkpoint (a dict with ``state_dict``; ``loss.*`` entries are skipped).

    ``config``: a ``VQConfig``, a dict (flat keys, or a taming config with ``model.params``) or a yaml path.
    By default the architecture comes from the checkpoint itself (ours) or from the taming yaml found
    beside it or in ``../configs/``.
    """
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
    cfg = _as_config(config)
    model = VQModel(cfg)
    check_state_dict(model, state, source=f"{path} (architecture from {config_source})")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def save_vq(path: str | Path, model: VQModel, **extra: Any) -> Path:
    """Write ``{"vq_config", "state_dict", **extra}`` atomically (temporary file + ``os.replace``)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    AtomicCheckpointIO().save_checkpoint({"vq_config": model.config.to_dict(), "state_dict": state, **extra}, path)
    return Path(path)


def codebook_usage(ids: Tensor, n_embed: int) -> dict[str, Any]:
    """Usage of the codebook by a set of token ids: ``perplexity`` (exp of the entropy of the code
    frequencies; n_embed when uniform), ``used_fraction`` (codes used at least once), ``counts``."""
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=n_embed).double()
    total = counts.sum().clamp_min(1)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "perplexity": math.exp(entropy),
        "used_fraction": float((counts > 0).double().mean()),
        "n_tokens": int(counts.sum()),
        "counts": counts.long().tolist(),
    }
