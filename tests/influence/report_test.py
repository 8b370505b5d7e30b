"""The influence report, loaded in a real headless Chromium (Debian's chromium + driver)."""

import os
import types

import numpy as np

from interp.influence import report
from interp.jobs import influence as influence_job
from interp.models import tokenizer as tokenizer_lib


def _results(queries=2, rows=3, tokens=6):
    rng = np.random.default_rng(0)

    def entry(row, sign):
        scores = sign * np.abs(rng.normal(size=tokens))
        return {
            "row": row,
            "score": float(scores.sum()),
            "tokens": [f" w{i}<&>" for i in range(tokens)],
            "token_scores": scores.tolist(),
            "layer_scores": [float(scores.sum()), 0.0],
        }

    return [
        {
            "name": f"query {q}",
            "prompt": "Call me",
            "completion": " Ishmael.",
            "measurement": "log p(completion)",
            "modules": ["blocks_0/mlp/up", "blocks_0/mlp/down"],
            "positive": [entry(r, 1) for r in range(rows)],
            "negative": [entry(10 + r, -1) for r in range(rows)],
        }  # fmt: skip
        for q in range(queries)
    ]


def test_the_report_renders_in_chromium_with_every_token_and_heatmap(browser, tmp_path):
    results = _results()
    written = report.write_report(tmp_path, results)
    browser.get(f"file://{written['html']}")
    from selenium.webdriver.common.by import By as by

    assert browser.title == "Influence"
    queries = browser.find_elements(by.CSS_SELECTOR, ".query")
    assert len(queries) == 2 and all(q.is_displayed() for q in queries)
    tokens = browser.find_elements(by.CSS_SELECTOR, ".tok")
    assert len(tokens) == 2 * 2 * 3 * 6
    assert tokens[0].text.strip() == "w0<&>"  # Escaped in the source, shown as written.
    first = results[0]["positive"][0]["token_scores"][0]
    assert tokens[0].get_attribute("title") == f"{first:+.4g}"  # The value on hover.
    red = tokens[0].value_of_css_property("background-color")
    blue = browser.find_elements(by.CSS_SELECTOR, ".row")[3].find_element(
        by.CSS_SELECTOR, ".tok").value_of_css_property("background-color")  # fmt: skip
    assert red.startswith("rgba(220, 40, 40") and blue.startswith("rgba(40, 90, 220")
    images = browser.find_elements(by.TAG_NAME, "img")
    assert len(images) == 2
    for image in images:  # The heatmaps load (a broken image has natural width 0).
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 100
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert os.path.getsize(tmp_path / "report.png") > 10_000


def test_rows_read_as_their_text_in_chromium(browser, tmp_path):
    """Training rows of a byte-level BPE (the demo's), packed so that they start and end
    inside characters: the report's tokens read as the rows' text ('Émile', not U+FFFD per
    byte token), as rendered by Chromium."""
    from selenium.webdriver.common.by import By as by

    tok = tokenizer_lib.train_bpe(["Alice was beginning to get very tired, said the Rabbit."]
                                  * 5, vocab_size=300)  # fmt: skip
    ids = tok.encode("Émile said — 日本語 🌍 done. " * 4)
    searched = np.stack([ids[start : start + 40] for start in (0, 1, 9, 20)])  # [C, T]
    count, length = searched.shape
    scores = types.SimpleNamespace(
        total=np.arange(count, dtype=np.float32)[None] - 1.5,  # [1, C]
        per_token=np.random.default_rng(0).normal(size=(1, count, length)),
        per_layer=np.ones((1, count, 2)),
    )
    chosen, index = np.arange(count), np.arange(100, 100 + count)
    entries = [influence_job._entry(scores, 0, i, chosen, index, searched, tok) for i in range(4)]
    result = {"name": "query 0", "prompt": "Émile", "completion": " said",
              "measurement": "log p(completion)", "modules": ["a", "b"],
              "positive": entries[2:], "negative": entries[:2]}  # fmt: skip
    written = report.write_report(tmp_path, [result])
    browser.get(f"file://{written['html']}")
    rows = browser.execute_script("""return Array.from(document.querySelectorAll('.row')).map(
        r => Array.from(r.querySelectorAll('.tok')).map(t => t.textContent));""")
    for pieces, entry in zip(rows, entries[2:] + entries[:2], strict=True):
        row = searched[chosen == entry["row"] - 100][0]
        assert len(pieces) == length
        assert "".join(pieces) == tok.decode(row, skip_special_tokens=False).strip("\ufffd")
    text = browser.find_element(by.TAG_NAME, "body").text
    assert "\ufffd" not in text
    for word in ("Émile said", "—", "日本語", "🌍"):
        assert word in text
    assert "\ufffd" not in influence_job.format_summary([result])
