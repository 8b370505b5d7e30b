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
5. with `sweep_prompts`, the effect measured the way steering benchmarks do (AxBench, Wu et
   al. 2025): for each method ('clamp' the feature to strength x max, 'add' strength x max
   to it: its decoder direction, or, the baseline, 'diffmean': add the difference-in-means
   direction between the site's rows on the concept's tokens in `context` and on held-out
   text, scaled to the norm 'add' adds at that strength), positions ('all', or only the
   'generated' tokens) and
   strength, a greedy and `samples` sampled completions of every prompt, scored by the share
   that mention the concept (any of `concept_words`, as whole words) and by fluency (the
   unsteered model's loss on the completion, nats/token), against unsteered; the best
   setting is the one mentioning the concept most while its loss stays within
   `fluency_margin` of unsteered (`sweep.png` plots both);
6. `<workdir>/steering.json` with the completions and the sweep.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from interp import parallel, paths, records, steering
from interp import sae as saes
from interp.analysis import plots
from interp.data import activations
from interp.data.documents import documents, sample_rows
from interp.jobs import analyse as analyse_job
from interp.jobs import lock
from interp.jobs import sae as sae_job
from interp.jobs import workdir as workdir_lib
from interp.models import hooks, sites
from interp.models.generate import generate

RESULTS_FILE = "steering.json"
SWEEP_PLOT = "sweep.png"


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
      sweep_prompts: Prompts the sweep completes (nothing of the concept in them); () = no
        sweep.
      concept_words: Words (case-insensitive, whole words) a completion mentioning the
        concept holds.
      methods: Of 'clamp', 'add' and 'diffmean'.
      positions: Of 'all' and 'generated'.
      sweep_strengths: Multiples of the feature's maximum activation.
      samples: Sampled completions per prompt and setting, besides the greedy one.
      temperature: Of the sampled completions.
      sweep_tokens: Tokens generated per sweep completion.
      fluency_margin: How far (nats/token) above the unsteered loss the best setting's
        loss may be.
      allow_other_model: Use an SAE the SAE job trained on another model (refused by
        default: `interp.jobs.sae.check_model`).
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
    sweep_prompts: tuple = ()
    concept_words: tuple = ()
    methods: tuple = steering.METHODS
    positions: tuple = steering.POSITIONS
    sweep_strengths: tuple = (1.0, 2.0, 4.0, 8.0)
    samples: int = 2
    temperature: float = 0.7
    sweep_tokens: int = 24
    fluency_margin: float = 1.0
    allow_other_model: bool = False

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
        if not self.sweep_prompts:
            return
        for name, allowed in (("methods", steering.METHODS), ("positions", steering.POSITIONS)):
            unknown = [v for v in getattr(self, name) if v not in allowed]
            if unknown or not getattr(self, name):
                raise ValueError(
                    f"config.steering.{name} must be some of {allowed}; got "
                    f"{getattr(self, name)!r}."
                )
        if not self.concept_words or isinstance(self.concept_words, str):
            raise ValueError(
                "config.steering.concept_words must list the words that show the concept, "
                "e.g. ('whale', 'whales'); the sweep counts completions holding one."
            )
        strengths = self.sweep_strengths
        if not strengths or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in strengths
        ):
            raise ValueError(
                f"config.steering.sweep_strengths must be finite numbers, e.g. (1.0, 4.0); "
                f"got {strengths!r}."
            )
        if self.samples < 0 or self.sweep_tokens < 1 or not self.temperature > 0:
            raise ValueError(
                "config.steering needs samples >= 0, sweep_tokens >= 1 and temperature > 0; "
                f"got {self.samples}, {self.sweep_tokens}, {self.temperature}."
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
    sae_path = steer_config.sae or sae_job.pipeline_topk_sae(workdir, "config.steering.sae")
    sae_job.check_model(sae_path, model, params, where="config.steering",
                        allowed=steer_config.allow_other_model)  # fmt: skip
    sae, sae_params = saes.load(sae_path)
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
    exclusions = sae_job.exclusions(config.get("sae") or {}, tokenizer, config.data)
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
    sweep = None
    if steer_config.sweep_prompts:
        head = sae.config.hook_head_index
        baseline_rows = _site_rows(model, params, hook, head, batches[:4], exclusions)
        concept_rows = _concept_rows(model, params, hook, head, tokenizer,
                                     steer_config.concept, steer_config.context)  # fmt: skip
        sweep = _sweep(
            steer_config, model, params, sae, sae_params, tokenizer, hook, feature,
            float(maxima[feature]), config.seed, concept_rows, baseline_rows,
        )  # fmt: skip
        parallel.on_main_process(
            plots.plot_steering_sweep, sweep["settings"], sweep["unsteered"],
            workdir / SWEEP_PLOT,
        )  # fmt: skip
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
        "sweep": sweep,
    }
    written = json.dumps(results, indent=2, ensure_ascii=False)
    parallel.on_main_process(paths.write_text, workdir / RESULTS_FILE, written)
    return results


def _pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 [B, width] tokens and their mask."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return tokens, mask


def _site_rows(model, params, hook, head_index, batches, exclusions) -> np.ndarray:
    """[N, D] float32: the rows of `hook` at the positions SAEs see, over `batches`."""
    out = []
    for tokens in batches:
        _, values = hooks.run_with_hooks(model, params, tokens, capture=[hook])
        rows = np.asarray(sites.to_rows(hook, values[hook], head_index), np.float32)
        keep = activations.keep_mask(np.asarray(tokens), **exclusions)
        out.append(rows[keep])
    return np.concatenate(out)


def _concept_rows(model, params, hook, head_index, tokenizer, concept, context) -> np.ndarray:
    """[N, D]: the rows of `hook` at `concept`'s tokens inside the sentence `context`."""
    ids = tokenizer.encode(context, add_eos=False)
    positions = analyse_job.concept_positions(ids, tokenizer.encode(concept, add_bos=False,
                                                                    add_eos=False))  # fmt: skip
    if not positions:
        raise ValueError(
            f"config.steering.context {context!r} does not hold the concept {concept!r} as "
            "the tokenizer splits it; write one that does."
        )
    _, values = hooks.run_with_hooks(model, params, np.asarray([ids]), capture=[hook])
    rows = np.asarray(sites.to_rows(hook, values[hook], head_index), np.float32)[0]
    return rows[positions]


def _sweep(cfg, model, params, sae, sae_params, tokenizer, hook, feature, maximum, seed,
           concept_rows, baseline_rows):  # fmt: skip
    """The measured sweep (module docstring, step 5): {'feature', 'max_activation',
    'unsteered': setting, 'settings': [setting, ...], 'best': the best SAE setting (clamp or
    add) or None, 'best_baseline': the best diffmean setting or None}; a setting is
    {'method', 'positions', 'strength', 'value', 'concept_share', 'concept_share_greedy',
    'fluency_loss', 'completions': the greedy completion of each prompt}."""
    prompts = [tokenizer.encode(p, add_eos=False) for p in cfg.sweep_prompts]
    width = max(len(p) for p in prompts)
    model.config.check_length(
        width + cfg.sweep_tokens,
        f"config.steering.sweep_prompts' longest ({width} tokens) + sweep_tokens "
        f"{cfg.sweep_tokens}",
    )
    pad_id = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else 0
    runs = [(prompts, 0.0)]  # Greedy, then the sampled rows (each prompt `samples` times).
    if cfg.samples:
        runs.append(([p for p in prompts for _ in range(cfg.samples)], cfg.temperature))
    words = re.compile(
        r"\b(?:" + "|".join(re.escape(w.strip()) for w in cfg.concept_words) + r")\b", re.I
    )

    # The non-SAE baseline: the difference in means between the site's rows on the concept
    # (its tokens in `context`) and on held-out text, scaled to the norm 'add' adds at the
    # same strength, so the two compare at equal perturbation size.
    unit = steering.feature_intervention(sae, sae_params, [steering.Add(feature, 1.0)], hook=hook)
    base = jnp.asarray(baseline_rows.mean(0))[None, None]
    add_norm = float(jnp.linalg.norm(unit(base) - base))  # Residual units per unit of code.
    direction = None
    if "diffmean" in cfg.methods:
        direction = steering.diff_mean(concept_rows, baseline_rows)

    def measure(method, positions, strength):
        value = strength * maximum
        if method == "diffmean":
            fn = steering.AddVector(jnp.asarray(value * add_norm * direction))
        else:
            edit = (
                steering.Add(feature, 0.0)
                if method is None
                else steering.sweep_edit(method, feature, value)
            )  # Unsteered as a no-op edit: the same compiled programs as the steered ones.
            fn = steering.feature_intervention(sae, sae_params, [edit], hook=hook)
        texts, losses, greedy = [], [], []
        for rows, temperature in runs:
            tokens, mask = _pad(rows, width, pad_id)
            lengths = mask.sum(1)
            start = lengths if positions == "generated" else np.zeros_like(lengths)
            out = generate(
                model, params, tokens, cfg.sweep_tokens, attention_mask=mask,
                temperature=temperature, rng=jax.random.key(seed),
                interventions={hook: steering.from_position(fn, start)},
            )  # fmt: skip
            new = np.asarray(out)[:, width:]
            joined = [list(r) + list(n) for r, n in zip(rows, new, strict=True)]
            full, full_mask = _pad(joined, width + cfg.sweep_tokens, pad_id)
            losses += list(steering.completion_loss(model, params, full, full_mask, lengths))
            batch = ["".join(tokenizer.token_pieces(n, True)) for n in new]
            texts += batch
            if temperature == 0.0:
                greedy = batch
        hits = [bool(words.search(t)) for t in texts]
        setting = {
            "method": method,
            "positions": positions,
            "strength": strength,
            "value": value,
            "concept_share": float(np.mean(hits)),
            "concept_share_greedy": float(np.mean(hits[: len(prompts)])),
            "fluency_loss": float(np.nanmean(losses)),
            "completions": greedy,
        }
        logging.info(
            "Sweep %s: concept %.0f%%, loss %.2f nats/token; e.g. %r",
            "unsteered" if method is None else f"{method} {positions} x{strength:g}",
            100 * setting["concept_share"], setting["fluency_loss"], greedy[0][:80],
        )  # fmt: skip
        return setting

    unsteered = measure(None, "all", 0.0)
    settings = [
        measure(method, positions, float(strength))
        for method in cfg.methods
        for positions in cfg.positions
        for strength in cfg.sweep_strengths
    ]

    def best(methods):
        """The setting of `methods` mentioning the concept most within the fluency margin
        (ties: the more fluent), or None when none mentions it more than unsteered text."""
        fluent = [
            s for s in settings if s["method"] in methods
            and s["fluency_loss"] <= unsteered["fluency_loss"] + cfg.fluency_margin
        ]  # fmt: skip
        found = max(fluent, key=lambda s: (s["concept_share"], -s["fluency_loss"]), default=None)
        if found is None or found["concept_share"] <= unsteered["concept_share"]:
            return None
        return found

    return {
        "feature": int(feature),
        "max_activation": maximum,
        "prompts": list(cfg.sweep_prompts),
        "concept_words": list(cfg.concept_words),
        "samples": cfg.samples,
        "temperature": cfg.temperature,
        "fluency_margin": cfg.fluency_margin,
        "unsteered": unsteered,
        "settings": settings,
        "best": best(("clamp", "add")),  # With the SAE feature.
        "best_baseline": best(("diffmean",)),
    }


def format_sweep(sweep: dict[str, Any]) -> str:
    """The sweep as a table: per setting, concept share and fluency, best marked."""
    rows = [sweep["unsteered"], *sweep["settings"]]
    lines = [
        f"Steering sweep: {len(sweep['prompts'])} prompts x (greedy + {sweep['samples']} "
        f"sampled); concept = any of {', '.join(sweep['concept_words'])}",
        f"{'setting':<24} {'concept':>8} {'greedy':>7} {'loss':>6}",
    ]
    for s in rows:
        name = "unsteered" if s["method"] is None else (
            f"{s['method']} {s['positions']} x{s['strength']:g}")  # fmt: skip
        mark = ""
        if s == sweep["best"]:
            mark = "  <- best SAE setting"
        elif s == sweep.get("best_baseline"):
            mark = "  <- best baseline"
        share, greedy = 100 * s["concept_share"], 100 * s["concept_share_greedy"]
        lines.append(f"{name:<24} {share:>7.0f}% {greedy:>6.0f}% {s['fluency_loss']:>6.2f}{mark}")
    if sweep["best"] is None:
        lines.append(
            f"No SAE setting within {sweep['fluency_margin']:g} nats/token of unsteered "
            "fluency mentions the concept more than the unsteered text."
        )
    return "\n".join(lines)


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
