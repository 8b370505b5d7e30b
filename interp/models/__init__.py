"""The language models under study: one Flax decoder, its hook points, HF checkpoints."""

from interp.models import hooks
from interp.models.config import ModelConfig
from interp.models.pretrained import from_pretrained, save_pretrained
from interp.models.transformer import Transformer, init_params

__all__ = [
    "ModelConfig",
    "Transformer",
    "from_pretrained",
    "hooks",
    "init_params",
    "save_pretrained",
]
