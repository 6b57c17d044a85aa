"""The denoiser, a DDiT-style transformer (adaLN-Zero, rotary, SDPA): ``forward(x_in, hidden, time, alpha=None) -> h [N, V]``,
``x_in [B, L]`` with hidden positions set to ``hidden_id = V`` (an extra embedding row), ``time [B] = (t + 1) / T``, ``alpha``
optional signal levels; the head runs on hidden positions only. ``causal=True``: the AR baseline (``decode_step``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glauber.schema import choice, option

try:  # optional, never required
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

ALPHA_SCALE = 10.0  # per-position signal levels: at most 10 rad per unit of alpha
SIZES = {"tiny": (64, 2, 2), "demo": (192, 4, 4), "small": (768, 12, 12), "medium": (1024, 24, 16)}  # width, blocks, heads


Size = choice("Size", SIZES, __name__)
Attention = choice("Attention", ("auto", "sdpa", "flash"), __name__)


@dataclass
class ModelConfig:
    """Denoiser options. ``size`` picks width/blocks/heads unless they are given explicitly."""

    size: Size = option(Size.tiny, "tiny | demo | small | medium: width, blocks and heads (see SIZES)")
    width: int | None = option(None, "hidden size (None: the size's)")
    blocks: int | None = option(None, "transformer blocks (None: the size's)")
    heads: int | None = option(None, "attention heads (None: the size's)")
    cond_dim: int = option(128, "width of the time (and signal-level) conditioning vector for adaLN")
    mlp_ratio: int = option(4, "MLP hidden size = mlp_ratio * width")
    dropout: float = option(0.1, "dropout in attention output and MLP")
    condition_on_alpha: bool = option(
        False, "add an embedding of each position's signal level alpha_i(t) to its token (lets infilling mark clamped positions)"
    )
    tie_head: bool = option(False, "share the output head with the token embedding")
    attention: Attention = option(
        Attention.auto, "auto (flash-attn when installed, on CUDA, in 16 bits; else PyTorch SDPA) | sdpa | flash (same as auto)"
    )
    causal: bool = option(False, "causal self-attention (position i sees <= i): the autoregressive baseline only")
    learned_positions: int = option(
        0, "> 0: learned absolute position embeddings for up to that many positions, beside rotary (image grids need it)"
    )

    def resolved(self) -> tuple[int, int, int]:
        if self.size not in SIZES:
            raise ValueError(f"model.size must be one of {tuple(SIZES)} (got {self.size!r})")
        w, b, h = SIZES[self.size]
        w, b, h = self.width or w, self.blocks or b, self.heads or h
        if w % h or (w // h) % 2:
            raise ValueError(f"model.width ({w}) must be a multiple of model.heads ({h}) with an even head size")
        if self.attention not in ("auto", "sdpa", "flash"):
            raise ValueError(f"model.attention must be 'auto', 'sdpa' or 'flash' (got {self.attention!r})")
        return w, b, h


def timestep_features(time: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of a scalar in ``[0, 1]`` per row, the scalar first multiplied by ``scale``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=time.device, dtype=torch.float32) / half)
    args = scale * time.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding tables, cached per length and device."""

    def __init__(self, head_dim: int, base: float = 10_000.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def forward(self, L: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] != L or self._cache[1] != device:
            pos = torch.arange(L, device=device, dtype=torch.float32)
            angles = torch.outer(pos, self.inv_freq.to(device))
            self._cache = (L, device, angles.cos()[None, :, None, :], angles.sin()[None, :, None, :])
        return self._cache[2], self._cache[3]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the head dimension; ``x [B, L, H, Dh]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (stable under bf16 autocast), weight only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float()).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from the conditioning vector."""

    def __init__(
        self, width: int, heads: int, cond_dim: int, mlp_ratio: int, dropout: float, attention: str, causal: bool = False
    ) -> None:
        super().__init__()
        self.heads, self.dropout, self.attention, self.causal = heads, dropout, attention, causal
        self.norm1, self.norm2 = LayerNorm(width), LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        hidden = mlp_ratio * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Linear(cond_dim, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p = self.dropout if self.training else 0.0
        if self.attention != "sdpa" and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return flash_attn_func(q, k, v, dropout_p=p, causal=self.causal)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal).transpose(1, 2)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, L, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = self._attend(q, k, v).reshape(B, L, D)
        x = x + gate1[:, None] * F.dropout(self.proj(a), self.dropout, self.training)
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2[:, None] * F.dropout(self.mlp(h), self.dropout, self.training)

    def forward_cached(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor], pos: int) -> Tensor:
        """One new position ``pos`` (``x [B, 1, D]``) of a causal block: caches its key/value, attends to ``0..pos``."""
        B, _, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(B, 1, 3, self.heads, D // self.heads).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = cache
        k_cache[:, pos : pos + 1] = k.to(k_cache.dtype)
        v_cache[:, pos : pos + 1] = v.to(v_cache.dtype)
        keys, values = k_cache[:, : pos + 1].to(q.dtype), v_cache[:, : pos + 1].to(q.dtype)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        x = x + gate1[:, None] * self.proj(a.transpose(1, 2).reshape(B, 1, D))
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2[:, None] * self.mlp(h)


class DDiT(nn.Module):
    """Bidirectional diffusion transformer returning ``h`` at the hidden positions only."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        width, blocks, heads = cfg.resolved()
        self.cfg, self.vocab_size, self.hidden_id = cfg, vocab_size, vocab_size
        self.embed = nn.Embedding(vocab_size + 1, width)  # last row: the hidden-input embedding
        nn.init.normal_(self.embed.weight, std=0.02)
        self.time_mlp = nn.Sequential(nn.Linear(256, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.alpha_embed = nn.Linear(64, width) if cfg.condition_on_alpha else None
        if self.alpha_embed is not None:
            nn.init.zeros_(self.alpha_embed.weight)
            nn.init.zeros_(self.alpha_embed.bias)
        self.pos_embed = nn.Embedding(cfg.learned_positions, width) if cfg.learned_positions > 0 else None  # beside rotary
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        self.rotary = Rotary(width // heads)
        self.blocks = nn.ModuleList(
            Block(width, heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout, cfg.attention, cfg.causal) for _ in range(blocks)
        )
        self.norm_out = LayerNorm(width)
        self.ada_out = nn.Linear(cfg.cond_dim, 2 * width)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.head = None if cfg.tie_head else nn.Linear(width, vocab_size, bias=False)  # tied: the embedding's token rows
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))

    def num_parameters(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() + (0 if self.head is None else self.head.weight.numel()) + self.head_bias.numel()
        return n

    def positions(self, length: int, start: int) -> Tensor:
        """Learned absolute position embeddings ``[length, D]`` from ``start``."""
        if start + length > self.pos_embed.num_embeddings:
            raise ValueError(
                f"sequence of {start + length} positions but model.learned_positions={self.pos_embed.num_embeddings}: "
                "set it to at least data.seq_len"
            )
        return self.pos_embed.weight[start : start + length]

    def trunk(self, x_in: Tensor, time: Tensor, alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Hidden states ``[B, L, D]`` and the conditioning vector ``[B, cond_dim]``."""
        x = self.embed(x_in)
        if self.pos_embed is not None:
            x = x + self.positions(x_in.shape[1], 0)
        if self.alpha_embed is not None:
            if alpha is None:
                raise ValueError("this model was built with condition_on_alpha=True: pass alpha [B, L]")
            # Smooth (low-frequency) features: neighbouring signal levels must map to similar inputs.
            x = x + self.alpha_embed(timestep_features(alpha.reshape(-1), 64, scale=ALPHA_SCALE).view(*alpha.shape, 64))
        c = F.silu(self.time_mlp(timestep_features(time, 256)))
        cos, sin = self.rotary(x_in.shape[1], x_in.device)
        for block in self.blocks:
            x = block(x, c, cos, sin)
        return x, c

    def forward(self, x_in: Tensor, hidden: Tensor | None, time: Tensor, alpha: Tensor | None = None) -> Tensor:
        """``h [N, V]`` in row-major order of ``hidden``: a boolean mask ``[B, L]``, sorted positions ``[B, m]`` (static
        shapes, for ``torch.compile``) or None for every position (an all-true mask without its synchronisation)."""
        x, c = self.trunk(x_in, time, alpha)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        if hidden is None:  # every position: broadcast the modulation instead of gathering
            return self._head(x, shift[:, None], scale[:, None]).flatten(0, 1)
        if hidden.dtype == torch.bool:
            rows = hidden.nonzero(as_tuple=True)[0]
            x = x[hidden]  # gather before the head: only the hidden positions pay for V
        else:
            B, m = hidden.shape
            rows = torch.arange(B, device=x.device).repeat_interleave(m)
            x = x.gather(1, hidden[..., None].expand(-1, -1, x.shape[-1])).reshape(B * m, -1)
        return self._head(x, shift[rows], scale[rows])

    def _head(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        x = self.norm_out(x) * (1 + scale) + shift
        weight = self.embed.weight[: self.vocab_size] if self.head is None else self.head.weight
        return F.linear(x, weight, self.head_bias)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[tuple[Tensor, Tensor]]:
        """Empty key/value buffers ``[B, max_len, H, Dh]`` per block for ``decode_step``."""
        if not self.cfg.causal:
            raise ValueError("decode_step needs a causal model (model.causal=true)")
        ref, heads = self.embed.weight, self.blocks[0].heads
        zeros = lambda: torch.zeros(batch, max_len, heads, ref.shape[1] // heads, dtype=dtype or ref.dtype, device=ref.device)
        return [(zeros(), zeros()) for _ in self.blocks]

    def decode_step(self, token: Tensor, pos: int, time: Tensor, cache: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Logits ``[B, V]`` at ``pos`` from ``token [B]`` and ``cache`` (positions ``< pos``): causal ``forward``, no dropout."""
        max_len = cache[0][0].shape[1]
        if not 0 <= pos < max_len:
            raise ValueError(f"position {pos} outside the cache of length {max_len}")
        x = self.embed(token[:, None])
        if self.pos_embed is not None:
            x = x + self.positions(1, pos)
        c = F.silu(self.time_mlp(timestep_features(time, 256)))
        cos, sin = self.rotary(max_len, token.device)
        cos, sin = cos[:, pos : pos + 1], sin[:, pos : pos + 1]
        for block, kv in zip(self.blocks, cache):
            x = block.forward_cached(x, c, cos, sin, kv, pos)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        return self._head(x[:, 0], shift, scale)
