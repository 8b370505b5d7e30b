"""Tracked layers' statistics are each projection's own input and output, in every family.

A tracked layer's per-sequence gradient G = sum_t g_t a_t^T is the weight's gradient only when
a_t is the projection's own input and g_t the gradient at its own output. Families place things
after a projection (Gemma's post-MLP norm after the down projection, soft-caps, scalings), so
identity-strategy per-layer scores (plain gradient dot products) must equal the products of
exact per-row kernel gradients (`jax.grad`) for every family the parity suite builds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import influence
from interp.influence import gradients
from tests import references

references.require_module("torch", "pip install -e '.[test]' torch==2.13.0")
from tests.models import hf_testing  # noqa: E402  (imports torch)

T = 8


def _rows(rows, seed, prompt=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, hf_testing.VOCAB, (rows, T)).astype(np.int32)
    loss_mask = np.ones((rows, T), np.float32)
    loss_mask[:, : max(prompt, 1)] = 0
    return {"tokens": tokens, "loss_mask": loss_mask}


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _exact_module_gradients(model, params, modules, batch):
    """{module: [N, P]}: d(summed NLL of each row)/d(kernel, bias), by jax.grad."""

    def nll(p, tokens, loss_mask):
        logits = model.apply({"params": p}, tokens[None])
        return gradients.sequence_nll(logits, tokens[None], loss_mask[None])[0]

    grads = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(
        params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"])
    )
    out = {}
    for m in modules:
        parts = [_get(grads, m.kernel).reshape(len(batch["tokens"]), -1)]
        if m.bias is not None:
            parts.append(_get(grads, m.bias).reshape(len(batch["tokens"]), -1))
        out[m.name] = np.asarray(jnp.concatenate(parts, axis=1), np.float64)
    return out


@pytest.mark.parametrize("variant", hf_testing.VARIANTS)
def test_identity_per_layer_scores_equal_exact_kernel_gradient_products(variant):
    _, _, _, model, params = hf_testing.converted(variant)
    train, query = _rows(3, seed=0), _rows(1, seed=1, prompt=4)
    fitted = influence.fit_factors(model, params, [train], "identity", sample_labels=False)
    ours = influence.pairwise_scores(model, params, fitted, [query], [train], per_layer=True)
    # One batch (one compile): rows 0-2 are the training rows, row 3 the query.
    both = {k: np.concatenate([train[k], query[k]]) for k in train}
    exact_grads = _exact_module_gradients(model, params, fitted.modules, both)
    assert {m.name.rsplit("/", 1)[1] for m in fitted.modules} >= {"up", "down"}
    for index, module in enumerate(fitted.modules):
        rows = exact_grads[module.name]
        exact = rows[3:] @ rows[:3].T  # [1, 3]
        got = ours.per_layer[:, :, index]
        scale = np.abs(exact).max()
        error = np.abs(got - exact).max() / scale
        assert error < 1e-4, f"{variant} {module.name}: relative error {error:.3g}"
