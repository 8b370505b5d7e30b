"""A tiny NeoX-style model whose Gauss-Newton matrix can be built exactly, and its data."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from interp.influence import gradients
from interp.models.config import ModelConfig
from interp.models.transformer import Transformer, init_params

CONFIG = ModelConfig(
    family="gpt_neox",
    vocab_size=16,
    d_model=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    head_dim=4,
    mlp_dim=16,
    max_len=16,
    positions="rotary",
    parallel_residual=True,
    activation="gelu",
    tied_embeddings=False,
)
T = 8


@functools.cache
def model_and_params(scale: float = 4.0):
    """Random weights scaled up from the init's std so predictions are far from uniform."""
    params = init_params(CONFIG, 0)
    params = jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, params)
    return Transformer(CONFIG), params


def data(rows: int, seed: int, prompt: int = 0) -> dict[str, np.ndarray]:
    """{'tokens', 'loss_mask'}: random rows; with `prompt`, only tokens after it are scored."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (rows, T)).astype(np.int32)
    loss_mask = np.ones((rows, T), np.float32)
    loss_mask[:, : max(prompt, 1)] = 0
    return {"tokens": tokens, "loss_mask": loss_mask}


def split(batch, size):
    return [
        {k: v[i : i + size] for k, v in batch.items()} for i in range(0, len(batch["tokens"]), size)
    ]


def flat_tracked(params, modules):
    """The tracked layers' parameters as one vector (kernel [I, O] row-major, then bias)."""
    parts = []
    for m in modules:
        parts.append(_get(params, m.kernel).reshape(-1))
        if m.bias is not None:
            parts.append(_get(params, m.bias).reshape(-1))
    return jnp.concatenate(parts)


def unflatten_tracked(params, modules, vector):
    params = jax.tree.map(lambda x: x, params)
    offset = 0
    for m in modules:
        for path in (m.kernel, m.bias):
            if path is None:
                continue
            leaf = _get(params, path)
            size = leaf.size
            _set(params, path, vector[offset : offset + size].reshape(leaf.shape))
            offset += size
    return params


def module_slices(params, modules):
    """{module name: slice of the flat vector}."""
    out, offset = {}, 0
    for m in modules:
        size = _get(params, m.kernel).size + (0 if m.bias is None else _get(params, m.bias).size)
        out[m.name] = slice(offset, offset + size)
        offset += size
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def to_flat_gradient(grads_by_module, modules):
    """Our G [O, I(+1)] per module -> the flat layout of `flat_tracked` (for one sequence)."""
    parts = []
    for m in modules:
        g = np.asarray(grads_by_module[m.name])
        inputs = g.shape[1] - (0 if m.bias is None else 1)
        parts.append(g[:, :inputs].T.reshape(-1))
        if m.bias is not None:
            parts.append(g[:, inputs])
    return np.concatenate(parts)


def per_sequence_flat_gradients(model, params, modules, batch):
    """[N, P]: d(summed NLL of each sequence)/d(tracked params), by jax.grad."""
    theta = flat_tracked(params, modules)

    def nll(vector, tokens, loss_mask):
        logits = model.apply({"params": unflatten_tracked(params, modules, vector)}, tokens[None])
        return gradients.sequence_nll(logits, tokens[None], loss_mask[None])[0]

    grad = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))
    return np.asarray(grad(theta, jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"])))


def exact_ggn(model, params, modules, batch):
    """[P, P]: (1/N) sum_n sum_t J_nt^T (diag p - p p^T) J_nt over scored targets t."""
    theta = flat_tracked(params, modules)
    tokens = jnp.asarray(batch["tokens"])
    mask = jnp.asarray(batch["loss_mask"])

    def logits(vector):
        return model.apply({"params": unflatten_tracked(params, modules, vector)}, tokens)[:, :-1]

    jac = jax.jacfwd(logits)(theta)  # [N, T-1, V, P]
    probs = jax.nn.softmax(logits(theta), axis=-1)  # [N, T-1, V]
    weights = mask[:, 1:]
    jp = jnp.einsum("ntv,ntvp->ntp", probs, jac)
    first = jnp.einsum("nt,ntv,ntvp,ntvq->pq", weights, probs, jac, jac)
    second = jnp.einsum("nt,ntp,ntq->pq", weights, jp, jp)
    return np.asarray((first - second) / tokens.shape[0], np.float64)


def spearman(x, y) -> float:
    rx = np.argsort(np.argsort(np.ravel(x))).astype(np.float64)
    ry = np.argsort(np.argsort(np.ravel(y))).astype(np.float64)
    return float(np.corrcoef(rx, ry)[0, 1])
