"""Tests for interp.parallel on 8 fake CPU devices (see conftest.py) and on two processes."""

import functools
import logging
import os
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from interp import parallel
from interp.models import hooks
from interp.models.config import ModelConfig
from interp.models.transformer import Transformer
from tests import multiprocess

CONFIGS = {
    # Llama-like: rotary, GQA (2 kv heads do not divide model=4: replicated), gated SiLU.
    "gqa_rotary_gated": ModelConfig(
        family="llama",
        num_heads=4,
        num_kv_heads=2,
        positions="rotary",
        gated_mlp=True,
        activation="silu",
        norm="rmsnorm",
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tied_embeddings=False,
    ),
    # GPT-2-like: learned positions, MHA, LayerNorm with biases, tied embeddings.
    "gpt2": ModelConfig(family="gpt2", num_heads=4, num_kv_heads=4),
}
MESHES = {"data2_model4": dict(data=2, model=4), "data8": dict(data=8)}
BATCH, LENGTH = 8, 16
ATOL = 1e-5


def _tokens(vocab_size, batch=BATCH, length=LENGTH, seed=0):
    return np.random.RandomState(seed).randint(0, vocab_size, (batch, length))


def _random_params(config, seed=0):
    """NumPy params of the model's shapes (compiling an init costs seconds on CPU)."""
    shapes = nn.meta.unbox(parallel.abstract_params(Transformer(config)))
    rng = np.random.RandomState(seed)
    return jax.tree.map(
        lambda s: (0.5 * rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(s.dtype),
        shapes,
    )


@functools.cache
def _reference_params(name):
    return _random_params(CONFIGS[name])


def _single_device(fn):
    """jit on device 0 only: the unsharded reference."""
    device = jax.devices()[0]
    jitted = jax.jit(fn)

    def call(*args):
        return jitted(*jax.device_put(args, device))

    return call


def _spec(x):
    return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


# ----------------------------------------------------------------------------- meshes


def test_make_mesh_shapes():
    assert dict(parallel.make_mesh().shape) == {"data": 8, "fsdp": 1, "model": 1}
    mesh = parallel.make_mesh(model=4)
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 4}
    assert dict(parallel.make_mesh(data=2, fsdp=2, model=2).shape) == {
        "data": 2,
        "fsdp": 2,
        "model": 2,
    }
    from_dict = parallel.mesh_from_config({"data": 1, "model": 2, "fsdp": -1})
    assert dict(from_dict.shape) == {"data": 1, "fsdp": 4, "model": 2}
    from_config = parallel.mesh_from_config(ml_collections.ConfigDict(dict(data=-1, model=8)))
    assert dict(from_config.shape) == {"data": 1, "fsdp": 1, "model": 8}


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(data=3), r"data=3 \* fsdp=1 \* model=1 = 3 devices, but 8 devices"),
        (dict(data=2, model=2), r"= 4 devices, but 8 devices are available"),
        (dict(model=3), r"on 8 devices: data=-1 needs the device count 8 to be divisible"),
        (dict(data=-1, fsdp=-1), r"Only one mesh axis may be -1"),
        (dict(data=0), r"data=0 must be a positive int or -1"),
    ],
)
def test_make_mesh_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        parallel.make_mesh(**kwargs)


def test_config_errors():
    with pytest.raises(ValueError, match=r"Unknown mesh field\(s\) \['modle'\]"):
        parallel.mesh_from_config({"modle": 2})
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match=r"names mesh axes \['tensor'\] that the mesh lacks"):
        parallel.batch_sharding(mesh, [("batch", "data"), ("mlp", "tensor")])
    with pytest.raises(ValueError, match="pair"):
        parallel.rules_from_config([("batch",)])
    explicit = jax.make_mesh((8, 1, 1), parallel.MESH_AXES)  # Explicit axes by default.
    with pytest.raises(ValueError, match=r"Mesh axes \['data', 'fsdp', 'model'\] are Explicit"):
        parallel.sharded_apply(Transformer(CONFIGS["gpt2"]), explicit)


def test_rules_from_config():
    assert parallel.rules_from_config(None) == parallel.DEFAULT_RULES
    assert parallel.rules_from_config(()) == parallel.DEFAULT_RULES
    rules = parallel.rules_from_config(
        [["batch", ["data", "fsdp"]], ["mlp", "model"], ["kv", None]]
    )
    assert rules == (("batch", ("data", "fsdp")), ("mlp", "model"), ("kv", None))
    # Rules from config drive the layout: here MLP weights are split, attention replicated.
    mesh = parallel.make_mesh(data=2, fsdp=1, model=4)
    shardings = parallel.param_shardings(Transformer(CONFIGS["gpt2"]), mesh, rules)
    assert tuple(shardings["blocks_0"]["mlp"]["up_kernel"].spec) == (None, "model")
    assert tuple(shardings["blocks_0"]["attn"]["q_kernel"].spec) == (None, None, None)


# ----------------------------------------------------------------------------- layouts


def _check_layout(params):
    """Specs and per-device shard shapes of the gpt2 config on mesh data=1, fsdp=2, model=4."""
    block = params["blocks_0"]
    expected = {
        # name: (array, mesh spec, per-device shard shape)
        "embed": (params["embed"], ("model", "fsdp"), (64, 32)),
        "pos_embed": (params["pos_embed"], (None, "fsdp"), (512, 32)),
        "mlp up": (block["mlp"]["up_kernel"], ("fsdp", "model"), (32, 64)),
        "mlp up bias": (block["mlp"]["up_bias"], ("model",), (64,)),
        "mlp down": (block["mlp"]["down_kernel"], ("model", "fsdp"), (64, 32)),
        "q": (block["attn"]["q_kernel"], ("fsdp", "model", None), (32, 1, 16)),
        "k": (block["attn"]["k_kernel"], ("fsdp", "model", None), (32, 1, 16)),
        "o": (block["attn"]["o_kernel"], ("model", None, "fsdp"), (1, 16, 32)),
        "norm": (block["ln_1"]["scale"], ("fsdp",), (32,)),
    }
    for name, (array, spec, shard_shape) in expected.items():
        assert _spec(array) == spec, name
        assert len(array.addressable_shards) == 8, name
        assert all(s.data.shape == shard_shape for s in array.addressable_shards), name
    # The shards tile the array: each device holds exactly its slice.
    up = block["mlp"]["up_kernel"]
    full = np.asarray(up)
    for shard in up.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


def test_param_layout_follows_rules():
    model = Transformer(CONFIGS["gpt2"])  # D=64, F=256, V=256, N=K=4, H=16.
    mesh = parallel.make_mesh(data=1, fsdp=2, model=4)
    plain = _reference_params("gpt2")
    params = parallel.shard_params(plain, model, mesh)
    _check_layout(params)
    np.testing.assert_array_equal(np.asarray(params["embed"]), plain["embed"])
    # Derived abstractly: the same layout without any arrays.
    shardings = parallel.param_shardings(model, mesh)
    assert jax.tree.map(lambda s: s.spec, shardings) == jax.tree.map(
        lambda x: x.sharding.spec, params
    )
    with pytest.raises(ValueError, match="does not match the model"):
        parallel.shard_params({"embed": plain["embed"]}, model, mesh)


def test_init_sharded_matches_single_device_init():
    model = Transformer(CONFIGS["gpt2"].replace(num_layers=1))
    # An 'rbg' key: threefry inits take seconds to compile on CPU (the multi-process test
    # covers the default int seed / threefry path).
    key = jax.random.key(0, impl="rbg")
    params = parallel.init_sharded(model, key, parallel.make_mesh(data=1, fsdp=2, model=4))
    _check_layout(params)
    init = _single_device(lambda key: model.init(key, jnp.zeros((1, 2), jnp.int32)))
    reference = nn.meta.unbox(init(key)["params"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
        params,
        reference,
    )


def test_indivisible_dims_fall_back_with_warning(caplog):
    parallel.mesh._warned.clear()
    model = Transformer(CONFIGS["gqa_rotary_gated"])  # 2 kv heads, model=4.
    mesh = parallel.make_mesh(data=2, model=4)
    with caplog.at_level(logging.WARNING):
        shardings = parallel.param_shardings(model, mesh)
    attn = shardings["blocks_0"]["attn"]
    assert tuple(attn["q_kernel"].spec) == ("fsdp", "model", None)
    assert tuple(attn["k_kernel"].spec) == ("fsdp", None, None)  # Replicated over model.
    assert "blocks_*/attn/k_kernel: dim 1 (size 2) over nothing" in caplog.text
    assert "blocks_0" not in caplog.text  # One line per kind of weight, not per layer.

    # A batch of 6 over data*fsdp = 2*2 keeps data only.
    mesh = parallel.make_mesh(data=2, fsdp=2, model=2)
    assert tuple(parallel.batch_sharding(mesh, ndim=2, shape=(6, 3)).spec) == ("data", None)
    assert tuple(parallel.batch_sharding(mesh, ndim=2, shape=(8, 3)).spec) == (
        ("data", "fsdp"),
        None,
    )


def test_shard_batch():
    mesh = parallel.make_mesh(data=2, model=4)
    tokens = _tokens(256)
    steering = np.ones(64, np.float32)  # Not batch-leading: replicated.
    batch = parallel.shard_batch({"tokens": tokens, "step": np.int32(3), "vector": steering}, mesh)
    assert _spec(batch["tokens"]) == (("data", "fsdp"), None)
    assert batch["tokens"].addressable_shards[0].data.shape == (BATCH // 2, LENGTH)
    assert batch["tokens"].dtype == jnp.int32
    assert batch["step"].sharding.is_fully_replicated
    assert batch["vector"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_sharded_forward_matches_unsharded(config_name, mesh_name):
    model = Transformer(CONFIGS[config_name])
    mesh = parallel.make_mesh(**MESHES[mesh_name])
    plain = _reference_params(config_name)
    params = parallel.shard_params(plain, model, mesh)
    tokens = _tokens(model.config.vocab_size)
    mask = np.ones_like(tokens)
    mask[:3, :5] = 0  # Left padding on a few rows.

    forward = parallel.sharded_apply(model, mesh)
    logits = forward(params, tokens, attention_mask=mask)
    reference = _single_device(lambda p, t, m: model.apply({"params": p}, t, attention_mask=m))(
        plain, tokens, mask
    )

    assert logits.shape == (BATCH, LENGTH, model.config.vocab_size)
    assert _spec(logits)[0] == ("data", "fsdp")
    assert logits.addressable_shards[0].data.shape[0] == BATCH // mesh.shape["data"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=ATOL)


def test_logical_constraints_take_effect():
    """Inside sharded_apply the model's with_logical_constraint calls become sharding ops."""
    model = Transformer(CONFIGS["gpt2"])
    mesh = parallel.make_mesh(data=2, model=4)
    params = parallel.shard_params(_reference_params("gpt2"), model, mesh)
    text = parallel.sharded_apply(model, mesh).lower(params, _tokens(256)).as_text()
    residual = '<@mesh, [{"data", "fsdp"}, {}, {}]> : tensor<8x16x64xf32>'
    hidden = '<@mesh, [{"data", "fsdp"}, {}, {"model"}]> : tensor<8x16x256xf32>'
    assert text.count("sdy.sharding_constraint %") >= 5
    assert residual in text and hidden in text


# ----------------------------------------------------------------------------- hooks


def test_hooks_under_jit_with_sharded_params():
    model = Transformer(CONFIGS["gqa_rotary_gated"])
    mesh = parallel.make_mesh(data=2, model=4)
    plain = _reference_params("gqa_rotary_gated")
    params = parallel.shard_params(plain, model, mesh)
    tokens = _tokens(model.config.vocab_size)
    capture = ["blocks_*/resid_post", "blocks_0/attn/pattern", "blocks_1/mlp/post_act"]

    identity = {"blocks_0/mlp/out": lambda v: v * 1.0}
    run = hooks.sharded_run_with_hooks(model, mesh, capture=capture, interventions=identity)
    logits, acts = run(params, tokens)
    ref_logits, ref_acts = _single_device(
        lambda p, t: hooks.run_with_hooks(model, p, t, capture=capture)
    )(plain, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=ATOL)
    assert _spec(logits)[0] == ("data", "fsdp")
    assert (
        set(acts)
        == set(ref_acts)
        == {
            "blocks_0/resid_post",
            "blocks_1/resid_post",
            "blocks_0/attn/pattern",
            "blocks_1/mlp/post_act",
        }
    )
    for name, value in acts.items():
        assert _spec(value)[0] == ("data", "fsdp"), name
        assert value.addressable_shards[0].data.shape[0] == BATCH // 2, name
        np.testing.assert_allclose(
            np.asarray(value), np.asarray(ref_acts[name]), atol=ATOL, err_msg=name
        )

    # A real intervention (ablating layer 0's MLP) also matches the unsharded model.
    ablate = {"blocks_0/mlp/out": jnp.zeros_like}
    ablated, _ = hooks.sharded_run_with_hooks(model, mesh, interventions=ablate)(params, tokens)
    reference = _single_device(
        lambda p, t: hooks.run_with_hooks(model, p, t, interventions=ablate)[0]
    )(plain, tokens)
    np.testing.assert_allclose(np.asarray(ablated), np.asarray(reference), atol=ATOL)
    assert not np.allclose(np.asarray(ablated), np.asarray(ref_logits), atol=1e-3)


def test_hook_grads_sharded_match_unsharded():
    model = Transformer(CONFIGS["gpt2"])
    mesh = parallel.make_mesh(data=2, model=4)
    plain = _reference_params("gpt2")
    params = parallel.shard_params(plain, model, mesh)
    tokens = _tokens(model.config.vocab_size)
    names = ["blocks_0/mlp/out", "blocks_1/resid_pre"]

    def loss_fn(logits):
        return jax.nn.log_softmax(logits)[..., 0].sum()

    def grads_fn(p, t):
        return hooks.hook_grads(model, p, t, loss_fn, names)

    sharded = parallel.sharded_jit(
        grads_fn, mesh, params_sharding=parallel.param_shardings(model, mesh)
    )
    loss, acts, grads = sharded(params, tokens)
    ref_loss, ref_acts, ref_grads = _single_device(grads_fn)(plain, tokens)

    assert loss.sharding.is_fully_replicated
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for name in names:
        assert _spec(grads[name])[0] == ("data", "fsdp"), name
        scale = np.abs(np.asarray(ref_grads[name])).max()
        np.testing.assert_allclose(
            np.asarray(grads[name]), np.asarray(ref_grads[name]), atol=1e-5 * scale
        )
        np.testing.assert_allclose(np.asarray(acts[name]), np.asarray(ref_acts[name]), atol=ATOL)


# ----------------------------------------------------------------------------- multi-process

_WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from interp import parallel

    port, process_id, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2,
                                    process_id=process_id)
    import jax
    import flax.linen as nn
    from interp.models import hooks
    from interp.models.config import ModelConfig
    from interp.models.transformer import Transformer

    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    assert jax.local_device_count() == 4
    model = Transformer(ModelConfig(**eval(os.environ["WORKER_CONFIG"])))
    mesh = parallel.make_mesh(data=2, model=4)
    tokens = np.load(os.path.join(out_dir, "tokens.npy"))
    run = hooks.sharded_run_with_hooks(model, mesh, capture=["blocks_1/resid_post"])

    # Host params (as if loaded from a checkpoint), the same on both processes.
    structure = jax.tree.structure(nn.meta.unbox(parallel.abstract_params(model)))
    with np.load(os.path.join(out_dir, "params.npz")) as data:
        host = [data[f"arr_{i}"] for i in range(structure.num_leaves)]
    params = parallel.shard_params(jax.tree.unflatten(structure, host), model, mesh)
    logits, acts = run(params, tokens)
    assert not logits.is_fully_addressable  # Really spread over both processes.
    # Params initialized in place, on both processes at once.
    initialized = parallel.init_sharded(model, 0, mesh)
    init_logits, _ = run(initialized, tokens)

    gathered = parallel.process_allgather(
        (logits, acts["blocks_1/resid_post"], init_logits, initialized))
    np.save(os.path.join(out_dir, f"logits_{process_id}.npy"), gathered[0])
    np.save(os.path.join(out_dir, f"resid_{process_id}.npy"), gathered[1])
    np.save(os.path.join(out_dir, f"init_logits_{process_id}.npy"), gathered[2])
    np.savez(os.path.join(out_dir, f"init_params_{process_id}.npz"),
             *jax.tree.leaves(gathered[3]))
    """
)


def test_two_processes_match_single_process(tmp_path):
    config = CONFIGS["gqa_rotary_gated"]
    model = Transformer(config)
    tokens = _tokens(config.vocab_size)
    plain = _reference_params("gqa_rotary_gated")
    np.save(tmp_path / "tokens.npy", tokens)
    np.savez(tmp_path / "params.npz", *jax.tree.leaves(plain))
    fields = {k: v for k, v in config.to_dict().items() if k != "sliding_layers"}
    port = multiprocess.free_port()
    workers = multiprocess.start_workers(
        _WORKER,
        [(port, i, tmp_path) for i in range(2)],
        [dict(WORKER_CONFIG=repr(fields))] * 2,
    )
    # Single-process reference while the workers run.
    capture = ["blocks_1/resid_post"]
    reference = _single_device(lambda p, t: hooks.run_with_hooks(model, p, t, capture=capture))
    ref_logits, ref_acts = reference(plain, tokens)

    workers.wait()
    structure = jax.tree.structure(plain)
    for i in range(2):  # Every process sees the full global results.
        logits = np.load(tmp_path / f"logits_{i}.npy")
        assert logits.shape == (BATCH, LENGTH, config.vocab_size)
        np.testing.assert_allclose(logits, np.asarray(ref_logits), atol=ATOL)
        resid = np.load(tmp_path / f"resid_{i}.npy")
        np.testing.assert_allclose(resid, np.asarray(ref_acts[capture[0]]), atol=ATOL)
        with np.load(tmp_path / f"init_params_{i}.npz") as data:
            leaves = [data[f"arr_{j}"] for j in range(structure.num_leaves)]
        init_logits, _ = reference(jax.tree.unflatten(structure, leaves), tokens)
        np.testing.assert_allclose(
            np.load(tmp_path / f"init_logits_{i}.npy"), np.asarray(init_logits), atol=ATOL
        )


_INIT_WORKER = textwrap.dedent(
    """
    import os, sys
    from interp import parallel

    parallel.initialize_distributed()  # No arguments: join whatever cluster JAX detects.
    parallel.initialize_distributed()  # Again: a no-op, not JAX's "only be called once".
    import jax

    print("RESULT", jax.distributed.is_initialized(), jax.process_index(),
          jax.process_count(), jax.local_device_count(), jax.device_count(), flush=True)
    """
)
# Variables by which JAX detects a cluster (jax/_src/clusters); the no-cluster case clears them.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "KUBERNETES_", "JAX_COORDINATOR_")


def _initialize_in_fresh_processes(cluster_envs):
    """Runs _INIT_WORKER once per env (concurrently); each one's (initialized, index, count,
    local devices, global devices)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
    outputs = multiprocess.start_workers(
        _INIT_WORKER, [()] * len(cluster_envs), cluster_envs, base_env=base
    ).wait()
    results = []
    for output in outputs:
        (line,) = [line for line in output.splitlines() if line.startswith("RESULT ")]
        initialized, *counts = line.split()[1:]
        results.append((initialized == "True", *map(int, counts)))
    return results


def test_initialize_distributed_without_a_cluster_is_one_process(tmp_path):
    # In a fresh process, as documented (before any other JAX use): no error, one process
    # that keeps all its local devices, and no distributed service left half set up.
    assert _initialize_in_fresh_processes([{}]) == [(False, 0, 1, 4, 4)]
    # Here JAX is already in use, so JAX itself would refuse; and one process needs nothing.
    parallel.initialize_distributed()
    parallel.initialize_distributed(num_processes=1)
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and jax.device_count() == 8


def test_initialize_distributed_joins_a_detected_cluster(tmp_path):
    # Two processes under a (simulated) SLURM step: with no arguments, each joins as the
    # process SLURM names, and sees the other's devices.
    port = multiprocess.free_port()
    slurm = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2")
    envs = [
        dict(slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port))
        for i in range(2)
    ]
    results = _initialize_in_fresh_processes(envs)
    assert results == [(True, 0, 2, 4, 8), (True, 1, 2, 4, 8)]


def test_initialize_distributed_when_asked_fails_loudly(monkeypatch):
    # Asked for (arguments, variables or required=True), a join that cannot happen is an
    # error naming the cause, never a quiet single-process run. JAX is in use here already.
    with pytest.raises(parallel.DistributedInitError, match="before any other JAX use"):
        parallel.initialize_distributed(required=True)
    with pytest.raises(parallel.DistributedInitError, match="before any other JAX use"):
        parallel.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=1)
    with pytest.raises(parallel.DistributedInitError, match="process_id 2 is outside 0..1"):
        parallel.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(parallel.DistributedInitError, match="JAX_NUM_PROCESSES='two'"):
        parallel.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")  # A variable asks for it as an argument does.
    with pytest.raises(parallel.DistributedInitError, match="before any other JAX use"):
        parallel.initialize_distributed()
    assert not jax.distributed.is_initialized()
