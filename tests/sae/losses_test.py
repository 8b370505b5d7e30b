"""Tests for interp.sae.losses: sparse kernels against the dense formulation, a NumPy
reference, invariants, STE and AuxK, and the constraints around each step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.sae import kernels, losses, modules
from interp.sae.modules import SAE, SAEConfig

D, X, B = 16, 64, 8


def _setup(architecture, seed=0, **overrides):
    values = dict(architecture=architecture, d_in=D, num_latents=X, k=4, input_scale=1.3, auxk_k=6)
    if architecture == "matryoshka_batchtopk":
        values["matryoshka_widths"] = (8, 24, X)
    config = SAEConfig(**{**values, **overrides})
    keys = jax.random.split(jax.random.key(seed), 4)
    params = modules.init_params(config, keys[0], b_dec=0.1 * jax.random.normal(keys[1], (D,)))
    params["b_enc"] = 0.1 * jax.random.normal(keys[2], (X,))
    x = jax.random.normal(keys[3], (B, D))
    return config, params, x


def _loss_and_grads(config, params, x, dead_mask=None, step=3):
    def loss(p):
        return losses.sae_loss(config, p, x, step=step, dead_mask=dead_mask)

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize(
    "subtract_decoder_bias, with_dead", [(True, True), (False, False), (False, True)]
)
def test_sparse_kernels_match_dense_values_and_grads(
    architecture, subtract_decoder_bias, with_dead
):
    config, params, x = _setup(architecture, subtract_decoder_bias=subtract_decoder_bias)
    dead = jax.random.bernoulli(jax.random.key(7), 0.3, (X,)) if with_dead else None
    (loss, got), grads = _loss_and_grads(config, params, x, dead)
    dense_config = config.replace(sparse_kernels=False)
    (want_loss, want), want_grads = _loss_and_grads(dense_config, params, x, dead)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for name in want_grads:
        np.testing.assert_allclose(grads[name], want_grads[name], atol=1e-5, err_msg=name)
    assert float(jnp.abs(grads["W_dec"]).max()) > 0.1
    if with_dead:
        assert float(got["auxk_loss"]) > 0


def test_sparse_kernels_differentiate_the_input_too():
    config, params, x = _setup("topk")
    grad = jax.grad(lambda x, c: losses.sae_loss(c, params, x, step=0)[0])
    np.testing.assert_allclose(
        grad(x, config), grad(x, config.replace(sparse_kernels=False)), atol=1e-5
    )


def test_metrics_match_numpy_reference_relu():
    config, params, x = _setup("relu", l1_coefficient=0.7, l1_warmup_steps=10)
    params["W_dec"] = params["W_dec"] * jnp.linspace(0.5, 2.0, X)[:, None]
    loss, metrics = losses.sae_loss(config, params, x, step=4)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xs = np.asarray(x, np.float64) * config.input_scale
    codes = np.maximum((xs - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    x_hat = codes @ p["W_dec"] + p["b_dec"]
    mse = np.mean(np.sum((x_hat - xs) ** 2, -1))
    fvu = np.sum((x_hat - xs) ** 2) / np.sum((xs - xs.mean(0)) ** 2)
    l1 = np.mean(np.sum(codes * np.linalg.norm(p["W_dec"], axis=-1), -1))
    coefficient = 0.7 * 4 / 10
    np.testing.assert_allclose(metrics["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(metrics["fvu"], fvu, rtol=1e-5)
    np.testing.assert_allclose(metrics["sparsity_loss"], l1, rtol=1e-5)
    np.testing.assert_allclose(metrics["sparsity_coefficient"], coefficient, rtol=1e-6)
    np.testing.assert_allclose(loss, mse + coefficient * l1, rtol=1e-5)
    np.testing.assert_allclose(metrics["l0"], np.mean(np.sum(codes > 0, -1)), rtol=1e-6)
    # The module's inference path agrees with the loss's reconstruction.
    x_hat_module, _ = SAE(config).apply({"params": params}, x)
    np.testing.assert_allclose(x_hat_module, x_hat / config.input_scale, atol=1e-4)


def test_sparsity_coefficient_warms_up_linearly():
    config = SAEConfig(architecture="relu", l1_coefficient=2.0, l1_warmup_steps=4)
    got = [float(losses.sparsity_coefficient(config, s)) for s in range(6)]
    assert got == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


@pytest.mark.parametrize("sparse_kernels", [True, False])
def test_topk_trains_with_exactly_k_active_latents_per_row(sparse_kernels):
    config, params, x = _setup("topk", sparse_kernels=sparse_kernels)
    params["b_enc"] = params["b_enc"] + 10.0  # Every pre-activation positive.
    _, metrics = losses.sae_loss(config, params, x, step=0)
    assert float(metrics["l0"]) == config.k


@pytest.mark.parametrize("sparse_kernels", [True, False])
def test_batchtopk_keeps_exactly_k_times_batch_in_training(sparse_kernels):
    config, params, x = _setup("batchtopk", sparse_kernels=sparse_kernels)
    params["b_enc"] = params["b_enc"] + 10.0
    _, metrics, aux = losses.sae_forward(config, params, x, step=0)
    assert float(metrics["l0"]) * B == config.k * B
    codes = kernels.batch_topk_codes(
        SAE(config).apply({"params": params}, x, method="pre_activation"), config.k
    )
    assert int(jnp.sum(codes > 0)) == config.k * B
    assert int(jnp.sum(np.sum(np.asarray(codes) > 0, -1) != config.k)) > 0  # Not per row.
    np.testing.assert_allclose(
        aux["batch_threshold"], jnp.min(jnp.where(codes > 0, codes, jnp.inf))
    )


@pytest.mark.parametrize("sparse_kernels", [True, False])
def test_matryoshka_adds_each_inner_prefix_reconstruction_to_the_batchtopk_loss(sparse_kernels):
    # Bussmann et al. 2025: the loss is BatchTopK's plus, for each inner prefix of the
    # latents, the MSE of the reconstruction from that prefix alone (NumPy reference).
    config, params, x = _setup("matryoshka_batchtopk", sparse_kernels=sparse_kernels)
    dead = jnp.arange(X) % 5 == 0
    loss, metrics, aux = losses.sae_forward(config, params, x, step=3, dead_mask=dead)
    plain = config.replace(architecture="batchtopk", matryoshka_widths=())
    want_loss, want, want_aux = losses.sae_forward(plain, params, x, step=3, dead_mask=dead)
    for name in set(want) - {"loss"}:  # The whole SAE is a BatchTopK SAE: the same figures.
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(aux["batch_threshold"], want_aux["batch_threshold"])
    pre = np.asarray(SAE(config).apply({"params": params}, x, method="pre_activation"))
    codes = np.asarray(kernels.batch_topk_codes(jnp.asarray(pre), config.k), np.float64)
    scaled = np.asarray(x, np.float64) * config.input_scale
    w_dec, b_dec = np.asarray(params["W_dec"], np.float64), np.asarray(params["b_dec"])
    inner = {}
    for width in config.matryoshka_widths[:-1]:
        x_hat = codes[:, :width] @ w_dec[:width] + b_dec
        inner[f"inner_mse_{width}"] = np.mean(np.sum((x_hat - scaled) ** 2, -1))
    assert sorted(name for name in metrics if name.startswith("inner_")) == sorted(inner)
    for name, value in inner.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, float(want_loss) + sum(inner.values()), rtol=1e-5)


def test_batchtopk_threshold_is_a_running_average_without_gradient():
    config, params, x = _setup("batchtopk", threshold_rate=0.25)
    (_, _), grads = _loss_and_grads(config, params, x)
    assert float(jnp.abs(grads["threshold"]).max()) == 0.0
    params = dict(params, threshold=jnp.full((X,), 2.0))
    aux = {"batch_threshold": jnp.asarray(1.0)}
    first = losses.constrain_params(config, params, aux, step=0)["threshold"]
    np.testing.assert_allclose(first, 1.0)  # Rate 1 / (step + 1) = 1 at first.
    later = losses.constrain_params(config, params, aux, step=10)["threshold"]
    np.testing.assert_allclose(later, 0.75 * 2.0 + 0.25 * 1.0)
    aux = {"batch_threshold": jnp.asarray(jnp.inf)}  # No positive activation: unchanged.
    np.testing.assert_allclose(losses.constrain_params(config, params, aux, 3)["threshold"], 2.0)


def test_jumprelu_threshold_gets_gradient_from_the_loss():
    config, params, x = _setup("jumprelu", jumprelu_bandwidth=0.2, jumprelu_init_threshold=0.1)
    (_, metrics), grads = _loss_and_grads(config, params, x)
    assert float(jnp.sum(grads["threshold"] != 0)) > 5
    assert float(metrics["sparsity_loss"]) == float(metrics["l0"])


def test_auxk_is_zero_without_dead_latents_and_revives_dead_ones():
    config, params, x = _setup("topk", auxk_alpha=0.5)
    (_, metrics), grads = _loss_and_grads(config, params, x, dead_mask=jnp.zeros((X,), bool))
    assert float(metrics["auxk_loss"]) == 0.0
    # A latent that never fires: its pre-activation is pushed far down.
    params["b_enc"] = params["b_enc"].at[5].set(-100.0)
    (_, no_dead), alive_grads = _loss_and_grads(config, params, x, dead_mask=None)
    assert float(jnp.abs(alive_grads["W_enc"][:, 5]).max()) == 0.0
    assert float(jnp.abs(alive_grads["W_dec"][5]).max()) == 0.0
    dead = jnp.zeros((X,), bool).at[5].set(True)
    (_, with_dead), dead_grads = _loss_and_grads(config, params, x, dead_mask=dead)
    assert float(with_dead["auxk_loss"]) > 0
    # AuxK takes it regardless of its (negative) activation: its decoder row gets gradient
    # only if its value is positive, so give it a positive pre-activation on some tokens.
    params["b_enc"] = params["b_enc"].at[5].set(-0.05)
    codes = SAE(config).apply({"params": params}, x, method="encode")
    assert float(jnp.abs(codes[:, 5]).max()) == 0.0  # Still never in the top k.
    (_, _), alive_grads = _loss_and_grads(config, params, x, dead_mask=None)
    (_, _), dead_grads = _loss_and_grads(config, params, x, dead_mask=dead)
    assert float(jnp.abs(alive_grads["W_dec"][5]).max()) == 0.0
    assert float(jnp.abs(dead_grads["W_dec"][5]).max()) > 0.0
    assert float(jnp.abs(dead_grads["W_enc"][:, 5]).max()) > 0.0


def test_decoder_constraint_helpers():
    w = losses.normalize_decoder(jax.random.normal(jax.random.key(0), (X, D)) * 3)
    np.testing.assert_allclose(jnp.linalg.norm(w, axis=-1), 1.0, rtol=1e-6)
    grad = losses.project_decoder_grad(jax.random.normal(jax.random.key(1), (X, D)), w)
    np.testing.assert_allclose(jnp.sum(grad * w, -1), 0.0, atol=1e-6)


@pytest.mark.parametrize("architecture", modules.ARCHITECTURES)
def test_bfloat16_compute_is_close_to_float32(architecture):
    config, params, x = _setup(architecture, jumprelu_bandwidth=0.1, auxk_k=6)
    dead = jnp.arange(X) % 3 == 0
    (loss, _), grads = _loss_and_grads(config, params, x, dead)
    bf16 = config.replace(dtype="bfloat16")
    (loss16, _), grads16 = _loss_and_grads(bf16, params, x, dead)
    np.testing.assert_allclose(loss16, loss, rtol=3e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    for name in grads:
        scale = float(jnp.abs(grads[name]).max())
        np.testing.assert_allclose(grads16[name], grads[name], atol=0.05 * scale, err_msg=name)
    # The matmuls run in bf16: the [B, X] pre-activations are bf16 in the step.
    jaxpr = str(jax.make_jaxpr(lambda p: losses.sae_loss(bf16, p, x, step=3))(params))
    assert f"bf16[{B},{X}]" in jaxpr
