"""The steering job: a prompt's completions with an SAE feature clamped to several multiples
of its maximum activation, side by side with the unsteered completion.

`run(config, workdir)` reads `config.steering` (see `configs/demo.py`):

1. the model (`model_path`, by default the pipeline's LM) and the SAE (`sae`, by default the
   pipeline's first TopK SAE), steered at the SAE's own site;
2. each feature's maximum activation over `max_rows` held-out rows of `config.data` spread
   over the whole held-out text (`interp.data.documents.sample_rows`, seeded by
   `config.seed`: the rows the analysis stage takes), with the positions `config.sae.exclude`
   leaves out of SAE training left out here too (`interp.steering.max_activations`; saved as
   `<workdir>/max_activations.npy`);
3. the feature: `feature`, or (-1) the one most active on `concept`'s tokens inside the
   sentence `context`, relative to its maximum (the analysis job's search,
   `interp.jobs.analyse.search_concept`); a concept that drives it above that maximum is
   flagged (`above_max` and a warning: "x max" then understates the feature's range);
4. greedy completions of `prompt` with the feature clamped to strength x maximum at every
   position, for each strength (the error term kept), one compiled program for all of them;
5. `<workdir>/steering.json` with the completions.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging

from interp import parallel, paths, records, steering
from interp import sae as saes
from interp.data.documents import documents, sample_rows
from interp.jobs import analyse as analyse_job
from interp.jobs import lock
from interp.jobs import sae as sae_job
from interp.jobs import workdir as workdir_lib
from interp.models import hooks
from interp.models.generate import generate

RESULTS_FILE = "steering.json"


@dataclasses.dataclass(frozen=True)
class SteeringConfig:
    """`config.steering`; unknown fields are an error.

    Attributes:
      model_path: Hugging Face folder; '' = the pipeline's LM (`<workdir>/../lm/export`).
      sae: SAE folder; '' = the pipeline's first TopK SAE (`<workdir>/../sae/saes/*-topk-*`).
      prompt: The text continued.
      feature: The latent steered; -1 = the one most active on `concept` in `context`.
      concept: Text whose tokens pick the feature when `feature` is -1.
      context: A sentence holding `concept`, where its tokens are read in context.
      strengths: Clamp values as multiples of the feature's maximum activation.
      max_new_tokens: Tokens generated per completion.
      max_rows: Held-out rows the maxima are taken over, drawn from all of the held-out
        text by `config.seed` (all of it when it has no more).
      batch_size: Rows per forward pass when taking maxima.
    """

    model_path: str = ""
    sae: str = ""
    prompt: str = "Alice was beginning to"
    feature: int = -1
    concept: str = " whale"
    context: str = "The whale rose from the sea, and the whale spouted."
    strengths: tuple = (0.0, 2.0, 5.0, 10.0)
    max_new_tokens: int = 20
    max_rows: int = 256
    batch_size: int = 16

    def __post_init__(self):
        # Checked here, before any model is loaded: a bad strength would otherwise surface
        # only after the maxima pass (a string), or as an empty completion (inf).
        strengths = self.strengths
        if isinstance(strengths, str | bytes) or not isinstance(strengths, Sequence):
            raise ValueError(
                f"config.steering.strengths must be a list of numbers, e.g. (0.0, 2.0, 5.0); "
                f"got {strengths!r}."
            )
        for strength in strengths:
            if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
                raise ValueError(
                    f"config.steering.strengths holds {strength!r}, which is not a number; "
                    "strengths are multiples of the feature's maximum activation, e.g. 5.0."
                )
            if not math.isfinite(strength):
                raise ValueError(
                    f"config.steering.strengths holds {strength!r}; strengths must be finite "
                    "numbers (an infinite clamp makes the completion empty)."
                )


@lock.holding  # One job per workdir.
def run(config, workdir: str) -> dict[str, Any]:
    """Runs the steering job; returns {'feature', 'hook', 'max_activation', 'concept_score',
    'above_max', 'heldout_rows', 'prompt', 'completions': [{'strength', 'value', 'text'},
    ...]} (strength None: unsteered; concept_score None for a `feature` given).

    Raises:
      ValueError: for unknown fields, strengths that are not finite numbers (before any
        model is loaded), a feature outside the SAE (see
        `interp.steering.feature_intervention`).
    """
    steer_config = records.from_dict(SteeringConfig, config.steering, where="config.steering")
    stage = workdir_lib.subconfig(config, keep=("seed", "data", "sae", "steering"))
    workdir = workdir_lib.prepare_workdir(stage, workdir, overwrite_config=True)
    model_path = steer_config.model_path or str(workdir.parent / "lm" / "export")
    model, params, tokenizer = workdir_lib.load_model(workdir, model_path, job="the steering job")
    sae, sae_params = saes.load(
        steer_config.sae or sae_job.pipeline_topk_sae(workdir, "config.steering.sae")
    )
    if not sae.config.hook_name:
        raise ValueError("The SAE names no hook site (hook_name); steering needs it.")
    (hook,) = hooks.resolve(model, [sae.config.hook_name])
    prompt_ids = tokenizer.encode(steer_config.prompt, add_eos=False)
    model.config.check_length(  # Before the maxima pass, not after it.
        len(prompt_ids) + steer_config.max_new_tokens,
        f"config.steering.prompt's {len(prompt_ids)} tokens + config.steering.max_new_tokens "
        f"{steer_config.max_new_tokens}",
    )

    _, heldout = documents(config.data)
    rows = sample_rows(config.data, heldout, tokenizer, steer_config.max_rows, config.seed)
    size = steer_config.batch_size
    batches = [rows[i : i + size] for i in range(0, len(rows), size)]
    exclusions = sae_job.exclusions(config.get("sae") or {}, tokenizer)
    maxima = steering.max_activations(model, params, sae, sae_params, batches, **exclusions)
    buffer = io.BytesIO()
    np.save(buffer, maxima)
    parallel.on_main_process(paths.write_bytes, workdir / "max_activations.npy", buffer.getvalue())

    feature, concept_score = steer_config.feature, None
    if feature < 0:
        found = analyse_job.search_concept(
            model, params, sae, sae_params, tokenizer, steer_config.concept,
            steer_config.context, k=1, relative_to=maxima, where="config.steering",
        )  # fmt: skip
        feature, concept_score = int(found.features[0]), float(found.scores[0])
        if found.above_max[0]:
            logging.warning(
                "The concept drives feature %d to %.2f x its maximum over %d held-out rows: "
                "the strengths (x max) are multiples of a maximum below the feature's range.",
                feature, concept_score, len(rows),
            )  # fmt: skip
    prompt = jnp.asarray([prompt_ids], jnp.int32)
    length = steer_config.max_new_tokens

    def complete(interventions=None):
        tokens = generate(model, params, prompt, length, interventions=interventions)
        # Joined pieces: no U+FFFD for a character cut by max_new_tokens.
        return "".join(tokenizer.token_pieces(np.asarray(tokens[0, len(prompt_ids) :]), True))

    completions = [{"strength": None, "value": None, "text": complete()}]
    for strength in steer_config.strengths:
        clamp = steering.Clamp.to_max(feature, float(strength), maxima)
        fn = steering.feature_intervention(sae, sae_params, [clamp], hook=hook)
        completions.append(
            {"strength": float(strength), "value": float(clamp.value), "text": complete({hook: fn})}
        )
        logging.info("Strength %g: %r", strength, completions[-1]["text"])
    results = {
        "hook": hook,
        "feature": int(feature),
        "max_activation": float(maxima[feature]),
        # The concept's activation / max when the search chose the feature; above_max: > 1.
        "concept_score": concept_score,
        "above_max": bool(concept_score is not None and found.above_max[0]),
        "heldout_rows": len(rows),
        "prompt": steer_config.prompt,
        "completions": completions,
    }
    written = json.dumps(results, indent=2, ensure_ascii=False)
    parallel.on_main_process(paths.write_text, workdir / RESULTS_FILE, written)
    return results


def format_side_by_side(results: dict[str, Any], width: int = 100) -> str:
    """The completions, one line per strength, after the prompt and the feature."""
    lines = [
        f"Steering feature {results['feature']} at {results['hook']} (max activation "
        f"{results['max_activation']:.3g}); prompt: {results['prompt']!r}",
    ]
    if results.get("above_max"):
        lines.append(
            f"  (the concept drives it to {results['concept_score']:.2f} x that max: the "
            "held-out rows did not show its range)"
        )
    for entry in results["completions"]:
        label = "unsteered" if entry["strength"] is None else f"{entry['strength']:g} x max"
        body = json.dumps(entry["text"], ensure_ascii=False)[1:-1]  # One line.
        line = f"{label:>12} | {body}"
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return "\n".join(lines)
