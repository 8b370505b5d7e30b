"""SAE kernels: straight-through estimators by hand, sharded top-k against lax.top_k."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
