"""SAE evaluation: hand-computable reconstruction metrics, exact accumulation, spliced loss."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.data import activations
from interp.metrics import read_metrics
from interp.models import hooks, sites
from interp.models.config import ModelConfig
from interp.models.losses import next_token_loss
from interp.models.transformer import Transformer, init_params
from interp.sae import evaluate
from interp.sae.modules import SAE, SAEConfig
from interp.sae.modules import init_params as sae_init_params

TINY = ModelConfig(
    vocab_size=61, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
    mlp_dim=32, max_len=16,
)  # fmt: skip
# Zeroing a residual stream site costs this model a lot; its last MLP output matters little.
RESIDUAL_SITES = ["blocks_0/resid_post", "blocks_1/resid_post"]
SITES = RESIDUAL_SITES + ["blocks_1/mlp/out"]


@pytest.fixture(scope="module")
def lm():
    """A random model made confident (larger embeddings, tied unembedding) and its greedy
    continuations, so the clean loss is well below the loss with any site ablated."""
    model = Transformer(TINY)
    params = init_params(TINY, seed=0)
    params = dict(params, embed=params["embed"] * 8)
    apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, TINY.vocab_size)
    for t in range(tokens.shape[1] - 1):
        tokens = tokens.at[:, t + 1].set(jnp.argmax(apply(tokens)[:, t], axis=-1))
    return model, params, tokens


@functools.partial(jax.jit, static_argnums=(0, 4))
def _capture(model, params, tokens, mask, site):
    return hooks.run_with_hooks(model, params, tokens, capture=[site], attention_mask=mask)[1][site]


def _apply(model, params, tokens, mask=None, splice=None):
    """Logits (jitted: eager Flax is slow), optionally with an SAE spliced in at a site."""
    if splice is None:
        return jax.jit(model.apply)({"params": params}, tokens, mask)
    site, sae, sae_params = splice
    interventions = {site: lambda value: sae.apply({"params": sae_params}, value)[0]}
    run = jax.jit(lambda p, t: hooks.run_with_hooks(model, p, t, interventions=interventions)[0])
    return run(params, tokens)


def _exact_sae(d_in):
    """ReLU SAE with X = 2D, W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    config = SAEConfig(architecture="relu", d_in=d_in, num_latents=2 * d_in)
    eye = jnp.eye(d_in)
    params = {
        "W_enc": jnp.concatenate([eye, -eye], axis=1),
        "b_enc": jnp.zeros(2 * d_in),
        "W_dec": jnp.concatenate([eye, -eye], axis=0),
        "b_dec": jnp.zeros(d_in),
    }
    return SAE(config), params


def _zero_sae(d_in):
    config = SAEConfig(architecture="relu", d_in=d_in, num_latents=8)
    params = jax.tree.map(jnp.zeros_like, sae_init_params(config, jax.random.key(0)))
    return SAE(config), params


# --- Spliced loss ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "site, padded",
    [(SITES[0], False), (SITES[0], True), (SITES[1], True), (SITES[2], False)],
)
def test_exact_sae_recovers_the_clean_loss(lm, site, padded):
    model, params, tokens = lm
    mask = jnp.ones_like(tokens).at[0, 7:].set(0).at[2, 4:].set(0) if padded else None
    sae, sae_params = _exact_sae(TINY.d_model)
    got = evaluate.spliced_loss(model, params, sae, sae_params, tokens, site, attention_mask=mask)
    clean, count = next_token_loss(_apply(model, params, tokens, mask), tokens, mask)
    assert got["clean_loss"] == pytest.approx(float(clean), abs=1e-6)
    assert got["num_predictions"] == int(count) == (9 + 6 + 3 if padded else 27)
    assert got["spliced_loss"] == pytest.approx(got["clean_loss"], abs=1e-6)
    assert got["kl"] == pytest.approx(0.0, abs=1e-7)
    if site in RESIDUAL_SITES:
        assert got["zero_ablation_loss"] - got["clean_loss"] > 0.1
        assert got["loss_recovered"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("site", RESIDUAL_SITES)
def test_zero_sae_gives_the_zero_ablation_loss(lm, site):
    model, params, tokens = lm
    sae, sae_params = _zero_sae(TINY.d_model)
    got = evaluate.spliced_loss(model, params, sae, sae_params, tokens, site)
    assert got["spliced_loss"] == pytest.approx(got["zero_ablation_loss"], abs=1e-6)
    assert got["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert got["kl"] > 0


def test_kl_matches_a_numpy_reference(lm):
    model, params, tokens = lm
    config = SAEConfig(architecture="topk", d_in=TINY.d_model, num_latents=32, k=3)
    sae, sae_params = SAE(config), sae_init_params(config, jax.random.key(3))
    site = "blocks_0/resid_post"
    got = evaluate.spliced_loss(model, params, sae, sae_params, tokens, site)
    clean = np.asarray(model.apply({"params": params}, tokens), np.float64)[:, :-1]
    spliced, _ = evaluate.hooks.run_with_hooks(
        model,
        params,
        tokens,
        interventions={site: lambda v: sae.apply({"params": sae_params}, v)[0]},
    )
    spliced = np.asarray(spliced, np.float64)[:, :-1]

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    logp, logq = log_softmax(clean), log_softmax(spliced)
    expected = (np.exp(logp) * (logp - logq)).sum(-1).mean()
    assert got["kl"] == pytest.approx(expected, rel=1e-4)
    assert got["kl"] > 0 and got["spliced_loss"] > got["clean_loss"]


def test_bad_sites_raise(lm):
    model, params, tokens = lm
    sae, sae_params = _zero_sae(TINY.d_model)
    with pytest.raises(ValueError, match="Unknown hook name"):
        evaluate.spliced_loss(model, params, sae, sae_params, tokens, "blocks_9/resid_post")
    with pytest.raises(ValueError, match="matches 2 hook points"):
        evaluate.spliced_loss(model, params, sae, sae_params, tokens, "blocks_*/resid_post")


# --- Reconstruction metrics -----------------------------------------------------------------


def _hand_sae():
    """D = 2, X = 3: codes relu(x0), relu(x1), 0 (latent 2 never fires); x_hat = (c0, c1 / 2)."""
    config = SAEConfig(architecture="relu", d_in=2, num_latents=3, subtract_decoder_bias=False)
    params = {
        "W_enc": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        "b_enc": jnp.array([0.0, 0.0, -1.0]),
        "W_dec": jnp.array([[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]]),
        "b_dec": jnp.zeros(2),
    }
    return SAE(config), params


HAND_X = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]])


def test_reconstruction_metrics_by_hand():
    sae, params = _hand_sae()
    got = evaluate.reconstruction_metrics(sae, params, HAND_X)
    # Mean (0.75, 0.5); squared distances 0.3125 + 2.8125 + 5.3125 + 3.3125 = 11.75.
    # Errors: row 2 reconstructs (0, 1) (error 1), row 4 reconstructs 0 (error 1).
    assert got["fvu"] == pytest.approx(2 / 11.75)
    assert got["explained_variance"] == pytest.approx(1 - 2 / 11.75)
    assert got["mse"] == pytest.approx(2 / 8)
    assert got["l0"] == pytest.approx(3 / 4)
    assert got["dead_fraction"] == pytest.approx(1 / 3)  # Latent 2.
    assert got["dense_fraction"] == pytest.approx(2 / 3)  # Latents 0 (1/2) and 1 (1/4) > 0.1.
    assert got["num_tokens"] == 4
    strict = evaluate.reconstruction_metrics(sae, params, HAND_X, dense_threshold=0.3)
    assert strict["dense_fraction"] == pytest.approx(1 / 3)


def test_mask_equals_dropping_rows():
    sae, params = _hand_sae()
    x = HAND_X.reshape(2, 2, 2)  # [B, T, D] works too.
    mask = jnp.array([[1, 0], [1, 1]])
    got = evaluate.reconstruction_metrics(sae, params, x, mask)
    expected = evaluate.reconstruction_metrics(sae, params, HAND_X[jnp.array([0, 2, 3])])
    assert got == pytest.approx(expected)
    # Without the (0, 2) row latent 1 never fires.
    assert got["dead_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "relu"])
def test_accumulating_batches_equals_the_concatenation(architecture):
    config = SAEConfig(architecture=architecture, d_in=8, num_latents=64, k=4)
    sae, params = SAE(config), sae_init_params(config, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 3)
    # Batches of different sizes and means: an average of per-batch FVUs would be wrong.
    batches = [
        jax.random.normal(k, (n, 8)) + shift
        for k, n, shift in zip(keys, (5, 17, 2), (0, 3, -2), strict=True)
    ]
    accumulator = evaluate.ReconstructionAccumulator()
    for batch in batches:
        accumulator.update(sae, params, batch)
    got = accumulator.result()
    expected = evaluate.reconstruction_metrics(sae, params, jnp.concatenate(batches))
    assert got == pytest.approx(expected, rel=1e-5)
    assert got["l0"] > 0


def test_evaluate_over_batches_equals_one_concatenated_batch(lm):
    model, params, tokens = lm
    config = SAEConfig(architecture="topk", d_in=TINY.d_model, num_latents=32, k=3)
    sae, sae_params = SAE(config), sae_init_params(config, jax.random.key(3))
    mask = jnp.ones_like(tokens).at[1, 6:].set(0)
    site = "blocks_1/resid_post"
    batches = [
        {"tokens": tokens[:1], "attention_mask": mask[:1]},
        (tokens[1:], mask[1:]),
        {"tokens": tokens[:1], "attention_mask": mask[:1]},  # Left out by max_batches.
    ]
    got = evaluate.evaluate(model, params, sae, sae_params, batches, site, max_batches=2)
    whole = evaluate.evaluate(model, params, sae, sae_params, [(tokens, mask)], site)
    assert got.pop("num_batches") == 2 and whole.pop("num_batches") == 1
    assert got == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert got["num_tokens"] == 10 + 6 + 10 and got["num_predictions"] == 9 + 5 + 9
    # Reconstruction metrics are those of the (unpadded) activations at the site.
    acts = _capture(model, params, tokens, mask, site)
    direct = evaluate.reconstruction_metrics(sae, sae_params, acts, mask)
    assert {k: got[k] for k in direct} == pytest.approx(direct, rel=1e-5)
    # Loss metrics are spliced_loss's on the whole batch.
    loss = evaluate.spliced_loss(model, params, sae, sae_params, tokens, site, mask)
    assert {k: got[k] for k in loss} == pytest.approx(loss, rel=1e-5, abs=1e-7)


def test_write(tmp_path, lm):
    model, params, tokens = lm
    sae, sae_params = _exact_sae(TINY.d_model)
    metrics = evaluate.evaluate(model, params, sae, sae_params, [tokens], "blocks_0/resid_post")
    path = evaluate.write(metrics, tmp_path, step=7)
    saved = json.loads(path.read_text())
    assert saved["step"] == 7 and saved["fvu"] == pytest.approx(metrics["fvu"])
    assert set(saved) == set(metrics) | {"step"}
    (record,) = read_metrics(tmp_path)
    assert record["step"] == 7
    assert record["sae_eval/loss_recovered"] == pytest.approx(metrics["loss_recovered"])
    assert any((tmp_path / "tb").iterdir())


# --- One layout per site: head-shaped sites, per-head SAEs, transcoders, exclusions ---------

# The failing input: width 16, 2 heads of 6, an SAE trained on harvested attn/z rows.
HEADS = ModelConfig(
    vocab_size=61, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=6,
    mlp_dim=32, max_len=16,
)  # fmt: skip


@pytest.mark.parametrize("site", ["blocks_0/attn/z", "blocks_0/attn/v", "blocks.0.attn.hook_z"])
def test_exact_sae_at_a_head_shaped_site_is_lossless(site):
    model, params = Transformer(HEADS), init_params(HEADS, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, HEADS.vocab_size)
    width = HEADS.num_heads * HEADS.head_dim
    # The SAE's width is what harvest gives for the site: heads side by side.
    (rows,) = activations.harvest(model, params, [np.asarray(tokens)], [site])
    ((name, harvested),) = rows.items()
    assert harvested.shape == (30, width) and [name] == hooks.resolve(model, [site])
    sae, sae_params = _exact_sae(width)
    metrics = evaluate.evaluate(model, params, sae, sae_params, [tokens], site)
    assert metrics["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["spliced_loss"] == pytest.approx(metrics["clean_loss"], abs=1e-6)
    # Splicing really writes the site: a zero SAE there gives the zero-ablation loss.
    zero, zero_params = _zero_sae(width)
    ablated = evaluate.spliced_loss(model, params, zero, zero_params, tokens, site)
    assert ablated["spliced_loss"] == pytest.approx(ablated["zero_ablation_loss"], abs=1e-6)
    assert ablated["zero_ablation_loss"] != pytest.approx(ablated["clean_loss"], abs=1e-3)


def test_per_head_sae_reads_and_writes_its_head_only():
    model, params = Transformer(HEADS), init_params(HEADS, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, HEADS.vocab_size)
    sae, sae_params = _zero_sae(HEADS.head_dim)
    sae = SAE(sae.config.replace(hook_name="blocks_1/attn/z", hook_head_index=1))
    got = evaluate.spliced_loss(model, params, sae, sae_params, tokens)  # Site from config.
    # Zeroing head 1 by hand gives the same loss; zeroing all heads does not.
    ablate = sites.row_intervention("blocks_1/attn/z", jnp.zeros_like, head_index=1)
    logits, _ = hooks.run_with_hooks(
        model, params, tokens, interventions={"blocks_1/attn/z": ablate}
    )
    loss, _ = next_token_loss(logits, tokens, None)
    assert got["spliced_loss"] == pytest.approx(float(loss), abs=1e-6)
    assert got["zero_ablation_loss"] == pytest.approx(float(loss), abs=1e-6)
    # The SAE's width is one head's: without the head index the site is too wide.
    with pytest.raises(ValueError, match="width 12 .*per-head SAE needs head_index"):
        evaluate.spliced_loss(model, params, SAE(sae.config.replace(hook_head_index=None)),
                              sae_params, tokens)  # fmt: skip
    with pytest.raises(ValueError, match="outside 0..1"):
        evaluate.spliced_loss(model, params, sae, sae_params, tokens, head_index=2)
    with pytest.raises(ValueError, match="names no hook site"):
        evaluate.spliced_loss(model, params, _zero_sae(16)[0], sae_params, tokens)


def test_transcoder_is_scored_against_and_spliced_into_its_output_site():
    model, params = Transformer(TINY), init_params(TINY, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, TINY.vocab_size)
    scale, bias = jax.random.normal(jax.random.key(5), (2, TINY.d_model))
    ln = {"scale": 1.0 + 0.5 * scale, "bias": 0.5 * bias}
    params = dict(params, blocks_1=dict(params["blocks_1"], ln_2=ln))
    # An exact "transcoder" from ln_2's normalized input to mlp/in: mlp/in = normalized * scale
    # + bias, so W_dec carries the scale and b_dec the bias.
    d = TINY.d_model
    config = SAEConfig(
        architecture="relu", d_in=d, num_latents=2 * d, d_out=d, subtract_decoder_bias=False,
        hook_name="blocks.1.ln2.hook_normalized", output_hook_name="blocks_1/mlp/in",
    )  # fmt: skip
    eye = jnp.eye(d)
    transcoder = {
        "W_enc": jnp.concatenate([eye, -eye], axis=1),
        "b_enc": jnp.zeros(2 * d),
        "W_dec": jnp.concatenate([eye, -eye], axis=0) * ln["scale"],
        "b_dec": ln["bias"],
    }
    got = evaluate.evaluate(model, params, SAE(config), transcoder, [tokens])
    assert got["fvu"] == pytest.approx(0.0, abs=1e-8)
    assert got["spliced_loss"] == pytest.approx(got["clean_loss"], abs=1e-5)
    # Scored against the output site: the same weights without the scale do worse.
    wrong = dict(transcoder, W_dec=jnp.concatenate([eye, -eye], axis=0))
    worse = evaluate.evaluate(model, params, SAE(config), wrong, [tokens])
    assert worse["fvu"] > 0.01 and worse["spliced_loss"] != pytest.approx(got["clean_loss"])
    # An output site the forward pass reaches before the input is refused, by name.
    backwards = SAE(config.replace(hook_name="blocks_1/resid_mid",
                                   output_hook_name="blocks_0/mlp/out"))  # fmt: skip
    with pytest.raises(ValueError, match="reaches before .* its input 'blocks_1/resid_mid'"):
        evaluate.evaluate(model, params, backwards, transcoder, [tokens])
    # A transcoder reading one head writes its whole output site.
    one_head = SAEConfig(
        architecture="relu", d_in=TINY.head_dim, num_latents=8, d_out=d,
        subtract_decoder_bias=False, hook_name="blocks_1/attn/z", hook_head_index=1,
        output_hook_name="blocks_1/mlp/out",
    )  # fmt: skip
    zero = jax.tree.map(jnp.zeros_like, sae_init_params(one_head, jax.random.key(0)))
    ablated = evaluate.evaluate(model, params, SAE(one_head), zero, [tokens])
    assert ablated["spliced_loss"] == pytest.approx(ablated["zero_ablation_loss"], abs=1e-6)


def test_excluded_positions_keep_their_activations_and_are_not_scored(lm):
    model, params, tokens = lm
    sae, sae_params = _zero_sae(TINY.d_model)
    site = "blocks_0/resid_post"
    first = int(tokens[0, 3])
    options = dict(skip_first=True, exclude_ids=[first])
    got = evaluate.spliced_loss(model, params, sae, sae_params, tokens, site, **options)
    keep = activations.keep_mask(np.asarray(tokens), **options)
    assert not keep[:, 0].any() and not keep[0, 3]
    # By hand: zeros only where kept.
    ablate = sites.row_intervention(site, lambda r: jnp.where(keep[..., None], 0.0, r))
    logits, _ = hooks.run_with_hooks(model, params, tokens, interventions={site: ablate})
    loss, _ = next_token_loss(logits, tokens, None)
    assert got["spliced_loss"] == pytest.approx(float(loss), abs=1e-6)
    # Reconstruction is scored on the kept rows only: the same rows harvest gives.
    config = SAEConfig(architecture="topk", d_in=TINY.d_model, num_latents=32, k=3)
    topk, topk_params = SAE(config), sae_init_params(config, jax.random.key(3))
    metrics = evaluate.evaluate(model, params, topk, topk_params, [tokens], site, **options)
    (rows,) = activations.harvest(model, params, [np.asarray(tokens)], site, **options)
    assert metrics["num_tokens"] == int(keep.sum()) == len(rows[site])
    by_hand = evaluate.reconstruction_metrics(topk, topk_params, rows[site])
    assert metrics["fvu"] == pytest.approx(by_hand["fvu"], rel=1e-5)


def test_an_sae_at_another_site_than_its_own_is_refused_unless_allowed(lm):
    model, params, tokens = lm
    sae, sae_params = _exact_sae(TINY.d_model)
    sae = SAE(sae.config.replace(hook_name="blocks.1.hook_resid_post"))
    other = "trained on 'blocks.1.hook_resid_post'.*used at 'blocks_0/resid_post'"
    with pytest.raises(ValueError, match=other):
        evaluate.spliced_loss(model, params, sae, sae_params, tokens, "blocks_0/resid_post")
    with pytest.raises(ValueError, match=other):
        evaluate.evaluate(model, params, sae, sae_params, [tokens], "blocks_0/resid_post")
    own = evaluate.spliced_loss(model, params, sae, sae_params, tokens, "blocks_1/resid_post")
    assert own["kl"] == pytest.approx(0.0, abs=1e-7)
    allowed = evaluate.spliced_loss(model, params, sae, sae_params, tokens,
                                    "blocks_0/resid_post", allow_other_site=True)  # fmt: skip
    assert allowed["kl"] == pytest.approx(0.0, abs=1e-7)  # An exact SAE is exact anywhere.
