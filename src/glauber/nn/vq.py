"""The VQ image tokenizer, in one import: images <-> grids of token ids for the discrete diffusion models.

``VQConfig`` (``vq_config``) describes a taming-transformers VQGAN, ``VQModel`` (``vq_model``) is the
network, ``load_vq``/``save_vq`` (``vq_checkpoint``) read taming checkpoints and the ``vq.ckpt`` written by
``glauber train-vq``.
"""

from glauber.nn.vq_checkpoint import CONFIG_MISMATCH_HINT, load_vq, save_vq
from glauber.nn.vq_config import VQConfig
from glauber.nn.vq_model import VQModel, codebook_usage

__all__ = ["CONFIG_MISMATCH_HINT", "VQConfig", "VQModel", "codebook_usage", "load_vq", "save_vq"]
