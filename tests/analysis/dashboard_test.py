"""The SAE dashboard (loaded in a real headless Chromium) and the feature plots."""

import dataclasses
import io
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


def test_page_content_is_escaped_and_complete(analysed, tmp_path):
    stats, effects = analysed
    path = dashboard.write_dashboard(tmp_path / "d.html", stats, logit_effects=effects,
                                     tokenizer=_token)  # fmt: skip
    page = open(path).read()
    assert "<&>" not in page and "&lt;&amp;&gt;" in page
    assert 'id="feature-0"' not in page  # Dead: not listed by default.
    alive = np.nonzero(stats.fires)[0]
    assert page.count('class="feature-item"') == len(alive) == NUM_LATENTS - 1
    assert "http" not in page.replace("http-equiv", "")  # Nothing fetched from elsewhere.
    # Control characters (byte-level tokens decode to them) are shown, not written raw.
    path = dashboard.write_dashboard(tmp_path / "c.html", stats, tokenizer=lambda t: "a\x00b\n")
    page = open(path, encoding="utf-8").read()
    assert not any(ord(c) < 32 and c != "\n" for c in page) and "a\\x00b\u21b5" in page
    with pytest.raises(ValueError, match="Feature 12 is outside"):
        dashboard.write_dashboard(tmp_path / "e.html", stats, features=[1, 12])


def test_dashboard_on_gcs(analysed, gcs_bucket):
    stats, _ = analysed
    url = f"{gcs_bucket}/run/dashboard.html"
    dashboard.write_dashboard(url, stats, features=[1, 2])
    page = paths.read_bytes(url).decode()
    assert page.count('class="feature"') == 2 and "&lt;1&gt;" in page  # Ids without tokenizer.


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


def test_dashboard_in_chromium(analysed, browser, tmp_path):
    from selenium.webdriver.common.by import By

    stats, effects = analysed
    path = dashboard.write_dashboard(tmp_path / "dashboard.html", stats, logit_effects=effects,
                                     tokenizer=_token, title="Test SAE")  # fmt: skip
    browser.get(f"file://{path}")
    assert browser.title == "Test SAE"
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    alive = np.nonzero(stats.fires)[0]
    items = browser.find_elements(By.CSS_SELECTOR, ".feature-item")
    assert [int(i.get_attribute("data-feature")) for i in items] == alive.tolist()
    panels = browser.find_elements(By.CSS_SELECTOR, "section.feature")
    assert len(panels) == len(alive)
    assert [p.is_displayed() for p in panels] == [True] + [False] * (len(alive) - 1)

    # The panel's numbers are the stats'.
    feature = int(alive[np.argmax(stats.fires[alive])])
    items[list(alive).index(feature)].click()
    panel = browser.find_element(By.ID, f"feature-{feature}")
    assert panel.is_displayed()

    def stat(key):
        return panel.find_element(By.CSS_SELECTOR, f'.stat[data-key="{key}"]').text

    assert stat("density") == f"{stats.density[feature]:.4g}"
    assert stat("fires") == str(stats.fires[feature])
    assert stat("max") == f"{stats.max[feature]:.4g}"
    assert stat("q50") == f"{stats.quantiles[feature, 0]:.4g}"
    contexts = panel.find_elements(By.CSS_SELECTOR, ".context")
    want = stats.contexts(feature)
    assert len(contexts) == len(want) == 4
    first = contexts[0].find_elements(By.CSS_SELECTOR, ".tok")
    peak = contexts[0].find_element(By.CSS_SELECTOR, ".tok.peak")  # The top token, inline.
    assert peak.value_of_css_property("display") == "inline"
    assert peak.text == _token(want[0]["tokens"][want[0]["index"]])
    assert [t.text for t in first] == [_token(t) for t in want[0]["tokens"]]  # Spaces kept.
    assert [float(t.get_attribute("title")) for t in first] == pytest.approx(
        want[0]["acts"], rel=1e-3, abs=1e-6
    )
    row = list(effects.features).index(feature)
    raised = panel.find_elements(By.CSS_SELECTOR, ".logit.pos .ltok")
    assert [t.text for t in raised] == [_token(t) for t in effects.top_tokens[row]]
    assert panel.find_elements(By.CSS_SELECTOR, "svg.hist rect")

    # Search filters the list: by number, then by token text.
    search = browser.find_element(By.ID, "search")
    search.send_keys(str(feature))
    assert [i.get_attribute("data-feature") for i in items if i.is_displayed()] == [str(feature)]
    search.clear()
    token = _token(want[0]["tokens"][want[0]["index"]]).strip()
    search.send_keys(token)
    shown = {int(i.get_attribute("data-feature")) for i in items if i.is_displayed()}

    def words(f):
        row = list(effects.features).index(f)
        ids = [t for c in stats.contexts(f) for t in c["tokens"]]
        return [_token(t) for t in ids + list(effects.top_tokens[row])
                + list(effects.bottom_tokens[row])]  # fmt: skip

    having = {f for f in alive if any(token in word for word in words(f))}
    assert feature in shown and shown == having and len(shown) < len(alive)
    assert browser.execute_script("return document.getElementById('density').naturalWidth") > 100
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

    # A screenshot that is not blank.
    from PIL import Image

    browser.save_screenshot(str(tmp_path / "shot.png"))
    assert os.path.getsize(tmp_path / "shot.png") > 10_000
    colours = Image.open(tmp_path / "shot.png").convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50


# Accented letters, an em dash, CJK and emoji: several bytes each, so several byte-level tokens.
SPLIT_TEXT = "Émile said — 日本語 🌍 done. Then Émile wrote: café, naïve. "


class _DecodeOnly:
    """A tokenizer known only by its `decode` (as a transformers tokenizer is)."""

    def __init__(self, tok):
        self.backend = tok.backend

    def decode(self, ids, skip_special_tokens=True):
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def test_contexts_read_as_their_decoded_text_in_chromium(analysed, browser, tmp_path):
    """Byte-level BPE (the demo's): every context's tokens, as the page shows them, read as
    the decoding of its window ('Émile', not U+FFFD twice), including windows that start or
    end inside a character; lone byte tokens in the logit lists show their bytes."""
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
    script = """return Array.from(document.querySelectorAll('.context')).map(
        c => Array.from(c.querySelectorAll('.tok')).map(t => t.textContent));"""
    for tokenizer in (tok, _DecodeOnly(tok)):
        path = dashboard.write_dashboard(tmp_path / "split.html", stats, logit_effects=effects,
                                         tokenizer=tokenizer)  # fmt: skip
        browser.get(f"file://{path}")
        shown = browser.execute_script(script)
        want = [c["tokens"] for f in np.nonzero(stats.fires)[0] for c in stats.contexts(f)]
        assert [len(pieces) for pieces in shown] == [len(w) for w in want]
        for pieces, window in zip(shown, want, strict=True):
            decoded = tok.decode(window, skip_special_tokens=False).strip("\ufffd")
            assert "".join(pieces) == dashboard._visible(decoded)
        everything = browser.execute_script("return document.body.textContent")
        assert "\ufffd" not in everything
        for word in ("Émile said", "—", "日本語", "🌍", "café"):
            assert word in everything
        # What the page shows (the first panel, rendered) and what search finds.
        visible = browser.find_element(By.CSS_SELECTOR, "section.feature:not([hidden])").text
        assert visible and "\ufffd" not in visible
        search = browser.find_element(By.ID, "search")
        search.clear()
        search.send_keys("émile")
        items = browser.find_elements(By.CSS_SELECTOR, ".feature-item")
        found = {int(i.get_attribute("data-feature")) for i in items if i.is_displayed()}
        having = {
            int(f)
            for f in np.nonzero(stats.fires)[0]
            if any("Émile" in tok.decode(c["tokens"]) for c in stats.contexts(f))
        }
        assert found == having and found
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
