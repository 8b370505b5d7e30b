"""Feature queries refuse an SAE used at another site than its own, as steering does."""

import jax
import pytest

from interp import influence
from interp.sae.modules import SAE, SAEConfig
from interp.sae.modules import init_params as sae_init

CONFIG = SAEConfig(architecture="relu", d_in=8, num_latents=16, hook_name="blocks_1/resid_post")
PARAMS = sae_init(CONFIG, jax.random.key(0))


def test_another_site_of_the_same_width_is_refused_naming_both():
    with pytest.raises(ValueError, match="trained on 'blocks_1/resid_post'.*used at "
                       "'blocks_0/resid_post'.*allow_other_site=True"):  # fmt: skip
        influence.sae_feature(SAE(CONFIG), PARAMS, "blocks_0/resid_post", 3)
    with pytest.raises(ValueError, match="used at 'blocks.1.hook_mlp_out'"):
        influence.sae_feature(SAE(CONFIG), PARAMS, "blocks.1.hook_mlp_out", 3)


@pytest.mark.parametrize("hook", [None, "blocks_1/resid_post", "blocks.1.hook_resid_post"])
def test_the_sae_own_site_in_any_spelling_is_accepted(hook):
    measurement = influence.sae_feature(SAE(CONFIG), PARAMS, hook, 3)
    assert measurement.hooks == (hook or "blocks_1/resid_post",)


def test_another_site_is_accepted_when_asked_for_or_when_the_sae_names_none():
    other = influence.sae_feature(SAE(CONFIG), PARAMS, "blocks_0/resid_post", 3,
                                  allow_other_site=True)  # fmt: skip
    assert other.hooks == ("blocks_0/resid_post",)
    unnamed = SAE(CONFIG.replace(hook_name=None))
    assert influence.sae_feature(unnamed, PARAMS, "blocks_0/resid_post", 3).hooks == (
        "blocks_0/resid_post",
    )
