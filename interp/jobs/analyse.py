"""The analysis job: one SAE's feature statistics and dashboard, and a feature search for a
concept (the feature the pipeline's steering stage then clamps).

`run(config, workdir)` reads `config.analysis` (see `configs/demo.py`):

1. the model (`model_path`, by default the pipeline's LM) and the SAE (`sae`, by default the
   pipeline's first TopK SAE);
2. `interp.analysis.analyse` over `max_rows` held-out rows of `config.data` spread over the
   whole held-out text (`interp.data.documents.sample_rows`, seeded by `config.seed`; the
   steering stage takes the same rows), leaving out the positions `config.sae.exclude`
   leaves out of SAE training: `<workdir>/feature_stats.npz`, `dashboard.html` (every
   feature that fired), `density.png`;
3. `search_features` on `concept`'s tokens inside the `context` sentence, ranked by
   activation relative to each feature's held-out maximum (features driven near their peak,
   not merely dense ones); a feature driven above that maximum is flagged (`above_max`,
   a logged warning): the held-out rows did not show its range;
4. `<workdir>/search.json` and `<workdir>/concept.html`, the dashboard of the features found,
   best first.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from interp import analysis, metrics, parallel, paths, records
from interp import sae as saes
from interp.data.documents import documents, sample_rows
from interp.jobs import lock
from interp.jobs import sae as sae_job
from interp.jobs import workdir as workdir_lib

SEARCH_FILE = "search.json"
CONCEPT_DASHBOARD = "concept.html"


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """`config.analysis`; unknown fields are an error.

    Attributes:
      model_path: Hugging Face folder; '' = the pipeline's LM (`<workdir>/../lm/export`).
      sae: SAE folder; '' = the pipeline's first TopK SAE (`<workdir>/../sae/saes/*-topk-*`).
      concept: Text whose tokens the feature search looks at.
      context: A sentence holding `concept`, read as the model reads text (with the
        checkpoint's BOS): the search looks at the concept's tokens there, in context, not
        at a lone token in position 0 (which SAE training leaves out).
      top: Features kept from the search (and shown on `concept.html`).
      max_rows: Held-out rows the statistics are taken over, drawn from all of the held-out
        text by `config.seed` (all of it when it has no more).
      batch_size: Rows per forward pass.
      allow_other_model: Use an SAE the SAE job trained on another model (refused by
        default: `interp.jobs.sae.check_model`).
    """

    model_path: str = ""
    sae: str = ""
    concept: str = " whale"
    context: str = "The whale rose from the sea, and the whale spouted."
    top: int = 5
    max_rows: int = 256
    batch_size: int = 16
    allow_other_model: bool = False


def concept_positions(ids: list[int], concept: list[int]) -> list[int]:
    """Positions in `ids` of every token of each occurrence of the token run `concept`."""
    n = len(concept)
    starts = [i for i in range(len(ids) - n + 1) if n and ids[i : i + n] == concept]
    return sorted({i + j for i in starts for j in range(n)})


def search_concept(
    model, params, sae, sae_params, tokenizer, concept: str, context: str, *, k: int,
    relative_to, where: str,
) -> analysis.SearchResult:  # fmt: skip
    """The features most active on `concept`'s tokens inside the sentence `context` (read as
    the model reads text, with the checkpoint's BOS), relative to their maxima.

    Args:
      relative_to: `FeatureStats` or [X] maxima over held-out rows (features that never fired
        there are left out).
      where: The config section named in errors ('config.analysis').

    Raises:
      ValueError: when `context` does not hold `concept` as the tokenizer splits it, or no
        feature that fired on the held-out rows fires on the concept.
    """
    ids = tokenizer.encode(context, add_eos=False)
    positions = concept_positions(ids, tokenizer.encode(concept, add_bos=False, add_eos=False))
    if not positions:
        raise ValueError(
            f"{where}.context {context!r} does not hold the concept {concept!r} as the "
            "tokenizer splits it; write one that does."
        )
    found = analysis.search_features(model, params, sae, sae_params, np.asarray(ids),
                                     positions=positions, k=k, relative_to=relative_to)  # fmt: skip
    if not len(found.features):
        raise ValueError(
            f"No SAE feature that fires on the held-out rows fires on {concept!r} in {context!r}; "
            f"set another {where}.concept."
        )
    return found


@lock.holding  # One job per workdir.
def run(config, workdir: str) -> dict[str, Any]:
    """Runs the analysis job; returns {'sae', 'hook', 'concept', 'feature' (the best found),
    'search': [{'feature', 'score', 'activation', 'max_activation', 'above_max'}, ...],
    'dashboard', 'concept_dashboard', 'heldout_rows'}.

    `above_max` marks a feature the concept drives above its maximum over the held-out rows
    (score > 1): that maximum, and so the score, understate what the feature does.

    Raises:
      ValueError: for unknown fields; when no feature that fired on the held-out rows fires on
        the concept.
    """
    analysis_config = records.from_dict(AnalysisConfig, config.analysis, where="config.analysis")
    stage = workdir_lib.subconfig(config, keep=("seed", "data", "sae", "analysis"))
    workdir = workdir_lib.prepare_workdir(stage, workdir, overwrite_config=True)
    model_path = analysis_config.model_path or str(workdir.parent / "lm" / "export")
    model, params, tokenizer = workdir_lib.load_model(workdir, model_path, job="the analysis job")
    sae_path = analysis_config.sae or sae_job.pipeline_topk_sae(workdir, "config.analysis.sae")
    sae_job.check_model(sae_path, model, params, where="config.analysis",
                        allowed=analysis_config.allow_other_model)  # fmt: skip
    sae, sae_params = saes.load(sae_path)

    _, heldout = documents(config.data)
    rows = sample_rows(config.data, heldout, tokenizer, analysis_config.max_rows, config.seed)
    size = analysis_config.batch_size
    batches = metrics.Tracked(
        [rows[i : i + size] for i in range(0, len(rows), size)],
        "analysis: feature statistics",
        size * rows.shape[-1],
    )
    exclusions = sae_job.exclusions(config.get("sae") or {}, tokenizer, config.data)
    written = analysis.analyse(model, params, sae, sae_params, batches, workdir,
                               tokenizer=tokenizer, **exclusions)  # fmt: skip
    stats = written["stats"]

    found = search_concept(model, params, sae, sae_params, tokenizer, analysis_config.concept,
                           analysis_config.context, k=analysis_config.top, relative_to=stats,
                           where="config.analysis")  # fmt: skip
    search = [
        {
            "feature": int(f),
            "score": float(s),
            "activation": float(a),
            "max_activation": float(stats.max[f]),
            "above_max": bool(above),
            "density": float(stats.fires[f] / max(stats.num_tokens, 1)),
            "top_tokens": top_tokens(stats, int(f), tokenizer),
        }
        for f, s, a, above in zip(
            found.features, found.scores, found.activations, found.above_max, strict=True
        )
    ]
    concept_page = str(workdir / CONCEPT_DASHBOARD)
    parallel.on_main_process(
        analysis.write_dashboard,
        concept_page,
        stats,
        logit_effects=written["logit_effects"],
        tokenizer=tokenizer,
        features=[entry["feature"] for entry in search],
        title=f"Features for {analysis_config.concept!r} at {stats.site}"
        + "".join(
            f"; feature {e['feature']} at {e['score']:.2f}x its held-out max (not seen there)"
            for e in search
            if e["above_max"]
        ),
    )
    results = {
        "sae": sae_path,
        "hook": stats.site,
        "concept": analysis_config.concept,
        "feature": search[0]["feature"],
        "search": search,
        "dashboard": written["dashboard"],
        "concept_dashboard": concept_page,
        "heldout_rows": len(rows),
    }
    search_json = json.dumps(results, indent=2, ensure_ascii=False)
    parallel.on_main_process(paths.write_text, workdir / SEARCH_FILE, search_json)
    return results


def top_tokens(stats, feature: int, tokenizer, count: int = 8) -> list[str]:
    """The distinct tokens a feature fires hardest on (at its top activations), in order."""
    seen: list[str] = []
    for k in range(stats.top_values.shape[1]):
        if not np.isfinite(stats.top_values[feature, k]) or len(seen) == count:
            break
        token = int(stats.top_tokens[feature, k, stats.context_before])
        piece = "".join(tokenizer.token_pieces([token], skip_special_tokens=False))
        if piece not in seen:
            seen.append(piece)
    return seen


def format_search(results: dict[str, Any]) -> str:
    """The features found, one line each, best first."""
    lines = [f"Features for {results['concept']!r} at {results['hook']} (activation / its max):"]
    for entry in results["search"]:
        above = "  ABOVE its held-out max" if entry.get("above_max") else ""
        tokens = ", ".join(repr(t) for t in entry.get("top_tokens", [])[:5])
        lines.append(
            f"  feature {entry['feature']:>5}: {entry['activation']:.3g} / "
            f"{entry['max_activation']:.3g} = {entry['score']:.2f}{above}"
            + (f"; fires most on {tokens}" if tokens else "")
        )
    return "\n".join(lines)
