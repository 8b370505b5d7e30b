"""interp/models/fingerprint.py: the same model hashes the same however it is held."""

import jax
import jax.numpy as jnp
import numpy as np

from interp import parallel
from interp.models.fingerprint import fingerprint
from interp.models.transformer import Transformer, init_params
from tests.models.testing import LLAMA_LIKE


def _model():
    config = LLAMA_LIKE
    return config, init_params(config, 0)


def test_same_weights_same_hash_whatever_the_layout_or_dtype():
    config, params = _model()
    reference = fingerprint(config, params)
    assert fingerprint(config, jax.device_get(params)) == reference  # NumPy leaves.
    model = Transformer(config)
    mesh = parallel.make_mesh(data=2, model=4)
    assert fingerprint(config, parallel.shard_params(params, model, mesh)) == reference
    assert fingerprint(config.to_dict(), params) == reference  # Dict or dataclass.
    # Compute dtype is not identity; bf16 weights read in f32 keep the bf16 hash.
    as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    back = jax.tree.map(lambda x: x.astype(jnp.float32), as_bf16)
    assert fingerprint(config.replace(dtype="bfloat16"), as_bf16) == fingerprint(config, back)


def test_other_weights_or_config_change_the_hash():
    config, params = _model()
    reference = fingerprint(config, params)
    retrained = init_params(config, 1)
    assert fingerprint(config, retrained) != reference
    nudged = jax.tree.map(lambda x: x, params)
    nudged["embed"] = params["embed"].at[0, 0].add(1e-3)  # One element of a sampled row.
    assert fingerprint(config, nudged) != reference
    assert fingerprint(config.replace(norm_eps=1e-6), params) != reference


def test_a_config_field_added_with_its_default_keeps_the_hash():
    # Fields added to ModelConfig later (at defaults that keep the old behaviour) must not
    # orphan saved caches and factors: their fingerprints stay valid.
    import dataclasses

    config, params = _model()
    fields = [(f.name, f.type, f) for f in dataclasses.fields(config)]
    older = dataclasses.make_dataclass("Older", [f for f in fields if f[0] != "qk_norm"])
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(older)}
    assert fingerprint(older(**values), params) == fingerprint(config, params)
    assert fingerprint(config.replace(qk_norm=True), params) != fingerprint(config, params)


def test_large_arrays_are_sampled_not_read_whole(monkeypatch):
    from interp.models import fingerprint as module

    monkeypatch.setattr(module, "SAMPLE_SIZE", 16)
    big = {"w": np.arange(1000, dtype=np.float32)}
    changed_unsampled = {"w": big["w"].copy()}
    changed_unsampled["w"][1] += 1  # Stride 62: element 1 is not in the sample.
    changed_sampled = {"w": big["w"].copy()}
    changed_sampled["w"][62] += 1
    assert module.fingerprint({"a": 1}, big) == module.fingerprint({"a": 1}, changed_unsampled)
    assert module.fingerprint({"a": 1}, big) != module.fingerprint({"a": 1}, changed_sampled)
