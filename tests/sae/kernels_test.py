"""SAE kernels: straight-through estimators by hand, grouped and sharded top-k against
lax.top_k, slot-wise sparse decode against the dense matmul."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import parallel
from interp.sae import kernels

X = 64


def test_jumprelu_straight_through_gradients_match_the_paper():
    bandwidth = 0.5
    pre = jnp.asarray([[0.1, 0.9, 1.2, 3.0]])
    theta = jnp.asarray([1.0, 1.0, 1.0, 1.0])
    out, vjp = jax.vjp(lambda p, t: kernels.jumprelu(p, t, bandwidth), pre, theta)
    np.testing.assert_allclose(out, [[0.0, 0.0, 1.2, 3.0]])
    d_pre, d_theta = vjp(jnp.ones_like(pre))
    np.testing.assert_allclose(d_pre, [[0.0, 0.0, 1.0, 1.0]])
    # -(theta / eps) K((pre - theta) / eps): only 0.9 and 1.2 are within eps / 2 of theta.
    np.testing.assert_allclose(d_theta, [0.0, -2.0, -2.0, 0.0])
    out, vjp = jax.vjp(lambda p, t: kernels.step_function(p, t, bandwidth), pre, theta)
    np.testing.assert_allclose(out, [[0.0, 0.0, 1.0, 1.0]])
    d_pre, d_theta = vjp(jnp.ones_like(pre))
    np.testing.assert_allclose(d_pre, 0.0)
    np.testing.assert_allclose(d_theta, [0.0, -2.0, -2.0, 0.0])


def test_sharded_top_k_equals_plain_top_k():
    mesh = parallel.make_mesh(data=2, model=4)
    pre = jax.random.normal(jax.random.key(0), (8, X))
    want_values, want_indices = jax.lax.top_k(pre, 5)
    flat_values, flat_indices = jax.lax.top_k(pre.reshape(-1), 3 * 8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        values, indices = jax.jit(kernels.top_k_latents, static_argnums=1)(pre, 5)
        batch_values, batch_indices = jax.jit(kernels.batch_top_k, static_argnums=1)(pre, 24)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(batch_values, flat_values)
    np.testing.assert_array_equal(batch_indices, flat_indices)


@pytest.mark.parametrize(
    "rows, width, k",
    [(4, 4096, 32), (3, 2048, 4), (2, 65536, 64)],  # the last recurses on its group maxima
)
def test_grouped_top_k_equals_lax_top_k_ties_included(rows, width, k):
    assert kernels._group_size(width, k) is not None
    pre = jax.random.normal(jax.random.key(1), (rows, width))
    masked = jnp.where(jax.random.bernoulli(jax.random.key(2), 0.99, pre.shape), -jnp.inf, pre)
    for values in (pre, jnp.round(pre * 2) / 2, pre.astype(jnp.bfloat16), masked):
        got_values, got_indices = jax.jit(kernels.top_k, static_argnums=1)(values, k)
        want_values, want_indices = jax.lax.top_k(values, k)
        np.testing.assert_array_equal(got_values, want_values)
        np.testing.assert_array_equal(got_indices, want_indices)


def test_sharded_grouped_top_k_equals_plain_top_k():
    mesh = parallel.make_mesh(data=2, model=4)
    pre = jnp.round(jax.random.normal(jax.random.key(3), (4, 4 * 2048)) * 4) / 4
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        values, indices = jax.jit(kernels.top_k_latents, static_argnums=1)(pre, 16)
    want_values, want_indices = jax.lax.top_k(pre, 16)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(indices, want_indices)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_decode_and_its_gradients_match_the_dense_matmul(dtype):
    batch, width, d, k = 6, 96, 8, 40  # k > 32 runs the slot loop past its unrolled part.
    keys = jax.random.split(jax.random.key(4), 3)
    w_dec = jax.random.normal(keys[0], (width, d))
    values = jax.random.normal(keys[1], (batch, k))
    cols = jax.vmap(lambda key: jax.random.permutation(key, width)[:k])(
        jax.random.split(keys[2], batch)
    )

    def sparse(values, w_dec):
        return kernels.sparse_decode(batch, dtype, values, None, cols, w_dec)

    def dense(values, w_dec):
        codes = jnp.zeros((batch, width)).at[jnp.arange(batch)[:, None], cols].set(values)
        return jnp.dot(codes.astype(dtype), w_dec.astype(dtype), preferred_element_type=jnp.float32)

    cotangent = jax.random.normal(keys[0], (batch, d))
    got, got_vjp = jax.vjp(sparse, values, w_dec)
    want, want_vjp = jax.vjp(dense, values, w_dec)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * 5)


@pytest.mark.parametrize("rows, width, k", [(64, 4096, 32), (16, 512, 4)])
def test_candidate_flat_top_k_equals_lax_top_k_and_falls_back_when_it_must(rows, width, k):
    pre = jax.random.normal(jax.random.key(5), (rows, width))
    one_row_holds_the_top = pre.at[3].add(10.0)  # Certification fails: the fallback runs.
    cases = (pre, jax.nn.relu(jnp.round(pre * 2) / 2), pre.astype(jnp.bfloat16))
    for values in cases + (one_row_holds_the_top, jnp.zeros_like(pre)):
        got = jax.jit(kernels.candidate_top_k, static_argnums=1)(values, k * rows)
        want = jax.lax.top_k(values.reshape(-1), k * rows)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_sparse_gradients_hold_no_rows_times_k_temporaries():
    # AuxK's k is d_in / 2: a backward pass that materialised the [B * k, D] gathered rows
    # (B * d_in^2 / 2 floats: 43 GB per device for Gemma 2 2B's width at batch 4096) would
    # not fit a chip; slot by slot it stays near the [X, D] gradients themselves.
    batch, width, d, k = 512, 2048, 512, 256
    keys = jax.random.split(jax.random.key(0), 4)
    w_enc = jax.random.normal(keys[0], (d, width))
    w_dec = jax.random.normal(keys[1], (width, d))
    x = jax.random.normal(keys[2], (batch, d))
    cols = jax.random.randint(keys[3], (batch, k), 0, width)

    def loss(w_enc, w_dec):
        pre = jax.lax.stop_gradient(x @ w_enc)
        values = kernels.gather_pre_activation(pre, x, jnp.zeros(d), w_enc, jnp.zeros(width),
                                               None, cols)  # fmt: skip
        return jnp.sum(kernels.sparse_decode(batch, jnp.float32, values, None, cols, w_dec) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w_enc, w_dec).compile()
    gathered = batch * k * d * 4  # One [B * k, D] float32 temporary: 268 MB.
    assert compiled.memory_analysis().temp_size_in_bytes < gathered / 4  # Seen: 39 MB.
