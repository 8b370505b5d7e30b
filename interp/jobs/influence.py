"""The influence job: fit EK-FAC factors on a model's training rows, then search for the rows
that most influence each query, by layer and by token, and write a report.

`run(config, workdir)` reads `config.influence` (see `configs/demo.py`):

1. the model: a Hugging Face folder (`model_path`, by default the pipeline's demo LM);
2. its training rows: the text of `config.data` packed as the LM job packs it;
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
from typing import Any

import numpy as np
from absl import logging

from interp import influence, parallel, records
from interp import sae as saes  # Jobs join rooms; interp.influence never imports sae.
from interp.data.documents import documents, pack_rows, sample_indices
from interp.influence import io as influence_io
from interp.influence import report as report_lib
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
      fit_rows: Training rows the factors are fitted on.
      search_rows: Training rows searched for each query.
      candidates: Rows per query kept by TF-IDF and scored; 0 scores all `search_rows`.
      batch_size: Rows per batch when fitting and scoring.
      damping: Added to every module's curvature; 0 = 0.1 x mean(Lambda) per module.
      top: Sequences shown per query and sign.
      checkpoint_every: Batches between checkpoints of a running fit.
      queries: ({'prompt', 'completion'} ...) measured by log p(completion | prompt).
      feature_queries: ({'sae': SAE folder or '' for the pipeline's first TopK SAE,
        'feature': latent index or -1 for the most active on the completion, 'prompt',
        'completion'} ...) measured by the feature's activation on the completion.
    """

    model_path: str = ""
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


# What a new run may change: the search and the report, not the fit the factors came from.
RESUMABLE_FIELDS = workdir_lib.RESUMABLE_FIELDS + tuple(
    f"influence.{name}"
    for name in ("queries", "feature_queries", "candidates", "search_rows", "top", "damping")
)


def _rows(tokens: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of `count` training rows, a seeded sample in order (all when fewer)."""
    return sample_indices(len(tokens), count, seed)  # The draw every job's rows come from.


def _batches(tokens: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{"tokens": tokens[i : i + size]} for i in range(0, len(tokens), size)]


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
    if need_queries and not inf.queries and not inf.feature_queries:
        raise ValueError("config.influence has no queries or feature_queries; add some.")
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.get("rules") or None)
    stage = workdir_lib.subconfig(config, keep=("seed", "data", "mesh", "rules", "influence"))
    workdir = workdir_lib.prepare_workdir(stage, workdir, resumable_fields=RESUMABLE_FIELDS)
    model_path = inf.model_path or str(workdir.parent / "lm" / "export")
    model, params, tokenizer = workdir_lib.load_model(workdir, model_path, job="the influence job")
    train_docs, _ = documents(config.data)
    rows = pack_rows(config.data, train_docs, tokenizer, max(inf.fit_rows, inf.search_rows))
    fit = rows[_rows(rows, inf.fit_rows, config.seed)]
    search_index = _rows(rows, inf.search_rows, config.seed + 1)
    searched = rows[search_index]
    logging.info("Fitting %s factors on %d rows; searching %d rows for %d queries.",
                 inf.strategy, len(fit), len(searched),
                 len(inf.queries) + len(inf.feature_queries))  # fmt: skip
    factors = _factors(inf, workdir, model, params, _batches(fit, inf.batch_size), mesh, rules)
    return inf, workdir, model, params, tokenizer, factors, search_index, searched, mesh, rules


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
    inf, workdir, model, params, tokenizer, factors, search_index, searched, mesh, rules = _setup(
        config, workdir, need_queries=True
    )
    tfidf = influence.TfidfIndex(searched)
    damping = inf.damping or None

    queries = []
    for entry in inf.queries:
        batch = _query_batch(tokenizer, entry["prompt"], entry["completion"])
        queries.append((entry, batch, None, "log p(completion)"))
    for entry in inf.feature_queries:
        measurement, batch, name = _feature_query(inf, entry, workdir, model, params, tokenizer)
        queries.append((entry, batch, measurement, name))

    results, stored = [], {"candidates": [], "total": [], "per_layer": [], "per_token": []}
    for number, (entry, batch, measurement, what) in enumerate(queries):
        chosen = (
            tfidf.top_k(batch["tokens"][0], inf.candidates)
            if inf.candidates
            else np.arange(len(searched))
        )
        scores = influence.pairwise_scores(
            model, params, factors, [batch], _batches(searched[chosen], inf.batch_size),
            damping, per_layer=True, per_token=True, measurement=measurement, mesh=mesh,
            rules=rules,
        )  # fmt: skip
        order = np.argsort(-scores.total[0])
        stored["candidates"].append(search_index[chosen])
        stored["total"].append(scores.total[0])
        stored["per_layer"].append(scores.per_layer[0])
        stored["per_token"].append(scores.per_token[0])
        results.append({
            "name": f"query {number}: {what}",
            "prompt": entry["prompt"],
            "completion": entry["completion"],
            "measurement": what,
            "modules": list(scores.modules),
            "positive": [_entry(scores, i, chosen, search_index, searched, tokenizer)
                         for i in order[: inf.top]],
            "negative": [_entry(scores, i, chosen, search_index, searched, tokenizer)
                         for i in order[::-1][: inf.top]],
        })  # fmt: skip
    # [queries, candidates(, modules | positions)]; candidates are training row indices.
    scores = {k: np.stack(v) for k, v in stored.items()}
    parallel.on_main_process(influence.save_scores, workdir / "scores", scores)
    written = parallel.on_main_process(report_lib.write_report, workdir / "report", results)
    logging.info("Influence report: %s", written["html"] if written else workdir / "report")
    return results


def _entry(scores, i, chosen, search_index, searched, tokenizer) -> dict[str, Any]:
    tokens = searched[chosen[i]]
    return {
        "row": int(search_index[chosen[i]]),
        "score": float(scores.total[0, i]),
        # Joined, the row's text: a character split over byte tokens is not U+FFFD per byte.
        "tokens": tokenizer.token_pieces(tokens, skip_special_tokens=False),
        "token_scores": [float(v) for v in scores.per_token[0, i, : len(tokens)]],
        "layer_scores": [float(v) for v in scores.per_layer[0, i]],
    }


def format_summary(results: list[dict[str, Any]], width: int = 90) -> str:
    """Per query, the most positively influential row's text (shortened), for the console."""
    lines = []
    for result in results:
        best = result["positive"][0]
        snippet = "".join(best["tokens"]).replace("\n", " ")
        lines.append(f"{result['name']}: {result['prompt']!r} -> {result['completion']!r}")
        lines.append(f"  top row {best['row']} ({best['score']:+.3g}): {snippet[:width]}...")
    return "\n".join(lines)
