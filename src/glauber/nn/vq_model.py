"""The VQ tokenizer network: a VQGAN encoder/decoder (taming-transformers' layout and parameter names, so
its checkpoints load) around a nearest-neighbour vector quantizer. Images <-> grids of token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glauber.nn.vq_config import VQConfig


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
    """One resolution level: residual blocks ``block``, each followed by an ``attn`` block when ``attend``."""

    def __init__(self, cfg: VQConfig, c_in: int, c_out: int, n_blocks: int, attend: bool) -> None:
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.norm_groups))
            c_in = c_out
            if attend:
                self.attn.append(AttnBlock(c_out, cfg.norm_groups))

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
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        c_in, res = cfg.ch, cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = _Level(cfg, c_in, cfg.ch * mult, cfg.num_res_blocks, res in cfg.attn_resolutions)
            c_in = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(c_in, cfg.dropout, cfg.norm_groups)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

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
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, cfg.dropout, cfg.norm_groups)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = _Level(cfg, c_in, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions)
            c_in = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(c_in)
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
            # |z|^2 is the same for every code: argmin of |e|^2 - 2 z.e
            ids[s : s + chunk] = torch.addmm(code_sq, flat[s : s + chunk], codes.t(), beta=1.0, alpha=-2.0).argmin(1)
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

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an image of the configured ``resolution``."""
        return (self.config.resolution // self.downsample_factor,) * 2

    @property
    def vocab_size(self) -> int:
        return self.config.n_embed

    def encode_latent(self, x: Tensor) -> Tensor:
        """Float images [N, C, H, W] in [-1, 1] -> pre-quantisation latents z_e [N, embed_dim, h, w]."""
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """Codebook vectors [N, embed_dim, h, w] -> images [N, out_ch, H, W] (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def quantise(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(z_st, ids, z_q, codebook_loss, commit_loss)``, ``z_st`` being ``z_q`` with a straight-through gradient."""
        ids = self.quantize.nearest(z_e)
        z_q = self.quantize.lookup(ids).to(z_e.dtype)
        z32, q32 = z_e.float(), z_q.float()
        return z_e + (z_q - z_e).detach(), ids, z_q, F.mse_loss(q32, z32.detach()), F.mse_loss(z32, q32.detach())

    def forward(self, x: Tensor) -> VQOutput:
        z_e = self.encode_latent(x)
        z_st, ids, z_q, codebook_loss, commit_loss = self.quantise(z_e)
        return VQOutput(self.decode_latent(z_st), ids, z_e, z_q, codebook_loss, commit_loss)

    def prepare(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 [N, H, W, C] (tensor or numpy) or float [N, C, H, W] in [-1, 1] -> checked float on the model's device."""
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
        p = next(self.parameters())
        return images.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def encode_to_ids(self, images: Tensor | np.ndarray, batch_size: int = 64) -> Tensor:
        """Images (as ``prepare`` takes them) -> token ids [N, H/f, W/f] on the device of ``images`` (CPU for numpy)."""
        out_device = images.device if isinstance(images, Tensor) else torch.device("cpu")
        parts = [
            self.quantize.nearest(self.encode_latent(self.prepare(images[s : s + batch_size]))).to(out_device)
            for s in range(0, len(images), batch_size)
        ]
        if not parts:
            h, w = (s // self.downsample_factor for s in self.prepare(images).shape[-2:])
            return torch.empty(0, h, w, dtype=torch.long, device=out_device)
        return torch.cat(parts)

    @torch.no_grad()
    def decode_ids(self, ids: Tensor | np.ndarray, grid_shape: Sequence[int] | None = None, batch_size: int = 64) -> Tensor:
        """Token ids [N, h, w] or [N, h*w] (``grid_shape``, default ``self.grid_shape``) -> float images in [-1, 1]."""
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
        out_device, p = ids.device, next(self.parameters())
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


def codebook_perplexity(counts: Tensor) -> Tensor:
    """exp of the entropy of the code frequencies: ``n_embed`` for uniform use, 1 for a single code."""
    p = counts / counts.sum().clamp_min(1)
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def codebook_usage(counts: Tensor) -> dict[str, Any]:
    """``perplexity``, ``used_fraction`` (codes used at least once), ``n_tokens`` and ``counts`` of per-code counts."""
    counts = counts.detach().double().cpu()
    return {
        "perplexity": float(codebook_perplexity(counts)),
        "used_fraction": float((counts > 0).double().mean()),
        "n_tokens": int(counts.sum()),
        "counts": counts.long().tolist(),
    }
