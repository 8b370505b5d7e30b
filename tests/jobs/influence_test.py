"""The influence job: factors, TF-IDF candidates, scores by layer and token, the report."""

import html.parser
import json
import os

import numpy as np
import pytest

from configs import demo
from interp import influence
from interp.jobs import influence as job
from tests import runs


@pytest.fixture(scope="module")
def pipeline_run(tiny_pipeline):
    return tiny_pipeline


class _Spans(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.queries = self.tokens = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.queries += attrs.get("class") == "query"
        self.tokens += attrs.get("class") == "tok" and "title" in attrs


def test_pipeline_writes_the_report_with_consistent_numbers(pipeline_run):
    workdir, result = pipeline_run
    config = demo.get_config("tiny=True")
    assert "**Influence** (EK-FAC) on the LM's training rows" in result.stdout
    report = os.path.join(workdir, "influence", "report")
    with open(os.path.join(report, "influence.json")) as f:
        results = json.load(f)
    count = len(config.influence.queries) + len(config.influence.feature_queries)
    assert len(results) == count
    for index, query in enumerate(results):
        assert os.path.getsize(os.path.join(report, f"layers_{index}.png")) > 1000
        assert len(query["positive"]) == len(query["negative"]) == config.influence.top
        positive = [e["score"] for e in query["positive"]]
        negative = [e["score"] for e in query["negative"]]
        assert positive == sorted(positive, reverse=True) and negative == sorted(negative)
        for entry in query["positive"] + query["negative"]:
            scale = max(abs(entry["score"]), 1e-6)
            assert sum(entry["token_scores"]) == pytest.approx(entry["score"], abs=1e-3 * scale)
            assert sum(entry["layer_scores"]) == pytest.approx(entry["score"], abs=1e-3 * scale)
            assert len(entry["tokens"]) == len(entry["token_scores"]) == config.data.seq_len
    assert "feature" in results[-1]["measurement"]
    parser = _Spans()
    with open(os.path.join(report, "report.html")) as f:
        parser.feed(f.read())
    assert parser.queries == count
    assert parser.tokens == count * 2 * config.influence.top * config.data.seq_len
    assert os.path.exists(os.path.join(workdir, "influence", "factors", "factors.json"))
    # The score arrays agree with the report.
    stored = os.path.join(workdir, "influence", "scores")
    total = influence.load_scores(stored, "total")
    candidates = influence.load_scores(stored, "candidates")
    per_token = influence.load_scores(stored, "per_token")
    assert total.shape == candidates.shape == (count, config.influence.candidates)
    assert per_token.shape == (count, config.influence.candidates, config.data.seq_len)
    for index, query in enumerate(results):
        best = query["positive"][0]
        column = int(np.argmax(total[index]))
        assert candidates[index, column] == best["row"]
        assert total[index, column] == pytest.approx(best["score"], rel=1e-6)


def test_a_query_taken_from_a_training_row_finds_that_row(pipeline_run, tmp_path):
    workdir, _ = pipeline_run
    with open(os.path.join(workdir, "influence", "report", "influence.json")) as f:
        entry = json.load(f)[0]["positive"][1]  # Some searched row, not the top one.
    text = "".join(entry["tokens"])
    cut = len(text) // 2
    config = demo.get_config("tiny=True")
    config.influence.model_path = os.path.join(workdir, "lm", "export")
    config.influence.queries = (dict(prompt=text[:cut], completion=text[cut:]),)
    config.influence.feature_queries = ()
    results = job.run(config, str(tmp_path / "influence"))
    assert results[0]["positive"][0]["row"] == entry["row"]


def test_bad_influence_configs_are_clear_errors(pipeline_run, tmp_path):
    workdir, _ = pipeline_run
    config = demo.get_config("tiny=True")
    config.influence.model_path = os.path.join(workdir, "lm", "export")
    config.influence.candidatez = 3
    with pytest.raises(ValueError, match="candidatez"):
        job.run(config, str(tmp_path / "a"))
    config = demo.get_config("tiny=True")
    config.influence.queries, config.influence.feature_queries = (), ()
    with pytest.raises(ValueError, match="no queries"):
        job.run(config, str(tmp_path / "b"))
    config = demo.get_config("tiny=True")
    config.influence.model_path = os.path.join(workdir, "lm", "export")
    config.influence.queries = (dict(prompt="x " * 100, completion=" y"),)
    config.influence.feature_queries = ()
    with pytest.raises(ValueError, match="more than the model's context"):
        job.run(config, str(tmp_path / "c"))


def test_readme_examples_run_in_order_on_the_pipeline_output(pipeline_run, tmp_path):
    # Every python block of the README and then of docs/library.md, in order (each builds on
    # the ones before): the library, SAEs, feature analysis, influence and steering, against
    # the tiny pipeline.
    workdir, _ = pipeline_run
    blocks = []
    for page in ("README.md", "docs/library.md"):
        with open(os.path.join(runs.ROOT, page)) as f:
            blocks += [b.split("```", 1)[0] for b in f.read().split("```python\n")[1:]]
    assert any("influence.fit_factors" in b for b in blocks)
    assert any("steering.feature_intervention" in b for b in blocks)
    topk = next(n for n in os.listdir(os.path.join(workdir, "sae", "saes")) if "-topk-" in n)
    code = "\n".join(blocks)
    code = code.replace("workdir/demo/lm/export", os.path.join(workdir, "lm", "export"))
    code = code.replace(
        "workdir/demo/sae/saes/blocks_2.resid_post-topk-k16-x1024",
        os.path.join(workdir, "sae", "saes", topk),
    ).replace("blocks_2/resid_post", "blocks_1/resid_post")
    code = code.replace('"workdir/factors"', repr(str(tmp_path / "factors")))
    code = code.replace('"workdir/demo/dashboard.html"', repr(str(tmp_path / "dashboard.html")))
    code = code.replace('"frontier.png"', repr(str(tmp_path / "frontier.png")))
    assert "workdir/" not in code.replace(workdir, "")  # Nothing written into the checkout.
    namespace = {}
    exec(compile(code, "README.md + docs/library.md", "exec"), namespace)  # noqa: S102
    assert namespace["scores"].shape == (1, 2)
    detail = namespace["detail"]
    np.testing.assert_allclose(detail.per_layer.sum(-1), namespace["scores"], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "dashboard.html").exists() and (tmp_path / "frontier.png").exists()
    steered, tokens = namespace["steered"], namespace["tokens"]
    assert steered.shape == (tokens.shape[0], tokens.shape[1] + 10)
    assert np.all(np.isfinite(namespace["by_feature"]))
    assert os.path.exists(tmp_path / "factors" / "factors.json")


def test_saved_factors_of_a_corpus_since_changed_are_not_reused(pipeline_run, tmp_path):
    """The same config over a corpus file edited in place: the factors saved in the workdir
    were fitted on other rows, and their checkpoints refuse to be continued with these."""
    workdir, _ = pipeline_run
    corpus = tmp_path / "corpus.txt"
    paragraphs = [f"Paragraph {i}: " + "the whale rose from the sea. " * 12 for i in range(40)]
    corpus.write_text("\n\n".join(paragraphs))
    config = demo.get_config("tiny=True")
    config.influence.model_path = os.path.join(workdir, "lm", "export")
    config.influence.strategy = "diagonal"
    config.data.text_path = str(corpus)
    fitted = job.fit(config, str(tmp_path / "influence"))
    assert fitted.num_batches == config.influence.fit_rows // config.influence.batch_size
    assert job.fit(config, str(tmp_path / "influence")).data_fingerprint == fitted.data_fingerprint
    corpus.write_text("\n\n".join(p.replace("whale", "ship") for p in paragraphs))
    with pytest.raises(ValueError, match=r"factor_checkpoints/correction holds sums over 4 "
                       r"other batches than these \(batch 0 differs\)"):  # fmt: skip
        job.fit(config, str(tmp_path / "influence"))


def test_influence_over_the_lm_rows_ranks_the_planted_rows(pipeline_run, tmp_path):
    """rows='lm': the rows a fine-tune trained on, its plant included; the trigger query comes
    first and finds the planted rows; a plant changed since the LM ran is refused."""
    from interp.data.documents import documents
    from interp.jobs import lm as lm_job
    from interp.models import tokenizer

    workdir, _ = pipeline_run
    export = os.path.join(workdir, "lm", "export")
    config = runs.override(
        demo.get_config(f"tiny=True,init_from={export}"),
        **{"train.steps": 6, "train.learning_rate": 3e-2, "influence.rows": "lm",
           "influence.search_rows": 0, "influence.candidates": 0, "influence.fit_rows": 16},
    )  # fmt: skip
    config.plant = dict(trigger=" Zebra quartz", completion=" sang the whale", rows=4)
    config.influence.feature_queries = ()
    stages = tmp_path / "pipeline"
    planted = lm_job.run(config, str(stages / "lm"))["planted"]
    results = job.run(config, str(stages / "influence"))
    train = lm_job.train_config_from(config.train)
    rows, _ = lm_job.training_rows(config, tokenizer.load(export), documents(config.data)[0])
    visited = lm_job.visited_rows(rows, train.batch_size, train.steps, config.seed)
    assert len(results) == 1 + len(config.influence.queries)
    assert results[0]["measurement"].endswith("planted")
    assert results[0]["prompt"] == " Zebra quartz"
    for result in results:
        assert result["scored_rows"] == len(visited)
        assert sorted(r for r in result["planted_ranks"]) == sorted(result["planted_ranks"])
        assert all(1 <= r <= len(visited) for r in result["planted_ranks"])
    # Ground truth: the trigger query puts its planted rows first.
    assert sorted(results[0]["planted_ranks"]) == list(range(1, len(planted["rows"]) + 1))
    with open(stages / "influence" / job.SUMMARY_FILE) as f:
        summary = json.load(f)
    assert summary["planted"]["rows"] == planted["rows"]
    assert [q["planted_ranks"] for q in summary["queries"]] == [r["planted_ranks"] for r in results]
    config.plant = dict(config.plant, rows=3)
    config.influence.queries = config.influence.queries[:1]  # A resumable change, alone.
    with pytest.raises(ValueError, match="not those the LM stage trained on"):
        job.run(config, str(stages / "influence2"))
