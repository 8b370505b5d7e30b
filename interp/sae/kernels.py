"""SAE kernels: sharded top-k, k-sparse decode and encoder gradients, straight-through steps.

Legend as in modules.py: B batch, D input width, X latents, k active latents per row.
These are the hot path of SAE training; losses.py builds the losses from them.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def _mesh_axes(logical_name: str, size: int) -> tuple[tuple[str, ...], int]:
    """Mesh axes (and how many ways) the current mesh and rules split a dim of `size`.

    ((), 1) outside `jax.set_mesh` + `nn.logical_axis_rules`; trailing axes that do not
    divide `size` are dropped, as parallel.py does, and so are axes of size 1.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    entry = nn.logical_to_mesh_axes((logical_name,))[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, count = [], 1
    for axis in axes:
        if axis not in mesh.shape or size % (count * mesh.shape[axis]):
            break
        if mesh.shape[axis] > 1:  # Axes of size 1 split nothing.
            kept.append(axis)
            count *= mesh.shape[axis]
    return tuple(kept), count


def _spec(*axes):
    return PartitionSpec(*(a if a else None for a in axes))


# Rows narrower than this go straight to `jax.lax.top_k`; wider ones are split into groups.
GROUPED_TOP_K_MIN_WIDTH = 2048


def top_k(values, k):
    """`jax.lax.top_k` over the last axis of [R, N] values, computed over groups.

    XLA lowers a top-k to a sort of whole rows on CPU, and on GPU too once k > 16 (its
    small-k kernel's limit; the RAFT select-k it ships is off by default): a sort of
    [16384, 32768] pre-activations costs far more than the encoder matmul that made them.
    Instead: split each row into G groups of m, take the top k groups by their maximum
    (recursively, the same way), and the top k of those k groups' k * m members. The top k
    of a row lie in its k groups with the largest maxima: an element outside them is
    outranked by each of those k maxima. Groups are taken in index order, so ties resolve
    to the lower index as in `jax.lax.top_k`: values and indices are identical to it.
    Cost: one max-reduction over the row plus top-ks over rows of G and k * m, with
    G ~ k * m ~ sqrt(k * N).
    """
    rows, width = values.shape
    group = _group_size(width, k)
    if group is None:
        return _lax_top_k(values, k)
    groups = values.reshape(rows, width // group, group)
    _, picked = top_k(groups.max(axis=-1), k)  # [R, k] groups with the largest maxima.
    picked = jnp.sort(picked, axis=-1)  # Index order, for lax.top_k's tie-breaking.
    candidates = jnp.take_along_axis(groups, picked[:, :, None], axis=1)  # [R, k, m]
    top, position = top_k(candidates.reshape(rows, k * group), k)
    indices = jnp.take_along_axis(picked, position // group, axis=-1) * group + position % group
    return top, indices


def _lax_top_k(values, k):
    """`jax.lax.top_k`, through float32 on CPU for narrower floats.

    XLA's CPU TopK kernel takes float32 only; bf16 falls back to a sort with a slow
    comparator (benchmarks/RESULTS.md, [4096, 4096], k=32: 2856 ms in bf16 against 62 ms
    in float32). The upcast is exact and keeps the order, so results are identical.
    """
    narrow = jnp.issubdtype(values.dtype, jnp.floating) and values.dtype.itemsize < 4
    if not narrow or jax.default_backend() != "cpu":
        return jax.lax.top_k(values, k)
    top, indices = jax.lax.top_k(values.astype(jnp.float32), k)
    return top.astype(values.dtype), indices


def _group_size(width, k):
    """Group size m for `top_k` over rows of `width`, or None to use lax.top_k directly.

    m is the power of two nearest sqrt(width / k) (balancing the two smaller top-ks) that
    divides the row and leaves more than k groups.
    """
    if width < GROUPED_TOP_K_MIN_WIDTH or width < 4 * k:
        return None
    target = (width / k) ** 0.5
    group = 1 << max(1, round(math.log2(target)))
    while group > 1 and (width % group or width // group <= k):
        group //= 2
    return group if group > 1 else None


def top_k_latents(pre, k):
    """`top_k` over the latents of pre [B, X], shard-local under a mesh.

    XLA replicates the operand of a top-k, so under a mesh each device takes the top k of its
    own [B / data, X / model] block (`shard_map`) and only the model * k candidates per token
    are gathered for the final top k (DESIGN.md: sharded TopK). Same values and indices as
    `jax.lax.top_k` (ties go to the lower index).
    """
    batch, width = pre.shape
    batch_axes, _ = _mesh_axes("batch", batch)
    latent_axes, shards = _mesh_axes("latent", width)
    block = width // shards
    if (not batch_axes and not latent_axes) or k > block:
        return _unsliceable(top_k(pre, k))

    def local(block_pre):
        values, indices = top_k(block_pre, k)
        if latent_axes:
            indices = indices + jax.lax.axis_index(latent_axes) * block
        return values, indices

    spec = _spec(batch_axes, latent_axes)
    values, indices = jax.shard_map(local, in_specs=spec, out_specs=(spec, spec))(pre)
    if shards == 1:
        return values, indices

    def final(values, indices):  # [B / data, model * k] candidates.
        values, pick = top_k(values, k)
        return values, jnp.take_along_axis(indices, pick, axis=-1)

    rows = _spec(batch_axes, ())
    return jax.shard_map(final, in_specs=(rows, rows), out_specs=(rows, rows))(values, indices)


def _unsliceable(top):
    """A top-k's (values, indices) behind an optimization barrier.

    XLA recognises a top-k as a sort whose users are slices of its first k entries; the slot
    loops' slices cols[:, j] merge with that slice and break the match, and the top-k
    becomes a sort of whole [B, X] rows (CPU: the demo's step went from 77 to 222 ms). Only
    outside `shard_map`: there a barrier crashes XLA's CPU compiler (a failed cast to
    GetTupleElement), and the sharded results pass through further ops anyway.
    """
    return tuple(jax.lax.optimization_barrier(tuple(top)))


def batch_top_k(values, count):
    """Top `count` entries of a whole [B, X] array: (values [count], flat indices [count]).

    Under a mesh, each device's block contributes its own top `count` (`shard_map`) and the
    final top `count` runs over those candidates only. Each block's top goes through
    `flat_top_k`.
    """
    batch, width = values.shape
    batch_axes, row_shards = _mesh_axes("batch", batch)
    latent_axes, col_shards = _mesh_axes("latent", width)
    rows, cols = batch // row_shards, width // col_shards
    if row_shards * col_shards == 1 or count > rows * cols:
        return _unsliceable(flat_top_k(values, count))

    def local(block):
        top, flat = flat_top_k(block, count)
        row, col = flat // cols, flat % cols
        if batch_axes:
            row = row + jax.lax.axis_index(batch_axes) * rows
        if latent_axes:
            col = col + jax.lax.axis_index(latent_axes) * cols
        return top[None], (row * width + col)[None]  # [1, count] per block.

    out = _spec(batch_axes + latent_axes, ())
    top, flat = jax.shard_map(local, in_specs=_spec(batch_axes, latent_axes), out_specs=(out, out))(
        values
    )
    top, pick = _lax_top_k(top.reshape(-1), count)
    return top, flat.reshape(-1)[pick]


# Rows keep this many times their even share of a flat top-k as candidates.
FLAT_TOP_K_SLACK = 4
# On CPU, flat_top_k takes per-row candidates only for rows at least this wide.
CPU_CANDIDATES_MIN_WIDTH = 65536


def flat_top_k(values, count):
    """`jax.lax.top_k(values.reshape(-1), count)` for [R, N] values.

    A top-k over all R * N entries is a sort of all of them in XLA (BatchTopK at B=16384,
    X=32768: 5e8 entries). Off CPU it goes through per-row candidates (`candidate_top_k`).
    On CPU only rows of CPU_CANDIDATES_MIN_WIDTH or more do: there XLA sorts rows little
    faster than the whole array, and the candidates' `lax.cond` stops it from using its
    partial-sort TopK kernel (benchmarks/RESULTS.md, count = 32 per row: 309 ms plain vs
    513 ms through candidates at [4096, 4096]; 218 vs 181 at [1024, 32768]; 340 vs 41 at
    [64, 2^20]).
    """
    if jax.default_backend() == "cpu" and values.shape[-1] < CPU_CANDIDATES_MIN_WIDTH:
        return _lax_top_k(values.reshape(-1), count)
    return candidate_top_k(values, count)


def candidate_top_k(values, count):
    """`flat_top_k` from per-row candidates: same values and indices as `jax.lax.top_k`.

    Each row's top c = 4 * count / R (`top_k`) are candidates; the top `count` of the
    candidates is the answer whenever every row's c-th value is below the smallest value
    kept (then nothing a row left out could have made it). Otherwise (one row holds a large
    share of the top, or ties sit at the boundary) a `lax.cond` falls back to the full top-k.
    """
    rows, width = values.shape
    per_row = min(width, FLAT_TOP_K_SLACK * -(-count // rows))
    if 2 * per_row > width:  # Candidates would not be much smaller than the array.
        return _lax_top_k(values.reshape(-1), count)
    candidates, cols = top_k(values, per_row)  # [R, c], each row in (value, index) order.
    top, pick = _lax_top_k(candidates.reshape(-1), count)
    flat = pick // per_row * width + cols.reshape(-1)[pick]
    certified = jnp.all(candidates[:, -1] < top[-1])
    return jax.lax.cond(
        certified,
        lambda: (top, flat),
        lambda: tuple(_lax_top_k(values.reshape(-1), count)),
    )


def topk_codes(pre, k):
    """Keeps each row's k largest pre-activations (ReLU'd), zeros elsewhere. pre: [B, X]."""
    values, indices = top_k_latents(pre, k)
    rows = jnp.arange(pre.shape[0])[:, None]
    return jnp.zeros_like(pre).at[rows, indices].set(jax.nn.relu(values))


def batch_topk_codes(pre, k):
    """Keeps the k * B largest ReLU'd pre-activations of the whole batch. pre: [B, X]."""
    values, indices = batch_top_k(jax.nn.relu(pre), k * pre.shape[0])
    return jnp.zeros(pre.size, pre.dtype).at[indices].set(values).reshape(pre.shape)


# ----------------------------------------------------------------------------- sparse kernels
#
# A TopK SAE's codes have k nonzeros per token, so the decoder and the encoder's weight
# gradient only need the k active latents: x_hat = sum_j v_j W_dec[i_j], and
# dW_enc[:, i] = sum over (b, j) with i_j = i of dpre_bj * x_b. Both are gathers and
# scatter-adds of B * k rows of D numbers instead of [B, X] x [X, D] matmuls (OpenAI's sparse
# kernels do the same). Only the encoder's forward stays dense: every pre-activation is needed
# to pick the top k. The custom VJPs below are checked against `jax.grad` of the dense
# formulation in tests/sae/modules_test.py.
#
# Active latents come in one of two layouts: per row, `cols` [B, k] (TopK, AuxK), or as
# coordinates, `rows` and `cols` [N] sorted by row (BatchTopK, whose rows hold varying counts).
# `rows` is None in the per-row layout.
#
# The trade-off: the scatter-adds materialise [B * k, D] (per row) or [N, D] update rows,
# about as much memory as dense [B, X] codes when k * D ~ X, and a scatter-add is slower per
# FLOP than a matmul; the gain is k / X of the FLOPs (1/1000 for k=32, X=32768). The per-row
# decode and its value gradient avoid the gathered [B, k, D] by looping over the k slots
# (`_slot_sum`, `_slot_dots`). `sparse_kernels=False` switches to the dense path where that
# wins (small X; benchmarks/sae_throughput.py has a column for it).


def _flat(rows, cols, values, width):
    """Coordinates (rows [N], cols [N], values [N, ...]) of either layout."""
    if rows is None:
        batch, k = cols.shape
        rows = jnp.repeat(jnp.arange(batch), k)
        return rows, cols.reshape(-1), values.reshape((batch * k,) + values.shape[2:])
    del width
    return rows, cols, values


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def sparse_decode(num_rows, dtype, values, rows, cols, w_dec):
    """sum_j values_j * W_dec[cols_j] per row, without b_dec.

    Args:
      num_rows: B (static).
      dtype: Compute dtype of the products (static); accumulation is float32.
      values: [B, k] (per row) or [N] (coordinates).
      rows: None (per row) or [N] row of each value, sorted.
      cols: [B, k] or [N] latent of each value.
      w_dec: [X, D].

    Returns:
      [B, D] float32.
    """
    if rows is None:
        return _slot_sum(values, cols, w_dec, dtype)
    rows_, cols_, values_ = _flat(rows, cols, values, None)
    gathered = w_dec.astype(dtype)[cols_]  # [N, D]
    products = (values_.astype(dtype)[:, None] * gathered).astype(jnp.float32)
    return jax.ops.segment_sum(products, rows_, num_rows, indices_are_sorted=True)


def _slot_sum(values, cols, table, dtype):
    """sum_j values[:, j] * table[cols[:, j]] per row: [B, k], [B, k], [X, D] -> [B, D] f32.

    One slot j at a time, so XLA fuses each row gather into the multiply-add instead of
    materialising [B, k, D] gathered rows (on CPU, B=4096, k=32, D=256: 2.6 ms against 52
    ms for gather + einsum). Products are of `dtype`-rounded factors, summed in float32, as
    a `preferred_element_type=float32` matmul would.
    """
    batch, k = cols.shape

    def add_slot(j, total):
        rows = table[cols[:, j]].astype(dtype).astype(jnp.float32)
        return total + values[:, j, None].astype(dtype).astype(jnp.float32) * rows

    zeros = jnp.zeros((batch, table.shape[-1]), jnp.float32)
    return jax.lax.fori_loop(0, k, add_slot, zeros, unroll=min(k, 32))


def _slot_dots(vectors, cols, table, dtype):
    """vectors[b] . table[cols[b, j]] for each slot: [B, D], [B, k], [X, D] -> [B, k] f32.

    The transpose of `_slot_sum`, one slot at a time for the same reason.
    """
    batch, k = cols.shape
    vectors = vectors.astype(dtype).astype(jnp.float32)

    def dot_slot(j, out):
        rows = table[cols[:, j]].astype(dtype).astype(jnp.float32)
        return out.at[:, j].set(jnp.sum(vectors * rows, axis=-1))

    zeros = jnp.zeros((batch, k), jnp.float32)
    return jax.lax.fori_loop(0, k, dot_slot, zeros, unroll=min(k, 32))


def _slot_scatter(values, cols, grad, shape):
    """sum_j of values[:, j] * grad scattered into rows cols[:, j]: [B, k], [B, k], [B, D] ->
    `shape` ([X, D]) float32.

    W_dec's gradient one slot at a time, so no [B * k, D] product is ever materialised (at an
    AuxK k of d_in / 2 that temporary is B * d_in^2 / 2 floats: 43 GB per device for B=4096,
    d_in=2304).
    """
    batch, k = cols.shape
    grad = grad.astype(jnp.float32)

    def add_slot(j, total):
        return total.at[cols[:, j]].add(values[:, j, None].astype(jnp.float32) * grad)

    zeros = jnp.zeros(shape, jnp.float32)
    return jax.lax.fori_loop(0, k, add_slot, zeros, unroll=min(k, 8))


def _sparse_decode_fwd(num_rows, dtype, values, rows, cols, w_dec):
    return sparse_decode(num_rows, dtype, values, rows, cols, w_dec), (values, rows, cols, w_dec)


def _sparse_decode_bwd(num_rows, dtype, residuals, grad):
    del num_rows
    values, rows, cols, w_dec = residuals
    if rows is None:  # Per row: slot by slot, no [B * k, D] temporaries.
        d_values = _slot_dots(grad, cols, w_dec, dtype)
        d_w_dec = _slot_scatter(values, cols, grad, w_dec.shape)
        return d_values.astype(values.dtype), None, None, d_w_dec
    rows_, cols_, values_ = _flat(rows, cols, values, None)
    grad_rows = grad[rows_]  # [N, D]
    gathered = w_dec.astype(dtype)[cols_]
    d_values = jnp.einsum(
        "ND,ND->N", grad_rows.astype(dtype), gathered, preferred_element_type=jnp.float32
    )
    # Only the active rows of W_dec get gradient: a scatter-add of N rows.
    d_w_dec = (
        jnp.zeros(w_dec.shape, jnp.float32)
        .at[cols_]
        .add(values_.astype(jnp.float32)[:, None] * grad_rows)
    )
    return d_values.reshape(values.shape).astype(values.dtype), None, None, d_w_dec


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


@jax.custom_vjp
def gather_pre_activation(pre, x, shift, w_enc, b_enc, rows, cols):
    """pre[rows, cols] with gradients to the encoder through the active latents only.

    `pre` must equal (x - shift) @ W_enc + b_enc (it is computed densely anyway, to select
    the latents); it gets no gradient itself, the encoder's arguments get it sparsely.

    Args:
      pre: [B, X] pre-activations (treated as a constant).
      x: [B, D] scaled inputs.
      shift: [D] subtracted from x before encoding (b_dec, or zeros).
      w_enc: [D, X].
      b_enc: [X].
      rows: None (per row) or [N] sorted row indices.
      cols: [B, k] or [N] latent indices.

    Returns:
      [B, k] or [N] float32 pre-activations of the chosen latents.
    """
    del x, shift, w_enc, b_enc
    if rows is None:
        return jnp.take_along_axis(pre, cols, axis=-1)
    return pre[rows, cols]


def _gather_fwd(pre, x, shift, w_enc, b_enc, rows, cols):
    out = gather_pre_activation(pre, x, shift, w_enc, b_enc, rows, cols)
    return out, (x, shift, w_enc, rows, cols)


def _gather_bwd(residuals, grad):
    x, shift, w_enc, rows, cols = residuals
    rows_, cols_, grad_ = _flat(rows, cols, grad.astype(jnp.float32), None)
    centered = x.astype(jnp.float32) - shift
    # dW_enc[:, i] = sum over active (b, j) with cols = i of dpre_bj * centered_b; built as
    # [X, D] rows (a scatter of contiguous rows) and transposed.
    if rows is None:  # Slot by slot: no [B * k, D] temporary.
        d_w_enc = _slot_scatter(grad, cols, centered, w_enc.shape[::-1])
    else:
        d_w_enc = (
            jnp.zeros(w_enc.shape[::-1], jnp.float32)
            .at[cols_]
            .add(grad_[:, None] * centered[rows_])
        )
    d_b_enc = jnp.zeros(w_enc.shape[1:], jnp.float32).at[cols_].add(grad_)
    # d/dshift = -sum_b dx_b = -W_enc @ d_b_enc: a matvec, not a [B, D] scatter.
    d_shift = -(w_enc @ d_b_enc)
    # dx is only live when the caller differentiates the input; XLA drops it otherwise.
    if rows is None:
        d_x = _slot_sum(grad.astype(jnp.float32), cols, w_enc.T, jnp.float32)
    else:
        d_x = jax.ops.segment_sum(
            grad_[:, None] * w_enc.T[cols_], rows_, x.shape[0], indices_are_sorted=True
        )
    return None, d_x.astype(x.dtype), d_shift, d_w_enc.T, d_b_enc, None, None


gather_pre_activation.defvjp(_gather_fwd, _gather_bwd)


# ----------------------------------------------------------------------------- JumpReLU


def _rectangle(u):
    """The rectangle kernel K(u) = 1 on (-1/2, 1/2) (Rajamanoharan et al. 2024, eq. 11)."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre, threshold, bandwidth):
    """pre * H(pre - threshold); d/dthreshold by the straight-through estimator.

    Pseudo-derivative (Rajamanoharan et al. 2024, eq. 12):
    d/dtheta = -(theta / eps) K((pre - theta) / eps); d/dpre = H(pre - theta).
    """
    return jnp.where(pre > threshold, pre, 0.0)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, residuals, grad):
    pre, threshold = residuals
    d_pre = jnp.where(pre > threshold, grad, 0.0)
    kernel = _rectangle((pre - threshold) / bandwidth)
    d_threshold = -(threshold / bandwidth) * kernel * grad
    return d_pre, _sum_to_shape(d_threshold, threshold.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step_function(pre, threshold, bandwidth):
    """H(pre - threshold) as float; gradient only to threshold, by the STE.

    Pseudo-derivative (Rajamanoharan et al. 2024, eq. 13): d/dtheta = -(1 / eps) K(...),
    d/dpre = 0: the L0 penalty trains the thresholds, not the encoder.
    """
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, bandwidth):
    return step_function(pre, threshold, bandwidth), (pre, threshold)


def _step_bwd(bandwidth, residuals, grad):
    pre, threshold = residuals
    d_threshold = -(1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth) * grad
    return jnp.zeros_like(pre), _sum_to_shape(d_threshold, threshold.shape)


step_function.defvjp(_step_fwd, _step_bwd)


def _sum_to_shape(x, shape):
    """Sums leading broadcast dims of x away: [..., X] -> [X]."""
    return x.reshape((-1,) + tuple(shape)).sum(0) if x.shape != tuple(shape) else x
