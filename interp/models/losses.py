"""Language-model losses, kept free of training dependencies so analysis code can import them."""

import jax
import jax.numpy as jnp


def next_token_loss(logits, tokens, mask=None):
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1], in float32.

    Args:
      logits: [B, T, V].
      tokens: [B, T] int.
      mask: Optional [B, T]; a target counts when it and its input are both real tokens.

    Returns:
      (mean loss, number of predicted tokens).
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weight = jnp.ones_like(nll) if mask is None else (mask[:, 1:] * mask[:, :-1]).astype(nll.dtype)
    count = jnp.maximum(weight.sum(), 1.0)
    return (nll * weight).sum() / count, count
