"""Training a language model with the framework: the demo model, or any config of `Transformer`.

`run(config, workdir)` is the whole job: tokenizer, packed data, sharded init, a jitted train
step with explicit shardings, held-out evaluation against a unigram baseline, metrics
(JSON lines + TensorBoard), a progress line, orbax checkpoints with exact resume, and at the
end an export in Hugging Face format that `interp.models.from_pretrained` loads.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from interp import checkpoint, experiment, metrics, parallel
from interp.data import corpus, text
from interp.models import generate
from interp.models import tokenizer as tokenizer_lib
from interp.models.config import ModelConfig
from interp.models.losses import next_token_loss
from interp.models.transformer import Transformer

EXPORT_DIR = "export"
TOKENIZER_DIR = "tokenizer"


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Held-out cross-entropy (nats) of an add-one-smoothed unigram model: the bar to beat."""
    counts = np.bincount(train_tokens.reshape(-1), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_tokens[:, 1:].reshape(-1)].mean())


def make_optimizer(train_config) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.learning_rate,
        warmup_steps=train_config.warmup_steps,
        decay_steps=max(train_config.steps, train_config.warmup_steps + 1),
        end_value=train_config.learning_rate * train_config.final_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=train_config.weight_decay),
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
    if (saved / "tokenizer.json").exists():
        return tokenizer_lib.load(saved)
    start = time.time()
    tok = tokenizer_lib.train_bpe(train_documents, vocab_size=config.tokenizer.vocab_size)
    if jax.process_index() == 0:
        tok.save(saved)
    logging.info("Trained a %d-token byte-level BPE in %.1fs.", tok.vocab_size, time.time() - start)
    return tok


def documents(data_config) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: the built-in corpus, or `data_config.text_path`."""
    if data_config.text_path:
        docs = text.read_documents(data_config.text_path, txt_paragraphs=True)
        cut = max(1, int(len(docs) * data_config.heldout_fraction))
        train, heldout = docs[:-cut], docs[-cut:]
    else:
        train = corpus.load_documents("train", heldout_fraction=data_config.heldout_fraction)
        heldout = corpus.load_documents("heldout", heldout_fraction=data_config.heldout_fraction)
    if data_config.max_documents:
        train = train[: data_config.max_documents]
        heldout = heldout[: max(1, data_config.max_documents // 10)]
    return train, heldout


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes training of) a language model and exports it.

    Args:
      config: See `configs/demo.py` for every field.
      workdir: Local or gs:// directory for config, tokenizer, checkpoints, metrics, export.

    Returns:
      Final figures: {'step', 'eval_loss', 'unigram_loss', 'export_dir'}.
    """
    # The LM stage's workdir checks only the LM's settings, not later pipeline stages'.
    workdir = experiment.prepare_workdir(experiment.subconfig(config, drop=("sae",)), workdir)
    train_docs, heldout_docs = documents(config.data)
    tok = _tokenizer(config, workdir, train_docs)
    start = time.time()
    train_tokens = text.pack(train_docs, tok, config.data.seq_len)
    eval_tokens = text.pack(heldout_docs, tok, config.data.seq_len)
    if len(train_tokens) < config.train.batch_size or len(eval_tokens) == 0:
        raise ValueError(
            f"Too little text: {len(train_tokens)} training and {len(eval_tokens)} held-out "
            f"rows of {config.data.seq_len} tokens for batch_size {config.train.batch_size}."
        )
    logging.info(
        "Packed %d train / %d held-out rows of %d tokens in %.1fs.",
        len(train_tokens), len(eval_tokens), config.data.seq_len, time.time() - start,
    )  # fmt: skip
    batches = text.Batches(train_tokens, config.train.batch_size, seed=config.seed)
    eval_rows = eval_tokens[: config.eval_batches * config.train.batch_size]
    baseline = unigram_loss(train_tokens, eval_rows, tok.vocab_size)

    model_config = model_config_from(config, tok.vocab_size)
    model = Transformer(model_config)
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.get("rules") or None)
    optimizer = make_optimizer(config.train)

    params = parallel.init_sharded(model, config.seed, mesh, rules)
    # Traced under the mesh and the rules so the model's logical constraints take effect.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        opt_state = jax.jit(optimizer.init)(params)
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        batch_sharding = parallel.batch_sharding(
            mesh, rules, 2, shape=(config.train.batch_size, config.data.seq_len)
        )
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

        ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
        start_step = ckpt.latest_step() or 0
        if start_step:
            state = ckpt.restore(start_step, target=checkpoint.abstract_like(state))
            logging.info("Resumed from step %d.", start_step)

        def evaluate(params):
            total, count = 0.0, 0.0
            for i in range(0, len(eval_rows), config.train.batch_size):
                rows = eval_rows[i : i + config.train.batch_size]
                if len(rows) < config.train.batch_size:
                    break
                loss, n = eval_fn(params, jax.device_put(rows, batch_sharding))
                total, count = total + float(loss) * float(n), count + float(n)
            return total / max(count, 1.0)

        writer = metrics.MetricWriter(workdir)
        tokens_per_step = config.train.batch_size * config.data.seq_len
        progress = metrics.Progress(config.train.steps, tokens_per_step, start_step=start_step)
        logging.info(
            "Model: %s, %.2fM parameters; unigram baseline %.3f nats.",
            model_config.family,
            sum(x.size for x in jax.tree.leaves(state["params"])) / 1e6,
            baseline,
        )
        eval_loss = None
        for step in range(start_step + 1, config.train.steps + 1):
            batch = jax.device_put(batches.get(step - 1), batch_sharding)
            state, out = step_fn(state, batch)
            last = step == config.train.steps
            if step % config.log_every == 0 or last:
                scalars = {k: float(v) for k, v in out.items()}
                writer.write(step, scalars)
                progress.update(step, **scalars)
            if step % config.eval_every == 0 or last:
                eval_loss = evaluate(state["params"])
                writer.write(step, {"eval_loss": eval_loss, "unigram_loss": baseline})
                logging.info(
                    "step %d: held-out loss %.3f (unigram %.3f)", step, eval_loss, baseline
                )
            if step % config.checkpoint_every == 0 or last:
                ckpt.save(step, state)
        ckpt.wait()
        ckpt.close()
        writer.close()
        if eval_loss is None:
            eval_loss = evaluate(state["params"])

    export_dir = workdir / EXPORT_DIR
    if jax.process_index() == 0:
        from interp.models import save_pretrained  # Imported late: it pulls in safetensors.

        save_pretrained(export_dir, model_config, jax.device_get(state["params"]), tokenizer=tok)
        logging.info("Exported to %s (interp.models.from_pretrained loads it).", export_dir)
    prompt = tok.encode(config.sample_prompt)
    sample = generate.generate(
        model,
        jax.device_get(state["params"]),
        np.asarray([prompt], np.int32),
        config.sample_tokens,
        temperature=0.8,
        top_p=0.95,
        rng=jax.random.key(config.seed),
    )
    sample_text = tok.decode(np.asarray(sample[0]).tolist())
    logging.info("Sample: %s", sample_text)
    summary = {
        "sample": sample_text,
        "step": config.train.steps,
        "eval_loss": eval_loss,
        "unigram_loss": baseline,
        "export_dir": str(export_dir),
    }
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(experiment.config_to_json(summary))
    return summary
