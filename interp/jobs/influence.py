"""The influence job: fit EK-FAC factors on a model's training rows, then search for the rows
that most influence each query, by layer and by token, and write a report.

`run(config, workdir)` reads `config.influence` (see `configs/demo.py`):

1. the model: a Hugging Face folder (`model_path`, by default the pipeline's demo LM);
2. its training rows: the text of `config.data` packed as the LM job packs it (`rows`
   'corpus'), or exactly the rows the pipeline's LM stage trained on (`rows` 'lm': the
   schedule's rows with `config.plant` written in, `interp.jobs.lm.training_rows`); with a
   plant, the planted trigger -> completion is the first query and every query reports the
   planted rows' ranks (ground truth: the trigger query should rank them first);
3. factors fitted on `fit_rows` of them (resumable: running sums are checkpointed under
   `<workdir>/factor_checkpoints`; the result is saved to `<workdir>/factors` and reused by
   later runs of the same model, refused for another model);
4. per query (a prompt and a completion, whose log-probability is the measurement; or an SAE
   feature's activation on the completion), TF-IDF picks `candidates` of `search_rows`
   training rows, and influence is computed on those, per layer and per token;
5. `<workdir>/scores/` (zarr arrays via tensorstore: candidates, total, per_layer,
   per_token, each [queries, candidates, ...]), `<workdir>/report/report.html` (tokens
   coloured by influence), `influence.json` and a layers x sequences heatmap per query
   (`layers_<i>.png`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from absl import logging

from interp import influence, metrics, parallel, paths, records
from interp import sae as saes  # Jobs join rooms; interp.influence never imports sae.
from interp.data import fingerprint as data_fingerprint
from interp.data.documents import documents, pack_rows, sample_indices
from interp.influence import io as influence_io
from interp.influence import report as report_lib
from interp.jobs import lm as lm_job
from interp.jobs import lock
from interp.jobs import sae as sae_job
from interp.jobs import workdir as workdir_lib
from interp.models import hooks, sites


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
    """`config.influence`; unknown fields are an error.

    Attributes:
      model_path: Hugging Face folder; '' = the pipeline's LM (`<workdir>/../lm/export`).
      strategy: 'ekfac', 'kfac', 'diagonal' or 'identity'.
      sample_labels: Fit on targets sampled from the model (true Fisher).
      modules: Tracked layer names or patterns; () = every MLP projection.
      rows: 'corpus' (rows of `config.data` packed as the LM job packs them, seeded samples)
        or 'lm' (the rows the LM stage of this config trained on, `config.plant` included).
      fit_rows: Training rows the factors are fitted on.
      search_rows: Training rows searched for each query; 0 = all of them (rows 'lm' only).
      candidates: Rows per query kept by TF-IDF and scored; 0 scores all `search_rows`.
      batch_size: Rows per batch when fitting and scoring.
      damping: Added to every module's curvature; 0 = 0.1 x mean(Lambda) per module.
      top: Sequences shown per query and sign.
      checkpoint_every: Batches between checkpoints of a running fit.
      queries: ({'prompt', 'completion'} ...) measured by log p(completion | prompt).
      feature_queries: ({'sae': SAE folder or '' for the pipeline's first TopK SAE,
        'feature': latent index or -1 for the most active on the completion, 'prompt',
        'completion', optionally 'allow_other_model': True to use an SAE trained on another
        model (`interp.jobs.sae.check_model`)} ...) measured by the feature's activation on
        the completion.
    """

    model_path: str = ""
    rows: str = "corpus"
    strategy: str = "ekfac"
    sample_labels: bool = True
    modules: tuple = ()
    fit_rows: int = 2048
    search_rows: int = 8192
    candidates: int = 256
    batch_size: int = 16
    damping: float = 0.0
    top: int = 5
    checkpoint_every: int = 50
    queries: tuple = ()
    feature_queries: tuple = ()


SUMMARY_FILE = "summary.json"  # Per query: rows scored, top rows, planted rows' ranks.

# What a new run may change: the search and the report, not the fit the factors came from.
RESUMABLE_FIELDS = workdir_lib.RESUMABLE_FIELDS + tuple(
    f"influence.{name}"
    for name in ("queries", "feature_queries", "candidates", "search_rows", "top", "damping")
)


def _rows(tokens: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of `count` training rows, a seeded sample in order (all when fewer)."""
    return sample_indices(len(tokens), count, seed)  # The draw every job's rows come from.


def _batches(tokens: np.ndarray, size: int, label: str | None = None):
    """Batches of `size` rows; with `label`, a sized iterable that logs progress lines."""
    batches = [{"tokens": tokens[i : i + size]} for i in range(0, len(tokens), size)]
    if label is None:
        return batches
    return metrics.Tracked(batches, label, size * tokens.shape[-1])


def _lm_rows(config, inf, workdir, tokenizer, train_docs):
    """(rows [N, T] as the LM stage trained on them, indices of the rows its schedule
    visits, the plant record or None); checked against the LM stage's data record when the
    pipeline's LM workdir is there (the same rows, or an error naming the difference)."""
    if not config.get("train"):
        raise ValueError(
            "config.influence.rows='lm' reads the LM stage's config.train (steps, batch_size) "
            "to know its rows; this config has none. Use rows='corpus', or the pipeline config."
        )
    rows, planted = lm_job.training_rows(config, tokenizer, train_docs)
    record = workdir.parent / "lm" / workdir_lib.DATA_FILE
    if not inf.model_path and record.exists():
        trained = json.loads(record.read_text()).get("train")
        digest = data_fingerprint.batch_digest(rows)
        if trained and trained != digest:
            raise workdir_lib.DataMismatchError(
                f"config.influence.rows='lm': the rows packed here (digest {digest}) are not "
                f"those the LM stage trained on ({trained}, {record}); config.data, "
                "config.train or config.plant changed since it ran. Rerun the LM stage, or "
                "restore the config it ran with."
            )
    train = lm_job.train_config_from(config.train)
    visited = lm_job.visited_rows(rows, train.batch_size, train.schedule_length, config.seed)
    return rows, visited, planted


def _query_batch(tokenizer, prompt: str, completion: str) -> dict[str, np.ndarray]:
    # The checkpoint's BOS, but no EOS a template may append: only the completion is scored.
    prompt_ids = tokenizer.encode(prompt, add_eos=False)
    full = tokenizer.encode(prompt + completion, add_eos=False)
    if len(full) <= len(prompt_ids):
        raise ValueError(f"The completion {completion!r} adds no token to {prompt!r}.")
    loss_mask = np.zeros((1, len(full)), np.float32)
    loss_mask[0, len(prompt_ids) :] = 1
    return {"tokens": np.asarray([full], np.int32), "loss_mask": loss_mask}


def _factors(config, workdir, model, params, fit_batches, mesh, rules) -> influence.Factors:
    folder = workdir / "factors"
    if (folder / influence_io.RECORD_FILE).exists():
        factors = influence.load_factors(folder)
        factors.check_model(model, params)  # Refuses factors of another model.
        # Fitted on these rows: not on a corpus since changed at the same path.
        data = influence.factors.data_fingerprint(model, fit_batches)
        same_data = config.strategy == "identity" or factors.data_fingerprint == data
        if factors.strategy == config.strategy and same_data:
            logging.info("Reusing the factors in %s.", folder)
            return factors
        if factors.strategy == config.strategy:
            logging.info(
                "The factors in %s were fitted on other rows (data fingerprint %r, these %s); "
                "fitting them again.", folder, factors.data_fingerprint, data,
            )  # fmt: skip
    factors = influence.fit_factors(
        model, params, fit_batches, config.strategy, config.sample_labels,
        modules=list(config.modules) or None, seed=0, mesh=mesh, rules=rules,
        checkpoint_dir=workdir / "factor_checkpoints", checkpoint_every=config.checkpoint_every,
    )  # fmt: skip
    parallel.on_main_process(influence.save_factors, folder, factors)
    return factors


def _feature_query(config, entry, workdir, model, params, tokenizer):
    folder = entry.get("sae") or sae_job.pipeline_topk_sae(
        workdir, "influence.feature_queries' sae"
    )
    sae_job.check_model(folder, model, params, where="the feature query",
                        allowed=bool(entry.get("allow_other_model")))  # fmt: skip
    sae, sae_params = saes.load(folder)
    if not sae.config.hook_name:
        raise ValueError(f"{folder} names no hook_name; the feature query needs the SAE's site.")
    (hook,) = hooks.resolve(model, [sae.config.hook_name])  # The folder's site, in our names.
    batch = _query_batch(tokenizer, entry["prompt"], entry["completion"])
    feature = int(entry.get("feature", -1))
    if feature < 0:  # The feature most active on the completion.
        _, values = hooks.run_with_hooks(model, params, batch["tokens"], capture=[hook])
        rows = sites.to_rows(hook, values[hook], sae.config.hook_head_index)
        codes = sae.apply({"params": sae_params}, rows, method="encode")
        feature = int(np.argmax((np.asarray(codes)[0] * batch["loss_mask"][0, :, None]).sum(0)))
    return influence.sae_feature(sae, sae_params, hook, feature), batch, f"{hook} feature {feature}"


def _setup(config, workdir: str, need_queries: bool):
    """Checks the config, prepares the workdir, loads the model and packs the rows."""
    inf = records.from_dict(InfluenceConfig, config.influence, where="config.influence")
    if inf.strategy not in influence.factors.STRATEGIES:
        raise ValueError(f"config.influence.strategy must be one of "
                         f"{influence.factors.STRATEGIES}, got {inf.strategy!r}.")  # fmt: skip
    if inf.rows not in ("corpus", "lm"):
        raise ValueError(
            f"config.influence.rows must be 'corpus' or 'lm' (the LM stage's rows), got "
            f"{inf.rows!r}."
        )
    if inf.fit_rows < 1 or inf.search_rows < 0 or (inf.search_rows == 0 and inf.rows != "lm"):
        raise ValueError(
            f"config.influence.fit_rows={inf.fit_rows} must be >= 1 and search_rows="
            f"{inf.search_rows} >= 1 (0, all rows, only with rows='lm')."
        )
    has_plant = inf.rows == "lm" and bool((config.get("plant") or {}).get("rows"))
    if need_queries and not inf.queries and not inf.feature_queries and not has_plant:
        raise ValueError("config.influence has no queries or feature_queries; add some.")
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.get("rules") or None)
    stage = workdir_lib.subconfig(config, keep=("seed", "data", "mesh", "rules", "influence"))
    workdir = workdir_lib.prepare_workdir(stage, workdir, resumable_fields=RESUMABLE_FIELDS)
    model_path = inf.model_path or str(workdir.parent / "lm" / "export")
    model, params, tokenizer = workdir_lib.load_model(workdir, model_path, job="the influence job")
    train_docs, _ = documents(config.data)
    planted = None
    if inf.rows == "lm":
        rows, pool, planted = _lm_rows(config, inf, workdir, tokenizer, train_docs)
    else:
        rows = pack_rows(config.data, train_docs, tokenizer, max(inf.fit_rows, inf.search_rows))
        pool = np.arange(len(rows))
    fit = rows[pool[_rows(pool, inf.fit_rows, config.seed)]]
    search_count = inf.search_rows or len(pool)
    search_index = pool[_rows(pool, search_count, config.seed + 1)]
    searched = rows[search_index]
    logging.info("Fitting %s factors on %d rows; searching %d rows for %d queries.",
                 inf.strategy, len(fit), len(searched),
                 len(inf.queries) + len(inf.feature_queries) + (planted is not None))  # fmt: skip
    batches = _batches(fit, inf.batch_size, "influence: factors")
    factors = _factors(inf, workdir, model, params, batches, mesh, rules)
    return (inf, workdir, model, params, tokenizer, factors, search_index, searched, mesh, rules,
            planted)  # fmt: skip


@lock.holding  # One job per workdir.
def fit(config, workdir: str) -> influence.Factors:
    """Fits (or resumes fitting) the factors of `config.influence`, saved in the workdir."""
    return _setup(config, workdir, need_queries=False)[5]


@lock.holding  # One job per workdir.
def run(config, workdir: str) -> list[dict[str, Any]]:
    """Runs the influence job; returns the report's per-query results.

    Raises:
      ValueError: For unknown fields, no queries, factors of another model, bad queries.
    """
    (inf, workdir, model, params, tokenizer, factors, search_index, searched, mesh, rules,
     planted) = _setup(config, workdir, need_queries=True)  # fmt: skip
    tfidf = influence.TfidfIndex(searched)
    damping = inf.damping or None

    queries = []
    if planted is not None:  # Ground truth first: the trigger should find its rows.
        entry = {"prompt": planted["trigger"], "completion": planted["completion"]}
        batch = _query_batch(tokenizer, entry["prompt"], entry["completion"])
        queries.append((entry, batch, None, "log p(completion), planted"))
    for entry in inf.queries:
        batch = _query_batch(tokenizer, entry["prompt"], entry["completion"])
        queries.append((entry, batch, None, "log p(completion)"))
    for entry in inf.feature_queries:
        measurement, batch, name = _feature_query(inf, entry, workdir, model, params, tokenizer)
        queries.append((entry, batch, measurement, name))

    def score(group, chosen, label):
        """Scores of the queries of `group` (one measurement) on rows `chosen`, in one pass."""
        return influence.pairwise_scores(
            model, params, factors, [batch for _, batch, _, _ in group],
            _batches(searched[chosen], inf.batch_size, label), damping, per_layer=True,
            per_token=True, measurement=group[0][2], mesh=mesh, rules=rules,
        )  # fmt: skip

    # Per query: (rows scored, InfluenceScores, index of the query in it).
    scored = [None] * len(queries)
    if inf.candidates:  # TF-IDF picks each query's own candidates: one pass per query.
        for number, query in enumerate(queries):
            chosen = tfidf.top_k(query[1]["tokens"][0], inf.candidates)
            label = f"influence: query {number + 1}/{len(queries)}"
            scored[number] = (chosen, score([query], chosen, label), 0)
    else:  # Every row for every query: one pass per measurement (the gradients shared).
        chosen = np.arange(len(searched))
        log_prob = [i for i, q in enumerate(queries) if q[2] is None]
        groups = [log_prob] if log_prob else []
        groups += [[i] for i, q in enumerate(queries) if q[2] is not None]
        for number, group in enumerate(groups):
            label = f"influence: search {number + 1}/{len(groups)}"
            scores = score([queries[i] for i in group], chosen, label)
            for position, i in enumerate(group):
                scored[i] = (chosen, scores, position)

    results, stored = [], {"candidates": [], "total": [], "per_layer": [], "per_token": []}
    for number, (entry, _, _, what) in enumerate(queries):
        chosen, scores, q = scored[number]
        total = scores.total[q]
        order = np.argsort(-total)
        stored["candidates"].append(search_index[chosen])
        stored["total"].append(total)
        stored["per_layer"].append(scores.per_layer[q])
        stored["per_token"].append(scores.per_token[q])

        def row(i, scores=scores, q=q, chosen=chosen):
            return _entry(scores, q, i, chosen, search_index, searched, tokenizer)

        result = {
            "name": f"query {number}: {what}",
            "prompt": entry["prompt"],
            "completion": entry["completion"],
            "measurement": what,
            "modules": list(scores.modules),
            "scored_rows": len(chosen),
            "positive": [row(i) for i in order[: inf.top]],
            "negative": [row(i) for i in order[::-1][: inf.top]],
        }
        if planted is not None:
            result["planted_ranks"] = planted_ranks(total, search_index[chosen], planted["rows"])
        results.append(result)
    # [queries, candidates(, modules | positions)]; candidates are training row indices.
    # Stacked when every query scored as many rows (TF-IDF may find fewer for one).
    widths = {len(v) for v in stored["total"]}
    if len(widths) == 1:
        scores = {k: np.stack(v) for k, v in stored.items()}
    else:
        scores = {k: _pad_stack(v) for k, v in stored.items()}
    parallel.on_main_process(influence.save_scores, workdir / "scores", scores)
    written = parallel.on_main_process(report_lib.write_report, workdir / "report", results)
    summary = {"planted": planted, "queries": [
        {k: r[k] for k in ("name", "prompt", "completion", "scored_rows", "planted_ranks")
         if k in r} | {"top_rows": [e["row"] for e in r["positive"]]}
        for r in results
    ]}  # fmt: skip
    parallel.on_main_process(
        paths.write_text, workdir / SUMMARY_FILE, workdir_lib.config_to_json(summary)
    )
    logging.info("Influence report: %s", written["html"] if written else workdir / "report")
    return results


def planted_ranks(total: np.ndarray, rows: np.ndarray, planted: list[int]) -> list[int | None]:
    """Each planted row's rank (1 = most positively influential) among the scored rows, or
    None where it was not scored (TF-IDF did not keep it)."""
    order = np.argsort(-np.asarray(total), kind="stable")
    rank = {int(rows[i]): r + 1 for r, i in enumerate(order)}
    return [rank.get(int(p)) for p in planted]


def _pad_stack(values: list[np.ndarray]) -> np.ndarray:
    width = max(len(v) for v in values)
    fill = -1 if values[0].dtype.kind in "iu" else np.nan
    out = np.full((len(values), width, *values[0].shape[1:]), fill, values[0].dtype)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out


def _entry(scores, q, i, chosen, search_index, searched, tokenizer) -> dict[str, Any]:
    tokens = searched[chosen[i]]
    return {
        "row": int(search_index[chosen[i]]),
        "score": float(scores.total[q, i]),
        # Joined, the row's text: a character split over byte tokens is not U+FFFD per byte.
        "tokens": tokenizer.token_pieces(tokens, skip_special_tokens=False),
        "token_scores": [float(v) for v in scores.per_token[q, i, : len(tokens)]],
        "layer_scores": [float(v) for v in scores.per_layer[q, i]],
    }


def format_summary(results: list[dict[str, Any]], width: int = 90) -> str:
    """Per query, the most positively influential row's text (shortened), and with a plant
    the planted rows' ranks, for the console."""
    lines = []
    for result in results:
        best = result["positive"][0]
        snippet = "".join(best["tokens"]).replace("\n", " ")
        lines.append(f"{result['name']}: {result['prompt']!r} -> {result['completion']!r}")
        lines.append(f"  top row {best['row']} ({best['score']:+.3g}): {snippet[:width]}...")
        if "planted_ranks" in result:
            ranks = ", ".join("-" if r is None else str(r) for r in result["planted_ranks"])
            lines.append(f"  planted rows' ranks of {result['scored_rows']}: {ranks}")
    return "\n".join(lines)
