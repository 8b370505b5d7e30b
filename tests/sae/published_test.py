"""Published-style SAEs on Gemma-3- and Qwen-3-shaped checkpoints: harvest -> evaluate -> splice.

Each case is a random-weight transformers checkpoint loaded with `from_pretrained` and a
SAELens-format folder naming its site the TransformerLens way, as published SAEs do. The
reference for every number is SAELens's own module applied to the site's raw value, so a
wrong site, head layout or output site shows up as a mismatch, not only as an error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import sae as saes
from interp.data import activations
from interp.models import hooks, sites
from interp.models.losses import next_token_loss
from interp.sae import evaluate
from tests import references
from tests.models import hf_testing

BOS = 0  # hf_testing's checkpoints: bos_token_id 0.


@pytest.fixture(scope="module")
def sae_lens():
    hint = "pip install -e '.[test]' torch==2.13.0 (the SAELens reference)"
    references.require_module("torch", hint)
    return references.require_module("sae_lens", hint)


def _randomized(module, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(noise.abs() * 0.05 if name == "threshold" else noise * 0.2)
    return module


def _folder(sae_lens, kind, model, tmp_path):
    """A SAELens folder of `kind` for `model`: (path, site names as TransformerLens writes)."""
    cfg = model.config
    width = cfg.num_heads * cfg.head_dim
    if kind == "jumprelu_resid_post":
        module = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=cfg.d_model, d_sae=96))
        names = {"hook_name": "blocks.1.hook_resid_post"}
    elif kind == "hook_z":
        module = sae_lens.StandardSAE(
            sae_lens.StandardSAEConfig(d_in=width, d_sae=96, reshape_activations="hook_z")
        )
        names = {"hook_name": "blocks.1.attn.hook_z"}
    elif kind == "one_head":
        module = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=cfg.head_dim, d_sae=64, k=8))
        names = {"hook_name": "blocks.0.attn.hook_z", "hook_head_index": 2}
    else:
        assert kind == "skip_transcoder"
        module = sae_lens.SkipTranscoder(sae_lens.SkipTranscoderConfig(
            d_in=cfg.d_model, d_sae=96, d_out=cfg.d_model, apply_b_dec_to_input=False))  # fmt: skip
        names = {"hook_name": "blocks.1.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out"}
    module = _randomized(module, seed=len(kind))
    for key, value in names.items():
        module.cfg.metadata[key] = value
    path = tmp_path / kind
    module.save_model(path)
    return path, sae_lens.SAE.load_from_disk(path)


@pytest.mark.parametrize(
    "variant, kind",
    [
        ("gemma3", "jumprelu_resid_post"),  # Gemma Scope 2's residual SAEs.
        ("gemma3", "skip_transcoder"),  # Gemma Scope 2's transcoders: mlp_in -> mlp_out.
        ("qwen3", "hook_z"),  # Attention-output SAEs on the concatenated heads.
        ("qwen3", "one_head"),  # A per-head SAE (SAELens's hook_head_index).
    ],
)
def test_published_sae_through_harvest_evaluate_and_splice(sae_lens, tmp_path, variant, kind):
    import torch

    _, _, _, model, params = hf_testing.converted(variant)
    path, reference = _folder(sae_lens, kind, model, tmp_path)
    sae, sae_params = saes.load(path)  # Two values, as before.
    meta = saes.read_metadata(path)
    # The folder's site: ours where that needs no model (hook_mlp_in is resid_mid, or
    # resid_pre in parallel-residual models, so it stays as written until resolved).
    assert sae.config.hook_name == meta["hook_name"]
    assert meta["transformer_lens_hook_name"].startswith("blocks.")
    (site,) = hooks.resolve(model, [sae.config.hook_name])
    head = sae.config.hook_head_index
    output_site = hooks.resolve(model, [sae.config.output_hook_name or site])[0]

    tokens = hf_testing.random_tokens(seed=3)
    tokens[:, 0] = BOS  # As the checkpoint's tokenizer would add it; BOS rows are excluded.
    keep = activations.keep_mask(tokens, bos_id=BOS)

    # The raw values at the sites, and SAELens's output computed from them.
    _, acts = hooks.run_with_hooks(model, params, tokens, capture=[site, output_site])
    raw = np.asarray(acts[site])  # [B, T, ...]: [B, T, N, H] for attn/z.
    if head is not None:
        reference_in = raw[:, :, head]
    else:
        reference_in = raw  # SAELens's hook_z SAEs take [..., N, H] and flatten themselves.
    with torch.no_grad():
        their_codes = reference.encode(torch.from_numpy(reference_in)).numpy()
        their_out = reference(torch.from_numpy(reference_in)).numpy()

    # Harvest gives the rows the SAE reads; our codes equal SAELens's on them.
    (rows,) = activations.harvest(model, params, [tokens], [site], bos_id=BOS)
    harvested = rows[site]
    if head is not None:  # Harvest keeps all heads side by side; the SAE reads one.
        harvested = harvested.reshape(len(harvested), -1, model.config.head_dim)[:, head]
    codes = np.asarray(sae.apply({"params": sae_params}, harvested, method="encode"))
    their_kept = their_codes.reshape(*tokens.shape, -1)[keep]
    assert (codes != 0).sum(-1).mean() > 1
    np.testing.assert_allclose(codes, their_kept, atol=1e-4, rtol=1e-4)

    # The spliced loss equals SAELens's output written into the output site by hand.
    metrics = evaluate.evaluate(model, params, sae, sae_params, [tokens], bos_id=BOS)
    assert metrics["num_tokens"] == int(keep.sum()) == len(harvested)

    def by_hand(value):
        new = jnp.asarray(their_out.reshape(value.shape[:2] + (-1,)))
        if head is not None:
            new = sites.from_rows(output_site, value, new, head)
        else:
            new = new.reshape(value.shape)
        return jnp.where(keep.reshape(keep.shape + (1,) * (value.ndim - 2)), new, value)

    logits, _ = hooks.run_with_hooks(model, params, tokens, interventions={output_site: by_hand})
    loss, _ = next_token_loss(logits, tokens, None)
    assert metrics["spliced_loss"] == pytest.approx(float(loss), rel=1e-5, abs=1e-5)
    assert metrics["spliced_loss"] != pytest.approx(metrics["clean_loss"], abs=1e-4)
    assert np.isfinite(metrics["fvu"]) and metrics["fvu"] > 0
    # The TransformerLens name works as a capture site too.
    _, by_name = hooks.run_with_hooks(
        model, params, tokens, capture=[meta["transformer_lens_hook_name"]]
    )
    np.testing.assert_array_equal(by_name[site], acts[site])
    jax.clear_caches()
