"""The noise law ``u`` on the vocabulary: where a noised token is drawn from (uniform or unigram)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NoiseLaw:
    """A strictly positive law ``u`` on ``{0..V-1}`` (float64), with its log and CDF for sampling.

    Checked once, at construction (where ``u`` enters: the config's noise name, unigram counts).
    ``to(device)`` returns a copy on that device made once and cached (shared by all the copies, so
    ``law.to(d)`` is the same object at every step), not checked again: it holds the same values.
    ``log_probs`` and the CDF are computed once per copy. Treat a law as immutable.
    """

    probs: Tensor

    def __post_init__(self) -> None:
        p = torch.as_tensor(self.probs, dtype=torch.float64)
        if p.ndim != 1 or p.numel() < 2:
            raise ValueError(f"noise law must be a 1-D vector over >= 2 tokens (got shape {tuple(p.shape)})")
        if not bool((torch.isfinite(p) & (p > 0)).all()):
            raise ValueError(
                "noise law u must be > 0 on every token (Pi_t(a) > 0); smooth unigram counts "
                "(unigram_smoothing > 0) so unseen tokens keep some mass"
            )
        self._settle(p / p.sum(), {})

    def _settle(self, probs: Tensor, copies: dict[torch.device, NoiseLaw]) -> None:
        """Set ``probs`` (already checked and normalised) and the derived tables; join ``copies``."""
        self.probs = probs
        self._log_probs = probs.log()
        self._cdf = probs.cumsum(0)
        self._copies = copies
        copies.setdefault(probs.device, self)

    @classmethod
    def uniform(cls, vocab_size: int) -> NoiseLaw:
        return cls(torch.full((vocab_size,), 1.0 / vocab_size, dtype=torch.float64))

    @classmethod
    def unigram(cls, counts: Tensor, smoothing: float = 1.0) -> NoiseLaw:
        """Unigram law of the training data, ``(count + smoothing) / total``."""
        if smoothing < 0:
            raise ValueError(f"unigram_smoothing must be >= 0 (got {smoothing})")
        return cls(torch.as_tensor(counts, dtype=torch.float64) + smoothing)

    @classmethod
    def from_name(cls, name: str, vocab_size: int, counts: Tensor | None = None, smoothing: float = 1.0) -> NoiseLaw:
        if name == "uniform":
            return cls.uniform(vocab_size)
        if name == "unigram":
            if counts is None:
                raise ValueError("noise='unigram' needs token counts of the training data")
            if len(counts) != vocab_size:
                raise ValueError(f"unigram counts cover {len(counts)} tokens, vocabulary has {vocab_size}")
            return cls.unigram(counts, smoothing)
        raise ValueError(f"noise must be 'uniform' or 'unigram' (got {name!r})")

    @property
    def vocab_size(self) -> int:
        return self.probs.numel()

    @property
    def log_probs(self) -> Tensor:
        return self._log_probs

    def to(self, device: torch.device | str) -> NoiseLaw:
        """This law on ``device``: copied once, then the cached copy (no check, no transfer)."""
        law = self._copies.get(device)  # type: ignore[call-overload]
        if law is None:
            probs = self.probs.to(device)
            law = self._copies.get(probs.device)  # e.g. "cuda" and "cuda:0" name one device
            if law is None:
                law = object.__new__(NoiseLaw)
                law._settle(probs, self._copies)
            self._copies[device] = law  # type: ignore[index]
        return law

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """Draw token ids of the given shape from ``u`` (inverse CDF in float64)."""
        cdf = self._cdf
        r = torch.rand(shape, dtype=torch.float64, device=cdf.device, generator=generator)
        return torch.searchsorted(cdf, r * cdf[-1], right=True).clamp_(max=self.vocab_size - 1)
