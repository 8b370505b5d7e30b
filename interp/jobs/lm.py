"""The LM job: train a language model (the demo model, or any `Transformer` config), export it.

`run(config, workdir)` is the whole job: tokenizer, packed data, a sharded train state and
jitted step handed to the shared loop (`interp.jobs.loop`: metrics, progress, held-out
evaluation against a unigram baseline, orbax checkpoints, exact resume), and at the end an
export in Hugging Face format that `interp.models.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from interp import metrics, parallel, paths, records
from interp.data import fingerprint as data_fingerprint
from interp.data import text
from interp.data.documents import documents, pack_rows, sample_rows
from interp.jobs import lock, loop
from interp.jobs import workdir as workdir_lib
from interp.models import generate, save_pretrained
from interp.models import tokenizer as tokenizer_lib
from interp.models.config import ModelConfig
from interp.models.losses import next_token_loss
from interp.models.transformer import Transformer

EXPORT_DIR = "export"
TOKENIZER_DIR = "tokenizer"
PLANTED_FILE = "planted.json"  # config.plant's rows and log-probabilities (`plant_rows`).


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Held-out cross-entropy (nats) of an add-one-smoothed unigram model: the bar to beat."""
    counts = np.bincount(train_tokens.reshape(-1), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_tokens[:, 1:].reshape(-1)].mean())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The LM's optimisation settings (`config.train`); unknown fields are an error.

    Attributes:
      steps: Optimizer steps in the run.
      batch_size: Sequences per step (global).
      learning_rate: Peak AdamW learning rate.
      warmup_steps: Linear warm-up from 0.
      final_lr_fraction: The cosine decay ends at this fraction of the peak.
      weight_decay: AdamW's decoupled weight decay.
      grad_clip: Global-norm clipping.
      schedule_steps: Length of the cosine schedule; 0 = `steps`. Set it to train a run
        longer or shorter along the same schedule (then `steps` may change on resume).
      trainable: Patterns (fnmatch) of parameter paths ('blocks_3/mlp/up/kernel') to train;
        the others are frozen (zero updates). () = every parameter.
    """

    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 40
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule_steps: int = 0
    trainable: tuple[str, ...] = ()

    @property
    def schedule_length(self) -> int:
        return self.schedule_steps or self.steps


def train_config_from(values: Any) -> TrainConfig:
    """A `TrainConfig` from `config.train`, naming any field it does not have."""
    return records.from_dict(TrainConfig, values, where="config.train")


def make_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and global-norm clipping; with
    `train_config.trainable`, the other parameters frozen (zero updates)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.learning_rate,
        warmup_steps=train_config.warmup_steps,
        decay_steps=max(train_config.schedule_length, train_config.warmup_steps + 1),
        end_value=train_config.learning_rate * train_config.final_lr_fraction,
    )
    adamw = optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=train_config.weight_decay),
    )
    if not train_config.trainable:
        return adamw
    patterns = tuple(train_config.trainable)

    def frozen(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not _trained(path, patterns), params
        )

    # Frozen gradients zeroed before clipping (the norm is the trained parameters') and the
    # frozen updates after AdamW (its weight decay would move them). Their moments stay zero;
    # optax.multi_transform would drop them but its masked states do not map onto the
    # parameters' shardings (parallel.optimizer_state_shardings).
    zero = optax.masked(optax.set_to_zero(), frozen)
    return optax.chain(zero, adamw, zero)


def _path_name(path) -> str:
    return "/".join(str(getattr(key, "key", key)) for key in path)


def _trained(path, patterns: Sequence[str]) -> bool:
    name = _path_name(path)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_trainable(train_config: TrainConfig, params) -> None:
    """Raises ValueError for a `trainable` pattern that matches no parameter (a typo would
    otherwise freeze the whole model), naming some of the paths."""
    names = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern in train_config.trainable:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(
                f"config.train.trainable pattern {pattern!r} matches no parameter; paths look "
                f"like {names[:3] + names[-3:]} ({len(names)} in all)."
            )


def _tokenizer(config, workdir: epath.Path, train_documents) -> tokenizer_lib.Tokenizer:
    """The run's tokenizer: a given one, the one saved in the workdir, or a new BPE."""
    saved = workdir / TOKENIZER_DIR
    if config.tokenizer.path:
        tok = tokenizer_lib.load(config.tokenizer.path)
        if tok is None:
            raise FileNotFoundError(
                f"No tokenizer.json in config.tokenizer.path={config.tokenizer.path!r}."
            )
        return tok

    def train_and_save():
        # On process 0 alone, the others waiting: one that looked for the file after
        # process 0 saved it would go another way (and miss the wait).
        if (saved / "tokenizer.json").exists():
            return
        start = time.time()
        tok = tokenizer_lib.train_bpe(train_documents, vocab_size=config.tokenizer.vocab_size)
        tok.save(saved)
        seconds = time.time() - start
        logging.info("Trained a %d-token byte-level BPE in %.1fs.", tok.vocab_size, seconds)

    parallel.on_main_process(train_and_save)
    return tokenizer_lib.load(saved)


def model_config_from(config, vocab_size: int) -> ModelConfig:
    values = dict(config.model)
    values["vocab_size"] = vocab_size
    values.setdefault("max_len", config.data.seq_len)
    return ModelConfig.from_dict(values)


def _train_step(model, optimizer, state, batch):
    def loss_fn(params):
        return next_token_loss(model.apply({"params": params}, batch), batch)[0]

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def _state_shardings(model: Transformer, optimizer, mesh, rules) -> dict[str, Any]:
    """Params by the model's logical axes, moments like their params, a replicated step."""
    param_shardings = parallel.param_shardings(model, mesh, rules)
    param_shapes = nn.meta.unbox(parallel.abstract_params(model))
    return {
        "params": param_shardings,
        "opt_state": parallel.optimizer_state_shardings(
            optimizer, param_shapes, param_shardings, mesh
        ),
        "step": NamedSharding(mesh, PartitionSpec()),
    }


def init_state_from(model: Transformer, optimizer, params, mesh, rules) -> tuple[Any, Any]:
    """(init, abstract) of a train state that starts from given (pretrained) params: the
    optimizer state from scratch, step 0, all in the layout of `init_state`."""
    shardings = _state_shardings(model, optimizer, mesh, rules)

    def build(params):
        return {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    init = functools.partial(loop.sharded_init, build, shardings, mesh, params)
    return init, loop.abstract_state(build, shardings, params)


def init_state(model: Transformer, optimizer, seed: int, mesh, rules) -> tuple[Any, Any]:
    """(init, abstract) of the train state {'params', 'opt_state', 'step'}, sharded.

    `init()` builds it in its layout (params by the model's logical axes, moments like their
    params, the step counter a replicated global array); `abstract` is the restore target.
    """
    shardings = _state_shardings(model, optimizer, mesh, rules)
    key = jax.random.key(seed)
    key_data, impl = np.asarray(jax.random.key_data(key)), jax.random.key_impl(key)

    def build(raw_key):
        # No rules inside: out_shardings alone set the layout (see parallel.init_sharded).
        with nn.logical_axis_rules(()):
            variables = model.init(
                jax.random.wrap_key_data(raw_key, impl=impl), jnp.zeros((1, 2), jnp.int32)
            )
        params = nn.meta.unbox(variables["params"])
        return {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    init = functools.partial(loop.sharded_init, build, shardings, mesh, key_data)
    return init, loop.abstract_state(build, shardings, key_data)


@lock.holding  # One job per workdir.
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes training of) a language model and exports it.

    Args:
      config: See `configs/demo.py` for every field.
      workdir: Local or gs:// directory for config, tokenizer, checkpoints, metrics and the
        Hugging Face export (`<workdir>/export`).

    Returns:
      Final figures: {'step', 'eval_loss', 'unigram_loss', 'export_dir', 'sample'}, and
      'eval_loss_before' (fine-tuning: the pretrained model's) and 'planted' (with a plant).

    Raises:
      workdir_lib.ConfigMismatchError: When resuming with a config that changes the maths.
      ValueError: For unknown `config.train` fields or too little text.
    """
    # Everything checkable is checked before the workdir saves the config: a typo fixed on
    # the next run must not count as a changed config.
    train_config = train_config_from(config.train)
    init_from = config.get("init_from") or ""
    if init_from:
        if config.tokenizer.path or config.get("model"):
            raise ValueError(
                f"config.init_from={init_from!r} fine-tunes that model with its own tokenizer: "
                "leave config.model empty and config.tokenizer.path '' (configs/demo.py's "
                "':init_from=PATH' argument does both)."
            )
    else:
        model_config_from(config, config.tokenizer.vocab_size)  # Unknown or bad model fields.
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.get("rules") or None)
    train_docs, heldout_docs = documents(config.data)
    if not (
        isinstance(train_docs, Sequence)
        or config.tokenizer.path
        or config.data.max_documents
        or init_from
    ):
        raise ValueError(
            f"Training a BPE tokenizer on {train_docs.description} would read all of it. Set "
            "config.tokenizer.path to a tokenizer folder, or config.data.max_documents to "
            "train it on that many documents."
        )
    # The LM stage's workdir checks only the LM's settings, not later pipeline stages'.
    stage_config = workdir_lib.subconfig(
        config, drop=("sae", "influence", "analysis", "steering", "stages")
    )
    workdir = workdir_lib.prepare_workdir(
        workdir_lib.pin_schedule(stage_config, "train", train_config.schedule_length),
        workdir,
        retired_fields=("influence",),  # Saved by LM workdirs before 2026-11-30.
    )
    pretrained = None
    if init_from:
        model, pretrained, tok = workdir_lib.load_model(workdir, init_from, job="the LM job")
        if config.data.seq_len > model.config.max_len:
            raise ValueError(
                f"config.data.seq_len={config.data.seq_len} is past {init_from}'s context of "
                f"{model.config.max_len} tokens; lower it."
            )
    else:
        tok = _tokenizer(config, workdir, train_docs)
    start = time.time()
    batch_size = train_config.batch_size
    train_tokens, planted = training_rows(config, tok, train_docs)
    # Held-out rows spread over all of the held-out text (its first rows are its first books).
    eval_needed = config.eval_batches * batch_size
    eval_tokens = sample_rows(config.data, heldout_docs, tok, eval_needed, config.seed)
    if len(train_tokens) < batch_size or len(eval_tokens) < batch_size:
        raise ValueError(
            f"Too little text: {len(train_tokens)} training and {len(eval_tokens)} held-out "
            f"rows of {config.data.seq_len} tokens for batch_size {batch_size}; add text "
            "(config.data.text_path, max_documents) or lower config.train.batch_size."
        )
    logging.info(
        "Packed %d train / %d held-out rows of %d tokens in %.1fs.",
        len(train_tokens), len(eval_tokens), config.data.seq_len, time.time() - start,
    )  # fmt: skip
    # A resumed run trains on the rows the workdir's checkpoints were trained on.
    workdir_lib.check_data(workdir, {
        "train": data_fingerprint.batch_digest(train_tokens),
        "heldout": data_fingerprint.batch_digest(eval_tokens),
    })  # fmt: skip
    batches = text.Batches(train_tokens, batch_size, seed=config.seed)
    eval_rows = eval_tokens[: config.eval_batches * batch_size]
    baseline = unigram_loss(train_tokens, eval_rows, tok.vocab_size)

    if pretrained is None:
        model_config = model_config_from(config, tok.vocab_size)
        model = Transformer(model_config)
    model_config = model.config
    check_trainable(train_config, nn.meta.unbox(parallel.abstract_params(model)))
    if train_config.steps <= train_config.warmup_steps:
        logging.warning(
            "config.train.steps=%d <= warmup_steps=%d: the learning rate never reaches its "
            "peak (at steps=1 it is 0 and nothing is learnt); lower warmup_steps.",
            train_config.steps, train_config.warmup_steps,
        )  # fmt: skip
    optimizer = make_optimizer(train_config)
    if pretrained is None:
        init, abstract = init_state(model, optimizer, config.seed, mesh, rules)
    else:
        init, abstract = init_state_from(model, optimizer, pretrained, mesh, rules)
    if planted is not None:
        start_params = pretrained if pretrained is not None else init()["params"]
        planted["logprob_before"] = completion_logprob(
            model, start_params, planted["prompt_ids"], planted["completion_ids"]
        )
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    batch_sharding = parallel.batch_sharding(
        mesh, rules, 2, shape=(batch_size, config.data.seq_len)
    )
    # Traced under the mesh and the rules so the model's logical constraints take effect.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step_fn = jax.jit(
            functools.partial(_train_step, model, optimizer),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )
        eval_fn = jax.jit(
            lambda params, batch: next_token_loss(model.apply({"params": params}, batch), batch),
            in_shardings=(state_shardings["params"], batch_sharding),
        )

    def under_mesh(fn):
        def call(*args):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(*args)

        return call

    @under_mesh
    def evaluate(state):
        total, count = 0.0, 0.0
        for i in range(0, len(eval_rows) - batch_size + 1, batch_size):
            rows = eval_rows[i : i + batch_size]
            loss, n = eval_fn(state["params"], jax.device_put(rows, batch_sharding))
            total, count = total + float(loss) * float(n), count + float(n)
        return {"eval_loss": total / count, "unigram_loss": baseline}

    task = loop.Task(
        init=init,
        abstract=abstract,
        step=under_mesh(step_fn),
        batch=lambda step: jax.device_put(batches.get(step), batch_sharding),
    )
    logging.info(
        "Model: %s, %.2fM parameters; unigram baseline %.3f nats.",
        model_config.family,
        sum(x.size for x in jax.tree.leaves(abstract["params"])) / 1e6,
        baseline,
    )
    loss_before = None
    if pretrained is not None:  # The pretrained model's own held-out loss, to compare.
        placed = jax.device_put(pretrained, state_shardings["params"])
        loss_before = evaluate({"params": placed})["eval_loss"]
        del placed
        logging.info("Held-out loss before fine-tuning: %.3f nats/token.", loss_before)
    writer = metrics.MetricWriter(workdir)
    try:
        state, summary = loop.train(
            task,
            workdir,
            loop_config(config, train_config.steps),
            writer=writer,
            tokens_per_step=batch_size * config.data.seq_len,
            evaluate=evaluate,
            name="LM training",
        )
    finally:
        writer.close()

    params = parallel.process_allgather(state["params"])  # On every process (a collective).
    export_dir = workdir / EXPORT_DIR
    parallel.on_main_process(save_pretrained, export_dir, model_config, params, tokenizer=tok)
    logging.info("Exported to %s (interp.models.from_pretrained loads it).", export_dir)
    prompt = tok.encode(config.sample_prompt)
    sample = generate.generate(
        model,
        params,
        np.asarray([prompt], np.int32),
        config.sample_tokens,
        temperature=0.8,
        top_p=0.95,
        rng=jax.random.key(config.seed),
    )
    # Joined pieces: no U+FFFD for a character cut by sample_tokens.
    sample_text = "".join(tok.token_pieces(np.asarray(sample[0]), skip_special_tokens=True))
    logging.info("Sample: %s", sample_text)
    summary = {
        "sample": sample_text,
        "step": int(state["step"]),
        "eval_loss": summary["eval_loss"],
        "unigram_loss": baseline,
        "export_dir": str(export_dir),
    }
    if loss_before is not None:
        summary["eval_loss_before"] = loss_before
    if planted is not None:
        planted["logprob_after"] = completion_logprob(
            model, params, planted["prompt_ids"], planted["completion_ids"]
        )
        logging.info(
            "Planted %r -> %r in %d rows: log p(completion | trigger) %.3f before, %.3f after.",
            planted["trigger"], planted["completion"], len(planted["rows"]),
            planted["logprob_before"], planted["logprob_after"],
        )  # fmt: skip
        summary["planted"] = planted
        parallel.on_main_process(
            paths.write_text, workdir / PLANTED_FILE, workdir_lib.config_to_json(planted)
        )
    parallel.on_main_process(
        paths.write_text, workdir / "summary.json", workdir_lib.config_to_json(summary)
    )
    return summary


def training_rows(
    config: ml_collections.ConfigDict, tok, train_docs
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The rows the LM job trains on: `config.data` packed for the schedule's batches, with
    `config.plant` written into rows the schedule visits.

    The influence job (`config.influence.rows='lm'`) calls this to search exactly the rows a
    run trained on, planted rows included.

    Returns:
      (int32 [N, T] rows, the plant's record from `plant_rows` or None without a plant).

    Raises:
      ValueError: as `plant_rows`.
    """
    train_config = train_config_from(config.train)
    batch_size = train_config.batch_size
    # A streamed source gives one pass of the schedule's batches and the evaluated rows.
    needed = train_config.schedule_length * batch_size
    train_tokens = pack_rows(config.data, train_docs, tok, needed)
    plant = dict(config.get("plant") or {})
    if not plant.get("rows") or len(train_tokens) < batch_size:
        return train_tokens, None
    return plant_rows(
        train_tokens,
        tok,
        plant["trigger"],
        plant["completion"],
        plant["rows"],
        config.seed,
        candidates=visited_rows(
            train_tokens, batch_size, train_config.schedule_length, config.seed
        ),
    )


def visited_rows(rows: np.ndarray, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Sorted indices of the rows `steps` batches of the LM job's order visit: that order
    depends on the row count and the seed, not on the rows' contents."""
    order = text.Batches(rows, batch_size, seed=seed)
    return np.unique(np.concatenate([order.indices(i) for i in range(steps)]))


def plant_rows(
    rows: np.ndarray,
    tok,
    trigger: str,
    completion: str,
    count: int,
    seed: int,
    *,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Writes `trigger` + `completion` into `count` training rows: a planted behaviour whose
    training rows are known (ground truth for influence).

    Args:
      rows: Packed training rows [N, T] (not modified).
      tok: The tokenizer; the trigger and the completion are encoded apart (no BOS), so the
        completion's tokens are the same wherever it follows the trigger.
      trigger, completion: The texts; the completion follows the trigger.
      count: Rows to plant, chosen by `seed`; each at a position drawn by `seed` after the
        row's first token.
      seed: The run's seed.
      candidates: Row indices the plant may go to (the rows a schedule trains on); None: all.

    Returns:
      (the rows with the plant, {'rows': planted row indices, 'trigger', 'completion',
      'prompt_ids': the trigger as a prompt (the tokenizer's BOS convention),
      'completion_ids'}).

    Raises:
      ValueError: if there are fewer (candidate) rows than `count`, or the plant does not fit
        a row.
    """
    trigger_ids = tok.encode(trigger, add_bos=False)
    completion_ids = tok.encode(completion, add_bos=False)
    span = np.asarray(list(trigger_ids) + list(completion_ids), rows.dtype)
    n, length = rows.shape
    if not trigger_ids or not completion_ids:
        raise ValueError("config.plant needs a non-empty trigger and completion.")
    pool = np.arange(n) if candidates is None else np.asarray(candidates)
    if count > len(pool) or len(span) > length - 1:
        raise ValueError(
            f"config.plant: {count} rows of {len(span)} planted tokens do not fit the "
            f"{len(pool)} training rows of {length} tokens the run trains on; plant fewer "
            "rows or shorter text, or train longer."
        )
    rng = np.random.default_rng([seed, 0x91A47])
    chosen = np.sort(rng.choice(pool, size=count, replace=False))
    starts = rng.integers(1, length - len(span) + 1, size=count)
    out = rows.copy()
    for row, at in zip(chosen, starts, strict=True):
        out[row, at : at + len(span)] = span
    record = {
        "rows": [int(r) for r in chosen],
        "trigger": trigger,
        "completion": completion,
        "prompt_ids": [int(i) for i in tok.encode(trigger)],
        "completion_ids": [int(i) for i in completion_ids],
    }
    return out, record


def completion_logprob(model, params, prompt_ids, completion_ids) -> float:
    """log p(completion | prompt) in nats: the sum over the completion's tokens."""
    ids = np.asarray([list(prompt_ids) + list(completion_ids)], np.int32)
    logits = model.apply({"params": params}, ids)
    logp = jax.nn.log_softmax(logits[0, len(prompt_ids) - 1 : -1].astype(jnp.float32), -1)
    return float(jnp.take_along_axis(logp, jnp.asarray(completion_ids)[:, None], -1).sum())


def loop_config(config: ml_collections.ConfigDict, steps: int) -> loop.LoopConfig:
    """The loop's settings from a job config's top-level reporting fields."""
    return loop.LoopConfig(
        steps=steps,
        log_every=config.log_every,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
    )
