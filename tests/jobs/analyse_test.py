"""The pipeline's analysis and steering stages: the feature search's feature is the one steered,
its dashboard is written, the completions are side by side; bad configs are clear errors."""

import json
import os

import numpy as np
import pytest

from configs import demo
from interp import analysis
from interp.jobs import analyse as job
from interp.jobs import steer
from interp.models import from_pretrained
from tests import runs


def test_pipeline_steers_the_feature_its_search_found(tiny_pipeline):
    workdir, result = tiny_pipeline
    config = demo.get_config("tiny=True")
    with open(os.path.join(workdir, "analysis", job.SEARCH_FILE)) as f:
        searched = json.load(f)
    with open(os.path.join(workdir, "steer", steer.RESULTS_FILE)) as f:
        steered = json.load(f)
    assert "-topk-" in os.path.basename(searched["sae"])
    assert searched["concept"] == config.analysis.concept
    assert 1 <= len(searched["search"]) <= config.analysis.top
    scores = [entry["score"] for entry in searched["search"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    for entry in searched["search"]:
        assert entry["score"] == pytest.approx(entry["activation"] / entry["max_activation"])
    assert steered["feature"] == searched["feature"] == searched["search"][0]["feature"]
    assert steered["prompt"] == config.steering.prompt
    strengths = [entry["strength"] for entry in steered["completions"]]
    assert strengths == [None, *config.steering.strengths] and 10.0 in strengths
    # The sweep: every (method, positions, strength) against unsteered, scored per completion.
    sweep, cfg = steered["sweep"], config.steering
    assert [(s["method"], s["positions"], s["strength"]) for s in sweep["settings"]] == [
        (m, p, s) for m in cfg.methods for p in cfg.positions for s in cfg.sweep_strengths
    ]
    assert sweep["unsteered"]["method"] is None and sweep["max_activation"] > 0
    for setting in [sweep["unsteered"], *sweep["settings"]]:
        assert len(setting["completions"]) == len(cfg.sweep_prompts)
        assert 0 <= setting["concept_share"] <= 1 and np.isfinite(setting["fluency_loss"])
        assert setting["value"] == pytest.approx(setting["strength"] * sweep["max_activation"])
    for key, methods in (("best", ("clamp", "add")), ("best_baseline", ("diffmean",))):
        best = sweep[key]
        assert best is None or (
            best in sweep["settings"]
            and best["method"] in methods
            and best["concept_share"] > sweep["unsteered"]["concept_share"]
            and best["fluency_loss"] <= sweep["unsteered"]["fluency_loss"] + cfg.fluency_margin
        )
    assert os.path.getsize(os.path.join(workdir, "steer", steer.SWEEP_PLOT)) > 1000
    # Both stages take maxima over the same held-out rows with the same exclusions.
    stats = analysis.FeatureStats.load(os.path.join(workdir, "analysis", "feature_stats.npz"))
    maxima = np.load(os.path.join(workdir, "steer", "max_activations.npy"))
    np.testing.assert_allclose(maxima, np.nan_to_num(stats.max), rtol=1e-5, atol=1e-6)
    for name in ("dashboard.html", job.CONCEPT_DASHBOARD, "density.png"):
        assert os.path.getsize(os.path.join(workdir, "analysis", name)) > 1000
    with open(os.path.join(workdir, "analysis", job.CONCEPT_DASHBOARD)) as f:
        assert config.analysis.concept.strip() in f.read()
    assert "**Features for ' whale'**" in result.stdout
    assert "Steering sweep:" in result.stdout and "add generated x4" in result.stdout


def test_the_lm_stage_config_leaves_out_the_later_stages(tiny_pipeline):
    workdir, _ = tiny_pipeline
    with open(os.path.join(workdir, "lm", "config.json")) as f:
        saved = json.load(f)
    assert not {"sae", "influence", "analysis", "steering"} & set(saved)
    with open(os.path.join(workdir, "analysis", "config.json")) as f:
        assert "steering" not in json.load(f)


def test_steering_alone_finds_the_feature_the_analysis_stage_found(tiny_pipeline, tmp_path):
    # feature = -1 outside the pipeline: the same in-context search, over the same maxima.
    workdir, _ = tiny_pipeline
    with open(os.path.join(workdir, "analysis", job.SEARCH_FILE)) as f:
        searched = json.load(f)
    config = demo.get_config("tiny=True")
    config.steering.model_path = os.path.join(workdir, "lm", "export")
    config.steering.sae = searched["sae"]
    config.steering.strengths = (1.0,)
    assert config.steering.feature == -1
    assert (config.steering.concept, config.steering.context) == (
        config.analysis.concept, config.analysis.context)  # fmt: skip
    assert steer.run(config, str(tmp_path / "steer"))["feature"] == searched["feature"]
    config.steering.context = "Nothing about it here."
    with pytest.raises(ValueError, match="config.steering.context .* does not hold the concept"):
        steer.run(config, str(tmp_path / "bad"))


def test_bad_analysis_configs_are_clear_errors(tiny_pipeline, tmp_path):
    workdir, _ = tiny_pipeline
    config = demo.get_config("tiny=True")
    config.analysis.model_path = os.path.join(workdir, "lm", "export")
    config.analysis.topp = 3
    with pytest.raises(ValueError, match="topp"):
        job.run(config, str(tmp_path / "a"))
    config = demo.get_config("tiny=True")
    config.analysis.model_path = os.path.join(workdir, "lm", "export")
    with pytest.raises(FileNotFoundError, match="No TopK SAE"):
        job.run(config, str(tmp_path / "b"))  # No sae/ beside this workdir.


def test_the_concept_is_searched_inside_its_context(tiny_pipeline, tmp_path):
    # Each token of each occurrence, not a lone token at position 0 (which SAE training and
    # evaluation leave out).
    assert job.concept_positions([5, 7, 9, 7, 9, 7], [7, 9]) == [1, 2, 3, 4]
    assert job.concept_positions([5, 7], [8]) == []
    workdir, _ = tiny_pipeline
    config = demo.get_config("tiny=True")
    config.analysis.model_path = os.path.join(workdir, "lm", "export")
    config.analysis.sae = os.path.join(
        workdir, "sae", "saes", next(n for n in os.listdir(os.path.join(workdir, "sae", "saes"))
                                     if "-topk-" in n)
    )  # fmt: skip
    config.analysis.context = "Nothing about it here."
    with pytest.raises(ValueError, match="does not hold the concept"):
        job.run(config, str(tmp_path / "c"))


def test_statistics_and_maxima_see_all_of_the_heldout_text(tiny_pipeline, tmp_path):
    # Held-out "books" in source order, the concept only in the last: the first max_rows rows
    # are the first book, so statistics taken over them never see a whale.
    workdir, _ = tiny_pipeline
    words = ("alice rabbit garden tea queen", "darcy ball letter sister estate",
             "pip marsh convict forge candle", "Whale SPOUT harpoon QUEEQUEG sea")  # fmt: skip
    books = [" ".join(f"{w}{i}" for i in range(60) for w in topic.split()) for topic in words]
    path = tmp_path / "books.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["filler " * 50] * 4 + books))
    config = demo.get_config("tiny=True")
    config.data.text_path, config.data.heldout_fraction = str(path), 0.5  # The 4 books.
    saes = os.path.join(workdir, "sae", "saes")
    sae = os.path.join(saes, next(n for n in sorted(os.listdir(saes)) if "-topk-" in n))
    config.analysis.update(model_path=os.path.join(workdir, "lm", "export"), sae=sae,
                           max_rows=16, context="The Whale rose, the Whale spouted.",
                           concept=" Whale")  # fmt: skip
    config.steering.update(model_path=config.analysis.model_path, sae=sae, max_rows=16,
                           context=config.analysis.context, concept=" Whale",
                           strengths=(1.0,), max_new_tokens=2)  # fmt: skip
    results = job.run(config, str(tmp_path / "analysis"))
    assert results["heldout_rows"] == 16
    stats = analysis.FeatureStats.load(tmp_path / "analysis" / "feature_stats.npz")
    tokenizer = from_pretrained(config.analysis.model_path)[2]
    first = set(tokenizer.encode(books[0]))
    last_only = set(tokenizer.encode(books[-1])) - set().union(*map(tokenizer.encode, books[:-1]))
    seen = set(stats.top_tokens[stats.top_tokens >= 0].tolist())
    assert last_only and seen & last_only, "the statistics never saw the last book"
    assert seen - first, "the statistics saw the first book only"
    for entry in results["search"]:
        assert entry["above_max"] == (entry["score"] > 1 + 1e-4)
    # The steering stage takes its maxima over the same rows.
    steered = steer.run(config, str(tmp_path / "steer"))
    assert steered["heldout_rows"] == 16 and isinstance(steered["above_max"], bool)
    maxima = np.load(tmp_path / "steer" / "max_activations.npy")
    np.testing.assert_allclose(maxima, np.nan_to_num(stats.max), rtol=1e-5, atol=1e-6)


def test_the_analysis_main_runs_alone_on_given_model_and_sae(tiny_pipeline, tmp_path):
    """experiments/analyse.py with the model and SAE named (not the pipeline's defaults beside
    the workdir) finds the feature the pipeline's analysis stage found."""
    from tests import runs

    workdir, _ = tiny_pipeline
    with open(os.path.join(workdir, "analysis", job.SEARCH_FILE)) as f:
        searched = json.load(f)
    out = str(tmp_path / "analysis")
    result = runs.run_main(
        "experiments.analyse",
        "configs/demo.py:tiny=True",
        out,
        f"--config.analysis.model_path={os.path.join(workdir, 'lm', 'export')}",
        f"--config.analysis.sae={searched['sae']}",
    )
    with open(os.path.join(out, job.SEARCH_FILE)) as f:
        alone = json.load(f)
    assert alone["feature"] == searched["feature"]
    assert [e["feature"] for e in alone["search"]] == [e["feature"] for e in searched["search"]]
    assert "Dashboard:" in result.stdout and os.path.exists(os.path.join(out, "dashboard.html"))


def test_the_results_summary_quotes_the_run_files_and_fills_a_readme_block(tiny_pipeline, tmp_path):
    """interp.jobs.results: every figure quoted comes from the stages' files; the README
    block between the markers is replaced, the rest kept; no markers is an error."""
    from interp.jobs import results
    from interp.jobs import sae as sae_job
    from interp.jobs import steer as steer_job

    workdir, _ = tiny_pipeline
    text = results.summarize(workdir)
    with open(os.path.join(workdir, "results.md")) as f:
        assert f.read() == text  # What the pipeline wrote at its end.
    with open(os.path.join(workdir, "sae", "eval.json")) as f:
        assert sae_job.format_table(json.load(f)) in text
    with open(os.path.join(workdir, "steer", "steering.json")) as f:
        assert steer_job.format_sweep(json.load(f)["sweep"]) in text
    with open(os.path.join(workdir, "lm", "summary.json")) as f:
        assert f"held-out loss {json.load(f)['eval_loss']:.3f}" in text
    with open(os.path.join(workdir, "analysis", "search.json")) as f:
        for entry in json.load(f)["search"]:
            assert f"- feature {entry['feature']}: {entry['score']:.2f}" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{results.BEGIN}\nold text\n{results.END}\n\nAfter.\n")
    results.write_readme_block(readme, text)
    assert readme.read_text() == (
        f"# Title\n\n{results.BEGIN}\n{text.strip()}\n{results.END}\n\nAfter.\n"
    )
    assert "(No results yet from: lm, sae, analysis, steer, influence.)" in results.summarize(
        tmp_path
    )
    readme.write_text("# No markers\n")
    with pytest.raises(ValueError, match="demo-results:begin"):
        results.write_readme_block(readme, text)


def test_an_sae_used_with_another_model_than_its_own_is_refused(tiny_pipeline, tmp_path):
    """The SAE job records its model's fingerprint; analysis and steering refuse another
    model (a one-weight change is enough) unless allow_other_model says the site is shared."""
    import jax

    from interp.jobs import sae as sae_job
    from interp.models import save_pretrained

    workdir, _ = tiny_pipeline
    model, params, tokenizer = from_pretrained(os.path.join(workdir, "lm", "export"))
    topk = sae_job.pipeline_topk_sae(os.path.join(workdir, "steer"), "sae")
    sae_job.check_model(topk, model, params, where="config.steering")  # Its own model.
    leaves, tree = jax.tree.flatten(params)
    other_params = jax.tree.unflatten(tree, [leaves[0] + 1e-3, *leaves[1:]])
    other = str(tmp_path / "other")
    save_pretrained(other, model.config, other_params, tokenizer=tokenizer)
    for section, run in (("analysis", job.run), ("steering", steer.run)):
        config = demo.get_config("tiny=True")
        config[section].model_path = other
        config[section].sae = topk
        fix = rf"trained on .*lm/export.*config\.{section}\.allow_other_model"
        with pytest.raises(sae_job.SAEModelMismatchError, match=fix):
            run(config, str(tmp_path / section))
    other_model, loaded, _ = from_pretrained(other)
    sae_job.check_model(topk, other_model, loaded, where="config.steering", allowed=True)


def test_the_pipeline_runs_only_the_stages_asked_for(tiny_pipeline, tmp_path):
    """config.stages: a model studied as it is (no LM stage): here the analysis alone, on the
    tiny run's model and SAE; the summary says which stages have no results."""
    from experiments import pipeline
    from interp.jobs import sae as sae_job

    workdir, _ = tiny_pipeline
    topk = sae_job.pipeline_topk_sae(os.path.join(workdir, "steer"), "sae")
    out = str(tmp_path / "study")
    result = runs.run_main(
        "experiments.pipeline", "configs/demo.py:tiny=True", out, "--config.stages=analysis",
        f"--config.analysis.model_path={os.path.join(workdir, 'lm', 'export')}",
        f"--config.analysis.sae={topk}",
    )  # fmt: skip
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "analysis",
        "results.md",
    ]
    assert "(No results yet from: lm, sae, steer, influence.)" in result.stdout
    assert "**Features for ' whale'**" in result.stdout
    config = demo.get_config("tiny=True")
    config.stages = ("steer", "lm")
    assert pipeline.stages_of(config) == ("lm", "steer")
    assert pipeline.stages_of({"stages": "analysis, sae"}) == ("sae", "analysis")
    config.stages = ("lm", "train")
    with pytest.raises(ValueError, match="choose among"):
        pipeline.stages_of(config)
