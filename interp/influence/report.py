"""What an influence search found, for people: a self-contained HTML page and a heatmap per query.

The page lists, per query, the most positively and most negatively influential training
sequences with every token coloured by its per-token influence (red raises the query's
measurement, blue lowers it; hover for the value); the PNG shows the same sequences' influence
split over the tracked layers (matplotlib), the view in which Grosse et al. 2023 saw wording
at the bottom and top layers and meaning in the middle.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from interp import paths


def _color(value: float, scale: float) -> str:
    """A background colour: red for positive, blue for negative, alpha by magnitude."""
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale) * 0.85
    rgb = "220, 40, 40" if value > 0 else "40, 90, 220"
    return f"rgba({rgb}, {alpha:.3f})"


def _sequence_html(tokens: Sequence[str], token_scores: Sequence[float], scale: float) -> str:
    spans = []
    for text, value in zip(tokens, token_scores, strict=True):
        spans.append(
            f'<span class="tok" style="background:{_color(value, scale)}" '
            f'title="{value:+.4g}">{html.escape(text)}</span>'
        )
    return "".join(spans)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }
.query { border-top: 2px solid #444; margin-top: 2em; padding-top: 1em; }
.prompt { color: #555; } .completion { font-weight: bold; }
.row { margin: 0.6em 0; line-height: 1.7; } .score { font-family: monospace; color: #333; }
.tok { white-space: pre-wrap; border-radius: 2px; }
"""


def write_report(directory: paths.PathLike, results: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Writes `report.html`, `influence.json` and `layers_<i>.png` under `directory`.

    Args:
      directory: Local or gs:// folder.
      results: One dict per query: 'name', 'prompt', 'completion', 'measurement', 'modules'
        (names), and 'positive' / 'negative': lists of {'row', 'score', 'tokens' (strings),
        'token_scores', 'layer_scores'}.

    Returns:
      {'html': path, 'json': path, 'png': [paths]} as strings.
    """
    folder = paths.resolve(directory)
    folder.mkdir(parents=True, exist_ok=True)
    sections, pngs = [], []
    for index, result in enumerate(results):
        shown = result["positive"] + result["negative"]
        # A robust scale: one outsized token would otherwise wash out every other colour.
        magnitudes = np.abs([v for s in shown for v in s["token_scores"]] or [0.0])
        scale = max(float(np.percentile(magnitudes, 98)), 1e-30)
        rows = []
        for title, entries in (("Most positive", result["positive"]),
                               ("Most negative", result["negative"])):  # fmt: skip
            rows.append(f"<h3>{title}</h3>")
            for entry in entries:
                rows.append(
                    f'<div class="row"><span class="score">row {entry["row"]}, influence '
                    f"{entry['score']:+.4g}</span><br>"
                    f"{_sequence_html(entry['tokens'], entry['token_scores'], scale)}</div>"
                )
        png = f"layers_{index}.png"
        _heatmap(folder / png, result)
        pngs.append(str(folder / png))
        sections.append(
            f'<div class="query" id="query-{index}"><h2>{html.escape(result["name"])}</h2>'
            f'<p><span class="prompt">{html.escape(result["prompt"])}</span>'
            f'<span class="completion">{html.escape(result["completion"])}</span></p>'
            f"<p>Measurement: {html.escape(result['measurement'])}</p>"
            f'<img src="{png}" alt="influence by layer" width="640">{"".join(rows)}</div>'
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Influence</title>"
        f"<style>{_STYLE}</style></head><body><h1>Influence of training sequences</h1>"
        "<p>Red tokens raise the query's measurement when their sequence is up-weighted, blue "
        "lower it (EK-FAC influence, Grosse et al. 2023); hover for the value.</p>"
        f"{''.join(sections)}</body></html>\n"
    )
    paths.write_text(folder / "report.html", page)
    paths.write_text(folder / "influence.json", json.dumps(list(results), indent=1) + "\n")
    return {"html": str(folder / "report.html"), "json": str(folder / "influence.json"),
            "png": pngs}  # fmt: skip


def _heatmap(path, result) -> None:
    """Layers x top sequences, diverging colours centred on 0."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # No display: files only.
    import matplotlib.pyplot as plt

    entries = result["positive"] + result["negative"]
    values = np.array([e["layer_scores"] for e in entries], np.float64).T  # [M, S]
    bound = max(float(np.abs(values).max()), 1e-30)
    figure, axes = plt.subplots(figsize=(1.2 + 0.5 * len(entries), 1.0 + 0.3 * len(values)))
    image = axes.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    axes.set_yticks(range(len(result["modules"])), result["modules"], fontsize=7)
    axes.set_xticks(range(len(entries)), [f"row {e['row']}" for e in entries], rotation=60,
                    fontsize=7)  # fmt: skip
    axes.set_title(result["name"], fontsize=9)
    figure.colorbar(image, ax=axes, label="influence")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    paths.write_bytes(path, buffer.getvalue())
