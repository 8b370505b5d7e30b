"""SAE training: planted features are recovered, sharding/resume/joint training are exact."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import parallel
from interp.sae import modules
from interp.sae import train as sae_train
from interp.sae.modules import SAEConfig

D, FEATURES, X = 32, 64, 128
BATCH, STEPS = 256, 300


def _dictionary(seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(FEATURES, D))
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _activations(features, rows, seed, active=3):
    """x = codes @ features with `active` features per row, magnitudes in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    chosen = np.argsort(rng.random((rows, len(features))), axis=1)[:, :active]
    codes = np.zeros((rows, len(features)), np.float32)
    np.put_along_axis(codes, chosen, rng.uniform(0.5, 1.5, (rows, active)), axis=1)
    return (codes @ features).astype(np.float32)


def _recovered(features, w_dec, cosine=0.9):
    """Fraction of true features with some decoder row at cosine similarity > `cosine`."""
    w_dec = np.asarray(w_dec)
    w_dec = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
    return float(np.mean((features @ w_dec.T).max(axis=1) > cosine))


def _one_device_mesh():
    return parallel.make_mesh(data=1, model=1, devices=jax.devices()[:1])


ARCHITECTURES = {
    "topk": dict(k=4),
    "batchtopk": dict(k=4),
    "relu": dict(l1_coefficient=0.25, l1_warmup_steps=50, subtract_decoder_bias=False),
    "jumprelu": dict(l1_coefficient=0.03, jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.035),
}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_learns_planted_features(architecture):
    features = _dictionary()
    data = _activations(features, BATCH * STEPS, seed=1)
    sample = data[:2048]
    config = SAEConfig(
        architecture=architecture,
        d_in=D,
        num_latents=X,
        input_scale=sae_train.input_scale_for(sample),
        dead_tokens=2048,
        **ARCHITECTURES[architecture],
    )
    train_config = sae_train.TrainConfig(
        steps=STEPS, learning_rate=1e-2, warmup_steps=20, decay_start=0.5
    )
    mesh = _one_device_mesh()
    median = sae_train.geometric_median(sample)
    state = sae_train.init_state(config, train_config, jax.random.key(0), mesh, b_dec_init=median)
    initial = jax.device_get(state["saes"][0]["params"])
    assert _recovered(features, initial["W_dec"]) < 0.1  # An untrained SAE fails the bar.
    step = sae_train.make_train_step(config, train_config, mesh)
    for i in range(STEPS):
        state, metrics = step(state, data[i * BATCH : (i + 1) * BATCH])
    metrics = sae_train.flatten_metrics(metrics)
    params = jax.device_get(state["saes"][0]["params"])
    assert _recovered(features, params["W_dec"]) >= 0.85, metrics
    assert metrics["fvu"] < 0.2, metrics
    assert int(state["step"]) == STEPS
    if config.normalizes_decoder:
        np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=-1), 1.0, rtol=1e-5)
    if config.arch.sparsity == "k":
        assert metrics["l0"] == 4.0
    if architecture == "jumprelu":  # The thresholds moved, through the STE alone.
        assert np.abs(params["threshold"] - initial["threshold"]).max() > 0.05
    if architecture.endswith("batchtopk"):  # The inference threshold gives the training L0.
        codes = modules.SAE(config).apply({"params": params}, data[:2048], method="encode")
        assert 2.5 < float(jnp.mean(jnp.sum(codes > 0, -1))) < 6.0


def _prefix_fvus(config, params, data, widths):
    """FVU of the reconstruction from each prefix of the latents alone (inference codes)."""
    sae = modules.SAE(config)
    codes = np.asarray(sae.apply({"params": params}, data, method="encode"))
    centred = np.sum((data - data.mean(0)) ** 2)
    fvus = []
    for width in widths:
        kept = np.where(np.arange(codes.shape[-1]) < width, codes, 0.0)
        x_hat = np.asarray(sae.apply({"params": params}, kept, method="decode"))
        fvus.append(float(np.sum((x_hat - data) ** 2) / centred))
    return fvus


def test_matryoshka_prefixes_reconstruct_in_order():
    # Features of Zipf-like frequency: a Matryoshka SAE's first latents must reconstruct on
    # their own, so they take the frequent features; a BatchTopK SAE spreads them anywhere.
    rng = np.random.default_rng(3)
    features = _dictionary(seed=3)
    weights = 1.0 / np.arange(1, FEATURES + 1)
    rows = BATCH * STEPS
    chosen = np.stack([rng.choice(FEATURES, 3, replace=False, p=weights / weights.sum())
                       for _ in range(rows)])  # fmt: skip
    codes = np.zeros((rows, FEATURES), np.float32)
    np.put_along_axis(codes, chosen, rng.uniform(0.5, 1.5, (rows, 3)), axis=1)
    data = (codes @ features).astype(np.float32)
    widths = (8, 32, X)
    mesh = _one_device_mesh()
    train_config = sae_train.TrainConfig(
        steps=STEPS, learning_rate=1e-2, warmup_steps=20, decay_start=0.5
    )
    fvus, recovered = {}, {}
    for architecture in ("matryoshka_batchtopk", "batchtopk"):
        config = SAEConfig(
            architecture=architecture, d_in=D, num_latents=X, k=3, dead_tokens=2048,
            input_scale=sae_train.input_scale_for(data[:2048]),
            matryoshka_widths=widths if architecture != "batchtopk" else (),
        )  # fmt: skip
        median = sae_train.geometric_median(data[:2048])
        state = sae_train.init_state(
            config, train_config, jax.random.key(0), mesh, b_dec_init=median
        )
        step = sae_train.make_train_step(config, train_config, mesh)
        for i in range(STEPS):
            state, metrics = step(state, data[i * BATCH : (i + 1) * BATCH])
        params = jax.device_get(state["saes"][0]["params"])
        fvus[architecture] = _prefix_fvus(config, params, data[:4096], widths)
        recovered[architecture] = _recovered(features, params["W_dec"])
    nested, plain = fvus["matryoshka_batchtopk"], fvus["batchtopk"]
    assert nested[0] > nested[1] > nested[2], fvus  # Each level adds to the one before.
    assert nested[2] < 0.25, fvus  # The whole SAE still reconstructs.
    # Measured (2026-12-08): prefixes of 8, 32, 128 latents at FVU 0.51, 0.30, 0.075 against
    # BatchTopK's 1.05, 0.99, 0.047; features recovered (cosine > 0.9) 84% against 92%.
    assert nested[0] < plain[0] - 0.2 and nested[1] < plain[1] - 0.1, fvus
    assert recovered["matryoshka_batchtopk"] >= 0.75, recovered


def test_input_scale_and_geometric_median():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * 3 + 1
    scale = sae_train.input_scale_for(x)
    np.testing.assert_allclose(np.mean(np.sum((scale * x) ** 2, -1)), 1.0, rtol=1e-6)
    # Outliers move the mean but hardly the median.
    points = np.concatenate([rng.normal(size=(200, 2)) * 0.1, np.full((20, 2), 100.0)])
    median = np.asarray(sae_train.geometric_median(points, iters=200))
    assert np.linalg.norm(median) < 0.2 < np.linalg.norm(points.mean(0))

    def objective(y):
        return np.linalg.norm(points - y, axis=1).sum()

    for delta in ([1e-2, 0], [0, 1e-2], [-1e-2, 0], [0, -1e-2]):
        assert objective(median) <= objective(median + np.asarray(delta)) + 1e-6


def test_schedule_warms_up_and_decays_to_zero():
    for decay in ("linear", "cosine"):
        config = sae_train.TrainConfig(
            steps=100, learning_rate=1.0, warmup_steps=10, lr_decay=decay, decay_start=0.5
        )
        schedule = sae_train.make_schedule(config)
        assert float(schedule(0)) == 0.0
        np.testing.assert_allclose(float(schedule(5)), 0.5)
        np.testing.assert_allclose([float(schedule(s)) for s in (10, 30, 50)], 1.0)
        assert 0.0 < float(schedule(75)) < 1.0
        np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-7)


def test_dead_latents_are_counted_over_a_window_of_tokens():
    config = SAEConfig(architecture="relu", d_in=D, num_latents=X, dead_tokens=3 * BATCH)
    train_config = sae_train.TrainConfig(steps=10, learning_rate=1e-3, warmup_steps=0)
    mesh = _one_device_mesh()
    state = sae_train.init_state(config, train_config, jax.random.key(0), mesh)
    sae = state["saes"][0]
    sae["params"]["b_enc"] = sae["params"]["b_enc"].at[:8].set(-1e3)  # 8 latents never fire.
    step = sae_train.make_train_step(config, train_config, mesh)
    data = _activations(_dictionary(), 5 * BATCH, seed=2)
    fractions = []
    for i in range(5):
        state, metrics = step(state, data[i * BATCH : (i + 1) * BATCH])
        fractions.append(float(metrics[0]["dead_fraction"]))
    counters = np.asarray(state["saes"][0]["tokens_since_fired"])
    np.testing.assert_array_equal(counters[:8], 3 * BATCH)  # Saturated at the window.
    assert counters[8:].max() < 3 * BATCH
    assert fractions[:2] == [0.0, 0.0] and fractions[2:] == [8 / X] * 3


def _configs():
    common = dict(d_in=D, num_latents=X, dead_tokens=2 * 16)  # Dead latents appear: AuxK runs.
    return (
        SAEConfig(architecture="topk", k=4, **common),
        SAEConfig(architecture="batchtopk", k=4, **common),
        SAEConfig(architecture="jumprelu", jumprelu_bandwidth=0.1, **common),
        SAEConfig(architecture="relu", l1_coefficient=0.1, **common),
    )


def _train(configs, mesh, batches, steps=3):
    train_config = sae_train.TrainConfig(steps=10, learning_rate=1e-2, warmup_steps=2)
    state = sae_train.init_state(configs, train_config, jax.random.key(0), mesh)
    step = sae_train.make_train_step(configs, train_config, mesh)
    for i in range(steps):
        state, metrics = step(state, batches[i])
    return jax.device_get(state), jax.device_get(metrics)


def test_sharded_step_equals_unsharded_step():
    data = _activations(_dictionary(), 3 * 16, seed=3)
    batches = [data[i * 16 : (i + 1) * 16] for i in range(3)]
    sharded_mesh = parallel.make_mesh(data=2, model=4)
    configs = _configs()[:3]  # relu's dense path is covered by jumprelu's.
    sharded, sharded_metrics = _train(configs, sharded_mesh, batches)
    single, single_metrics = _train(configs, _one_device_mesh(), batches)
    np.testing.assert_allclose(
        [m["auxk_loss"] for m in single_metrics[:2]], [m["auxk_loss"] for m in sharded_metrics[:2]],
        rtol=1e-5,
    )  # fmt: skip
    assert single_metrics[0]["auxk_loss"] > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded, single)


def test_several_saes_in_one_step_equal_each_trained_alone():
    data = _activations(_dictionary(), 3 * 16, seed=4)
    batches = [data[i * 16 : (i + 1) * 16] for i in range(3)]
    mesh = _one_device_mesh()
    configs = (_configs()[0], _configs()[3])
    together, _ = _train(configs, mesh, batches)
    for i, config in enumerate(configs):
        alone, _ = _train((config,), mesh, batches)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), together["saes"][i],
            alone["saes"][0],
        )  # fmt: skip


def test_one_batch_per_sae_for_different_sites():
    mesh = _one_device_mesh()
    configs = (_configs()[3], _configs()[3].replace(d_in=8))
    train_config = sae_train.TrainConfig(steps=2, learning_rate=1e-2, warmup_steps=0)
    state = sae_train.init_state(configs, train_config, jax.random.key(0), mesh)
    step = sae_train.make_train_step(configs, train_config, mesh)
    state, metrics = step(state, (np.ones((16, D), np.float32), np.ones((8, 8), np.float32)))
    assert state["saes"][1]["params"]["W_dec"].shape == (X, 8) and len(metrics) == 2
    with pytest.raises(ValueError, match="batch"):
        step(state, np.ones((16, D), np.float32))


def test_state_is_laid_out_latents_over_model():
    config = _configs()[1]
    train_config = sae_train.TrainConfig(steps=10)
    mesh = parallel.make_mesh(data=2, model=4)
    state = sae_train.init_state(config, train_config, jax.random.key(0), mesh)
    sae = state["saes"][0]
    assert sae["params"]["W_dec"].sharding.shard_shape((X, D)) == (X // 4, D)
    assert sae["params"]["W_enc"].sharding.shard_shape((D, X)) == (D, X // 4)
    assert sae["params"]["threshold"].sharding.shard_shape((X,)) == (X // 4,)
    assert sae["tokens_since_fired"].sharding.shard_shape((X,)) == (X // 4,)
    adam_mu = sae["opt_state"][1][0].mu["W_dec"]
    assert adam_mu.sharding.is_equivalent_to(sae["params"]["W_dec"].sharding, 2)
    abstract = sae_train.abstract_state(config, train_config, mesh)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    same = jax.tree.map(
        lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim), abstract, state
    )
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("num_latents", [512, 4096])  # lax.top_k directly, and grouped.
def test_the_compiled_step_never_sorts_the_pre_activations(architecture, num_latents):
    # XLA turns a top-k into a sort of whole [B, X] rows when its pattern match fails (it
    # did once: the demo's step went from 77 to 222 ms); on CPU it should be its TopK kernel.
    batch = 256
    config = SAEConfig(architecture=architecture, d_in=D, num_latents=num_latents, k=8)
    train_config = sae_train.TrainConfig(steps=10)
    mesh, rules = _one_device_mesh(), parallel.DEFAULT_RULES
    state = sae_train.init_state(config, train_config, jax.random.key(0), mesh)
    fields = sae_train._optimizer_fields(train_config)
    configs = sae_train.resolve_dead_tokens(config, train_config)  # As make_train_step does.
    jitted, _ = sae_train._compiled_step(configs, fields, mesh, rules, ((batch, D),))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hlo = jitted.lower(state, (jnp.zeros((batch, D)),)).compile().as_text()
    sorts = [line for line in hlo.splitlines() if " sort(" in line]
    assert 'custom_call_target="TopK"' in hlo
    assert not [
        s for s in sorts if f"[{batch},{num_latents}]" in s or f"[{batch * num_latents}]" in s
    ]


def _auxk_run(dead_tokens):
    """20 steps of a TopK SAE of 128 latents, 4 active per row: (AuxK losses, final W_dec)."""
    config = SAEConfig(architecture="topk", k=4, d_in=D, num_latents=X, dead_tokens=dead_tokens)
    train_config = sae_train.TrainConfig(steps=20, batch_size=64, learning_rate=1e-2,
                                         warmup_steps=0)  # fmt: skip
    mesh = _one_device_mesh()
    state = sae_train.init_state(config, train_config, jax.random.key(0), mesh)
    step = sae_train.make_train_step(config, train_config, mesh)
    data = _activations(_dictionary(), 20 * 64, seed=5)
    auxk = []
    for i in range(20):
        state, metrics = step(state, data[i * 64 : (i + 1) * 64])
        auxk.append(float(metrics[0]["auxk_loss"]))
    return np.asarray(auxk), np.asarray(state["saes"][0]["params"]["W_dec"])


def test_auxk_acts_in_a_short_run_with_the_default_window(caplog):
    # 1,280 tokens: the default window is a tenth of them (128 tokens, two steps), so the dead
    # latents are trained by AuxK; Gao et al.'s 10M tokens (the old default) never come.
    assert SAEConfig().dead_tokens is None
    train_config = sae_train.TrainConfig(steps=20, batch_size=64)
    (resolved,) = sae_train.resolve_dead_tokens(SAEConfig(), train_config)
    assert resolved.dead_tokens == 128
    (kept,) = sae_train.resolve_dead_tokens(SAEConfig(dead_tokens=7), train_config)
    assert kept.dead_tokens == 7
    long = sae_train.TrainConfig(steps=10**6, batch_size=4096)
    assert sae_train.resolve_dead_tokens(SAEConfig(), long)[0].dead_tokens == 10_000_000
    auxk, w_dec = _auxk_run(None)
    assert (auxk[:2] == 0).all() and (auxk[2:] > 0).all()  # Dead from the window on.
    with caplog.at_level("WARNING"):
        never, w_dec_never = _auxk_run(10_000_000)
    assert (never == 0).all()
    # What AuxK trains: the decoder rows of latents the TopK loss never reached.
    assert np.abs(w_dec - w_dec_never).max(1).max() > 1e-3
    assert "AuxK never acts" in caplog.text and "10,000,000 tokens" in caplog.text


def test_settings_that_switch_a_loss_term_off_are_named():
    run = sae_train.TrainConfig(steps=100, batch_size=64)
    assert sae_train.inert_terms(SAEConfig(), run) == []
    assert sae_train.inert_terms(SAEConfig(dead_tokens=99 * 64), run) == []  # The last step.
    (auxk,) = sae_train.inert_terms(SAEConfig(dead_tokens=99 * 64 + 1), run)
    assert "AuxK never acts" in auxk
    assert sae_train.inert_terms(SAEConfig(dead_tokens=10**9, auxk_alpha=0), run) == []
    (l1,) = sae_train.inert_terms(SAEConfig(architecture="relu", l1_coefficient=0), run)
    assert "l1_coefficient=0" in l1 and "L1" in l1
    (l0,) = sae_train.inert_terms(SAEConfig(architecture="jumprelu", l1_coefficient=0), run)
    assert "L0" in l0
    (warmup,) = sae_train.inert_terms(SAEConfig(architecture="relu", l1_warmup_steps=400), run)
    assert "never reaches" in warmup and "25%" in warmup
    frozen_run = sae_train.TrainConfig(steps=100, batch_size=64, learning_rate=0)
    (frozen,) = sae_train.inert_terms(SAEConfig(), frozen_run)
    assert "nothing is trained" in frozen
    with pytest.raises(ValueError, match="dead_tokens=0 must be >= 1"):
        SAEConfig(dead_tokens=0)
