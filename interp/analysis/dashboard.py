"""A static HTML dashboard of an SAE's features: a page, and beside it a folder of feature
files it loads on demand; it opens from disk (file://) or a bucket, with no server and no
network.

    stats = feature_stats(model, params, sae, sae_params, batches)
    effects = logit_effects(model, params, sae_params, sae=sae)
    write_dashboard(f"{workdir}/dashboard.html", stats, logit_effects=effects,
                    tokenizer=tokenizer)  # Also writes {workdir}/dashboard_files/.

The page has a searchable list of every feature that fired (a number finds that feature;
other text finds the features with it in the word a top context peaks on or among their
logit-effect tokens) and a panel for the feature selected, in the manner of sae-vis and
Neuronpedia: statistics (density, max, mean when firing, quantiles), the activation histogram
(inline SVG from the binned counts), the tokens the feature's decoder direction most raises
and lowers, and its top contexts with each token highlighted by the feature's activation (the
value on hover). The density histogram of all features is embedded as a PNG. Token text is
HTML-escaped; a context's tokens read as its decoded text (a character split over byte tokens
is shown whole, on the token that completes it).

Layout, so that 8k-65k latents stay usable: the page holds the list only (per feature its
index, density, max and search words; the list draws the rows in view) and the panels live in
`dashboard_files/` (`<page stem>_files`, as browsers save pages): `features_00000.js`,
`features_00001.js`, ..., `features_per_file` (128) features each in list order, each a call
of the page's `dashboardPanels([[feature, panel HTML], ...])`. Opening a feature inserts a
`<script src>` for its file (browsers refuse fetch() of file:// URLs, not scripts), whose
panels are then kept. The files are written before the page, so a page that exists has its
files (a rerun overwrites both; files past the new count stay, unread); copy the folder with
the page. Where every feature fits in one file (a search's few, a notebook's) the page is one
self-contained file instead (`self_contained` overrides). Script data are JSON with '</',
'<!--', U+2028 and U+2029 escaped, and the page's search words with every '<', '>' and '&':
no token text can end or bend a script.

Sizes, measured on random `FeatureStats` of 8,192 features that all fired (20 contexts of 13
tokens of the README under a 2,000-token byte-level BPE, random activations, logit effects with
k=10): the page 2.9 MB (350 bytes a feature, 320 of them its search words; about 23 MB at
65,536 features), each of the 64 files of 128 features 5.0 MB (39 kB a panel, with every
token coloured by a random activation), 321 MB in all, written in 15 s (mostly splitting
contexts into token text). In headless Chromium the page
shows its first panel 0.8 s after opening, a search over every feature takes 4 ms, and a
feature whose file has not loaded opens in 0.5 s; a 65,536-feature page (small panels) opened
in 0.5 s and searched in 10-35 ms.
"""

from __future__ import annotations

import base64
import concurrent.futures
import html
import json
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from interp import paths
from interp.analysis import plots
from interp.analysis.features import FeatureStats, check_features
from interp.analysis.logits import LogitEffects
from interp.models import tokenizer as tokenizer_lib

FEATURES_PER_FILE = 128  # 3-5 MB of panels: what opening a feature loads.
_HISTOGRAM_BARS = 40
_PARALLEL_WRITES = 8  # Feature files written at once (an object store's latency, not CPU).


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


def _is_gap(char: str) -> bool:
    return char.isspace() or char == "\u21b5"  # The newline as `_visible` shows it.


def _peak_word(pieces: list[str], index: int, reach: int = 12) -> str:
    """The word of a context's text (between gaps) that holds its top token, whose own piece
    may be empty (a character's first bytes, shown on the token that completes it), reaching
    at most `reach` characters either side of that token (code and URLs make long words)."""
    text = "".join(pieces)
    start = sum(len(piece) for piece in pieces[:index])
    end = start + len(pieces[index])
    if start < end and all(_is_gap(char) for char in text[start:end]):
        return ""  # A space or a newline: nothing anyone searches for.
    if start == end == len(text):
        return ""  # The first bytes of a character the window cuts off.
    while start < end and _is_gap(text[start]):
        start += 1
    while end > start and _is_gap(text[end - 1]):
        end -= 1
    first, last = max(start - reach, 0), min(end + reach, len(text))
    while start > first and not _is_gap(text[start - 1]):
        start -= 1
    while end < last and not _is_gap(text[end]):
        end += 1
    return text[start:end]


def _panel(stats, feature, effects, row, text) -> tuple[str, str]:
    """(the panel's HTML, the words it is searched by: one a line, lower case)."""
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
    # The page keeps the search words of every feature, so only a few each: the word each
    # top context peaks on (whole: 'Émile' may span tokens) and the logit-effect tokens.
    words = [_peak_word(p, c["index"]) for c, p in zip(contexts, pieces, strict=True)]
    if effects is not None and row is not None:
        words += [text.label(t).strip() for t in effects.top_tokens[row]]
        words += [text.label(t).strip() for t in effects.bottom_tokens[row]]
    panel = (
        f'<section class="feature" id="feature-{feature}" data-feature="{feature}">'
        f'<h2>Feature {feature}</h2><div class="head"><table class="stats">{table}</table>'
        f"<div><h3>Activations when firing</h3>{_histogram_svg(stats, feature)}</div></div>"
        f"{_logits_html(effects, row, text)}"
        f'<h3>Top contexts</h3><div class="contexts">{shown}</div></section>'
    )
    return panel, "\n".join(dict.fromkeys(w.lower() for w in words if w))


def _js(value: Any, *, text: bool = False) -> str:
    """`value` as JSON that is also safe as JS inside an HTML <script>: '</' (which could
    close it) and '<!--' (which changes how it is parsed) escaped, and U+2028 and U+2029
    (line ends to JS before ES2019). `text`: every '<', '>' and '&' escaped (strings that are
    text, not HTML: no token shows raw in the page). JSON has these only inside strings,
    where the escapes mean the same characters."""
    out = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    escapes = [("\u2028", "\\u2028"), ("\u2029", "\\u2029")]
    if text:
        escapes += [("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")]
    else:
        escapes += [("</", "<\\/"), ("<!--", "<\\u0021--")]
    for raw, escaped in escapes:
        out = out.replace(raw, escaped)
    return out


def _number(value: float) -> float | None:
    """4 significant digits for the page's list; None (null) for nan or inf."""
    return float(f"{value:.4g}") if np.isfinite(value) else None


def files_folder(path: paths.PathLike) -> epath.Path:
    """The folder beside a dashboard page that holds its feature files: 'dashboard_files'
    for 'dashboard.html' (local paths resolved; gs:// as given)."""
    path = paths.resolve(path)
    return path.parent / f"{path.stem}_files"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }
nav { width: 18em; border-right: 1px solid #ccc; display: flex; flex-direction: column; }
nav input { margin: 0.6em; padding: 0.4em; font-size: 1em; }
/* The list draws only the rows in view (tens of thousands of features): rows of one height,
   placed in a block as tall as all of them. */
#feature-list { overflow-y: auto; flex: 1; } #rows { position: relative; }
.feature-item { position: absolute; left: 0; right: 0; height: 24px; line-height: 24px;
  padding: 0 0.8em; cursor: pointer; font-size: 0.9em; white-space: nowrap; }
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

# DASHBOARD (defined before this script): {features: [[feature, density, max, search words],
# ...] in list order, files: the feature files' URLs (relative), perFile: features per file}.
_SCRIPT = """
const {features, files, perFile} = DASHBOARD;
const ROW = 24;  // Pixels; .feature-item's height.
const panels = new Map();  // Feature -> its panel's HTML, once its file has loaded.
const position = new Map(features.map((entry, i) => [entry[0], i]));
const requested = new Map();  // File index -> 'loading' or 'failed'.
const search = document.getElementById('search');
const list = document.getElementById('feature-list');
const rows = document.getElementById('rows');
const box = document.getElementById('panel');
let selected = null;
let shown = features.map((_, i) => i);  // Positions of the features the search leaves.

function dashboardPanels(entries) {  // Each feature file calls this with its panels.
  for (const [feature, panel] of entries) panels.set(feature, panel);
  if (selected !== null) show();
}
function message(text) {
  const p = document.createElement('p');
  p.className = 'empty';
  p.textContent = text;
  box.replaceChildren(p);
  box.dataset.feature = '';
}
function show() {
  if (panels.has(selected)) {
    if (box.dataset.feature !== String(selected)) {
      box.innerHTML = panels.get(selected);
      box.dataset.feature = selected;
    }
    return;
  }
  const file = Math.floor(position.get(selected) / perFile);
  if (file >= files.length || requested.get(file) === 'failed') {
    message('Could not load ' + (files[file] || 'the panel') + ' (the folder of feature ' +
            'files must be beside this page).');
    return;
  }
  message('Loading feature ' + selected + '...');
  if (!requested.has(file)) {
    requested.set(file, 'loading');
    const script = document.createElement('script');
    script.src = files[file];
    script.onerror = () => { requested.set(file, 'failed'); if (selected !== null) show(); };
    document.head.appendChild(script);
  }
}
function select(feature) {
  selected = feature;
  for (const item of rows.children) {
    item.classList.toggle('selected', item.dataset.feature === String(feature));
  }
  show();
}
function fmt(value) { return value === null ? 'n/a' : String(value); }

function draw() {  // The rows in view, and a few more.
  const first = Math.max(0, Math.floor(list.scrollTop / ROW) - 10);
  const last = Math.min(shown.length, Math.ceil((list.scrollTop + list.clientHeight) / ROW) + 10);
  const items = [];
  for (let k = first; k < last; k++) {
    const [feature, density, max] = features[shown[k]];
    const item = document.createElement('div');
    item.className = feature === selected ? 'feature-item selected' : 'feature-item';
    item.dataset.feature = feature;
    item.style.top = k * ROW + 'px';
    item.title = 'density ' + fmt(density) + ', max ' + fmt(max);
    const value = document.createElement('span');
    value.className = 'density';
    value.textContent = fmt(density);
    item.append('Feature ' + feature, value);
    items.push(item);
  }
  rows.replaceChildren(...items);
}
function filter() {
  const query = search.value.trim().toLowerCase();
  const number = /^[0-9]+$/.test(query);  // A number names a feature; other text searches.
  shown = [];
  features.forEach(([feature, , , words], i) => {
    if (!query || (number ? String(feature) === query : words.includes(query))) shown.push(i);
  });
  rows.style.height = shown.length * ROW + 'px';
  list.scrollTop = 0;
  document.getElementById('count').textContent = shown.length + ' shown';
  draw();
}
rows.addEventListener('click', event => {
  const item = event.target.closest('.feature-item');
  if (item) select(Number(item.dataset.feature));
});
list.addEventListener('scroll', () => requestAnimationFrame(draw), {passive: true});
window.addEventListener('resize', () => requestAnimationFrame(draw));
search.addEventListener('input', filter);
// After the parse: a self-contained page's panels follow this script.
document.addEventListener('DOMContentLoaded', () => {
  filter();
  if (features.length) select(features[0][0]); else message('No features.');
});
"""


def _write_files(jobs) -> None:
    """Writes each (path, text) of an iterable, a few at a time (gs:// latency overlaps the
    building of the next), holding only those in flight."""
    with concurrent.futures.ThreadPoolExecutor(_PARALLEL_WRITES) as pool:
        pending = set()
        for path, text in jobs:
            if len(pending) >= _PARALLEL_WRITES:
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    future.result()
            pending.add(pool.submit(paths.write_text, path, text))
        for future in concurrent.futures.as_completed(pending):
            future.result()


def write_dashboard(
    path: paths.PathLike,
    stats: FeatureStats,
    *,
    logit_effects: LogitEffects | None = None,
    tokenizer: Any = None,
    features: Sequence[int] | None = None,
    max_features: int | None = None,
    title: str = "SAE features",
    features_per_file: int = FEATURES_PER_FILE,
    self_contained: bool | None = None,
) -> str:
    """Writes the dashboard of one SAE: the page at `path` and its feature files in
    `files_folder(path)` (local or gs://; see the module docstring). A rerun overwrites both.

    Args:
      path: The HTML file, e.g. '<workdir>/dashboard.html'.
      stats: The SAE's `feature_stats`.
      logit_effects: Its `logit_effects` (any features; those given are shown).
      tokenizer: Turns token ids into text: an `interp.models.tokenizer.Tokenizer` (or any
        object with `decode(ids)`: a context's tokens are shown so that together they read
        as its decoding, see `Tokenizer.token_pieces`), a callable id -> str, or None (ids
        shown as <id>).
      features: The features to show, in this order, each once (default: every feature that
        fired, by index).
      max_features: Cap on the default list (default: none).
      title: The page's title.
      features_per_file: Panels per feature file, which is loaded whole when one of its
        features is opened (128: 3-5 MB).
      self_contained: Panels inside the page, no folder (default: when they fit in one file).

    Returns:
      The page's path, as given, as a string.

    Raises:
      ValueError: for a feature outside the SAE, or `features_per_file` < 1.
    """
    if features_per_file < 1:
        raise ValueError(f"features_per_file must be at least 1; got {features_per_file}.")
    if features is None:
        features = np.nonzero(stats.fires > 0)[0][:max_features]
    features = check_features(np.asarray(features, np.int64), stats.num_latents)
    features = list(dict.fromkeys(int(f) for f in features))
    if self_contained is None:
        self_contained = len(features) <= features_per_file
    page_path, folder = paths.resolve(path), files_folder(path)
    text = _TokenText(tokenizer)
    rows = {}
    if logit_effects is not None:
        rows = {int(f): i for i, f in enumerate(logit_effects.features)}
    listed = []  # [feature, density, max, search words] per feature, for the page.
    blocks = range(0, len(features), features_per_file)
    names = [f"features_{i // features_per_file:05d}.js" for i in blocks]

    def feature_files():  # Built one at a time, as the writes take them.
        for start, name in zip(blocks, names, strict=True):
            entries = []
            for feature in features[start : start + features_per_file]:
                panel, words = _panel(stats, feature, logit_effects, rows.get(feature), text)
                entries.append([feature, panel])
                listed.append([feature, _number(stats.density[feature]),
                               _number(stats.max[feature]), words])  # fmt: skip
            yield folder / name, f"dashboardPanels({_js(entries)});\n"

    if self_contained:
        inline = "".join(f"<script>{code}</script>" for _, code in feature_files())
        urls = []
    else:
        _write_files(feature_files())  # Before the page: a page that exists has its files.
        inline = ""
        urls = [f"{urllib.parse.quote(folder.name)}/{name}" for name in names]
    data = {"features": listed, "files": urls, "perFile": features_per_file}
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
        f'<div id="feature-list"><div id="rows"></div></div></nav>'
        f"<main><h1>{html.escape(title)}</h1>"
        f'<p id="summary">Site {site}: {stats.num_latents} features, {dead} dead, '
        f"{stats.num_tokens} tokens; {len(features)} shown.</p>"
        f'<img id="density" alt="feature density histogram" width="480" '
        f'src="data:image/png;base64,{density_png}"><div id="panel"></div></main>'
        f"<script>const DASHBOARD = {_js(data, text=True)};\n{_SCRIPT}</script>{inline}"
        "</body></html>\n"
    )
    paths.write_text(page_path, page)
    return str(path)
