"""The SAE job: harvest a model's activations, train several SAEs on them, evaluate, export.

`run(config, workdir)` reads `config.sae` (see `configs/demo.py`):

1. the model: a Hugging Face folder (`config.sae.model_path`, by default the demo LM the
   pipeline trained under `<workdir>/../lm/export`);
2. activations at the hook sites over the training text, cached as zarr under
   `<workdir>/activations` (or `config.sae.cache_path`, local or gs://, shared across sweeps:
   a complete cache of the same model is reused; one made by another model is an error;
   a harvest stopped by SIGTERM, SIGKILL or a crash continues from its last progress
   commit, `config.sae.harvest_commit_seconds`, when the job is rerun);
3. every SAE in `config.sae.saes` trained together, one jitted step, on shuffled cached rows,
   with `input_scale` (unit mean squared norm) and `b_dec` (geometric median) from the data,
   through the shared loop (`interp.jobs.loop`: metrics, progress, checkpoints, resume);
4. evaluation on held-out rows spread over all of the held-out text (FVU, L0, dead/dense
   latents, spliced-in loss, KL, loss recovered), written to `<workdir>/eval.json` and
   TensorBoard, and printed as a table;
   the positions left out (`config.sae.exclude`: first positions, BOS, chosen token ids;
   `exclusions`) are the same in harvest, so training, and evaluation;
5. each SAE exported in SAELens format to `<workdir>/saes/<name>`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from interp import metrics, parallel, paths
from interp.data import activations, text
from interp.data import cache as cache_lib
from interp.data import fingerprint as data_fingerprint
from interp.data.documents import documents, pack_rows, sample_rows, separator_option
from interp.jobs import lock, loop
from interp.jobs import workdir as workdir_lib
from interp.models import sites as sites_lib
from interp.models.fingerprint import fingerprint
from interp.sae import architectures
from interp.sae import evaluate as sae_evaluate
from interp.sae import io as sae_io
from interp.sae import train as sae_train
from interp.sae.modules import SAE, SAEConfig


def sae_name(entry, site: str) -> str:
    """A readable name: 'blocks_2.resid_post-topk-k16-x1024' or '...-relu-l0.3-x1024'."""
    arch = entry["architecture"]
    sparsity = architectures.architecture(arch).sparsity_label(
        {"l1_coefficient": SAEConfig.l1_coefficient, **entry}
    )
    head = "" if entry.get("hook_head_index") is None else f".h{entry['hook_head_index']}"
    return f"{site.replace('/', '.')}{head}-{arch}-{sparsity}-x{entry['num_latents']}"


def pipeline_topk_sae(stage_workdir, setting: str) -> str:
    """The first TopK SAE the pipeline's SAE stage exported (`<stage>/../sae/saes/...`), for
    a later stage (influence, steering) that names none.

    Raises:
      FileNotFoundError: when there is none, naming the config `setting` to set instead.
    """
    root = paths.resolve(stage_workdir).parent / "sae" / "saes"
    names = sorted(p.name for p in root.iterdir()) if root.exists() else []
    topk = [n for n in names if "-topk-" in n]
    if not topk:
        raise FileNotFoundError(f"No TopK SAE under {root}; set {setting}.")
    return str(root / topk[0])


def _unique(names: list[str]) -> list[str]:
    """Appends -2, -3, ... to repeated names (two SAEs differing only in, say, a learning rate)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _sites(sae_config) -> list[str]:
    """The harvested sites in interp's names (TransformerLens names are accepted)."""
    return [sites_lib.from_transformer_lens(site) for site in sae_config.sites]


def _entries(sae_config) -> list[dict[str, Any]]:
    harvested = _sites(sae_config)
    entries = []
    for raw in sae_config.saes:
        entry = dict(raw)
        entry["site"] = sites_lib.from_transformer_lens(entry.get("site", harvested[0]))
        entry.setdefault("num_latents", sae_config.num_latents)
        if entry["site"] not in harvested:
            raise ValueError(
                f"SAE {entry} trains on site {entry['site']!r}, which is not harvested; "
                f"add it to config.sae.sites {list(sae_config.sites)}."
            )
        entries.append(entry)
    return entries


def _columns(entry, width: int, model_config) -> slice:
    """The columns of a site's cached rows an SAE reads: all, or one head's (a per-head SAE,
    `hook_head_index`: columns head * head_dim ... of the heads-side-by-side rows)."""
    head = entry.get("hook_head_index")
    if head is None:
        return slice(0, width)
    head_dim = model_config.head_dim
    heads = width // head_dim
    if width % head_dim or heads < 2:
        raise ValueError(
            f"SAE {entry} reads head {head} of {entry['site']!r}, whose rows ({width} wide) are "
            f"not heads of {head_dim}; hook_head_index applies to attn/q, k, v and z."
        )
    if not 0 <= head < heads:
        raise ValueError(f"SAE {entry}: hook_head_index {head} outside 0..{heads - 1}.")
    return slice(head * head_dim, (head + 1) * head_dim)


def _input_scale(cache, entry, rows: np.ndarray) -> float:
    """The cache's scale for a whole site; a per-head SAE's from its head's rows."""
    if entry.get("hook_head_index") is None:
        return cache.input_scale(entry["site"])
    return activations.unit_norm_scale(activations.mean_squared_norm(rows))


_EXCLUDE_DEFAULTS = {"first": True, "bos": True, "separator": True, "token_ids": ()}


def exclusions(sae_config, tokenizer, data_config=None) -> dict[str, Any]:
    """`keep_mask` options from `config.sae.exclude`, the same for harvest and evaluation.

    `first`: each row's first position (a packed row's first token has no context and an
    outsized norm); `bos`: the tokenizer's BOS token wherever it stands; `separator`: the
    token packing puts between documents (`config.data.separator`, given `data_config`): in
    a pretrained model it is an attention sink whose residual norm is ~100x a word's
    (SmolLM2-135M, layer 15: ~15,000 against a median 168), which would otherwise dominate
    an SAE's loss and make its FVU look tiny; `token_ids`: more token ids (other special
    tokens).

    Raises:
      ValueError: for unknown keys.
    """
    given = dict(sae_config.get("exclude") or {})
    unknown = sorted(set(given) - set(_EXCLUDE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"config.sae.exclude has unknown keys {unknown}; known: {sorted(_EXCLUDE_DEFAULTS)}."
        )
    options = {**_EXCLUDE_DEFAULTS, **given}
    bos = getattr(tokenizer, "bos_id", None) if options["bos"] else None
    ids = [int(i) for i in options["token_ids"]]
    if options["separator"] and data_config is not None and tokenizer is not None:
        separator = text.separator_id(tokenizer, separator_option(data_config))
        if separator is not None and separator not in ids and separator != bos:
            ids.append(int(separator))
    return {
        "bos_id": None if bos is None else int(bos),
        "skip_first": bool(options["first"]),
        "exclude_ids": tuple(ids),
    }


def _token_batches(tokens: np.ndarray, batch_size: int):
    for start in range(0, len(tokens) - batch_size + 1, batch_size):
        yield tokens[start : start + batch_size]


PROGRESS_SECONDS = 15.0  # Between the harvest's progress lines.
MODEL_FINGERPRINT = "model_fingerprint"  # SAE metadata: the model the SAE was trained on.


class SAEModelMismatchError(ValueError):
    """An SAE is used with another model than the one it was trained on."""


def check_model(sae_path: str, model, params, *, where: str, allowed: bool = False) -> None:
    """Refuses an SAE trained (by this framework) on another model than `model`.

    An SAE folder the SAE job wrote records its model's fingerprint
    (`interp.models.fingerprint`); another model's activations at the same site are another
    distribution, on which the SAE's features mean nothing, even at the same width. Folders
    without the record (released SAEs, older exports) are checked by width only, when used.

    Args:
      sae_path: The SAE folder (local, gs:// or hf://).
      model, params: The model it is about to be used with.
      where: The config section, for the fix ('config.steering').
      allowed: `<where>.allow_other_model`: use it anyway (e.g. on a fine-tune whose layers
        up to the SAE's site were frozen, so the site's activations are the base model's).

    Raises:
      SAEModelMismatchError: naming both models and the fix.
    """
    if allowed or str(sae_path).startswith("hf://"):  # Released SAEs record no fingerprint.
        return
    recorded = sae_io.read_metadata(sae_path).get(MODEL_FINGERPRINT)
    if not recorded:
        return
    actual = fingerprint(model.config, params)
    if recorded != actual:
        name = sae_io.read_metadata(sae_path).get("model_name") or "another model"
        raise SAEModelMismatchError(
            f"The SAE {sae_path} was trained on {name!r} (model fingerprint {recorded}); the "
            f"model here is another (fingerprint {actual}). Use the SAE with the model it was "
            f"trained on, or, if this model's activations at its site are that model's (a "
            f"fine-tune with those layers frozen), set {where}.allow_other_model=True."
        )


class CacheModelMismatchError(ValueError):
    """An activation cache was harvested from another model than the one this job studies."""


def _check_cache_model(metadata, path: str, model_path: str, model_hash: str) -> None:
    """Raises unless the cache at `path` (its metadata.json: complete, or partly harvested)
    was harvested from the model with `model_hash`."""
    made_by = metadata.get("extra", {}).get("model_fingerprint")
    if made_by == model_hash:
        return
    name = metadata.get("model", {}).get("name")
    if made_by is None:
        what = f"by an older version (from {name!r}), before caches recorded their model"
    else:
        what = f"from another model ({name!r}, fingerprint {made_by})"
    if not metadata.get("complete"):
        what = f"(in part: its harvest was stopped) {what}"
    raise CacheModelMismatchError(
        f"The activation cache at {path} was harvested {what}, not from {model_path!r} "
        f"(fingerprint {model_hash}); SAEs would train on the wrong activations. To "
        "re-harvest for this model, delete the cache (and the SAE workdir's checkpoints, "
        "trained on it), or run in a new SAE workdir with config.sae.cache_path set to a new "
        "location."
    )


def _cache_path(sae_config, workdir) -> str:
    return sae_config.cache_path or str(workdir / "activations")


def _harvest_rows(config, train_docs, tokenizer) -> np.ndarray:
    """The token rows [N, T] a harvest of `config.sae` reads, in harvest order."""
    sae_config = config.sae
    rows_per_batch = sae_config.harvest_batch_size * (config.data.seq_len - 1)
    batches_needed = math.ceil(sae_config.harvest_rows / rows_per_batch)
    needed = batches_needed * sae_config.harvest_batch_size
    tokens = pack_rows(config.data, train_docs, tokenizer, needed)
    order = np.random.default_rng(config.seed).permutation(len(tokens))[:needed]
    return tokens[np.sort(order)]


def _cache(
    config, workdir, model_path, model, params, rows, model_hash, excluded
) -> cache_lib.ActivationCache:
    sae_config = config.sae
    harvested = _sites(sae_config)
    path = _cache_path(sae_config, workdir)
    # The harvested tokens themselves: the data config names a corpus path, not its text.
    tokens = data_fingerprint.batch_digest(rows)
    if cache_lib.is_complete(path):
        cache = cache_lib.ActivationCache.open(path)
        _check_cache_model(cache.metadata, path, model_path, model_hash)
        missing = set(harvested) - set(cache.sites)
        cached_exclusions = cache.metadata.get("extra", {}).get("exclusions")
        same_positions = cached_exclusions == _json_exclusions(excluded)
        cached_tokens = cache.metadata.get("extra", {}).get("rows_from", {}).get("tokens")
        # A harvest asked for as many rows ends where its text does (excluded positions make
        # the rows fewer than batches x positions): the same request would get no more.
        asked = cache.metadata.get("requested_rows") or 0
        if not same_positions:
            logging.info(
                "The cache at %s kept other positions (%s, now %s); harvesting again.",
                path,
                cached_exclusions,
                _json_exclusions(excluded),
            )
        elif cached_tokens != tokens:
            logging.info(
                "The cache at %s was harvested from other token rows (fingerprint %s, now "
                "%s); harvesting again.", path, cached_tokens, tokens,
            )  # fmt: skip
        elif not missing and max(cache.num_rows, asked) >= sae_config.harvest_rows:
            logging.info("Reusing %d cached activation rows at %s.", cache.num_rows, path)
            return cache
    elif (partial := cache_lib.read_metadata(path)) is not None:
        # A harvest that was stopped: continued below when its settings are these.
        _check_cache_model(partial, path, model_path, model_hash)
    batch_size = sae_config.harvest_batch_size
    logging.info("Harvesting %d rows at %s.", sae_config.harvest_rows, list(sae_config.sites))

    def stream(start):
        # Token batches from the start-th on: the same batches, whatever the start.
        batches = _token_batches(rows[start * batch_size :], batch_size)
        return activations.harvest(model, params, batches, harvested, **excluded)

    progress = metrics.Progress(sae_config.harvest_rows, None, label="harvest", unit="row")
    last = [time.monotonic()]

    def on_rows(rows: int) -> None:  # Rows/s and ETA every PROGRESS_SECONDS.
        if time.monotonic() - last[0] >= PROGRESS_SECONDS:
            progress.update(rows)
            last[0] = time.monotonic()

    return cache_lib.write_cache(
        path,
        stream,
        harvested,
        num_rows=sae_config.harvest_rows,
        on_rows=on_rows,
        model_config=model.config,
        model_name=model_path,
        extra={
            "model_fingerprint": model_hash,
            "exclusions": _json_exclusions(excluded),
            # What decides the rows, so a stopped harvest is continued only by the same one.
            "rows_from": {
                "seed": config.seed,
                "data": config.data.to_dict(),
                "batch_size": batch_size,
                "tokens": tokens,
            },
        },
        overwrite=True,
        resume=True,
        commit_seconds=sae_config.harvest_commit_seconds,
    )


def _json_exclusions(excluded: dict[str, Any]) -> dict[str, Any]:
    return {**excluded, "exclude_ids": list(excluded["exclude_ids"])}


@lock.holding  # One job per workdir.
def run(config, workdir: str) -> dict[str, dict[str, float]]:
    """Runs the SAE job; returns {sae name: evaluation metrics}.

    Raises:
      CacheModelMismatchError: If the activation cache was made from another model.
      workdir_lib.ConfigMismatchError: When resuming with a config that changes the maths.
      ValueError: For unknown fields in `config.sae.train` or an SAE entry.
    """
    # Everything checkable is checked before the workdir saves the config (a typo fixed on
    # the next run must not count as a changed config), and before any harvesting.
    sae_config = config.sae
    train_config = sae_train.as_train_config(sae_config.train, where="config.sae.train")
    entries = _entries(sae_config)
    exclusions(sae_config, None)  # Unknown keys.
    for entry in entries:  # Unknown or bad SAE fields; the width comes from the cache later.
        SAEConfig.from_dict({k: v for k, v in entry.items() if k != "site"} | {"d_in": 1})
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.get("rules") or None)
    stage_config = workdir_lib.subconfig(config, keep=("seed", "data", "mesh", "rules", "sae"))
    workdir = workdir_lib.prepare_workdir(
        workdir_lib.pin_schedule(stage_config, "sae.train", train_config.schedule_length),
        workdir,
    )
    if train_config.steps > train_config.schedule_length and train_config.lr_decay != "constant":
        logging.warning(
            "sae.train.steps=%d runs past the schedule's end (schedule_steps=%d): the "
            "learning rate is 0 from there on.",
            train_config.steps,
            train_config.schedule_length,
        )
    model_path = sae_config.model_path or str(workdir.parent / "lm" / "export")
    model, params, tokenizer = workdir_lib.load_model(workdir, model_path, job="the SAE job")
    train_docs, heldout_docs = documents(config.data)
    model_hash = fingerprint(model.config, params)
    excluded = exclusions(sae_config, tokenizer, config.data)
    rows = _harvest_rows(config, train_docs, tokenizer)
    # The workdir's SAEs were trained on the rows it harvested: never resumed on others.
    workdir_lib.check_data(workdir, {"harvest": data_fingerprint.batch_digest(rows)})
    # One process harvests and writes the cache (its rows are host arrays, not shards); the
    # others wait for it, then read it like any reused cache.
    cache = parallel.on_main_process(
        _cache, config, workdir, model_path, model, params, rows, model_hash, excluded
    )
    if cache is None:  # Another process than 0.
        cache = cache_lib.ActivationCache.open(_cache_path(sae_config, workdir))

    sites = [entry["site"] for entry in entries]
    columns = [_columns(entry, cache.dims[entry["site"]], model.config) for entry in entries]
    sample = {site: cache.read(site, 0, min(cache.num_rows, 8192)) for site in set(sites)}
    samples = [
        np.asarray(sample[site][:, cols], np.float32)
        for site, cols in zip(sites, columns, strict=True)
    ]
    configs = tuple(
        SAEConfig.from_dict(
            {k: v for k, v in entry.items() if k != "site"}
            | {"d_in": cols.stop - cols.start, "hook_name": entry["site"]}
            | {"input_scale": _input_scale(cache, entry, rows)}
        )
        for entry, cols, rows in zip(entries, columns, samples, strict=True)
    )
    # dead_tokens=None scaled to this run, so the exported configs say what AuxK used.
    configs = sae_train.resolve_dead_tokens(configs, train_config)
    b_dec_init = [np.asarray(sae_train.geometric_median(rows)) for rows in samples]
    names = _unique([sae_name(entry, entry["site"]) for entry in entries])
    # Progress-line labels: the architecture alone when every SAE reads one site.
    short = names if len(set(sites)) > 1 else _unique([e["architecture"] for e in entries])
    labels = dict(zip(names, short, strict=True))

    def shown(metric: str) -> bool | str:
        name, _, what = metric.rpartition("/")
        return what in ("fvu", "l0") and (f"{labels[name]}/{what}" if name else True)

    stream: dict[str, Any] = {}

    def batch_fn(step):
        # Sequential reads from the cache's resumable shuffled order, opened at the first
        # step asked for (the step a resumed run starts from).
        if "iterator" not in stream:
            stream["iterator"] = cache.batches(
                sorted(set(sites)), train_config.batch_size, seed=config.seed, start_step=step
            )
        batch = next(stream["iterator"])
        return tuple(
            np.asarray(batch[site][:, cols], np.float32)
            for site, cols in zip(sites, columns, strict=True)
        )

    key = jax.random.key(config.seed)
    task = loop.Task(
        init=lambda: sae_train.init_state(configs, train_config, key, mesh, rules, b_dec_init),
        abstract=sae_train.abstract_state(configs, train_config, mesh, rules),
        step=sae_train.make_train_step(configs, train_config, mesh, rules),
        batch=batch_fn,
        flatten=lambda out: sae_train.flatten_metrics(out, names),
        shown=shown,
    )
    loop_config = loop.LoopConfig(
        steps=train_config.steps,
        log_every=train_config.log_every,
        checkpoint_every=train_config.checkpoint_every,
        keep_checkpoints=train_config.keep_checkpoints,
    )
    writer = metrics.MetricWriter(workdir)
    try:
        state, _ = loop.train(
            task,
            workdir,
            loop_config,
            writer=writer,
            tokens_per_step=train_config.batch_size,
            name="SAE training",
        )

        eval_needed = sae_config.eval_batches * sae_config.eval_batch_size
        # Spread over all of the held-out text, not its first (book-ordered) rows.
        eval_tokens = sample_rows(config.data, heldout_docs, tokenizer, eval_needed, config.seed)
        eval_batches = list(_token_batches(eval_tokens, sae_config.eval_batch_size))
        results = {}
        for name, sae_cfg, site, sae_state in zip(
            names, configs, sites, state["saes"], strict=True
        ):
            # Gathered on every process (latents may be sharded over them); each evaluates.
            sae_params = parallel.process_allgather(sae_state["params"])
            results[name] = sae_evaluate.evaluate(
                model, params, SAE(sae_cfg), sae_params, eval_batches, site,
                max_batches=sae_config.eval_batches, **excluded,
            )  # fmt: skip
            parallel.on_main_process(
                sae_io.save,
                workdir / "saes" / name,
                sae_cfg,
                sae_params,
                metadata={
                    "hook_name": site,
                    "model_name": model_path,
                    MODEL_FINGERPRINT: model_hash,  # `check_model` compares it.
                },
            )
        step = int(state["step"])
        for name, result in results.items():
            writer.write(step, {f"eval/{name}/{k}": v for k, v in result.items()})
    finally:
        writer.close()
    parallel.on_main_process(
        paths.write_text, workdir / "eval.json", workdir_lib.config_to_json(results)
    )
    logging.info("SAE evaluation on held-out text written to %s.", workdir / "eval.json")
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the headline metrics, one row per SAE."""
    lines = [
        "| SAE | FVU | L0 | dead | dense | loss clean | loss spliced | loss recovered | KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['dead_fraction']:.1%} "
            f"| {r['dense_fraction']:.1%} | {r['clean_loss']:.3f} | {r['spliced_loss']:.3f} "
            f"| {r['loss_recovered']:.1%} | {r['kl']:.3f} |"
        )
    return "\n".join(lines)
