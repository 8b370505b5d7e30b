"""A tiny model and token batches shared by the activation and cache tests."""

import numpy as np

from interp.models.config import ModelConfig
from interp.models.transformer import Transformer, init_params

CONFIG = ModelConfig(
    vocab_size=50,
    d_model=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=32,
    max_len=16,
)
BOS, PAD = 1, 0
SITES = ["blocks_0/resid_post", "blocks_1/mlp/out"]


def model_and_params():
    return Transformer(CONFIG), init_params(CONFIG, seed=3)


def random_tokens(seed, batch=3, length=8):
    """Random [batch, length] ids that avoid BOS and PAD."""
    return np.random.default_rng(seed).integers(2, CONFIG.vocab_size, (batch, length), np.int32)
