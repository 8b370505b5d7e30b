"""The SAE dashboard (loaded in a real headless Chromium) and the feature plots."""

import dataclasses
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp import analysis, paths
from interp.analysis import dashboard, plots
from interp.models import tokenizer as tokenizer_lib
from interp.models.config import ModelConfig
from interp.models.transformer import Transformer, init_params
from interp.sae.modules import SAE, SAEConfig
from interp.sae.modules import init_params as sae_init_params

TINY = ModelConfig(
    vocab_size=61, d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
    mlp_dim=32, max_len=16,
)  # fmt: skip
NUM_LATENTS = 12
PER_FILE = 4  # 11 features that fire: 3 feature files.


def _token(token: int) -> str:
    return f" t{token}<&>"  # Markup in token text must be escaped.


@pytest.fixture(scope="module")
def analysed():
    """Stats and logit effects of a small ReLU SAE over two batches of random tokens."""
    model, params = Transformer(TINY), init_params(TINY, seed=0)
    config = SAEConfig(architecture="relu", d_in=16, num_latents=NUM_LATENTS,
                       hook_name="blocks_1/resid_post")  # fmt: skip
    sae_params = sae_init_params(config, jax.random.key(3))
    sae_params["W_enc"] = sae_params["W_enc"] * 40
    sae_params["b_enc"] = jnp.full((NUM_LATENTS,), -0.5).at[0].set(-1e3)  # Feature 0 is dead.
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 4, 10))
    stats = analysis.feature_stats(model, params, SAE(config), sae_params, list(tokens),
                                   top_k=4, context=3, context_after=1)  # fmt: skip
    effects = analysis.logit_effects(model, params, sae_params, k=5, sae=SAE(config))
    return stats, effects


def _listed(page: str) -> list:
    """The page's list: [feature, density, max, search words] per feature."""
    start = page.index("const DASHBOARD = ") + len("const DASHBOARD = ")
    return json.loads(page[start : page.index(";\n", start)])["features"]


def _panels(code: str) -> dict[int, str]:
    """Feature -> panel HTML of a feature file (or of a self-contained page's scripts)."""
    found = {}
    for call in code.split("dashboardPanels([")[1:]:
        found.update(json.JSONDecoder().raw_decode("[" + call)[0])
    return {int(f): panel for f, panel in found.items()}


def _files(path) -> list[str]:
    folder = dashboard.files_folder(path)
    return [open(folder / name, encoding="utf-8").read() for name in sorted(os.listdir(folder))]


def test_page_content_is_escaped_and_complete(analysed, tmp_path):
    stats, effects = analysed
    alive = np.nonzero(stats.fires)[0].tolist()
    path = dashboard.write_dashboard(tmp_path / "d.html", stats, logit_effects=effects,
                                     tokenizer=_token, features_per_file=PER_FILE)  # fmt: skip
    page, files = open(path, encoding="utf-8").read(), _files(path)
    assert sorted(os.listdir(tmp_path / "d_files")) == [
        "features_00000.js", "features_00001.js", "features_00002.js"
    ]  # fmt: skip
    assert [row[0] for row in _listed(page)] == alive == [f for f in alive if f] and 0 not in alive
    # Each file holds the next PER_FILE features' panels, in list order; the page none.
    assert [list(_panels(code)) for code in files] == [alive[:4], alive[4:8], alive[8:]]
    assert 'class="feature"' not in page and "Top contexts" not in page
    for text in [page, *files]:
        assert "<&>" not in text and "http" not in text.replace("http-equiv", "")
    panel = _panels(files[1])[alive[5]]
    assert "&lt;&amp;&gt;" in panel and "Logit effects" in panel and "<svg" in panel
    # Few enough features: one self-contained page, no folder.
    path = dashboard.write_dashboard(tmp_path / "one.html", stats, tokenizer=_token)
    assert not os.path.exists(tmp_path / "one_files")
    assert list(_panels(open(path, encoding="utf-8").read())) == alive
    # Control characters (byte-level tokens decode to them) are shown, not written raw.
    path = dashboard.write_dashboard(tmp_path / "c.html", stats, tokenizer=lambda t: "a\x00b\n",
                                     features_per_file=PER_FILE)  # fmt: skip
    page, files = open(path, encoding="utf-8").read(), _files(path)
    for text in [page, *files]:
        assert not any(ord(c) < 32 and c != "\n" for c in text)
    assert "a\\\\x00b" in page and all("a\\\\x00b\u21b5" in code for code in files)
    with pytest.raises(ValueError, match="Feature 12 is outside"):
        dashboard.write_dashboard(tmp_path / "e.html", stats, features=[1, 12])
    with pytest.raises(ValueError, match="features_per_file must be at least 1"):
        dashboard.write_dashboard(tmp_path / "e.html", stats, features_per_file=0)


def test_feature_files_are_written_before_the_page(analysed, tmp_path):
    stats, _ = analysed
    (tmp_path / "d_files").write_text("a file where the folder goes")
    with pytest.raises(OSError):
        dashboard.write_dashboard(tmp_path / "d.html", stats, features_per_file=PER_FILE)
    assert not (tmp_path / "d.html").exists()  # No page without its files.
    os.remove(tmp_path / "d_files")
    for features in ([1, 2, 3], [4, 1]):  # A rerun overwrites page and files.
        dashboard.write_dashboard(tmp_path / "d.html", stats, features=features,
                                  features_per_file=2, self_contained=False)  # fmt: skip
    page = (tmp_path / "d.html").read_text()
    assert [row[0] for row in _listed(page)] == [4, 1]
    assert list(_panels((tmp_path / "d_files" / "features_00000.js").read_text())) == [4, 1]


def test_dashboard_on_gcs(analysed, gcs_bucket):
    stats, _ = analysed
    url = f"{gcs_bucket}/run/dashboard.html"
    dashboard.write_dashboard(url, stats, features=[1, 2, 3], features_per_file=2)
    page = paths.read_bytes(url).decode()
    assert [row[0] for row in _listed(page)] == [1, 2, 3]
    assert '"dashboard_files/features_00000.js","dashboard_files/features_00001.js"' in page
    first, second = (paths.read_bytes(f"{gcs_bucket}/run/dashboard_files/features_0000{i}.js")
                     for i in (0, 1))  # fmt: skip
    assert list(_panels(first.decode())) == [1, 2] and list(_panels(second.decode())) == [3]
    assert "&lt;1&gt;" in _panels(first.decode())[1]  # Ids without tokenizer.


def test_plots_are_pngs(analysed, tmp_path):
    stats, _ = analysed
    from PIL import Image

    for data in (
        plots.plot_density_histogram(stats, tmp_path / "density.png"),
        plots.plot_activation_histogram(stats, 3, tmp_path / "f3.png"),
        plots.plot_frontier(
            [
                {"l0": 8, "fvu": 0.3, "architecture": "topk", "label": "k=8"},
                {"l0": 32, "fvu": 0.1, "architecture": "topk"},
                {"l0": 20, "fvu": 0.2, "architecture": "relu"},
            ],
            tmp_path / "frontier.png",
        ),  # fmt: skip
    ):
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and len(image.convert("L").getcolors()) > 10
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="Feature 99 is outside"):
        plots.plot_activation_histogram(stats, 99)
    with pytest.raises(ValueError, match="lacks \\['fvu'\\]"):
        plots.plot_frontier([{"l0": 3}])


def _wait_for_panel(browser, feature: int):
    """The panel of `feature`, once its feature file has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, f"feature-{feature}"))


def _rows(browser) -> list[int]:
    """The features of the list's rows (those drawn: the list draws the rows in view)."""
    script = "return Array.from(document.querySelectorAll('.feature-item'), i => i.dataset.feature)"
    return [int(f) for f in browser.execute_script(script)]


def _click(browser, feature: int):
    """Clicks the list's row of `feature`."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f'.feature-item[data-feature="{feature}"]').click()


def _loaded_files(browser) -> list[str]:
    script = "return Array.from(document.scripts).filter(s => s.src).map(s => s.src)"
    return [src.rsplit("/", 1)[1] for src in browser.execute_script(script)]


def test_dashboard_in_chromium(analysed, browser, tmp_path):
    """From file://: the list of every feature, the first file loaded for the first panel, a
    later file only when one of its features is opened; search finds features whose files
    have not loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stats, effects = analysed
    path = dashboard.write_dashboard(tmp_path / "dashboard.html", stats, logit_effects=effects,
                                     tokenizer=_token, title="Test SAE",
                                     features_per_file=PER_FILE)  # fmt: skip
    browser.get(f"file://{path}")
    assert browser.title == "Test SAE"
    alive = np.nonzero(stats.fires)[0]
    _wait_for_panel(browser, alive[0])
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    assert _rows(browser) == alive.tolist()
    assert [p.get_attribute("id") for p in browser.find_elements(By.CSS_SELECTOR,
            "section.feature")] == [f"feature-{alive[0]}"]  # fmt: skip
    assert _loaded_files(browser) == ["features_00000.js"]

    # A feature of the last file: its panel's numbers and contexts are the stats'.
    feature = int(alive[8:][np.argmax(stats.fires[alive[8:]])])
    _click(browser, feature)
    panel = _wait_for_panel(browser, feature)
    assert panel.is_displayed() and not browser.find_elements(By.ID, f"feature-{alive[0]}")
    assert _loaded_files(browser) == ["features_00000.js", "features_00002.js"]

    def stat(key):
        return panel.find_element(By.CSS_SELECTOR, f'.stat[data-key="{key}"]').text

    assert stat("density") == f"{stats.density[feature]:.4g}"
    assert stat("fires") == str(stats.fires[feature])
    assert stat("max") == f"{stats.max[feature]:.4g}"
    assert stat("q50") == f"{stats.quantiles[feature, 0]:.4g}"
    contexts = panel.find_elements(By.CSS_SELECTOR, ".context")
    want = stats.contexts(feature)
    assert len(contexts) == len(want) == 4
    for context, wanted in zip(contexts, want, strict=True):
        tokens = context.find_elements(By.CSS_SELECTOR, ".tok")
        assert [t.text for t in tokens] == [_token(t) for t in wanted["tokens"]]  # Spaces kept.
    first = contexts[0].find_elements(By.CSS_SELECTOR, ".tok")
    peak = contexts[0].find_element(By.CSS_SELECTOR, ".tok.peak")  # The top token, inline.
    assert peak.value_of_css_property("display") == "inline"
    assert peak.text == _token(want[0]["tokens"][want[0]["index"]])
    assert [float(t.get_attribute("title")) for t in first] == pytest.approx(
        want[0]["acts"], rel=1e-3, abs=1e-6
    )
    row = list(effects.features).index(feature)
    raised = panel.find_elements(By.CSS_SELECTOR, ".logit.pos .ltok")
    assert [t.text for t in raised] == [_token(t) for t in effects.top_tokens[row]]
    assert panel.find_elements(By.CSS_SELECTOR, "svg.hist rect")

    # Search filters the list: by number, then by token text (a feature's peak words and
    # logit-effect tokens), here the peak token of a feature of the file not loaded.
    search = browser.find_element(By.ID, "search")
    search.send_keys(str(feature))
    assert _rows(browser) == [feature]
    search.clear()
    unloaded = int(alive[4])
    top = stats.contexts(unloaded)[0]
    token = _token(top["tokens"][top["index"]]).strip()
    search.send_keys(token)
    shown = set(_rows(browser))

    def words(f):
        row = list(effects.features).index(f)
        peaks = [c["tokens"][c["index"]] for c in stats.contexts(f)]
        return [_token(t) for t in peaks + list(effects.top_tokens[row])
                + list(effects.bottom_tokens[row])]  # fmt: skip

    having = {f for f in alive if any(token in word for word in words(f))}
    assert unloaded in shown and shown == having and len(shown) < len(alive)
    assert browser.find_element(By.ID, "count").text == f"{len(shown)} shown"
    assert "features_00001.js" not in _loaded_files(browser)
    _click(browser, unloaded)
    found = _wait_for_panel(browser, unloaded).find_element(By.CSS_SELECTOR, ".tok.peak")
    assert found.text.strip() == token
    assert browser.execute_script("return document.getElementById('density').naturalWidth") > 100
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

    # A screenshot that is not blank.
    from PIL import Image

    browser.save_screenshot(str(tmp_path / "shot.png"))
    assert os.path.getsize(tmp_path / "shot.png") > 10_000
    colours = Image.open(tmp_path / "shot.png").convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50

    # Without its folder, the page says what is missing.
    os.rename(tmp_path / "dashboard_files", tmp_path / "elsewhere")
    browser.get(f"file://{path}")
    missing = "Could not load dashboard_files/features_00000.js"
    WebDriverWait(browser, 10).until(lambda b: missing in b.find_element(By.ID, "panel").text)
    browser.get_log("browser")  # Its SEVERE 'not found' is this test's.


@pytest.mark.parametrize("per_file", [PER_FILE, 1000])  # Feature files; a self-contained page.
def test_token_text_cannot_leave_its_script_in_chromium(analysed, browser, tmp_path, per_file):
    from selenium.webdriver.common.by import By

    stats, _ = analysed
    nasty = '</script><b id="bold">"\'\\\u2028<!--<script>'

    def label(token):
        return f"x{token}{nasty}"

    path = dashboard.write_dashboard(tmp_path / "x.html", stats, tokenizer=label,
                                     features_per_file=per_file)  # fmt: skip
    code = open(path, encoding="utf-8").read()
    if per_file == PER_FILE:
        code += "".join(_files(path))
    assert "</script><b" not in code and "<!--" not in code and "\u2028" not in code
    browser.get(f"file://{path}")
    alive = np.nonzero(stats.fires)[0]
    panel = _wait_for_panel(browser, alive[0])
    want = stats.contexts(alive[0])[0]
    tokens = panel.find_element(By.CSS_SELECTOR, ".context").find_elements(By.CSS_SELECTOR, ".tok")
    assert [t.get_attribute("textContent") for t in tokens] == [label(t) for t in want["tokens"]]
    assert browser.find_elements(By.ID, "bold") == []
    browser.find_element(By.ID, "search").send_keys(f"x{want['tokens'][want['index']]}</script>")
    assert int(alive[0]) in _rows(browser)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def _random_stats(num_latents: int, rng, k: int = 20, window: int = 13) -> analysis.FeatureStats:
    """Stats of the sizes a real run has (20 contexts of 13 tokens), with random numbers."""
    bins = 64
    histogram = rng.integers(0, 50, (num_latents, bins))
    top_values = -np.sort(-rng.uniform(0.1, 10, (num_latents, k)), axis=1)
    return analysis.FeatureStats(
        num_tokens=10**6, fires=histogram.sum(1), max=top_values[:, 0],
        sum=histogram.sum(1) * 1.5, histogram=histogram, bin_edges=np.logspace(-3, 2, bins + 1),
        quantile_levels=np.array([0.5, 0.9, 0.99]),
        quantiles=np.sort(rng.uniform(0.1, 5, (num_latents, 3)), axis=1), top_values=top_values,
        top_rows=rng.integers(0, 10**4, (num_latents, k)),
        top_positions=rng.integers(0, 1024, (num_latents, k)),
        top_tokens=rng.integers(0, 5000, (num_latents, k, window)),
        top_acts=rng.uniform(0, 10, (num_latents, k, window)),
        context_before=min(8, window - 1),
    )  # fmt: skip


def test_a_long_list_draws_the_rows_in_view_in_chromium(browser, tmp_path):
    """3,000 features: some 40 rows drawn at a time; the last one scrolled to, opened from
    the last of 24 feature files, and found by its number."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stats = _random_stats(3000, np.random.default_rng(1), k=1, window=1)
    assert (stats.fires > 0).all()
    path = dashboard.write_dashboard(tmp_path / "long.html", stats, tokenizer=lambda t: f" w{t}")
    browser.get(f"file://{path}")
    _wait_for_panel(browser, 0)
    assert _rows(browser)[:3] == [0, 1, 2] and len(_rows(browser)) < 100
    scroll = "const list = document.getElementById('feature-list'); list.scrollTop = 1e9;"
    browser.execute_script(scroll)
    WebDriverWait(browser, 10).until(lambda b: 2999 in _rows(b))
    assert 0 not in _rows(browser) and len(_rows(browser)) < 100
    _click(browser, 2999)
    _wait_for_panel(browser, 2999)
    assert _loaded_files(browser) == ["features_00000.js", "features_00023.js"]
    browser.find_element(By.ID, "search").send_keys("2999")
    assert _rows(browser) == [2999]
    assert browser.find_element(By.CSS_SELECTOR, ".feature-item.selected").text.startswith(
        "Feature 2999"
    )
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_the_page_grows_by_its_list_not_its_panels(tmp_path):
    """Per feature, the page adds its list entry (search words included), a small fraction
    of the panel that stays in the feature files."""
    rng = np.random.default_rng(0)
    stats = _random_stats(600, rng)
    tokens, values = rng.integers(0, 5000, (2, 600, 10)), rng.normal(size=(2, 600, 10))
    effects = analysis.LogitEffects(np.arange(600), tokens[0], values[0], tokens[1], values[1])
    pages, panels = {}, {}
    for count in (100, 600):
        path = tmp_path / str(count) / "dashboard.html"
        dashboard.write_dashboard(path, stats, logit_effects=effects, features=range(count),
                                  tokenizer=lambda t: f" word{t}",
                                  self_contained=False)  # fmt: skip
        pages[count] = path.stat().st_size
        folder = dashboard.files_folder(path)
        panels[count] = sum(os.path.getsize(folder / name) for name in os.listdir(folder))
    per_feature = (pages[600] - pages[100]) / 500
    per_panel = panels[600] / 600
    # 40 distinct search words a feature here (20 peaks, 20 logit tokens): about 400 bytes.
    assert per_feature < per_panel / 50, (per_feature, per_panel)
    assert len(os.listdir(dashboard.files_folder(path))) == 5  # 128 features a file.


# Accented letters, an em dash, CJK and emoji: several bytes each, so several byte-level tokens.
SPLIT_TEXT = "Émile said — 日本語 🌍 done. Then Émile wrote: café, naïve. "


class _DecodeOnly:
    """A tokenizer known only by its `decode` (as a transformers tokenizer is)."""

    def __init__(self, tok):
        self.backend = tok.backend

    def decode(self, ids, skip_special_tokens=True):
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _peak_words(pieces: list[str], peak: int) -> list[str]:
    """The words (between spaces) of the shown text that hold the peak token's text, or the
    character its empty piece starts (a character's first bytes, shown on a later token)."""
    text = "".join(pieces)
    start = len("".join(pieces[:peak]))
    end = max(start + len(pieces[peak]), start + 1)
    found, offset = [], 0
    for word in text.split(" "):
        if word and offset < end and start < offset + len(word):
            found.append(word)
        offset += len(word) + 1
    return found


def test_contexts_read_as_their_decoded_text_in_chromium(analysed, browser, tmp_path):
    """Byte-level BPE (the demo's): every context's tokens, as the page shows them, read as
    the decoding of its window ('Émile', not U+FFFD twice), including windows that start or
    end inside a character; lone byte tokens in the logit lists show their bytes. Search
    finds a word by any of its tokens: 'émile' finds the contexts that peak inside it."""
    from selenium.webdriver.common.by import By

    stats, effects = analysed
    tok = tokenizer_lib.train_bpe(["Alice was beginning to get very tired, said the Rabbit."]
                                  * 5, vocab_size=300)  # fmt: skip
    ids = tok.encode(SPLIT_TEXT * 3)
    shape = (*stats.top_values.shape, 12)  # [X, K, W]: windows of 12 tokens.
    starts = np.arange(np.prod(shape[:2])) * 7 % (len(ids) - shape[-1])
    windows = np.stack([ids[s : s + shape[-1]] for s in starts])  # Cut at every token.
    acts = np.random.default_rng(1).uniform(0, 1, shape)
    stats = dataclasses.replace(stats, top_tokens=windows.reshape(shape), top_acts=acts)
    # Every feature's contexts as shown: [[pieces, peak index], ...] per feature.
    script = """return Array.from(document.querySelectorAll('.feature-item')).map(item => {
        item.click();
        return Array.from(document.querySelectorAll('#panel .context')).map(c => {
          const tokens = Array.from(c.querySelectorAll('.tok'));
          return [tokens.map(t => t.textContent), tokens.findIndex(t => t.matches('.peak'))];
        });
      });"""
    alive = np.nonzero(stats.fires)[0]
    for tokenizer in (tok, _DecodeOnly(tok)):
        path = dashboard.write_dashboard(tmp_path / "split.html", stats, logit_effects=effects,
                                         tokenizer=tokenizer)  # fmt: skip
        browser.get(f"file://{path}")  # Self-contained: every panel shows on its click.
        shown = browser.execute_script(script)
        want = [[c["tokens"] for c in stats.contexts(f)] for f in alive]
        assert [[len(p) for p, _ in f] for f in shown] == [[len(w) for w in f] for f in want]
        for pieces, window in zip(
            [p for f in shown for p, _ in f], [w for f in want for w in f], strict=True
        ):
            decoded = tok.decode(window, skip_special_tokens=False).strip("\ufffd")
            assert "".join(pieces) == dashboard._visible(decoded)
        everything = browser.execute_script("return document.body.textContent")
        assert "\ufffd" not in everything
        for word in ("Émile said", "—", "日本語", "🌍", "café"):
            assert word in everything
        # What the page shows (the panel, rendered) and what search finds.
        visible = browser.find_element(By.CSS_SELECTOR, "section.feature").text
        assert visible and "\ufffd" not in visible
        search = browser.find_element(By.ID, "search")
        search.clear()
        search.send_keys("émile")
        found = set(_rows(browser))
        peaking = {
            int(f)
            for f, contexts in zip(alive, shown, strict=True)
            if any("Émile" in w for pieces, peak in contexts for w in _peak_words(pieces, peak))
        }
        anywhere = {int(f) for f, contexts in zip(alive, shown, strict=True)
                    if any("Émile" in "".join(pieces) for pieces, _ in contexts)}  # fmt: skip
        assert found == peaking and found and found < anywhere
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
