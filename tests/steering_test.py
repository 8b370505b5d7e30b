"""Steering: identity edits change nothing, edits match x - decode(f) + decode(f') by hand,
sweeps compile once, maxima match a brute-force max, bad input is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import parallel, steering
from interp.data import activations
from interp.models import generate as generate_lib
from interp.models import hooks
from interp.models.generate import generate
from interp.models.transformer import Transformer, init_params
from interp.sae.modules import SAE, SAEConfig
from interp.sae.modules import init_params as sae_init
from interp.steering import Ablate, Add, Clamp, Scale, feature_intervention
from tests.models.testing import GPT2_LIKE

SITE = "blocks_1/resid_post"
HEAD_SITE = "blocks_0/attn/z"


def _model():
    # Scaled-up random weights, so that greedy tokens react to steering (as generate_test).
    params = jax.tree.map(lambda p: 8.0 * p, init_params(GPT2_LIKE, seed=0))
    return Transformer(GPT2_LIKE), params


def _sae(d_in=32, hook=SITE, head_index=None, seed=1, **kwargs):
    config = SAEConfig(architecture="topk", d_in=d_in, num_latents=64, k=8, hook_name=hook,
                       hook_head_index=head_index, **kwargs)  # fmt: skip
    params = sae_init(config, jax.random.key(seed))
    params["b_dec"] = jax.random.normal(jax.random.key(seed + 1), (d_in,))
    return SAE(config), params


MODEL, PARAMS = _model()
SAE_, SAE_PARAMS = _sae()
TOKENS = jax.random.randint(jax.random.key(2), (2, 6), 0, GPT2_LIKE.vocab_size)


def _logits(interventions=None):
    return hooks.run_with_hooks(MODEL, PARAMS, TOKENS, interventions=interventions)[0]


@jax.jit
def _jitted_logits(steer):
    return hooks.run_with_hooks(MODEL, PARAMS, TOKENS, interventions={SITE: steer})[0]


@jax.jit
def _jitted_clean_logits():
    return hooks.run_with_hooks(MODEL, PARAMS, TOKENS)[0]


IDENTITIES = {
    "none": [],
    "neutral": [Scale(3, 1.0), Add(5, 0.0), Scale(60, 1.0)],
}


@pytest.mark.parametrize("edits", list(IDENTITIES))
def test_identity_edits_leave_logits_unchanged(edits):
    steer = feature_intervention(SAE_, SAE_PARAMS, IDENTITIES[edits])
    clean = _logits()
    np.testing.assert_array_equal(_logits({SITE: steer}), clean)
    # Compiled, the model's own arithmetic may be fused differently (last bits), so the
    # steered program is compared with the unsteered one compiled alike.
    np.testing.assert_array_equal(_jitted_logits(steer), _jitted_clean_logits())


def test_identity_with_sharded_params_over_a_mesh():
    mesh = parallel.make_mesh(data=2, model=4)
    sharded = parallel.shard_params(PARAMS, MODEL, mesh)
    steer = feature_intervention(SAE_, SAE_PARAMS, IDENTITIES["neutral"])
    plain = hooks.sharded_run_with_hooks(MODEL, mesh)(sharded, TOKENS)[0]
    steered = hooks.sharded_run_with_hooks(MODEL, mesh, interventions={SITE: steer})
    np.testing.assert_allclose(steered(sharded, TOKENS)[0], plain, atol=1e-5)
    np.testing.assert_allclose(plain, _logits(), atol=1e-4)


def test_a_sweep_compiles_once_with_sharded_params():
    # The intervention is an argument of the sharded, jitted call (replicated: its leading
    # sizes are not the batch's), so the sweep's values are traced.
    mesh = parallel.make_mesh(data=2, model=4)
    traces = []

    def run(params, tokens, steer):
        traces.append(1)
        return hooks.run_with_hooks(MODEL, params, tokens, interventions={SITE: steer})[0]

    sharded_run = parallel.sharded_jit(
        run, mesh, params_sharding=parallel.param_shardings(MODEL, mesh)
    )
    sharded = parallel.shard_params(PARAMS, MODEL, mesh)
    for value in (1.0, 5.0, 20.0):
        steer = feature_intervention(SAE_, SAE_PARAMS, [Clamp(3, value)])
        got = sharded_run(sharded, TOKENS, steer)
        np.testing.assert_allclose(got, _logits({SITE: steer}), atol=1e-4)
    assert len(traces) == 1


def test_identity_in_cached_generation():
    prompt = TOKENS[:, :4]
    steer = feature_intervention(SAE_, SAE_PARAMS, IDENTITIES["neutral"])
    clean = generate(MODEL, PARAMS, prompt, 6)
    np.testing.assert_array_equal(generate(MODEL, PARAMS, prompt, 6, interventions={SITE: steer}),
                                  clean)  # fmt: skip
    strong = feature_intervention(SAE_, SAE_PARAMS, [Clamp(3, 200.0)])
    assert not np.array_equal(generate(MODEL, PARAMS, prompt, 6, interventions={SITE: strong}),
                              clean), "A strong clamp changed nothing."  # fmt: skip


def _by_hand(x, edits, sae_params, sae, keep_error=True):
    """x - decode(f) + decode(f') in NumPy, f' from f edit by edit. x: [..., D]."""
    x = np.asarray(x, np.float64)
    f = np.asarray(sae.apply({"params": sae_params}, jnp.asarray(x, jnp.float32), method="encode"),
                   np.float64)  # fmt: skip
    edited = f.copy()
    for edit in edits:
        i = edit.feature
        if isinstance(edit, Clamp):
            edited[..., i] = edit.value
        elif isinstance(edit, Add):
            edited[..., i] += edit.scale
        elif isinstance(edit, Scale):
            edited[..., i] *= edit.factor
        else:
            edited[..., i] = 0.0
    w_dec = np.asarray(sae_params["W_dec"], np.float64)
    b_dec = np.asarray(sae_params["b_dec"], np.float64)

    def decode(codes):
        return codes @ w_dec + b_dec

    return x - decode(f) + decode(edited) if keep_error else decode(edited)


EDITS = {
    "clamp": [Clamp(3, 7.5)],
    "add": [Add(10, -2.0)],
    "scale": [Scale(0, 3.0), Scale(1, 3.0), Scale(2, 3.0)],
    "ablate": [Ablate(i) for i in range(0, 64, 2)],
    "in_order": [Clamp(4, 2.0), Scale(4, 3.0), Add(4, 1.0), Ablate(9)],
}


@pytest.mark.parametrize("keep_error", [True, False])
@pytest.mark.parametrize("name", list(EDITS))
def test_site_value_is_x_minus_decode_f_plus_decode_f_edited(name, keep_error):
    steer = feature_intervention(SAE_, SAE_PARAMS, EDITS[name], keep_error=keep_error)
    _, clean = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[SITE])
    _, got = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[SITE],
                                  interventions={SITE: steer})  # fmt: skip
    want = _by_hand(clean[SITE], EDITS[name], SAE_PARAMS, SAE_, keep_error)
    np.testing.assert_allclose(got[SITE], want, atol=1e-4, rtol=1e-5)


def test_a_per_token_normalised_sae_scales_the_edit_by_each_token_s_std():
    # layer_norm SAEs decode to y * std + mean of each token's own row (SAELens), so the edit
    # x - decode(f, x) + decode(f', x) is (f' - f) W_dec * std.
    sae, sae_params = _sae(normalize_activations="layer_norm")
    edits = [Clamp(3, 2.0), Add(8, -1.0)]
    _, clean = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[SITE])
    steer = feature_intervention(sae, sae_params, edits)
    _, got = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[SITE],
                                  interventions={SITE: steer})  # fmt: skip
    x = np.asarray(clean[SITE], np.float64)
    f = np.asarray(sae.apply({"params": sae_params}, clean[SITE], method="encode"), np.float64)
    edited = f.copy()
    edited[..., 3] = 2.0
    edited[..., 8] -= 1.0
    centred = x - x.mean(-1, keepdims=True)
    std = np.sqrt((centred**2).sum(-1, keepdims=True) / (x.shape[-1] - 1))
    want = x + (edited - f) @ np.asarray(sae_params["W_dec"], np.float64) * std
    np.testing.assert_allclose(got[SITE], want, atol=1e-4, rtol=1e-5)
    identity = feature_intervention(sae, sae_params, [])
    np.testing.assert_array_equal(_logits({SITE: identity}), _logits())


def test_keep_error_false_without_edits_is_the_reconstruction():
    steer = feature_intervention(SAE_, SAE_PARAMS, [], keep_error=False)
    _, clean = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[SITE])
    _, got = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[SITE],
                                  interventions={SITE: steer})  # fmt: skip
    reconstruction = SAE_.apply({"params": SAE_PARAMS}, clean[SITE])[0]
    np.testing.assert_allclose(got[SITE], reconstruction, atol=1e-5)


def test_per_head_sae_at_a_head_shaped_site():
    head = 2
    sae, sae_params = _sae(d_in=GPT2_LIKE.head_dim, hook=HEAD_SITE, head_index=head)
    edits = [Clamp(5, 4.0), Add(7, 1.5)]
    steer = feature_intervention(sae, sae_params, edits)
    _, clean = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[HEAD_SITE])
    _, got = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[HEAD_SITE],
                                  interventions={HEAD_SITE: steer})  # fmt: skip
    z, new = np.asarray(clean[HEAD_SITE]), np.asarray(got[HEAD_SITE])  # [B, T, N, H]
    others = [n for n in range(GPT2_LIKE.num_heads) if n != head]
    np.testing.assert_array_equal(new[:, :, others], z[:, :, others])
    want = _by_hand(z[:, :, head], edits, sae_params, sae)
    np.testing.assert_allclose(new[:, :, head], want, atol=1e-4, rtol=1e-5)
    # All heads side by side (hook_z layout): rows are N * H wide.
    wide, wide_params = _sae(d_in=GPT2_LIKE.num_heads * GPT2_LIKE.head_dim, hook=HEAD_SITE)
    steer = feature_intervention(wide, wide_params, [Ablate(0)])
    _, got = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[HEAD_SITE],
                                  interventions={HEAD_SITE: steer})  # fmt: skip
    want = _by_hand(z.reshape(*z.shape[:2], -1), [Ablate(0)], wide_params, wide)
    np.testing.assert_allclose(np.asarray(got[HEAD_SITE]).reshape(want.shape), want, atol=1e-4)


VALUES = np.linspace(0.0, 19.0, 20)


def test_a_sweep_of_clamp_values_compiles_once_under_jit():
    before = _jitted_logits._cache_size()
    results = [
        _jitted_logits(feature_intervention(SAE_, SAE_PARAMS, [Clamp(3, v)])) for v in VALUES
    ]
    assert _jitted_logits._cache_size() - before <= 1
    for feature in (1, 9, 33):  # Feature indices are traced too.
        _jitted_logits(feature_intervention(SAE_, SAE_PARAMS, [Clamp(feature, 2.0)]))
    assert _jitted_logits._cache_size() - before <= 1
    assert not np.allclose(results[0], results[-1])
    eager = _logits({SITE: feature_intervention(SAE_, SAE_PARAMS, [Clamp(3, VALUES[7])])})
    np.testing.assert_allclose(results[7], eager, atol=1e-4)


def test_a_sweep_of_clamp_values_compiles_once_in_generate():
    prompt = TOKENS[:, :3]
    sweep = [feature_intervention(SAE_, SAE_PARAMS, [Clamp(3, v)]) for v in 10.0 * VALUES]
    generate(MODEL, PARAMS, prompt, 4, interventions={SITE: sweep[0]})
    before = generate_lib._generate_cached._cache_size()
    outputs = [generate(MODEL, PARAMS, prompt, 4, interventions={SITE: s}) for s in sweep]
    assert generate_lib._generate_cached._cache_size() == before
    assert len({np.asarray(o).tobytes() for o in outputs}) > 1, "The sweep changed nothing."
    # Each equals an eager full-pass reference of the same value (positions independent).
    uncached = generate(MODEL, PARAMS, prompt, 4, interventions={SITE: sweep[-1]}, use_cache=False)
    np.testing.assert_array_equal(outputs[-1], uncached)


def test_max_activations_equal_a_brute_force_max_over_kept_positions():
    bos, excluded = 1, 7
    tokens = np.array(jax.random.randint(jax.random.key(5), (4, 8), 2, GPT2_LIKE.vocab_size))
    tokens[:, 0] = bos
    tokens[1, 4] = bos  # A packed document boundary.
    tokens[2, 3] = excluded
    mask = np.ones_like(tokens)
    mask[0, 6:] = 0  # Right padding.
    mask[3, :2] = 0  # Left padding: skip_first drops column 2.
    batches = [(tokens[:2], mask[:2]), (tokens[2:], mask[2:])]
    options = dict(bos_id=bos, skip_first=True, exclude_ids=(excluded,))
    got = steering.max_activations(MODEL, PARAMS, SAE_, SAE_PARAMS, batches, **options)
    want = np.full(64, -np.inf)
    _, acts = hooks.run_with_hooks(MODEL, PARAMS, jnp.asarray(tokens), capture=[SITE],
                                   attention_mask=jnp.asarray(mask))  # fmt: skip
    codes = np.asarray(SAE_.apply({"params": SAE_PARAMS}, acts[SITE], method="encode"))
    keep = activations.keep_mask(tokens, mask, **options)
    for b, t in zip(*np.nonzero(keep), strict=True):
        want = np.maximum(want, codes[b, t])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # Without exclusions, every real token counts (the same shapes: no new compilation).
    everything = steering.max_activations(MODEL, PARAMS, SAE_, SAE_PARAMS, batches)
    assert np.all(everything >= got - 1e-4) and np.any(everything > got + 1e-3)
    assert Clamp.to_max(4, 10.0, got) == Clamp(4, 10.0 * float(got[4]))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: feature_intervention(SAE_, SAE_PARAMS, [Clamp(64, 1.0)]), ValueError,
         r"outside 0\.\.63"),
        (lambda: feature_intervention(SAE_, SAE_PARAMS, [Ablate(-1)]), ValueError, "outside"),
        (lambda: Clamp(3, float("nan")), ValueError, "NaN"),
        (lambda: Clamp(3, np.array(np.nan, np.float32)), ValueError, "NaN"),
        (lambda: Add(3, float("nan")), ValueError, "NaN"),
        (lambda: Scale(3, np.float32(np.nan)), ValueError, "NaN"),
        (lambda: Clamp(3, float("inf")), ValueError, "Clamp value .* infinite"),
        (lambda: Add(3, -float("inf")), ValueError, "Add scale .* infinite"),
        (lambda: Scale(3, float("inf")), ValueError, "Scale factor .* infinite"),
        (lambda: Clamp(3, np.array([1.0, np.inf])), ValueError, "infinite"),
        (lambda: Add(3, 1e39), ValueError, "beyond float32"),  # Stored as float32: inf.
        (lambda: Clamp.to_max(3, float("inf"), np.ones(64)), ValueError, "multiple .* infinite"),
        (lambda: Clamp.to_max(3, 2.0, np.full(64, np.inf)), ValueError, "maximum .* infinite"),
        (lambda: Clamp(3, "5.0"), TypeError, "real number"),
        (lambda: Scale(3, True), TypeError, "real number"),
        (lambda: Add(3, None), TypeError, "real number"),
        (lambda: Clamp.to_max(99, 10.0, np.ones(64)), ValueError, "outside"),
        (lambda: feature_intervention(SAE_, SAE_PARAMS, ["clamp"]), TypeError, "Clamp, Add"),
        (lambda: feature_intervention(*_sae(d_out=16, subtract_decoder_bias=False), []),
         ValueError, "transcoder"),
    ],
)  # fmt: skip
def test_bad_edits_are_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_an_sae_of_another_width_is_refused():
    narrow, narrow_params = _sae(d_in=16)
    steer = feature_intervention(narrow, narrow_params, [Clamp(0, 1.0)])
    with pytest.raises(ValueError, match="reads 16-wide rows.*width 32"):
        _logits({SITE: steer})
    wide, wide_params = _sae(d_in=GPT2_LIKE.head_dim, hook=HEAD_SITE)  # Per-head, no head.
    steer = feature_intervention(wide, wide_params, [])
    with pytest.raises(ValueError, match="per-head SAE needs head_index"):
        _logits({HEAD_SITE: steer})


def test_a_site_the_sae_was_not_trained_on_is_refused_with_both_names():
    steer = feature_intervention(SAE_, SAE_PARAMS, [])
    other = "trained on 'blocks_1/resid_post'.*used at 'blocks_0/resid_post'.*allow_other_site"
    with pytest.raises(ValueError, match=other):
        _logits({"blocks_0/resid_post": steer})
    with pytest.raises(ValueError, match="'blocks_1/resid_post'.*used at 'blocks.0.hook_resid"):
        feature_intervention(SAE_, SAE_PARAMS, [], hook="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="trained on 'blocks_1/resid_post'.*'final_norm'"):
        generate(MODEL, PARAMS, TOKENS[:, :2], 1, interventions={"final_norm": steer})
    with pytest.raises(ValueError, match="used at 'blocks_0/resid_post'"):
        steering.max_activations(MODEL, PARAMS, SAE_, SAE_PARAMS, [TOKENS],
                                 hook="blocks_0/resid_post")  # fmt: skip


def test_the_sae_own_site_in_either_spelling_and_an_allowed_other_site_run():
    clean = _logits()
    for hook in (None, "blocks.1.hook_resid_post", SITE):
        steer = feature_intervention(SAE_, SAE_PARAMS, [], hook=hook)
        np.testing.assert_array_equal(_logits({"blocks.1.hook_resid_post": steer}), clean)
    # Asked for, another site of the same width runs (and edits there).
    steer = feature_intervention(SAE_, SAE_PARAMS, [Clamp(3, 5.0)], hook="blocks_0/resid_post",
                                 allow_other_site=True)  # fmt: skip
    assert not np.allclose(_logits({"blocks_0/resid_post": steer}), clean)
    other = dict(hook="blocks_0/resid_post", allow_other_site=True)
    maxima = steering.max_activations(MODEL, PARAMS, SAE_, SAE_PARAMS, [TOKENS], **other)
    assert maxima.shape == (64,)


def test_steering_only_generated_positions_leaves_the_prompt_alone():
    """from_position(start=prompt length): the prompt's positions are unedited (so the first
    new token is the unsteered one), later ones steered, cached == full passes; start 0 is
    the plain intervention; clamp and add with the same leaves compile once."""
    prompt = TOKENS[:, :4]
    strong = feature_intervention(SAE_, SAE_PARAMS, [Clamp(3, 200.0)])
    clean = np.asarray(generate(MODEL, PARAMS, prompt, 6))
    everywhere = np.asarray(generate(MODEL, PARAMS, prompt, 6, interventions={SITE: strong}))
    assert not np.array_equal(everywhere[:, 4], clean[:, 4]), "The clamp changed no first token."
    late = steering.from_position(strong, jnp.full((2,), 4))
    got = np.asarray(generate(MODEL, PARAMS, prompt, 6, interventions={SITE: late}))
    np.testing.assert_array_equal(got[:, 4], clean[:, 4])  # Read off the unedited prompt.
    assert not np.array_equal(got, clean), "Steering the generated tokens changed nothing."
    full = generate(MODEL, PARAMS, prompt, 6, interventions={SITE: late}, use_cache=False)
    np.testing.assert_array_equal(got, full)
    at_zero = steering.from_position(strong, jnp.zeros((2,), jnp.int32))
    np.testing.assert_array_equal(
        generate(MODEL, PARAMS, prompt, 6, interventions={SITE: at_zero}), everywhere
    )
    # A no-op edit through the wrapper is exactly unsteered; clamp <-> add: no new program.
    noop = steering.from_position(feature_intervention(SAE_, SAE_PARAMS, [Add(3, 0.0)]), [0, 0])
    np.testing.assert_array_equal(
        generate(MODEL, PARAMS, prompt, 6, interventions={SITE: noop}), clean
    )
    before = generate_lib._generate_cached._cache_size()
    for method in ("clamp", "add"):
        edit = steering.sweep_edit(method, 3, 50.0)
        wrapped = steering.from_position(feature_intervention(SAE_, SAE_PARAMS, [edit]), [4, 4])
        generate(MODEL, PARAMS, prompt, 6, interventions={SITE: wrapped})
    assert generate_lib._generate_cached._cache_size() == before
    with pytest.raises(ValueError, match="'clamp' or 'add'"):
        steering.sweep_edit("diffmean", 3, 1.0)


def test_completion_loss_is_the_mean_nll_of_the_completion_tokens():
    tokens = np.asarray(TOKENS)
    mask = np.ones_like(tokens)
    mask[1, 5:] = 0  # Row 1: 5 real tokens, completion from 3.
    starts = np.asarray([2, 3])
    got = steering.completion_loss(MODEL, PARAMS, tokens, mask, starts)
    for row, (start, length) in enumerate([(2, 6), (3, 5)]):
        logits = MODEL.apply({"params": PARAMS}, tokens[row : row + 1, :length])[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = [-float(logp[t - 1, tokens[row, t]]) for t in range(start, length)]
        assert got[row] == pytest.approx(np.mean(nll), rel=1e-5)
    assert np.isnan(steering.completion_loss(MODEL, PARAMS, tokens, mask, [6, 6])[0])


def test_diff_mean_is_the_unit_difference_of_means_and_add_vector_adds_it():
    rng = np.random.default_rng(0)
    concept, baseline = rng.normal(size=(3, 32)) + 2.0, rng.normal(size=(50, 32))
    direction = steering.diff_mean(concept, baseline)
    expected = concept.mean(0) - baseline.mean(0)
    np.testing.assert_allclose(direction, expected / np.linalg.norm(expected), rtol=1e-5)
    with pytest.raises(ValueError, match="no direction"):
        steering.diff_mean(baseline, baseline)
    with pytest.raises(ValueError, match="needs rows"):
        steering.diff_mean(concept[:0], baseline)
    vector = jnp.asarray(direction)
    _, clean = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[SITE])
    added = {SITE: steering.AddVector(3.0 * vector)}
    _, edited = hooks.run_with_hooks(MODEL, PARAMS, TOKENS, capture=[SITE], interventions=added)
    np.testing.assert_allclose(edited[SITE], clean[SITE] + 3.0 * vector, atol=1e-5)
    # A sweep of its scale compiles once in generation.
    prompt = TOKENS[:, :3]
    steer = steering.from_position(steering.AddVector(vector), [0, 0])
    generate(MODEL, PARAMS, prompt, 4, interventions={SITE: steer})
    before = generate_lib._generate_cached._cache_size()
    for scale in (2.0, 50.0):
        steer = steering.from_position(steering.AddVector(scale * vector), [0, 0])
        generate(MODEL, PARAMS, prompt, 4, interventions={SITE: steer})
    assert generate_lib._generate_cached._cache_size() == before
