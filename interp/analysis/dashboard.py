"""A static, self-contained HTML dashboard of an SAE's features (one page, no network).

    stats = feature_stats(model, params, sae, sae_params, batches)
    effects = logit_effects(model, params, sae_params, sae=sae)
    write_dashboard(f"{workdir}/dashboard.html", stats, logit_effects=effects,
                    tokenizer=tokenizer)

The page has a searchable feature list (a number finds that feature; other text finds the
features with it in their top contexts or logit-effect tokens) and a panel per feature, in
the manner of sae-vis and Neuronpedia: statistics (density, max, mean when firing, quantiles), the
activation histogram (inline SVG from the binned counts), the tokens the feature's decoder
direction most raises and lowers, and its top contexts with each token highlighted by the
feature's activation (the value on hover). The density histogram of all features is embedded
as a PNG. Everything is inline (styles, script, images as data: URIs): the file can be opened
from disk or a bucket. Token text is HTML-escaped; a context's tokens read as its decoded text
(a character split over byte tokens is shown whole, on the token that completes it).

Size: about 25 kB per feature with 20 contexts of 13 tokens, so by default only the first
`max_features` features that fired are written; pass `features=` to choose.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from interp import paths
from interp.analysis import plots
from interp.analysis.features import FeatureStats, check_features
from interp.analysis.logits import LogitEffects
from interp.models import tokenizer as tokenizer_lib

MAX_FEATURES = 2000
_HISTOGRAM_BARS = 40


class _TokenText:
    """Token ids as text, from a tokenizer (`decode`), a callable id -> str, or None (ids).

    `window(ids)` gives one string per token of a context, joined the window's text
    (`interp.models.tokenizer.split_decoded`: a character made of several byte tokens is
    shown once, on the token that completes it); `label(id)` is one token on its own.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.labels: dict[int, str] = {}

    def window(self, ids: Sequence[int]) -> list[str]:
        ids = [int(t) for t in ids]
        tokenizer = self.tokenizer
        if hasattr(tokenizer, "token_pieces"):
            pieces = tokenizer.token_pieces(ids, skip_special_tokens=False)
        elif hasattr(tokenizer, "decode"):  # E.g. a transformers tokenizer.
            prefixes = [self._decode(ids[: k + 1]) for k in range(len(ids))]
            pieces = tokenizer_lib.split_decoded(prefixes)
        else:
            pieces = [self.label(t) for t in ids]
        return [_visible(str(piece)) for piece in pieces]

    def label(self, token: int) -> str:
        token = int(token)
        if token not in self.labels:
            tokenizer = self.tokenizer
            if tokenizer is None:
                value = f"<{token}>"
            elif hasattr(tokenizer, "token_label"):
                value = tokenizer.token_label(token)
            elif hasattr(tokenizer, "decode"):
                value = self._decode([token])
            else:
                value = tokenizer(token)
            self.labels[token] = _visible(str(value))
        return self.labels[token]

    def _decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        except TypeError:  # A decode without that option.
            return self.tokenizer.decode(ids)


def _visible(text: str) -> str:
    """Control characters made visible (a newline as U+21B5, others as \\xNN): byte-level
    tokens decode to them, and a NUL or form feed has no place in an HTML page."""
    out = []
    for char in text:
        if char == "\n":
            out.append("\u21b5")
        elif ord(char) < 32 or 0x7F <= ord(char) < 0xA0:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4g}"


def _histogram_svg(stats: FeatureStats, feature: int) -> str:
    """Bars of the feature's binned activations (merged to at most 40), log-spaced x."""
    counts = stats.histogram[feature]
    used = np.nonzero(counts)[0]
    if not used.size:
        return '<p class="empty">Never fired.</p>'
    lo, hi = int(used[0]), int(used[-1]) + 1
    groups = np.array_split(np.arange(lo, hi), min(_HISTOGRAM_BARS, hi - lo))
    bars = [int(counts[g].sum()) for g in groups]
    width, height, bar = 320, 80, 320 / len(groups)
    top = max(bars)
    rects = []
    for i, (group, count) in enumerate(zip(groups, bars, strict=True)):
        h = height * count / top
        left, right = stats.bin_edges[group[0]], stats.bin_edges[group[-1] + 1]
        rects.append(
            f'<rect x="{i * bar:.1f}" y="{height - h:.1f}" width="{max(bar - 1, 1):.1f}" '
            f'height="{h:.1f}"><title>{left:.3g} to {right:.3g}: {count}</title></rect>'
        )
    return (
        f'<svg class="hist" width="{width}" height="{height + 16}" '
        f'viewBox="0 0 {width} {height + 16}">{"".join(rects)}'
        f'<text x="0" y="{height + 13}">{stats.bin_edges[lo]:.3g}</text>'
        f'<text x="{width}" y="{height + 13}" text-anchor="end">'
        f"{stats.bin_edges[hi]:.3g}</text></svg>"
    )


def _context_html(context: dict[str, Any], scale: float, pieces: list[str]) -> str:
    spans = []
    for i, (piece, act) in enumerate(zip(pieces, context["acts"], strict=True)):
        alpha = 0.0 if scale <= 0 else min(1.0, max(act, 0.0) / scale) * 0.9
        cls = "tok peak" if i == context["index"] else "tok"
        spans.append(
            f'<span class="{cls}" style="background:rgba(255, 120, 0, {alpha:.3f})" '
            f'title="{act:.4g}" data-act="{act:.6g}">{html.escape(piece)}</span>'
        )
    return (
        f'<div class="context" data-row="{context["row"]}" '
        f'data-position="{context["position"]}"><span class="ctxval">'
        f"{context['value']:.4g}</span> {''.join(spans)}</div>"
    )


def _logits_html(effects: LogitEffects | None, row: int | None, text) -> str:
    if effects is None or row is None:
        return ""
    sides = []
    for name, tokens, values, cls in (
        ("Raises", effects.top_tokens[row], effects.top_values[row], "pos"),
        ("Lowers", effects.bottom_tokens[row], effects.bottom_values[row], "neg"),
    ):
        items = "".join(
            f'<li class="logit {cls}"><span class="ltok">{html.escape(text.label(t))}</span> '
            f'<span class="lval">{v:+.3f}</span></li>'
            for t, v in zip(tokens, values, strict=True)
        )
        sides.append(f'<div class="side"><h4>{name}</h4><ol>{items}</ol></div>')
    return f'<h3>Logit effects</h3><div class="logits">{"".join(sides)}</div>'


def _panel(stats, feature, effects, row, text) -> tuple[str, str]:
    """(the panel's HTML, the text it is searched by)."""
    contexts = stats.contexts(feature)
    stat_rows = [
        ("density", _fmt(stats.density[feature])),
        ("fires", str(int(stats.fires[feature]))),
        ("max", _fmt(stats.max[feature])),
        ("mean_active", _fmt(stats.mean_active[feature])),
    ] + [
        (f"q{level * 100:g}", _fmt(value))
        for level, value in zip(stats.quantile_levels, stats.quantiles[feature], strict=True)
    ]
    table = "".join(
        f'<tr><th>{key}</th><td class="stat" data-key="{key}">{value}</td></tr>'
        for key, value in stat_rows
    )
    scale = float(stats.max[feature]) if np.isfinite(stats.max[feature]) else 0.0
    pieces = [text.window(c["tokens"]) for c in contexts]
    shown = "".join(_context_html(c, scale, p) for c, p in zip(contexts, pieces, strict=True)) or (
        '<p class="empty">No activating contexts.</p>'
    )
    words = ["".join(p) for p in pieces]  # Whole contexts: 'Émile' may span tokens.
    if effects is not None and row is not None:
        words += [text.label(t) for t in effects.top_tokens[row]]
        words += [text.label(t) for t in effects.bottom_tokens[row]]
    panel = (
        f'<section class="feature" id="feature-{feature}" data-feature="{feature}" hidden>'
        f'<h2>Feature {feature}</h2><div class="head"><table class="stats">{table}</table>'
        f"<div><h3>Activations when firing</h3>{_histogram_svg(stats, feature)}</div></div>"
        f"{_logits_html(effects, row, text)}"
        f'<h3>Top contexts</h3><div class="contexts">{shown}</div></section>'
    )
    return panel, " ".join(words).lower()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }
nav { width: 18em; border-right: 1px solid #ccc; display: flex; flex-direction: column; }
nav input { margin: 0.6em; padding: 0.4em; font-size: 1em; }
nav ul { list-style: none; margin: 0; padding: 0; overflow-y: auto; flex: 1; }
.feature-item { padding: 0.25em 0.8em; cursor: pointer; font-size: 0.9em; }
.feature-item:hover { background: #eef; } .feature-item.selected { background: #dde6ff; }
.feature-item .density { color: #777; float: right; font-family: monospace; }
main { flex: 1; overflow-y: auto; padding: 1em 2em; }
.head { display: flex; gap: 2em; align-items: flex-start; }
table.stats th { text-align: left; padding-right: 1em; font-weight: normal; color: #555; }
table.stats td { font-family: monospace; }
svg.hist rect { fill: #d0603a; } svg.hist text { font-size: 10px; fill: #555; }
.logits { display: flex; gap: 2em; }
.side h4 { margin: 0.2em 0; } .side ol { margin: 0; padding-left: 1.5em; font-size: 0.9em; }
.logit.pos .lval { color: #1a7f37; } .logit.neg .lval { color: #b42318; }
.ltok, .tok { white-space: pre; font-family: monospace; }
.context { margin: 0.3em 0; line-height: 1.8; }
.ctxval { font-family: monospace; color: #555; display: inline-block; width: 5em; }
.tok { border-radius: 2px; } .tok.peak { outline: 1px solid #b45309; }
/* A token with no text of its own (the first bytes of a character a later token completes)
   keeps a thin bar, so that its colour and value still show. */
.tok:empty { display: inline-block; width: 2px; height: 1.1em; vertical-align: text-bottom; }
.empty { color: #888; } #count { padding: 0 0.8em; }
"""

_SCRIPT = """
const search = document.getElementById('search');
const items = Array.from(document.querySelectorAll('.feature-item'));
const panels = Array.from(document.querySelectorAll('.feature'));
function select(feature) {
  panels.forEach(p => { p.hidden = p.dataset.feature !== feature; });
  items.forEach(i => i.classList.toggle('selected', i.dataset.feature === feature));
}
function filter() {
  const query = search.value.trim().toLowerCase();
  const number = /^[0-9]+$/.test(query);  // A number names a feature; other text searches.
  let shown = 0;
  items.forEach(i => {
    const hit = !query || (number ? i.dataset.feature === query : i.dataset.search.includes(query));
    i.hidden = !hit;
    shown += hit ? 1 : 0;
  });
  document.getElementById('count').textContent = shown + ' shown';
}
items.forEach(i => i.addEventListener('click', () => select(i.dataset.feature)));
search.addEventListener('input', filter);
if (items.length) select(items[0].dataset.feature);
filter();
"""


def write_dashboard(
    path: paths.PathLike,
    stats: FeatureStats,
    *,
    logit_effects: LogitEffects | None = None,
    tokenizer: Any = None,
    features: Sequence[int] | None = None,
    max_features: int = MAX_FEATURES,
    title: str = "SAE features",
) -> str:
    """Writes the dashboard page of one SAE to `path` (local or gs://).

    Args:
      path: The HTML file, e.g. '<workdir>/dashboard.html'.
      stats: The SAE's `feature_stats`.
      logit_effects: Its `logit_effects` (any features; those given are shown).
      tokenizer: Turns token ids into text: an `interp.models.tokenizer.Tokenizer` (or any
        object with `decode(ids)`: a context's tokens are shown so that together they read
        as its decoding, see `Tokenizer.token_pieces`), a callable id -> str, or None (ids
        shown as <id>).
      features: The features to show, in this order (default: those that fired, up to
        `max_features`, by index).
      max_features: Cap on the default list.
      title: The page's title.

    Returns:
      The path written, as a string.

    Raises:
      ValueError: for a feature outside the SAE.
    """
    if features is None:
        features = np.nonzero(stats.fires > 0)[0][:max_features]
    features = [int(f) for f in check_features(np.asarray(features, np.int64), stats.num_latents)]
    text = _TokenText(tokenizer)
    rows = {}
    if logit_effects is not None:
        rows = {int(f): i for i, f in enumerate(logit_effects.features)}
    items, panels = [], []
    for feature in features:
        panel, words = _panel(stats, feature, logit_effects, rows.get(feature), text)
        panels.append(panel)
        items.append(
            f'<li class="feature-item" data-feature="{feature}" '
            f'data-search="{html.escape(words, quote=True)}">Feature {feature}'
            f'<span class="density">{_fmt(stats.density[feature])}</span></li>'
        )
    density_png = base64.b64encode(plots.plot_density_histogram(stats)).decode("ascii")
    dead = int((stats.fires == 0).sum())
    site = html.escape(
        stats.site + ("" if stats.head_index is None else f" head {stats.head_index}")
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f'<nav><input id="search" type="search" placeholder="Feature number or token text" '
        f'autocomplete="off"><div id="count" class="empty"></div>'
        f'<ul id="feature-list">{"".join(items)}</ul></nav>'
        f"<main><h1>{html.escape(title)}</h1>"
        f'<p id="summary">Site {site}: {stats.num_latents} features, {dead} dead, '
        f"{stats.num_tokens} tokens; {len(features)} shown.</p>"
        f'<img id="density" alt="feature density histogram" width="480" '
        f'src="data:image/png;base64,{density_png}">{"".join(panels)}</main>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
    paths.write_text(path, page)
    return str(path)
