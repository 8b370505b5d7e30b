"""The real-run configs (Gemma 2 2B SAE sweep, GPT-2 SAEs, Pythia influence) checked with no
weights: their model, mesh and shardings built from the published architectures
(configs/hf/*.json, sources in configs/hf/SOURCES.md), divisibility and memory on the full
slice (an abstract mesh), and the jobs' jitted steps lowered on 8 CPU devices."""

import jax
import pytest

from configs import gemma2_2b_sae, gpt2_sae, pythia_influence
from interp import parallel
from interp.jobs import plan
from tests.runs import ROOT

HF = f"{ROOT}/configs/hf"


@pytest.fixture(scope="module")
def gemma():
    return plan.model_config(f"{HF}/gemma-2-2b.json")


@pytest.fixture(scope="module")
def pythia():
    return plan.model_config(f"{HF}/pythia-410m-deduped.json")


def test_published_architectures(gemma, pythia):
    gpt2 = plan.model_config(f"{HF}/gpt2.json")
    got = {name: (c.d_model, c.num_layers, c.num_heads, c.num_kv_heads, c.mlp_dim, c.vocab_size)
           for name, c in (("gemma", gemma), ("gpt2", gpt2), ("pythia", pythia))}  # fmt: skip
    assert got == {
        "gemma": (2304, 26, 8, 4, 9216, 256000),
        "gpt2": (768, 12, 12, 12, 3072, 50257),
        "pythia": (1024, 24, 16, 16, 4096, 50304),
    }
    assert gemma.head_dim == 256 and gemma.sliding_window == 4096 and gemma.final_softcap == 30
    assert pythia.parallel_residual and pythia.rotary_fraction == 0.25
    assert not pythia.tied_embeddings and gpt2.tied_embeddings


@pytest.mark.parametrize("slice_name", ["v4-32", "v5litepod-256"])
def test_gemma_sweep_divides_and_fits(gemma, slice_name):
    config = gemma2_2b_sae.get_config(f"slice={slice_name}")
    report = plan.sae_plan(config, gemma, parallel.get_slice(slice_name))
    assert report.relaxed == {}, report.format()
    assert report.fits(), report.format()
    assert [c.num_latents for c in plan.sae_configs(config, gemma)] == [2**i for i in range(16, 21)]


def test_gemma_sweep_does_not_fit_a_v5e_16(gemma):
    # The float32 model on device 0 (10.5 GB) plus 1/16 of the sweep exceed a 16 GB chip:
    # what docs/real_runs.md says, so a v5e-16 launch is known to fail before it is paid for.
    config = gemma2_2b_sae.get_config("slice=v5litepod-16")
    assert not plan.sae_plan(config, gemma, parallel.get_slice("v5litepod-16")).fits()


def test_indivisible_latents_are_reported(gemma):
    config = gemma2_2b_sae.get_config("slice=v4-32,width=65536")
    config.sae.saes = (dict(architecture="topk", k=64, num_latents=65536 + 8),)
    relaxed = plan.sae_plan(config, gemma, parallel.get_slice("v4-32")).relaxed
    assert "sae0/W_enc" in relaxed and "size 65544" in relaxed["sae0/W_enc"][0], relaxed


def test_gemma_step_lowers_on_8_devices(gemma):
    config = gemma2_2b_sae.get_config("slice=v5litepod-8,width=65536")
    text = plan.lower_sae_step(config, gemma, parallel.make_mesh(model=8)).as_text()
    # The decoder [X, D] comes in with its latents over 'model' (embed over the size-1 fsdp).
    decoder = '{sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {"fsdp"}]>'
    assert f"tensor<65536x2304xf32> {decoder}" in text


def test_gpt2_sae_fits_one_gpu_and_lowers_on_8():
    gpt2 = plan.model_config(f"{HF}/gpt2.json")
    report = plan.sae_plan(gpt2_sae.get_config(), gpt2, parallel.get_slice("h100-1"))
    assert report.relaxed == {} and report.fits(), report.format()
    config = gpt2_sae.get_config("slice=h100-8")
    assert dict(config.mesh) == {"data": 8, "fsdp": 1, "model": 1}
    plan.lower_sae_step(config, gpt2, parallel.mesh_from_config(config.mesh))


@pytest.mark.parametrize("slice_name, fits", [("v4-8", True), ("h100-8", True),
                                              ("v5litepod-8", False)])  # fmt: skip
def test_pythia_influence_divides_and_fits(pythia, slice_name, fits):
    config = pythia_influence.get_config(f"slice={slice_name}")
    report = plan.influence_plan(config, pythia, parallel.get_slice(slice_name))
    assert report.relaxed == {}, report.format()
    assert report.fits() == fits, report.format()


def test_pythia_covariance_pass_lowers_on_8_devices(pythia):
    config = pythia_influence.get_config("slice=h100-8")
    mesh = parallel.mesh_from_config(config.mesh)
    lowered = plan.lower_influence(config, pythia, mesh)
    # 8 sequences of 2048 tokens split over 'data'; every MLP projection's covariances back.
    assert 'tensor<8x2048xi32> {sdy.sharding = #sdy.sharding<@mesh, [{"data"' in lowered.as_text()
    outputs = jax.tree.leaves(lowered.out_info)
    assert len(outputs) == 2 * 48 + 1
