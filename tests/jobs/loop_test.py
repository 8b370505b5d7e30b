"""The shared training loop: resume equals an uninterrupted run, on any mesh; metrics, eval."""

import jax
import numpy as np
import pytest

from interp import checkpoint, metrics, parallel
from interp.jobs import loop
from interp.sae import train as sae_train
from interp.sae.modules import SAEConfig

D, X, BATCH = 16, 64, 16


def _data(steps=6, seed=5):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(32, D))
    codes = rng.random((steps * BATCH, 32)) * (rng.random((steps * BATCH, 32)) < 0.1)
    return (codes @ features).astype(np.float32)


def _sae_task(mesh, data, fail_at=None):
    """Two SAEs trained together, as the SAE job builds them."""
    configs = (
        SAEConfig(architecture="topk", k=4, d_in=D, num_latents=X, dead_tokens=2 * BATCH),
        SAEConfig(architecture="relu", l1_coefficient=0.1, d_in=D, num_latents=X),
    )
    train_config = sae_train.TrainConfig(steps=6, learning_rate=1e-2, warmup_steps=2)
    key = jax.random.key(0)

    def batch(index):
        if index == fail_at:
            raise KeyboardInterrupt  # As if the process died while fetching this batch.
        return data[index * BATCH : (index + 1) * BATCH]

    return loop.Task(
        init=lambda: sae_train.init_state(configs, train_config, key, mesh, b_dec_init=data[0]),
        abstract=sae_train.abstract_state(configs, train_config, mesh),
        step=sae_train.make_train_step(configs, train_config, mesh),
        batch=batch,
        flatten=lambda out: sae_train.flatten_metrics(out, ["topk", "relu"]),
    )


LOOP = loop.LoopConfig(steps=6, log_every=1, checkpoint_every=2)


def _assert_trees_close(a, b, atol):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol),
        a,
        b,
    )


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    data, mesh = _data(), parallel.make_mesh(data=2, model=4)
    straight, _ = loop.train(_sae_task(mesh, data), tmp_path / "a", LOOP)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_sae_task(mesh, data, fail_at=4), tmp_path / "b", LOOP)
    assert checkpoint.Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [2, 4]
    resumed, _ = loop.train(_sae_task(mesh, data), tmp_path / "b", LOOP)
    assert checkpoint.Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [4, 6]
    assert int(resumed["step"]) == 6
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), straight, resumed
    )


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before_to_the_same_end(tmp_path):
    data, mesh = _data(), parallel.make_mesh(data=2, model=4)
    straight, _ = loop.train(_sae_task(mesh, data), tmp_path / "a", LOOP)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_sae_task(mesh, data, fail_at=4), tmp_path / "b", LOOP)
    # Step 4's array-data files lose their second halves (a copy cut short).
    step_dir = tmp_path / "b" / "checkpoints" / "4"
    for path in [*step_dir.glob("default/d/*"), *step_dir.glob("default/*/d/*")]:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    resumed, _ = loop.train(_sae_task(mesh, data), tmp_path / "b", LOOP)  # From step 2.
    assert checkpoint.Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [4, 6]
    assert [p.name.split(".")[0] for p in (tmp_path / "b" / "checkpoints").glob("*.corrupt-*")]
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), straight, resumed
    )


def test_resuming_on_another_mesh_gives_the_same_state_in_the_new_layout(tmp_path):
    data = _data()
    wide, narrow = parallel.make_mesh(data=2, model=4), parallel.make_mesh(data=8, model=1)
    straight, _ = loop.train(_sae_task(wide, data), tmp_path / "a", LOOP)
    with pytest.raises(KeyboardInterrupt):
        loop.train(_sae_task(wide, data, fail_at=4), tmp_path / "b", LOOP)
    resumed, _ = loop.train(_sae_task(narrow, data), tmp_path / "b", LOOP)
    w_enc = resumed["saes"][0]["params"]["W_enc"]
    assert w_enc.sharding.mesh.shape == narrow.shape  # Restored into the new layout.
    # Reductions run in another order on another mesh: equal to float32 rounding.
    _assert_trees_close(straight, resumed, atol=1e-5)


def test_state_is_built_sharded_and_global(tmp_path):
    mesh = parallel.make_mesh(data=2, model=4)
    state = _sae_task(mesh, _data()).init()
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array) and leaf.sharding.mesh.shape == mesh.shape
    w_enc = state["saes"][0]["params"]["W_enc"]  # [D, X], latents over 'model'.
    assert w_enc.addressable_shards[0].data.shape == (D, X // 4)


def test_metrics_progress_and_evaluation_follow_the_intervals(tmp_path):
    data, mesh = _data(), parallel.make_mesh(data=1, model=1, devices=jax.devices()[:1])
    evaluated = []

    def evaluate(state):
        evaluated.append(int(state["step"]))
        return {"eval_score": float(state["step"])}

    writer = metrics.MetricWriter(tmp_path, tensorboard=False)
    config = loop.LoopConfig(steps=6, log_every=4, eval_every=3, checkpoint_every=6)
    _, summary = loop.train(
        _sae_task(mesh, data), tmp_path, config, writer=writer, evaluate=evaluate
    )
    writer.close()
    assert evaluated == [3, 6] and summary == {"eval_score": 6.0}
    records = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in records if "topk/fvu" in r] == [4, 6]
    assert [r["step"] for r in records if "eval_score" in r] == [3, 6]
    # A run resumed at its end takes no step and evaluates the restored state.
    _, again = loop.train(_sae_task(mesh, data, fail_at=0), tmp_path, config, evaluate=evaluate)
    assert again == {"eval_score": 6.0} and evaluated == [3, 6, 6]


def test_a_checkpoint_past_the_asked_steps_is_an_error_not_the_answer(tmp_path):
    data, mesh = _data(), parallel.make_mesh(data=1, model=1, devices=jax.devices()[:1])
    loop.train(_sae_task(mesh, data), tmp_path, LOOP)
    shorter = loop.LoopConfig(steps=4, log_every=1, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint at step 6, past steps=4"):
        loop.train(_sae_task(mesh, data), tmp_path, shorter)


def test_a_failing_evaluation_loses_no_training(tmp_path):
    data, mesh = _data(), parallel.make_mesh(data=1, model=1, devices=jax.devices()[:1])

    def evaluate(state):
        raise MemoryError("evaluation ran out of memory")

    with pytest.raises(MemoryError):
        loop.train(_sae_task(mesh, data), tmp_path, LOOP, evaluate=evaluate)
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps() == [4, 6]


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("log_every", -1), ("checkpoint_every", 1.5), ("eval_every", -2),
     ("eval_every", 0.5), ("eval_every", None), ("keep_checkpoints", True)],
)  # fmt: skip
def test_loop_config_rejects_bad_intervals(field, value):
    fields = dict(steps=10, log_every=1, eval_every=0, checkpoint_every=5) | {field: value}
    with pytest.raises(ValueError, match=field):
        loop.LoopConfig(**fields)


def test_loop_config_takes_numpy_ints():
    config = loop.LoopConfig(steps=np.int64(10), log_every=np.int32(2))
    assert (config.steps, config.log_every) == (10, 2) and type(config.steps) is int
