"""Activations for SAE training: harvest them at hook points, shuffle them, cache them on disk.

    sites = ["blocks_3/resid_post", "blocks_3/mlp/out"]
    stream = activations.harvest(model, params, token_batches, sites, bos_id=tok.bos_id)
    # Straight into training, mixed across sequences:
    buffer = activations.ShuffleBuffer(stream, capacity=2**18, seed=0)
    batch = buffer.get(4096)                        # {site: [4096, D]}
    # Or once to disk, then many SAE sweeps read it back: interp/data/cache.py.

Legend: B batch, T positions, D activation width, N kept rows (tokens), C buffer capacity,
R rows per on-disk chunk.

Which positions are kept. Padding (mask 0) is never a real token. The BOS token (and, with
`skip_first`, the first real position of every row) is dropped as well: its residual stream
is an attention sink whose norm is often tens of times that of other tokens and nearly constant
across sequences, so a handful of such rows dominate an SAE's reconstruction loss and its
input scaling while carrying no information. All sites of one harvest keep the same
positions, so row i of every site is the same token.

Why shuffle. Consecutive tokens of one sequence have strongly correlated activations (the
residual stream changes slowly along a sequence, and a document's topic persists), so an SAE
trained on batches of whole sequences sees a handful of contexts per step: gradients are
biased, latents specialise to recent documents and die or over-fire (SAELens and sparsify
both shuffle through a large token buffer for this reason). `ShuffleBuffer` mixes the live
stream; the cache's `batches` mixes on read.

The on-disk cache (`write_cache`, `ActivationCache`) is in `interp/data/cache.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from interp import parallel
from interp.models import hooks
from interp.models import sites as sites_lib

Batch = Mapping[str, np.ndarray]

# ----------------------------------------------------------------------------- harvesting


def keep_mask(
    tokens: np.ndarray,
    attention_mask: np.ndarray | None = None,
    *,
    bos_id: int | None = None,
    skip_first: bool = False,
    exclude_ids: Sequence[int] = (),
) -> np.ndarray:
    """Which positions SAEs see: real tokens that are not BOS, (optionally) first or excluded.

    The one definition shared by `harvest` (so SAE training) and `interp.sae.evaluate`
    (reconstruction metrics and where the SAE is spliced in), so an SAE is scored on the
    positions it was trained on (SAELens and SAEBench exclude special tokens likewise).

    Args:
      tokens: [B, T] int token ids.
      attention_mask: [B, T], 1 for real tokens, 0 for padding; None means all real.
      bos_id: Drop every position holding this token (packed rows may hold several; where
        BOS and EOS are one token, as in GPT-2, the document separators go too).
      skip_first: Drop each row's first real token (position 0 in the model's counting, so
        the first non-padding column under left padding). For models that always attend from
        position 0 like a BOS even without one.
      exclude_ids: Drop every position holding one of these tokens (other special tokens).

    Returns:
      bool [B, T].
    """
    tokens = np.asarray(tokens)
    real = (
        np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    )
    keep = real.copy()
    if bos_id is not None:
        keep &= tokens != bos_id
    if len(exclude_ids):
        keep &= ~np.isin(tokens, np.asarray(list(exclude_ids), tokens.dtype))
    if skip_first:
        keep &= np.cumsum(real, axis=1) > 1
    return keep


def padding_from_ids(
    tokens: np.ndarray, pad_id: int, *, text_ids: Sequence[int | None] = ()
) -> np.ndarray:
    """An attention mask [B, T] for rows padded with `pad_id` and no mask of their own.

    Only the leading and trailing runs of `pad_id` are padding: the same id inside the text
    (an EOS that doubles as padding, as in GPT-2 and Llama) is a real token. A row whose real
    text ends (or starts) with that id cannot be told apart from padding; pass the tokenizer's
    attention mask for such rows (`Tokenizer.encode_batch` gives it). So `pad_id` must be a
    token no text holds at its ends: a dedicated pad token.

    Args:
      tokens: [B, T] int token ids.
      pad_id: The padding token.
      text_ids: Tokens real text holds at its ends (the BOS every row starts with): a
        `pad_id` among them is an error, not a guess (None entries are ignored).

    Raises:
      ValueError: `pad_id` is one of `text_ids` (tokenizers that use one id for BOS, EOS and
        padding, as the demo's and GPT-2's do): the ids cannot say what is padding.
    """
    if pad_id in {int(i) for i in text_ids if i is not None}:
        raise ValueError(
            f"pad_id={pad_id} is also a token of the text (the BOS, bos_id={pad_id}): a row's "
            "leading BOS cannot be told from padding by its id, and would be masked out of "
            "attention. Pass each batch as (tokens, attention_mask) or {'tokens', "
            "'attention_mask'} (Tokenizer.encode_batch gives both), or leave pad_id None for "
            "rows without padding (packed rows)."
        )
    is_pad = np.asarray(tokens) == pad_id
    leading = np.cumprod(is_pad, axis=1).astype(bool)
    trailing = np.cumprod(is_pad[:, ::-1], axis=1)[:, ::-1].astype(bool)
    return (~(leading | trailing)).astype(np.int32)


def split_batch(
    item, pad_id: int | None = None, *, text_ids: Sequence[int | None] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, T], attention_mask int32 [B, T]) of a batch given as a [B, T] array,
    a (tokens, mask) tuple or a {'tokens', 'attention_mask' (or 'mask')} dict.

    Without a mask, every position is real, or with `pad_id` the leading and trailing runs of
    it are padding (`padding_from_ids`, which refuses a `pad_id` among `text_ids`).

    Raises:
      ValueError: for tokens that are not [B, T], or a mask of another shape; as
        `padding_from_ids` raises.
    """
    if isinstance(item, Mapping):
        tokens = item["tokens"]
        mask = item.get("attention_mask", item.get("mask"))
    elif isinstance(item, tuple):
        tokens, mask = item
    else:
        tokens, mask = item, None
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"Token batches must be [B, T]; got shape {tokens.shape}.")
    if mask is None:
        mask = (
            np.ones(tokens.shape, np.int32)
            if pad_id is None
            else padding_from_ids(tokens, pad_id, text_ids=text_ids)
        )
    mask = np.asarray(mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {mask.shape} does not match tokens {tokens.shape}.")
    return tokens.astype(np.int32), mask.astype(np.int32)


def harvest(
    model: nn.Module,
    params: Any,
    token_batches: Iterable[Any],
    sites: str | Sequence[str],
    *,
    bos_id: int | None = None,
    pad_id: int | None = None,
    skip_first: bool = False,
    exclude_ids: Sequence[int] = (),
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: parallel.Rules = parallel.DEFAULT_RULES,
) -> Iterator[dict[str, np.ndarray]]:
    """Runs the model over token batches and yields the activations of the kept positions.

    The forward pass is one jitted `hooks.run_with_hooks` (compiled once per batch shape);
    only the captured sites are outputs, so XLA drops the layers after the last site and the
    unembedding. Rows are in row-major (batch, position) order of the kept positions.

    Args:
      model: A `Transformer` (any module with `HookPoint`s).
      params: Its parameters.
      token_batches: Iterable of [B, T] int arrays, of (tokens, attention_mask) pairs, or of
        {'tokens': ..., 'attention_mask': ...} dicts. The mask also goes to the model, so
        padded keys are not attended to.
      sites: Hook names or patterns (`blocks_*/resid_post`, or TransformerLens names); each
        site gives its per-token rows of `interp.models.sites.to_rows` (so `attn/z` gives
        [N, heads * head_dim], heads side by side, the layout SAEs are evaluated and spliced
        in with).
      bos_id: Drop positions holding this token (see the module docstring for why).
      pad_id: For items without a mask: leading and trailing runs of this token are padding
        (`padding_from_ids`; the same id inside the text is kept). Ignored when a mask is
        given. A `pad_id` equal to `bos_id` is an error for items without a mask (a leading
        BOS would read as padding): pass masks, or no `pad_id` for unpadded rows.
      skip_first: Also drop each row's first real position.
      exclude_ids: Also drop positions holding these tokens (see `keep_mask`).
      dtype: Dtype of the yielded rows (cast on device, before the transfer).
      mesh: Optional mesh: the forward pass runs with params and batches sharded by `rules`
        (`parallel.sharded_jit`); results are gathered to every process.
      rules: Logical-axis rules for `mesh`.

    Yields:
      {site: [N, D] of `dtype`}, one dict per token batch; N = `keep_mask(...).sum()`.
    """
    names = hooks.resolve(model, [sites] if isinstance(sites, str) else list(sites))

    def run(params, tokens, mask):
        _, acts = hooks.run_with_hooks(model, params, tokens, capture=names, attention_mask=mask)
        return {name: sites_lib.to_rows(name, acts[name]).astype(dtype) for name in names}

    if mesh is None:
        forward = jax.jit(run)
    else:
        shardings = parallel.param_shardings(model, mesh, rules)
        forward = parallel.sharded_jit(run, mesh, rules, params_sharding=shardings)

    def rows(tokens, keep, acts):
        acts = parallel.process_allgather(acts) if mesh is not None else jax.device_get(acts)
        out = {}
        for name in names:
            out[name] = np.asarray(acts[name])[keep]  # [N, D]
        return out

    pending = None  # The previous batch: its transfer waits until the next one is dispatched.
    for item in token_batches:
        tokens, mask = split_batch(item, pad_id, text_ids=(bos_id,))
        keep = keep_mask(
            tokens, mask, bos_id=bos_id, skip_first=skip_first, exclude_ids=exclude_ids
        )
        acts = forward(params, tokens, mask)  # Asynchronous dispatch.
        if pending is not None:
            yield rows(*pending)
        pending = (tokens, keep, acts)
    if pending is not None:
        yield rows(*pending)


# ----------------------------------------------------------------------------- scaling


def sum_squared_norms(x: np.ndarray) -> float:
    """Sum over rows of squared L2 norms: per row in float32, across rows in float64."""
    x = np.asarray(x)
    x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    return float(np.einsum("nd,nd->n", x, x).sum(dtype=np.float64))


def mean_squared_norm(x: np.ndarray | jax.Array) -> float:
    """Mean over rows of the squared L2 norm (rows in float32, the mean in float64). x: [N, D]."""
    return sum_squared_norms(x) / max(1, int(np.prod(np.shape(x)[:-1])))


def unit_norm_scale(mean_sq_norm: float) -> float:
    """The factor s with E[||s x||^2] = 1: 1 / sqrt(mean squared norm).

    Scaling SAE inputs to unit mean squared norm makes one L1 coefficient / learning rate
    work across layers and models (Anthropic's April 2024 update scales to sqrt(D) instead,
    a constant factor away). The SAE keeps it as `SAEConfig.input_scale`.
    """
    if not mean_sq_norm > 0:
        raise ValueError(f"mean squared norm must be positive, got {mean_sq_norm}.")
    return float(1.0 / math.sqrt(mean_sq_norm))


# ----------------------------------------------------------------------------- shuffling


class ShuffleBuffer:
    """Mixes activation rows from many sequences before they reach the SAE.

    Holds up to `capacity` rows of every key (sites, or anything else row-aligned such as
    token ids), in aligned arrays. `get(B)` first refills the buffer to capacity from the
    stream whenever it is less than `min_fill` full (at the first call too), then draws B
    rows uniformly at random without replacement and removes them; rows from the end fill
    the holes. So every streamed row is returned at most once (exactly once if the stream is
    drained), and each batch is a random sample of at least `min_fill * capacity` rows taken
    from the C / T most recent sequences: the SAELens / sparsify pattern (see the module
    docstring for why it matters). Given the seed and the stream, the output is
    deterministic.

    When the stream ends, the buffer is drained; `get` raises StopIteration once fewer than
    B rows remain (those are dropped). `iterate(B)` is the same as a generator.
    """

    def __init__(
        self,
        source: Iterable[Batch],
        capacity: int,
        *,
        seed: int = 0,
        min_fill: float = 0.5,
    ):
        """Wraps a stream.

        Args:
          source: Iterable of {key: [n, ...]} with the same keys (and trailing shapes) in every
            item, e.g. `harvest(...)`. Items of any size (also larger than capacity) work.
          capacity: C, rows held.
          seed: Seed of the draws.
          min_fill: Refill when fewer than this fraction of C rows remain, in (0, 1].
        """
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}.")
        if not 0 < min_fill <= 1:
            raise ValueError(f"min_fill must be in (0, 1], got {min_fill}.")
        self.capacity = capacity
        self.min_fill = min_fill
        self._source = iter(source)
        self._rng = np.random.default_rng(seed)
        self._storage: dict[str, np.ndarray] | None = None
        self._count = 0
        self._pending: dict[str, np.ndarray] | None = None  # Rows taken but not yet stored.
        self._exhausted = False

    def __len__(self) -> int:
        """Rows in the buffer now."""
        return self._count

    def _next_item(self) -> dict[str, np.ndarray] | None:
        try:
            item = {key: np.asarray(value) for key, value in next(self._source).items()}
        except StopIteration:
            self._exhausted = True
            return None
        sizes = {len(value) for value in item.values()}
        if len(sizes) != 1:
            raise ValueError(f"Stream item has keys of different row counts: {sizes}.")
        if self._storage is None:
            self._storage = {
                key: np.empty((self.capacity, *value.shape[1:]), value.dtype)
                for key, value in item.items()
            }
        elif item.keys() != self._storage.keys():
            raise ValueError(f"Stream keys changed: {sorted(self._storage)} -> {sorted(item)}.")
        return item

    def _fill(self) -> None:
        while self._count < self.capacity:
            if self._pending is None:
                self._pending = self._next_item()
                if self._pending is None:
                    return
            n = len(next(iter(self._pending.values())))
            take = min(n, self.capacity - self._count)
            for key, value in self._pending.items():
                self._storage[key][self._count : self._count + take] = value[:take]
            self._count += take
            self._pending = None if take == n else {k: v[take:] for k, v in self._pending.items()}

    def get(self, batch_size: int) -> dict[str, np.ndarray]:
        """A random batch {key: [batch_size, ...]}; raises StopIteration when drained."""
        if not 1 <= batch_size <= self.capacity:
            raise ValueError(f"batch_size must be in [1, capacity={self.capacity}].")
        if not self._exhausted and self._count < max(batch_size, self.min_fill * self.capacity):
            self._fill()
        if self._count < batch_size:
            raise StopIteration
        count, remaining = self._count, self._count - batch_size
        chosen = self._rng.choice(count, batch_size, replace=False)
        holes = chosen[chosen < remaining]  # Freed slots below the new end ...
        movers = np.setdiff1d(np.arange(remaining, count), chosen, assume_unique=True)  # ... fed
        out = {}
        for key, storage in self._storage.items():
            out[key] = storage[chosen]
            storage[holes] = storage[movers]
        self._count = remaining
        return out

    def iterate(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """`get(batch_size)` until the stream and buffer are drained."""
        while True:
            try:
                yield self.get(batch_size)
            except StopIteration:
                return


# ----------------------------------------------------------------------------- SAE sites


@dataclasses.dataclass(frozen=True)
class SaeSite:
    """Where an SAE reads (`input`) and writes (`output`; the same site unless a
    transcoder), and which head of a head-shaped site each end uses (None: all heads side
    by side). Names are resolved hook names (ours)."""

    input: str
    output: str
    head_index: int | None = None
    output_head_index: int | None = None

    @property
    def name(self) -> str:
        """The site the SAE reads (`input`)."""
        return self.input


def _one_site(model: nn.Module, name: str, what: str) -> str:
    names = hooks.resolve(model, [name])
    if len(names) != 1:
        raise ValueError(f"{what} {name!r} matches {len(names)} hook points {names}; name one.")
    return names[0]


def check_sae_site(
    sae: Any,
    site: str | None,
    *,
    model: nn.Module | None = None,
    allow_other_site: bool = False,
    end: str = "input",
) -> None:
    """Refuses an SAE used at a site other than its own: the one check of "this SAE at this
    site" for every consumer (steering, feature statistics, search and logit effects,
    influence's feature queries, evaluation).

    An SAE's features are directions in the activations it was trained on; at another site
    of the same width they run without complaint and mean nothing. Names are compared as
    sites, so TransformerLens's spelling of the SAE's own site is the same site.

    Args:
      sae: An SAE module with a `config` (hook_name; a transcoder's output_hook_name), used
        only through its config; one that names no site is not checked.
      site: Where it is used (ours or TransformerLens's name); None or '' checks nothing.
      model: The model, when at hand: names whose site depends on it (hook_mlp_in) are
        compared exactly.
      allow_other_site: Use it there anyway (e.g. a site that holds the same activations
        under another name, or an experiment on purpose).
      end: 'input', the site the SAE reads, or 'output', the one it writes (a transcoder's
        output site, else its input).

    Raises:
      ValueError: naming both sites and the override.
    """
    config = getattr(sae, "config", None)
    own = getattr(config, "hook_name", None)
    if end == "output":
        own = getattr(config, "output_hook_name", None) or own
    if not site or not own or allow_other_site:
        return
    if sites_lib.same_site(site, own, getattr(model, "config", None)):
        return
    what = "writes" if end == "output" and own != getattr(config, "hook_name", None) else "reads"
    raise ValueError(
        f"This SAE was trained on {own!r} (the site it {what}) but is used at {site!r}; its "
        "features mean nothing at another site, even one of the same width. Use the SAE's "
        f"own site, or pass allow_other_site=True if {site!r} holds the same activations."
    )


def resolve_sae_site(
    model: nn.Module,
    sae: nn.Module,
    site: str | None = None,
    head_index: int | None = None,
    *,
    allow_other_site: bool = False,
) -> SaeSite:
    """The site an SAE reads and writes, checked against the model: the one definition for
    evaluation, feature analysis and steering.

    Args:
      model: A `Transformer`.
      sae: An SAE module with a `config` (hook_name, hook_head_index, output_hook_name,
        d_in, output_width); used only through its config, so this layer needs no SAE code.
      site: A hook name (ours or TransformerLens's) overriding the config's: another site
        than the config's is refused unless `allow_other_site` (`check_sae_site`).
      head_index: A head overriding the config's.
      allow_other_site: Accept a `site` other than the SAE's own.

    Raises:
      ValueError: when no site is known, a name matches no or several hook points, `site`
        is not the SAE's own (see `allow_other_site`), a transcoder's output comes before
        its input, or the SAE's widths do not match the sites' rows (naming both, and the
        head-index hint for head-shaped sites).
    """
    config = sae.config
    site = site or getattr(config, "hook_name", None)
    if site is None:
        raise ValueError(
            "This SAE's config names no hook site (hook_name); pass site=, e.g. "
            "'blocks_1/resid_post'."
        )
    head_index = getattr(config, "hook_head_index", None) if head_index is None else head_index
    name = _one_site(model, site, "SAE site")
    check_sae_site(sae, name, model=model, allow_other_site=allow_other_site)
    resolved = SaeSite(name, name, head_index, head_index)
    if getattr(config, "is_transcoder", False):
        if not config.output_hook_name:
            raise ValueError(
                "This transcoder's config names no output site (output_hook_name, SAELens's "
                "hook_name_out); set it to the site its output replaces."
            )
        output = _one_site(model, config.output_hook_name, "Transcoder output site")
        order = hooks.hook_names(model)
        if order.index(output) <= order.index(name):
            raise ValueError(
                f"This transcoder writes {output!r}, which the forward pass reaches before "
                f"(or at) its input {name!r}; a transcoder's output site comes after its input."
            )
        resolved = SaeSite(name, output, head_index, None)  # It writes the whole output site.
    wanted = {"input": config.d_in, "output": getattr(config, "output_width", config.d_in)}
    for end, width in _row_widths(model, resolved).items():
        if width != wanted[end]:
            where = getattr(resolved, end)
            hint = ""
            if head_index is None and "attn/" in where:
                hint = " (a per-head SAE needs head_index / SAELens's hook_head_index)"
            raise ValueError(
                f"This SAE's {end} is {wanted[end]} wide, but site {where!r} gives rows of "
                f"width {width} (head_index={head_index}){hint}; is it the site the SAE was "
                "trained on?"
            )
    return resolved


def _row_widths(model: nn.Module, site: SaeSite) -> dict[str, int]:
    """{'input': width, 'output': width} of the site's rows, from shapes alone."""
    if sites_lib.is_pattern(site.input) or sites_lib.is_pattern(site.output):
        return {}  # Pattern rows are as wide as the sequence is long: checked when run.
    ends = {"input": site.input, "output": site.output}
    heads = {"input": site.head_index, "output": site.output_head_index}

    def rows(tokens):
        params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
        _, acts = hooks.run_with_hooks(model, params, tokens, capture=sorted(set(ends.values())))
        return {end: sites_lib.to_rows(name, acts[name], heads[end]) for end, name in ends.items()}

    shapes = jax.eval_shape(rows, jax.ShapeDtypeStruct((1, 2), jnp.int32))
    return {end: value.shape[-1] for end, value in shapes.items()}
