"""TransformerLens hook names read the same values here as in TransformerLens itself.

The same random-weight Hugging Face checkpoints are loaded into a `HookedTransformer` (no
weight folding or centring, so its hooks see the checkpoint's own activations) and into
ours; every TransformerLens hook that `interp.models.sites` maps must hold the same values.
"""

import json
import shutil

import numpy as np
import pytest

from interp.models import hooks, sites
from tests import references
from tests.models import hf_testing

# TransformerLens hooks with no equal site here, by design (documented in sites.py).
NOT_KEPT = {
    "hook_embed", "hook_pos_embed", "attn.hook_attn_scores", "ln1.hook_scale", "ln2.hook_scale",
    "ln_final.hook_scale", "unembed.hook_out",
}  # fmt: skip


def _site(name):
    """'blocks.3.attn.hook_z' -> 'attn.hook_z'; top-level names as they are."""
    return name.split(".", 2)[-1] if name.startswith("blocks.") else name


@pytest.fixture(scope="module")
def transformer_lens():
    hint = "pip install -e '.[test]' (transformer-lens, the hook-name reference)"
    references.require_module("torch", hint)
    return references.require_module("transformer_lens", hint)


def _hooked_transformer(transformer_lens, variant, tmp_path):
    import torch
    from transformer_lens import loading_from_pretrained as loading

    _, hf, folder, model, params = hf_testing.converted(variant)
    # TransformerLens picks its loader from the folder's name ('llama', 'gemma' in a path
    # select name-based branches): a neutral name reads the architecture from config.json.
    neutral = tmp_path / "checkpoint"
    shutil.copytree(folder, neutral)
    config = json.loads((neutral / "config.json").read_text())
    if "n_positions" in config:  # GPT-2's n_ctx, which transformers 5 no longer writes.
        config["n_ctx"] = config["n_positions"]
    (neutral / "config.json").write_text(json.dumps(config))
    fields = loading.convert_hf_model_config(str(neutral))
    cfg = transformer_lens.HookedTransformerConfig(
        **{**fields, "tokenizer_name": None}, device="cpu", dtype=torch.float32
    )
    tl = transformer_lens.HookedTransformer(cfg)
    state = loading.get_pretrained_state_dict(str(neutral), cfg, hf_model=hf)
    tl.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False,
    )  # fmt: skip
    return tl, model, params


@pytest.mark.parametrize("variant", ["gpt2", "neox_parallel", "llama_gqa_llama3"])
def test_transformer_lens_hooks_hold_the_same_values(transformer_lens, variant, tmp_path):
    import torch

    tl, model, params = _hooked_transformer(transformer_lens, variant, tmp_path)
    tokens = hf_testing.random_tokens()
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.tensor(tokens))
    _, acts = hooks.run_with_hooks(model, params, tokens, capture=["*"])
    compared, refused = set(), set()
    for name, value in cache.items():
        site = _site(name)
        try:
            ours = hooks.resolve(model, [name])
        except sites.UnknownTransformerLensName:
            refused.add(site)
            continue
        theirs = value.numpy()
        got = np.asarray(acts[ours[0]])
        assert got.shape == theirs.shape, (name, got.shape, theirs.shape)
        scale = max(float(np.abs(theirs).max()), 1e-6)
        np.testing.assert_allclose(got, theirs, atol=1e-4 * scale, err_msg=name)
        compared.add(site)
    rotary = model.config.positions == "rotary"
    # hook_q / hook_k come before the rotary embedding there: refused here, and rightly so.
    before_rotary = {"attn.hook_q", "attn.hook_k"} if rotary else set()
    assert refused == (NOT_KEPT | before_rotary) & {_site(n) for n in cache}
    if rotary:
        q = cache["blocks.1.attn.hook_q"].numpy()
        assert not np.allclose(q, np.asarray(acts["blocks_1/attn/q"]), atol=1e-3)
    expected = {"hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "mlp.hook_pre",
                "mlp.hook_post", "ln1.hook_normalized", "ln2.hook_normalized",
                "ln_final.hook_normalized", "unembed.hook_in"}  # fmt: skip
    assert expected <= compared, expected - compared
