"""Feature statistics against brute force over every activation of a small stream."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import analysis
from interp.data import activations
from interp.models import hooks, sites
from interp.models.config import ModelConfig
from interp.models.transformer import Transformer, init_params
from interp.sae.modules import SAE, SAEConfig
from interp.sae.modules import init_params as sae_init_params

TINY = ModelConfig(
    vocab_size=61, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
    mlp_dim=32, max_len=16,
)  # fmt: skip
BOS = 1


@pytest.fixture(scope="module")
def lm():
    return Transformer(TINY), init_params(TINY, seed=0)


def _sae(d_in, site, head_index=None, num_latents=24):
    config = SAEConfig(architecture="relu", d_in=d_in, num_latents=num_latents,
                       hook_name=site, hook_head_index=head_index)  # fmt: skip
    params = sae_init_params(config, jax.random.key(3))
    # Activations of order 1 (the random model's rows are small); some features fire rarely.
    params["W_enc"] = params["W_enc"] * 40
    params["b_enc"] = jnp.linspace(-1.5, 0.0, num_latents)
    return SAE(config), params


def _batches():
    """Three batches of [4, 12] tokens with BOS at the start and padding in one row."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        tokens = rng.integers(2, TINY.vocab_size, (4, 12))
        tokens[:, 0] = BOS
        mask = np.ones_like(tokens)
        mask[1, 9:] = 0
        out.append({"tokens": tokens, "attention_mask": mask})
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _all_codes(model, sae, site, head_index, params, sae_params, tokens, mask):
    _, acts = hooks.run_with_hooks(model, params, tokens, capture=[site], attention_mask=mask)
    rows = sites.to_rows(site, acts[site], head_index)
    return sae.apply({"params": sae_params}, rows, method="encode")


def _brute_force(lm, sae, sae_params, batches, site, head_index=None):
    """(codes [R, T, X], keep [R, T], tokens [R, T], mask) over the whole stream at once."""
    model, params = lm
    tokens = np.concatenate([b["tokens"] for b in batches])
    mask = np.concatenate([b["attention_mask"] for b in batches])
    codes = np.asarray(_all_codes(model, sae, site, head_index, params, sae_params,
                                  jnp.asarray(tokens), jnp.asarray(mask)))  # fmt: skip
    keep = activations.keep_mask(tokens, mask, bos_id=BOS)
    return codes, keep, tokens, mask


@pytest.mark.parametrize(
    "site, head_index, d_in",
    [("blocks_1/resid_post", None, 16), ("blocks.0.attn.hook_z", 1, 8)],
)
def test_stats_and_top_contexts_equal_brute_force(lm, site, head_index, d_in):
    model, params = lm
    sae, sae_params = _sae(d_in, site, head_index)
    batches = _batches()
    stats = analysis.feature_stats(model, params, sae, sae_params, iter(batches), top_k=5,
                                   context=3, context_after=2, bos_id=BOS)  # fmt: skip
    name = hooks.resolve(model, [site])[0]
    codes, keep, tokens, mask = _brute_force(lm, sae, sae_params, batches, name, head_index)
    kept = codes[keep]  # [N, X]
    assert stats.num_tokens == keep.sum()
    np.testing.assert_array_equal(stats.fires, (kept != 0).sum(0))
    np.testing.assert_allclose(stats.density, (kept != 0).mean(0))
    np.testing.assert_allclose(stats.max, kept.max(0), rtol=1e-5)
    np.testing.assert_allclose(stats.sum, kept.sum(0), rtol=1e-5, atol=1e-6)
    assert (stats.density > 0).mean() > 0.5 and stats.density.max() < 1  # A meaningful test.
    # Quantiles: within half a log-spaced bin of the exact ones.
    half_bin = np.sqrt(stats.bin_edges[1] / stats.bin_edges[0])
    for f in range(sae.config.num_latents):
        active = kept[:, f][kept[:, f] > 0]
        if not active.size:  # A dead feature.
            assert np.isnan(stats.quantiles[f]).all() and stats.contexts(f) == []
            continue
        exact = np.quantile(active, stats.quantile_levels, method="inverted_cdf")
        np.testing.assert_allclose(stats.quantiles[f], exact, rtol=half_bin - 1 + 1e-6)
    # Top contexts: the brute-force sort of every kept (row, position).
    rows, positions = np.nonzero(keep)
    for f in range(sae.config.num_latents):
        values = codes[rows, positions, f]
        order = np.argsort(-values, kind="stable")[:5]
        order = order[values[order] > 0]
        contexts = stats.contexts(f)
        assert [(c["row"], c["position"]) for c in contexts] == list(
            zip(rows[order].tolist(), positions[order].tolist(), strict=True)
        )
        np.testing.assert_allclose([c["value"] for c in contexts], values[order], rtol=1e-5)
        for c in contexts:  # The window: tokens and the feature's activation on each.
            r, p = c["row"], c["position"]
            span = [q for q in range(p - 3, p + 3) if 0 <= q < 12 and mask[r, q]]
            assert c["tokens"] == tokens[r, span].tolist()
            want = np.where(keep[r, span], codes[r, span, f], 0.0)
            np.testing.assert_allclose(c["acts"], want, rtol=1e-5, atol=1e-7)
            assert c["tokens"][c["index"]] == tokens[r, p]


def test_stats_save_and_load(lm, tmp_path):
    model, params = lm
    sae, sae_params = _sae(8, "blocks_0/attn/z", head_index=0)
    stats = analysis.feature_stats(model, params, sae, sae_params, _batches()[:1], top_k=2)
    stats.save(tmp_path / "stats.npz")
    loaded = analysis.FeatureStats.load(tmp_path / "stats.npz")
    assert (loaded.site, loaded.head_index, loaded.num_tokens) == (
        "blocks_0/attn/z",
        0,
        45,
    )  # 3 padded
    for field in ("fires", "max", "quantiles", "top_values", "top_tokens", "top_acts"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(stats, field))
    assert loaded.contexts(3) == stats.contexts(3)


def test_bad_input_is_named(lm):
    model, params = lm
    sae, sae_params = _sae(12, "blocks_1/resid_post")
    with pytest.raises(ValueError, match="input is 12 wide.*width 16"):
        analysis.feature_stats(model, params, sae, sae_params, _batches())
    sae, sae_params = _sae(8, "blocks_0/attn/z")  # Per-head SAE without its head.
    with pytest.raises(ValueError, match="head_index"):
        analysis.feature_stats(model, params, sae, sae_params, _batches())
    sae, sae_params = _sae(16, "blocks_1/resid_post")
    stats = analysis.feature_stats(model, params, sae, sae_params, _batches()[:1], top_k=2)
    with pytest.raises(ValueError, match="Feature 24 is outside this SAE.*0..23"):
        stats.contexts(24)
    with pytest.raises(ValueError, match="no batches"):
        analysis.feature_stats(model, params, sae, sae_params, [])


def test_search_finds_the_features_firing_most_on_a_text(lm):
    model, params = lm
    sae, sae_params = _sae(16, "blocks_1/resid_post")
    text = _batches()[0]["tokens"][0]
    found = analysis.search_features(model, params, sae, sae_params, text, k=4, bos_id=BOS)
    codes, *_ = _brute_force(lm, sae, sae_params, [{"tokens": text[None],
                                                    "attention_mask": np.ones((1, 12))}],
                             "blocks_1/resid_post")  # fmt: skip
    best = codes[0, 1:].max(0)  # BOS excluded.
    np.testing.assert_array_equal(found.features, np.argsort(-best)[:4])
    np.testing.assert_allclose(found.activations, np.sort(best)[::-1][:4], rtol=1e-5)
    np.testing.assert_array_equal(found.positions, 1 + codes[0, 1:, found.features].argmax(1))
    # By token: one position.
    at = analysis.search_features(model, params, sae, sae_params, text, positions=[5], k=3)
    np.testing.assert_array_equal(at.features, np.argsort(-codes[0, 5])[:3])
    assert (at.positions == 5).all()
    # Relative to each feature's max over a dataset (a text not in it, so no ties at 1).
    stats = analysis.feature_stats(model, params, sae, sae_params, _batches(), bos_id=BOS)
    other = np.random.default_rng(7).integers(2, TINY.vocab_size, 12)
    other[0] = BOS
    relative = analysis.search_features(model, params, sae, sae_params, other, k=4, bos_id=BOS,
                                        relative_to=stats)  # fmt: skip
    codes, *_ = _brute_force(lm, sae, sae_params, [{"tokens": other[None],
                                                    "attention_mask": np.ones((1, 12))}],
                             "blocks_1/resid_post")  # fmt: skip
    best = codes[0, 1:].max(0)
    ratio = np.where(stats.max > 0, best / np.where(stats.max > 0, stats.max, 1), 0)
    np.testing.assert_array_equal(relative.features, np.argsort(-ratio)[:4])
    np.testing.assert_allclose(relative.scores, np.sort(ratio)[::-1][:4], rtol=1e-5)


def test_an_sae_at_another_site_than_its_own_is_refused_unless_allowed(lm):
    model, params = lm
    sae, sae_params = _sae(16, "blocks.1.hook_resid_post")
    other = "trained on 'blocks.1.hook_resid_post'.*used at 'blocks_0/resid_post'"
    with pytest.raises(ValueError, match=other):
        analysis.feature_stats(model, params, sae, sae_params, _batches(),
                               site="blocks_0/resid_post")  # fmt: skip
    text = _batches()[0]["tokens"][0]
    with pytest.raises(ValueError, match=other):
        analysis.search_features(model, params, sae, sae_params, text, site="blocks_0/resid_post")
    own = analysis.search_features(model, params, sae, sae_params, text, k=3,
                                   site="blocks_1/resid_post")  # fmt: skip
    assert len(own.features) == 3
    moved = analysis.search_features(model, params, sae, sae_params, text, k=3,
                                     site="blocks_0/resid_post", allow_other_site=True)  # fmt: skip
    assert not np.array_equal(moved.per_token, own.per_token)


def test_texts_past_the_model_context_are_refused_for_rotary_positions_too():
    model = Transformer(TINY.replace(positions="rotary", max_len=8))
    params = None  # Refused before the model runs.
    sae, sae_params = _sae(16, "blocks_1/resid_post")
    too_long = "12 tokens, more than the 8 positions this model was trained for"
    with pytest.raises(ValueError, match=f"The searched text: {too_long}"):
        analysis.search_features(model, params, sae, sae_params, _batches()[0]["tokens"][0])
    with pytest.raises(ValueError, match=f"feature_stats' batches: {too_long}"):
        analysis.feature_stats(model, params, sae, sae_params, _batches())


def test_search_flags_scores_above_the_recorded_maximum(lm, caplog):
    # Maxima taken over text that never showed a feature's range: the search says so.
    model, params = lm
    sae, sae_params = _sae(16, "blocks_1/resid_post")
    text = _batches()[0]["tokens"][0]
    stats = analysis.feature_stats(model, params, sae, sae_params, _batches(), bos_id=BOS)
    plain = analysis.search_features(model, params, sae, sae_params, text, k=4, bos_id=BOS)
    assert not plain.above_max.any()  # No maxima, nothing to be above.
    # The text is in the dataset: every score is at most 1 (ties at 1 are not flagged).
    within = analysis.search_features(model, params, sae, sae_params, text, k=6, bos_id=BOS,
                                      relative_to=stats)  # fmt: skip
    assert within.scores.max() <= 1 + 1e-5 and not within.above_max.any()
    # Maxima halved for two of the features the text drives: those two score 2x, flagged.
    lowered = np.nan_to_num(stats.max).copy()
    lowered[within.features[:2]] /= 2
    with caplog.at_level("WARNING"):
        above = analysis.search_features(model, params, sae, sae_params, text, k=6,
                                         bos_id=BOS, relative_to=lowered)  # fmt: skip
    flagged = set(above.features[above.above_max].tolist())
    assert flagged == set(within.features[:2].tolist())
    np.testing.assert_allclose(above.scores[above.above_max], 2 * within.scores[:2], rtol=1e-5)
    assert "above their recorded maximum" in caplog.text
    assert all(f"feature {f}" in caplog.text for f in flagged)
