"""What a pipeline run found, as Markdown, from the result files its stages wrote.

    text = results.summarize("workdir/demo")      # lm/, sae/, influence/, analysis/, steer/
    results.write_readme_block("README.md", text)  # Between the demo-results markers.

    python -m experiments.results --workdir=workdir/demo [--readme=README.md]

Everything quoted comes from the workdir's files (`lm/summary.json`, `sae/eval.json`,
`influence/summary.json`, `analysis/search.json`, `steer/steering.json`), so the README's
quoted results are regenerated from a run rather than typed in, and cannot drift from it. A
stage that has not run is left out (the text says which).
"""

from __future__ import annotations

import json
from typing import Any

from interp import paths
from interp.jobs import influence as influence_job
from interp.jobs import sae as sae_job
from interp.jobs import steer as steer_job

BEGIN = "<!-- demo-results:begin -->"
END = "<!-- demo-results:end -->"
RESULTS_FILE = "results.md"  # In the pipeline's workdir.


def _read(path) -> Any:
    path = paths.resolve(path)
    return json.loads(path.read_text()) if path.exists() else None


def _quote(text: str, width: int = 160) -> str:
    """One line, JSON-escaped, shortened: a completion as the console shows it."""
    body = json.dumps(text, ensure_ascii=False)[1:-1]
    return body if len(body) <= width else body[: width - 3] + "..."


def _lm(summary: dict[str, Any], config: dict[str, Any] | None) -> list[str]:
    source = (config or {}).get("init_from") or "a model trained from scratch"
    train = (config or {}).get("train", {})
    seq_len = (config or {}).get("data", {}).get("seq_len", "?")
    lines = ["**Language model.** "]
    if (config or {}).get("init_from"):
        lines[0] += (
            f"`{source}` fine-tuned for {summary['step']} steps of {train.get('batch_size', '?')}"
            f" x {seq_len} tokens"
        )
        if train.get("trainable"):
            lines[0] += f" (trainable: {', '.join(f'`{p}`' for p in train['trainable'])})"
        if "eval_loss_before" in summary:
            lines[0] += (
                f": held-out loss {summary['eval_loss_before']:.3f} -> "
                f"{summary['eval_loss']:.3f} nats/token"
            )
    else:
        lines[0] += f"trained from scratch for {summary['step']} steps: held-out loss "
        lines[0] += f"{summary['eval_loss']:.3f} nats/token"
    lines[0] += f" (unigram {summary['unigram_loss']:.3f})."
    planted = summary.get("planted")
    if planted:
        lines.append(
            f"Planted behaviour: {planted['trigger']!r} -> {planted['completion']!r} in "
            f"{len(planted['rows'])} training rows; log p(completion | trigger) "
            f"{planted['logprob_before']:.2f} -> {planted['logprob_after']:.2f} nats."
        )
    lines.append(f'Sample: "{_quote(summary["sample"])}"')
    return lines


def _search(search: dict[str, Any]) -> list[str]:
    lines = [
        f"**Features for {search['concept']!r}** at `{search['hook']}` (activation in context "
        "/ its max over held-out text; the tokens each fires on most):",
        "",
    ]
    for entry in search["search"]:
        tokens = ", ".join(f"`{_quote(t, 20)}`" for t in entry.get("top_tokens", [])[:6])
        above = " (above its held-out max)" if entry.get("above_max") else ""
        lines.append(
            f"- feature {entry['feature']}: {entry['score']:.2f}{above}; fires on "
            f"{100 * entry.get('density', 0):.3f}% of tokens, most on {tokens or '-'}"
        )
    return lines


def _steering(steering: dict[str, Any]) -> list[str]:
    sweep = steering.get("sweep")
    lines = [
        f"**Steering** with feature {steering['feature']} (max activation "
        f"{steering['max_activation']:.3g}).",
    ]
    if not sweep:
        return lines + ["", "```", steer_job.format_side_by_side(steering), "```"]
    plain, margin = sweep["unsteered"], sweep["fluency_margin"]
    lines += ["", "```", steer_job.format_sweep(sweep), "```", ""]

    def described(setting, what):
        return (
            f"{what}: {setting['method']} at {setting['strength']:g} x max on "
            f"{setting['positions']} positions, {100 * setting['concept_share']:.0f}% of "
            f"completions mention the concept (unsteered {100 * plain['concept_share']:.0f}%) "
            f"at a loss of {setting['fluency_loss']:.2f} nats/token (unsteered "
            f"{plain['fluency_loss']:.2f})."
        )

    candidates = (
        ("best", f"The best SAE setting within {margin:g} nats/token of unsteered fluency"),
        ("best_baseline", "The best difference-in-means baseline within the same margin"),
    )
    chosen = [(key, what) for key, what in candidates if sweep.get(key)]
    for key, what in chosen:
        lines.append(described(sweep[key], what))
    if not sweep.get("best"):
        lines.append(
            f"No SAE setting within {margin:g} nats/token of unsteered fluency mentions the "
            "concept more often than unsteered text."
        )
    if chosen:
        names = " / ".join(f"{sweep[k]['method']} x{sweep[k]['strength']:g}" for k, _ in chosen)
        lines += ["", f"Greedy completions, unsteered -> {names}:", ""]
        for i, prompt in enumerate(sweep["prompts"]):
            steered = [_quote(sweep[k]["completions"][i], 90) for k, _ in chosen]
            after = " / ".join(f"**{text}**" for text in steered)
            lines.append(f"- {_quote(prompt)} | {_quote(plain['completions'][i], 90)} -> {after}")
    return lines


def _influence(summary: dict[str, Any]) -> list[str]:
    lines = ["**Influence** (EK-FAC) on the LM's training rows:", ""]
    for query in summary["queries"]:
        line = (
            f"- {query['prompt'][-60:]!r} -> {query['completion']!r}: top rows {query['top_rows']}"
        )
        if "planted_ranks" in query:
            ranks = sorted(r for r in query["planted_ranks"] if r is not None)
            line += f"; planted rows ranked {ranks} of {query['scored_rows']}"
        lines.append(line)
    return lines


def summarize(workdir: paths.PathLike) -> str:
    """Markdown of what the run at `workdir` found (the module docstring's files)."""
    root = paths.resolve(workdir)
    parts, missing = [], []
    lm_summary = _read(root / "lm" / "summary.json")
    if lm_summary:
        parts.append("\n\n".join(_lm(lm_summary, _read(root / "lm" / "config.json"))))
    else:
        missing.append("lm")
    evaluated = _read(root / "sae" / "eval.json")
    if evaluated:
        parts.append("**SAEs** on held-out text, spliced into the model:\n\n"
                     + sae_job.format_table(evaluated))  # fmt: skip
    else:
        missing.append("sae")
    search = _read(root / "analysis" / "search.json")
    if search:
        parts.append("\n".join(_search(search)))
    else:
        missing.append("analysis")
    steering = _read(root / "steer" / steer_job.RESULTS_FILE)
    if steering:
        parts.append("\n".join(_steering(steering)))
    else:
        missing.append("steer")
    influence = _read(root / "influence" / influence_job.SUMMARY_FILE)
    if influence:
        parts.append("\n".join(_influence(influence)))
    else:
        missing.append("influence")
    if missing:
        parts.append(f"(No results yet from: {', '.join(missing)}.)")
    return "\n\n".join(parts) + "\n"


def write_readme_block(readme: paths.PathLike, text: str) -> None:
    """Replaces what lies between `BEGIN` and `END` in `readme` with `text`.

    Raises:
      ValueError: if the file lacks either marker (or has them out of order).
    """
    path = paths.resolve(readme)
    content = path.read_text()
    start, end = content.find(BEGIN), content.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block to write the results into.")
    head = content[: start + len(BEGIN)]
    path.write_text(f"{head}\n{text.strip()}\n{content[end:]}")
