"""The influence report, loaded in a real headless Chromium (Debian's chromium + driver)."""

import os

import numpy as np

from interp.influence import report


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
