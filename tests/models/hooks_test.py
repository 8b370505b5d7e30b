"""Hook points: capture, intervene and differentiate at named sites."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.models import hooks
from interp.models.transformer import Norm, Transformer, init_params
from tests.models.testing import ALL, GPT2_LIKE, LLAMA_LIKE

EXPECTED_BLOCK_SITES = [
    "resid_pre",
    "attn_out",
    "mlp/in",
    "mlp/pre_act",
    "mlp/down",
    "mlp/out",
    "resid_post",
]


def _setup(config, batch=2, length=9):
    model = Transformer(config)
    params = init_params(config, seed=1)
    tokens = jax.random.randint(jax.random.key(2), (batch, length), 0, config.vocab_size)
    return model, params, tokens


@pytest.mark.parametrize("family", sorted(ALL))
def test_required_sites_exist_in_every_block(family):
    config = ALL[family]
    names = hooks.hook_names(Transformer(config))
    for layer in range(config.num_layers):
        for site in EXPECTED_BLOCK_SITES:
            assert f"blocks_{layer}/{site}" in names
    assert "final_norm" in names


@pytest.mark.parametrize("family", sorted(ALL))
def test_identity_interventions_and_capture_leave_logits_unchanged(family):
    model, params, tokens = _setup(ALL[family])
    clean = model.apply({"params": params}, tokens)
    everything = {name: (lambda x: x) for name in hooks.hook_names(model)}

    @jax.jit
    def hooked(params, tokens):
        return hooks.run_with_hooks(model, params, tokens, capture=["*"], interventions=everything)

    # Eagerly the hooked run is bit-identical; under jit XLA may fuse differently (1e-7).
    logits, acts = hooks.run_with_hooks(
        model, params, tokens, capture=["*"], interventions=everything
    )
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(clean))
    assert set(acts) == set(hooks.hook_names(model))
    jit_clean = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
    chex.assert_trees_all_close(hooked(params, tokens)[0], jit_clean, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", sorted(ALL))
def test_sublayer_outputs_are_what_the_residual_stream_adds_in_every_family(family):
    # attn_out and mlp/out mean the same in every family (TransformerLens's hook_attn_out /
    # hook_mlp_out): in Gemma they come after the post-norms, which are part of the sublayer.
    config = ALL[family]
    model, params, tokens = _setup(config)
    _, acts = hooks.run_with_hooks(model, params, tokens, capture=["*"])
    for layer in range(config.num_layers):
        site = {s: acts[f"blocks_{layer}/{s}"] for s in ("resid_pre", "attn_out", "mlp/out")}
        post = acts[f"blocks_{layer}/resid_post"]
        if config.parallel_residual:
            added = site["resid_pre"] + site["attn_out"] + site["mlp/out"]
            chex.assert_trees_all_close(post, added, atol=1e-5)
        else:
            mid = acts[f"blocks_{layer}/resid_mid"]
            chex.assert_trees_all_close(mid, site["resid_pre"] + site["attn_out"], atol=1e-5)
            chex.assert_trees_all_close(post, mid + site["mlp/out"], atol=1e-5)
        if layer + 1 < config.num_layers:
            np.testing.assert_array_equal(post, acts[f"blocks_{layer + 1}/resid_pre"])
        # A norm's `normalized` point is its input centred (LayerNorm) and divided by the
        # RMS, before the learned scale and bias.
        x = np.asarray(site["resid_pre"], np.float64)
        if config.norm == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        want = x / np.sqrt((x**2).mean(-1, keepdims=True) + config.norm_eps)
        got = acts[f"blocks_{layer}/ln_1/normalized"]
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_captured_values_are_consistent_with_the_residual_stream():
    model, params, tokens = _setup(GPT2_LIKE)
    logits, acts = hooks.run_with_hooks(model, params, tokens, capture=["*"])
    chex.assert_shape(acts["blocks_0/attn/pattern"], (2, GPT2_LIKE.num_heads, 9, 9))
    # Attention rows are distributions and causal.
    pattern = np.asarray(acts["blocks_0/attn/pattern"])
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(pattern, k=1) == 0)
    # The unembedding reads final_norm: tied embeddings give logits = final_norm @ E^T.
    expected = jnp.einsum("BTD,VD->BTV", acts["final_norm"], params["embed"])
    chex.assert_trees_all_close(logits, expected, atol=1e-5)


def test_zero_ablation_removes_the_site_from_the_residual():
    model, params, tokens = _setup(GPT2_LIKE)
    site = "blocks_1/mlp/out"
    logits, acts = hooks.run_with_hooks(
        model,
        params,
        tokens,
        capture=["blocks_1/*"],
        interventions={site: jnp.zeros_like},
    )
    np.testing.assert_array_equal(acts[site], 0.0)
    np.testing.assert_array_equal(acts["blocks_1/resid_post"], acts["blocks_1/resid_mid"])
    assert not np.allclose(logits, model.apply({"params": params}, tokens))


def test_patterns_apply_an_intervention_to_every_match():
    model, params, tokens = _setup(GPT2_LIKE)
    calls = []

    def record(x):
        calls.append(x.shape)
        return x

    hooks.run_with_hooks(model, params, tokens, interventions={"blocks_*/resid_post": record})
    assert len(calls) == GPT2_LIKE.num_layers


@pytest.mark.parametrize("config", [GPT2_LIKE, LLAMA_LIKE], ids=["tied", "untied"])
def test_gradient_at_final_norm_matches_the_analytic_value(config):
    model, params, tokens = _setup(config)
    weights = jax.random.normal(jax.random.key(3), (2, 9, config.vocab_size))

    def loss_fn(logits):
        return jnp.sum(logits * weights)

    loss, acts, grads = hooks.hook_grads(model, params, tokens, loss_fn, ["final_norm"])
    unembed = params["embed"].T if config.tied_embeddings else params["lm_head"]
    expected = jnp.einsum("BTV,DV->BTD", weights, unembed)
    chex.assert_trees_all_close(grads["final_norm"], expected, atol=1e-5)
    chex.assert_trees_all_close(loss, loss_fn(model.apply({"params": params}, tokens)), rtol=1e-6)
    assert set(acts) == {"final_norm"}


def test_gradient_at_a_block_output_matches_direct_differentiation():
    model, params, tokens = _setup(GPT2_LIKE)
    last = f"blocks_{GPT2_LIKE.num_layers - 1}/resid_post"
    targets = jax.random.randint(jax.random.key(4), (2, 9), 0, GPT2_LIKE.vocab_size)

    def loss_fn(logits):
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, targets[..., None], -1).sum()

    _, acts, grads = hooks.hook_grads(model, params, tokens, loss_fn, [last, "blocks_0/mlp/out"])

    def from_residual(resid):
        normed = Norm(GPT2_LIKE).apply({"params": params["ln_f"]}, resid)
        return loss_fn(jnp.einsum("BTD,VD->BTV", normed, params["embed"]))

    chex.assert_trees_all_close(grads[last], jax.grad(from_residual)(acts[last]), atol=1e-5)
    # Finite difference along the gradient at an earlier site.
    direction = grads["blocks_0/mlp/out"] / jnp.linalg.norm(grads["blocks_0/mlp/out"])
    eps = 1e-2

    def shifted(sign):
        logits, _ = hooks.run_with_hooks(
            model,
            params,
            tokens,
            interventions={"blocks_0/mlp/out": lambda x: x + sign * eps * direction},
        )
        return loss_fn(logits)

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    analytic = jnp.sum(grads["blocks_0/mlp/out"] * direction)
    np.testing.assert_allclose(numeric, analytic, rtol=2e-2)


def test_hook_grads_under_jit_equal_eager():
    model, params, tokens = _setup(LLAMA_LIKE)
    loss_fn = lambda logits: jnp.sum(jnp.tanh(logits))  # noqa: E731
    names = ["blocks_*/mlp/out"]
    eager = hooks.hook_grads(model, params, tokens, loss_fn, names)[2]
    jitted = jax.jit(lambda p, t: hooks.hook_grads(model, p, t, loss_fn, names)[2])(params, tokens)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)


def test_wrong_hook_name_lists_valid_names():
    model = Transformer(GPT2_LIKE)
    with pytest.raises(
        ValueError,
        match=r"Unknown hook name 'blocks_0/mlp_out'.*blocks_\{0\.\.2\}/mlp/out",
    ):
        hooks.resolve(model, ["blocks_0/mlp_out"])
    with pytest.raises(ValueError, match="Did you mean"):
        hooks.run_with_hooks(
            model,
            init_params(GPT2_LIKE),
            jnp.zeros((1, 3), jnp.int32),
            capture=["blocks_9/resid_post"],
        )


def test_intervention_with_wrong_shape_is_a_clear_error():
    model, params, tokens = _setup(GPT2_LIKE)
    with pytest.raises(ValueError, match="must return the input's shape"):
        hooks.run_with_hooks(
            model,
            params,
            tokens,
            interventions={"blocks_0/resid_post": lambda x: x[:, :1]},
        )


def test_two_interventions_for_one_site_are_an_error_not_a_silent_choice():
    model, params, tokens = _setup(LLAMA_LIKE)
    for clash in (
        {"blocks_1/resid_post": jnp.zeros_like, "blocks.1.hook_resid_post": jnp.ones_like},
        {"blocks_*/resid_post": jnp.zeros_like, "blocks_1/resid_post": jnp.ones_like},
    ):
        with pytest.raises(ValueError, match="'blocks_1/resid_post' is given two interventions"):
            hooks.run_with_hooks(model, params, tokens, interventions=clash)
