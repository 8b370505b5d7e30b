"""`analyse` writes the stats, dashboard and density plot of one SAE to a folder."""

import jax
import numpy as np

from interp import analysis
from interp.models.config import ModelConfig
from interp.models.transformer import Transformer, init_params
from interp.sae.modules import SAE, SAEConfig
from interp.sae.modules import init_params as sae_init_params

TINY = ModelConfig(
    vocab_size=61, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
    mlp_dim=32, max_len=16,
)  # fmt: skip


def test_analyse_writes_everything_and_skips_logits_off_the_residual_stream(tmp_path):
    model, params = Transformer(TINY), init_params(TINY, seed=0)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 4, 10))
    for site, head, width, logits in (("blocks_1/resid_post", None, 16, True),
                                      ("blocks.0.attn.hook_z", 1, 8, False)):  # fmt: skip
        config = SAEConfig(architecture="relu", d_in=width, num_latents=8, hook_name=site,
                           hook_head_index=head)  # fmt: skip
        sae_params = sae_init_params(config, jax.random.key(0))
        folder = tmp_path / str(width)
        written = analysis.analyse(model, params, SAE(config), sae_params, list(tokens), folder,
                                   top_k=3)  # fmt: skip
        loaded = analysis.FeatureStats.load(written["stats_path"])
        np.testing.assert_array_equal(loaded.fires, written["stats"].fires)
        page = (folder / "dashboard.html").read_text()
        assert ("Logit effects" in page) == logits == (written["logit_effects"] is not None)
        assert (folder / "density.png").read_bytes()[:4] == b"\x89PNG"
