"""EK-FAC factors against explicit computations on a tiny model (no transposed Kronecker)."""

import os
import signal

import jax
import numpy as np
import pytest

from interp import checkpoint, influence, preemption
from interp.influence import factors as factors_lib
from interp.influence import gradients
from tests.influence import testing

MODULES = ("blocks_0/mlp/up", "blocks_1/mlp/down")


@pytest.fixture(scope="module")
def setup():
    model, params = testing.model_and_params()
    batch = testing.data(12, seed=0)
    modules = gradients.tracked_modules(model, MODULES)
    return model, params, batch, modules


def _per_sequence(model, params, batch, modules):
    checked = {k: jax.numpy.asarray(v) for k, v in gradients.check_batch(batch, 16, "t").items()}
    stats = gradients.inputs_and_grads(model, params, checked, modules)
    return {n: factors_lib.per_sequence_gradients(a, g) for n, (a, g) in stats.items()}, stats


def test_default_modules_are_every_mlp_projection_and_names_are_checked(setup):
    model, _, _, _ = setup
    names = [m.name for m in influence.tracked_modules(model)]
    assert names == ["blocks_0/mlp/up", "blocks_0/mlp/down", "blocks_1/mlp/up", "blocks_1/mlp/down"]
    with pytest.raises(ValueError, match="No tracked module matches 'blocks_9/.*blocks_0/mlp/up"):
        influence.tracked_modules(model, ["blocks_9/mlp/up"])


def test_per_sequence_gradient_is_the_weight_gradient(setup):
    # G_n = sum_t g_t a_t^T [O, I+1] must be dNLL/dW with W's orientation and the bias column.
    model, params, batch, modules = setup
    ours, _ = _per_sequence(model, params, batch, modules)
    flat = np.stack([
        testing.to_flat_gradient({n: g[i] for n, g in ours.items()}, modules)
        for i in range(len(batch["tokens"]))
    ])  # fmt: skip
    exact = testing.per_sequence_flat_gradients(model, params, modules, batch)
    np.testing.assert_allclose(flat, exact, atol=1e-5 * np.abs(exact).max())


def test_covariances_eigenbases_and_correction_match_explicit_sums(setup):
    model, params, batch, modules = setup
    fitted = influence.fit_factors(
        model, params, testing.split(batch, 4), sample_labels=False, modules=MODULES
    )
    grads, stats = _per_sequence(model, params, batch, modules)
    assert fitted.num_tokens == 12 * testing.T and fitted.num_sequences == 12
    for m in modules:
        a, g = (np.asarray(x, np.float64) for x in stats[m.name])
        values = fitted.arrays[m.name]
        a_cov = np.einsum("bti,btj->ij", a, a) / a[..., 0].size
        s_cov = np.einsum("bti,btj->ij", g, g) / g[..., 0].size
        q_a, q_s = values["Q_A"].astype(np.float64), values["Q_S"].astype(np.float64)
        np.testing.assert_allclose(q_a @ np.diag(values["eig_A"]) @ q_a.T, a_cov, atol=1e-4)
        np.testing.assert_allclose(q_s @ np.diag(values["eig_S"]) @ q_s.T, s_cov,
                                   atol=1e-5 * np.abs(s_cov).max())  # fmt: skip
        # Lambda is the diagonal of the per-sequence Fisher in the basis Q_S (x) Q_A.
        vecs = np.asarray(grads[m.name], np.float64).reshape(len(a), -1)  # vec(G_n), [N, O*I]
        fisher = vecs.T @ vecs / len(a)
        basis = np.kron(q_s, q_a)
        expected = np.diag(basis.T @ fisher @ basis).reshape(values["Lambda"].shape)
        np.testing.assert_allclose(values["Lambda"], expected, rtol=1e-3,
                                   atol=1e-6 * expected.max())  # fmt: skip


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_preconditioner_solves_with_its_own_curvature_matrix(setup, strategy):
    model, params, batch, modules = setup
    fitted = influence.fit_factors(model, params, [batch], strategy, False, modules=MODULES)
    grads, _ = _per_sequence(model, params, batch, modules)
    for m in modules:
        values = fitted.arrays[m.name]
        lam = values["Lambda"].astype(np.float64)
        damping = fitted.default_damping(m.name)
        assert damping == pytest.approx(0.1 * lam.mean())
        if strategy == "diagonal":
            curvature = np.diag(lam.reshape(-1))
        else:
            basis = np.kron(values["Q_S"], values["Q_A"]).astype(np.float64)
            curvature = basis @ np.diag(lam.reshape(-1)) @ basis.T
        gradient = np.asarray(grads[m.name][0], np.float64)
        expected = np.linalg.solve(curvature + damping * np.eye(len(curvature)),
                                   gradient.reshape(-1)).reshape(gradient.shape)  # fmt: skip
        got = np.asarray(factors_lib.precondition(fitted, m.name, gradient.astype(np.float32)))
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_kfac_is_exact_for_one_token_of_one_sequence():
    # With one sequence whose only nonzero g and a are one token's, F = vec(g a^T)vec(g a^T)^T
    # = (a a^T) (x) (g g^T) exactly (K-FAC's assumption holds), up to the averages' scale.
    model, params = testing.model_and_params()
    batch = {"tokens": np.array([[3, 5]], np.int32), "loss_mask": np.array([[0, 1]], np.float32)}
    modules = gradients.tracked_modules(model, ["blocks_1/mlp/down"])
    fitted = influence.fit_factors(
        model, params, [batch], "kfac", False, modules=["blocks_1/mlp/down"]
    )
    grads, stats = _per_sequence(model, params, batch, modules)
    a, g = (np.asarray(x[0], np.float64) for x in stats["blocks_1/mlp/down"])
    assert np.abs(g[1]).max() == 0  # The last position predicts nothing.
    vec = np.asarray(grads["blocks_1/mlp/down"][0], np.float64).reshape(-1)
    fisher = np.outer(vec, vec)
    values = fitted.arrays["blocks_1/mlp/down"]
    basis = np.kron(values["Q_S"], values["Q_A"]).astype(np.float64)
    kfac = basis @ np.diag(values["Lambda"].reshape(-1).astype(np.float64)) @ basis.T
    # A and S average over the two positions: A (x) S = (sum_t a a^T / 2) (x) (g0 g0^T / 2).
    a_both = (np.outer(a[0], a[0]) + np.outer(a[1], a[1])) / 2
    expected = np.kron(np.outer(g[0], g[0]) / 2, a_both)
    np.testing.assert_allclose(kfac, expected, atol=1e-4 * np.abs(expected).max())
    # And with the second position's input equal to the first's, it is the Fisher itself.
    only = np.kron(np.outer(g[0], g[0]), np.outer(a[0], a[0]))
    np.testing.assert_allclose(only, fisher, atol=1e-5 * np.abs(fisher).max())


def test_sampled_labels_differ_by_seed_and_one_shot_iterators_are_refused(setup):
    model, params, batch, _ = setup
    one = influence.fit_factors(model, params, [batch], modules=MODULES, seed=0)
    two = influence.fit_factors(model, params, [batch], modules=MODULES, seed=1)
    assert not np.allclose(one.arrays[MODULES[0]]["eig_S"], two.arrays[MODULES[0]]["eig_S"])
    with pytest.raises(TypeError, match="one-shot iterator"):
        influence.fit_factors(model, params, iter([batch]), modules=MODULES)
    with pytest.raises(ValueError, match="strategy must be one of"):
        influence.fit_factors(model, params, [batch], strategy="exact")


@pytest.mark.parametrize(
    "batch, message",
    [({"tokens": np.zeros((2, 20), np.int32)}, "more than the model's context of 16"),
     ({"tokens": np.zeros((2, 4), np.int32), "loss_mask": np.zeros((2, 4))}, "score no token"),
     ({"ids": np.zeros((2, 4), np.int32)}, "'tokens'")],
)  # fmt: skip
def test_bad_batches_are_clear_errors(setup, batch, message):
    model, params, _, _ = setup
    with pytest.raises(ValueError, match=message):
        influence.fit_factors(model, params, [batch], modules=MODULES)


def _assert_same_factors(got, want, exact=True):
    assert (got.strategy, got.modules, got.num_tokens, got.num_sequences) == (
        want.strategy, want.modules, want.num_tokens, want.num_sequences,
    )  # fmt: skip
    for name, values in want.arrays.items():
        assert sorted(got.arrays[name]) == sorted(values)
        for key, value in values.items():
            if exact:
                np.testing.assert_array_equal(got.arrays[name][key], value, err_msg=key)
            else:
                np.testing.assert_allclose(got.arrays[name][key], value, rtol=1e-6, atol=1e-7)


class _Interrupting:
    """Batches that raise after `fail_after` have been read (a fit killed midway)."""

    def __init__(self, batches, fail_after):
        self.batches, self.fail_after, self.read = batches, fail_after, 0

    def __iter__(self):
        for batch in self.batches:
            if self.read == self.fail_after:
                raise KeyboardInterrupt
            self.read += 1
            yield batch


@pytest.mark.parametrize("fail_after", [2, 5])  # In the covariance pass; in the correction.
def test_a_fit_resumed_in_parts_equals_one_fit(setup, tmp_path, fail_after, monkeypatch):
    model, params, batch, _ = setup
    batches = testing.split(batch, 4)  # 3 batches a pass.
    options = dict(modules=MODULES, sample_labels=True, seed=3)
    whole = influence.fit_factors(model, params, batches, **options)
    interrupted = _Interrupting(batches, fail_after)
    with pytest.raises(KeyboardInterrupt):
        influence.fit_factors(model, params, interrupted, checkpoint_dir=tmp_path,
                              checkpoint_every=1, **options)  # fmt: skip
    calls = []
    for stage in ("_covariance_sums", "_correction_sums"):
        original = getattr(factors_lib, stage)
        monkeypatch.setattr(factors_lib, stage,
                            lambda *a, f=original, n=stage: calls.append(n) or f(*a))  # fmt: skip
    resumed = influence.fit_factors(model, params, batches, checkpoint_dir=tmp_path,
                                    checkpoint_every=1, **options)  # fmt: skip
    _assert_same_factors(resumed, whole)
    # Only what the interrupted run had not checkpointed is computed again.
    assert len(calls) == 6 - fail_after
    other = dict(options, seed=4)
    with pytest.raises(ValueError, match="partial fit of something else"):
        influence.fit_factors(model, params, batches, checkpoint_dir=tmp_path, **other)


class _Signalling:
    """Batches that send this process SIGTERM as batch `at` (counting both passes) is read."""

    def __init__(self, batches, at):
        self.batches, self.at, self.read = batches, at, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if self.read == self.at:
                os.kill(os.getpid(), signal.SIGTERM)  # Handled: the fit stops after it.
            self.read += 1
            yield batch


@pytest.mark.parametrize("at", [1, 4])  # In the covariance pass; in the correction.
def test_sigterm_saves_the_batches_done_and_a_rerun_equals_one_fit(setup, tmp_path, at):
    model, params, batch, _ = setup
    batches = testing.split(batch, 4)  # 3 batches a pass.
    options = dict(modules=MODULES, sample_labels=True, seed=3, checkpoint_dir=tmp_path,
                   checkpoint_every=10)  # fmt: skip  # No periodic save: the stop's own.
    whole = influence.fit_factors(model, params, batches, **{**options, "checkpoint_dir": None})
    with pytest.raises(preemption.Preempted) as stopped:
        influence.fit_factors(model, params, _Signalling(batches, at), **options)
    # The correction pass's checkpoint steps (its sync ids) follow the covariance pass's 3.
    stage, saved = ("covariance", 2) if at == 1 else ("correction", 3 + 2)
    assert (stopped.value.step, stopped.value.total, stopped.value.exit_code) == (2, 3, 143)
    assert str(stopped.value).startswith(f"The {stage} pass preempted (SIGTERM) at step 2 of 3")
    assert checkpoint.Checkpointer(tmp_path / stage).all_steps() == [saved]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Handler restored.
    resumed = influence.fit_factors(model, params, batches, **options)
    _assert_same_factors(resumed, whole)


def test_a_correction_checkpoint_numbered_from_0_still_resumes(setup, tmp_path, monkeypatch):
    """Before the correction pass's steps followed the covariance pass's, it numbered them
    from 0; such a checkpoint (here: correction step 5 renamed 2) resumes after its batches."""
    model, params, batch, _ = setup
    batches = testing.split(batch, 4)  # 3 batches a pass.
    options = dict(modules=MODULES, sample_labels=True, seed=3, checkpoint_dir=tmp_path,
                   checkpoint_every=10)  # fmt: skip
    whole = influence.fit_factors(model, params, batches, **{**options, "checkpoint_dir": None})
    with pytest.raises(preemption.Preempted):
        influence.fit_factors(model, params, _Signalling(batches, 4), **options)
    (tmp_path / "correction" / "5").rename(tmp_path / "correction" / "2")
    calls = []
    original = factors_lib._correction_sums
    monkeypatch.setattr(factors_lib, "_correction_sums", lambda *a: calls.append(1) or original(*a))
    resumed = influence.fit_factors(model, params, batches, **options)
    _assert_same_factors(resumed, whole)
    assert len(calls) == 1  # Only the correction pass's last batch.
    assert checkpoint.Checkpointer(tmp_path / "correction").all_steps() == [2, 3 + 3]


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
def test_factors_round_trip_through_a_folder(setup, tmp_path, strategy):
    model, params, batch, _ = setup
    fitted = influence.fit_factors(model, params, [batch], strategy, False, modules=MODULES)
    influence.save_factors(tmp_path / "f", fitted)
    loaded = influence.load_factors(tmp_path / "f")
    _assert_same_factors(loaded, fitted)
    assert loaded.model_fingerprint == fitted.model_fingerprint
    (tmp_path / "f" / "factors.json").unlink()  # As if the save had been cut short.
    with pytest.raises(FileNotFoundError, match="fit them again"):
        influence.load_factors(tmp_path / "f")


def test_factors_round_trip_on_gs(setup, gcs_bucket):
    model, params, batch, _ = setup
    fitted = influence.fit_factors(model, params, [batch], "ekfac", False, modules=MODULES)
    influence.save_factors(f"{gcs_bucket}/run/factors", fitted)
    _assert_same_factors(influence.load_factors(f"{gcs_bucket}/run/factors"), fitted)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_scores_round_trip_as_zarr_arrays(tmp_path, where, request):
    base = str(tmp_path / "scores")
    if where == "gs":
        base = f"{request.getfixturevalue('gcs_bucket')}/run/scores"
    arrays = {"total": np.arange(12, dtype=np.float64).reshape(3, 4) / 7,
              "candidates": np.arange(12).reshape(3, 4)}  # fmt: skip
    influence.save_scores(base, arrays)
    np.testing.assert_array_equal(influence.load_scores(base, "total"),
                                  arrays["total"].astype(np.float32))  # fmt: skip
    np.testing.assert_array_equal(influence.load_scores(base, "candidates"), arrays["candidates"])
    with pytest.raises(FileNotFoundError, match="No scores array 'missing'"):
        influence.load_scores(base, "missing")


def test_eigendecompositions_are_dealt_over_devices_with_the_same_result(setup, monkeypatch):
    model, params, batch, modules = setup
    sums, tokens = factors_lib.covariance_sums(model, params, [batch], modules, sample_labels=False)
    one = factors_lib.eigendecompose(sums, tokens)
    placed = []
    original = factors_lib._eigh
    monkeypatch.setattr(factors_lib, "_eigh", lambda m: placed.append(m.devices()) or original(m))
    dealt = factors_lib.eigendecompose(sums, tokens, jax.devices())
    assert len({tuple(d) for d in placed}) == 2 * len(modules)  # Each on its own device.
    for name, values in one.items():
        for key in ("eig_A", "eig_S"):
            np.testing.assert_allclose(dealt[name][key], values[key], rtol=1e-5, atol=1e-7)


# A rerun into a folder that holds a fit: same batches, more batches, other batches.


def _fit_in(setup, batches, folder, strategy="ekfac", **more):
    model, params, _, _ = setup
    return influence.fit_factors(model, params, batches, strategy, modules=MODULES, seed=3,
                                 checkpoint_dir=folder, checkpoint_every=10, **more)  # fmt: skip


@pytest.fixture(scope="module")
def eight(setup):
    """8 batches of 2 rows, and the fresh fits over the first 4 and over all 8."""
    model, params, _, _ = setup
    batches = testing.split(testing.data(16, seed=5), 2)
    fresh = {n: _fit_in(setup, batches[:n], None) for n in (4, 8)}
    return batches, fresh


def _counting(monkeypatch):
    calls = []
    for stage in ("_covariance_sums", "_correction_sums"):
        original = getattr(factors_lib, stage)
        monkeypatch.setattr(factors_lib, stage,
                            lambda *a, f=original, n=stage: calls.append(n) or f(*a))  # fmt: skip
    return calls


def test_a_finished_fit_rerun_with_more_batches_equals_a_fresh_fit_of_them(
    setup, eight, tmp_path, monkeypatch
):
    batches, fresh = eight
    assert not np.allclose(fresh[4].curvature(MODULES[1]), fresh[8].curvature(MODULES[1]))
    _assert_same_factors(_fit_in(setup, batches[:4], tmp_path), fresh[4], exact=False)
    calls = _counting(monkeypatch)
    extended = _fit_in(setup, batches, tmp_path)
    _assert_same_factors(extended, fresh[8], exact=False)
    # The covariances go on from batch 4; the correction, whose eigenbasis changed, starts
    # over on all 8, its steps numbered after the covariance pass's 8.
    assert calls == ["_covariance_sums"] * 4 + ["_correction_sums"] * 8
    assert checkpoint.Checkpointer(tmp_path / "covariance").all_steps() == [4, 8]
    assert checkpoint.Checkpointer(tmp_path / "correction").all_steps() == [16]
    assert (extended.num_batches, fresh[4].num_batches) == (8, 4)
    assert extended.data_fingerprint == fresh[8].data_fingerprint != fresh[4].data_fingerprint
    calls.clear()  # And a rerun of the finished 8-batch fit computes nothing again.
    _assert_same_factors(_fit_in(setup, batches, tmp_path), fresh[8], exact=False)
    assert calls == []


@pytest.mark.parametrize("strategy", ["kfac", "diagonal"])
def test_other_strategies_extend_to_more_batches_too(setup, eight, tmp_path, strategy):
    batches, _ = eight
    _fit_in(setup, batches[:4], tmp_path, strategy)
    extended = _fit_in(setup, batches, tmp_path, strategy)
    _assert_same_factors(extended, _fit_in(setup, batches, None, strategy), exact=False)


def test_an_extension_interrupted_in_its_new_correction_pass_resumes(setup, eight, tmp_path):
    batches, fresh = eight
    _fit_in(setup, batches[:4], tmp_path)
    with pytest.raises(preemption.Preempted):  # 8 covariance batches read, then 3 of 8.
        _fit_in(setup, _Signalling(batches, 8 + 2), tmp_path)
    assert checkpoint.Checkpointer(tmp_path / "correction").all_steps() == [8 + 3]
    _assert_same_factors(_fit_in(setup, batches, tmp_path), fresh[8], exact=False)


@pytest.mark.parametrize("finished", [True, False])  # A finished fit; one stopped midway.
def test_a_rerun_with_fewer_batches_than_were_summed_is_refused(setup, eight, tmp_path, finished):
    batches, _ = eight
    if finished:
        _fit_in(setup, batches, tmp_path)
    else:
        with pytest.raises(preemption.Preempted):  # Stopped after 6 covariance batches.
            _fit_in(setup, _Signalling(batches, 5), tmp_path)
    with pytest.raises(ValueError, match=r"covariance holds sums over (8|6) other batches than "
                       r"these \(only 4 batches are given\).*another checkpoint_dir"):  # fmt: skip
        _fit_in(setup, batches[:4], tmp_path)


@pytest.mark.parametrize("changed", [0, 2])
def test_a_rerun_with_other_batches_is_refused_naming_the_first(setup, eight, tmp_path, changed):
    batches, fresh = eight
    _fit_in(setup, batches[:4], tmp_path)
    other = list(batches)
    other[changed] = {**other[changed], "tokens": (other[changed]["tokens"] + 1) % 16}
    for given in (other[:4], other):  # The same number of batches; more.
        with pytest.raises(ValueError, match=f"over 4 other batches than these \\(batch "
                           f"{changed} differs\\)"):  # fmt: skip
            _fit_in(setup, given, tmp_path)
    # Batches after the ones summed may be anything: the fit goes on over them.
    later = batches[:4] + other[4:6]
    got = _fit_in(setup, later, tmp_path)
    _assert_same_factors(got, _fit_in(setup, later, None), exact=False)


def test_factors_record_the_batches_they_were_fitted_on(setup, eight, tmp_path):
    model, _, _, _ = setup
    batches, fresh = eight
    assert fresh[8].data_fingerprint == factors_lib.data_fingerprint(model, batches)
    # As the fit reads them: an all-ones attention mask is the default one; int64 tokens
    # are the same tokens.
    same = [{**b, "tokens": b["tokens"].astype(np.int64),
             "attention_mask": np.ones_like(b["tokens"])} for b in batches]  # fmt: skip
    assert factors_lib.data_fingerprint(model, same) == fresh[8].data_fingerprint
    assert factors_lib.data_fingerprint(model, batches[::-1]) != fresh[8].data_fingerprint
    influence.save_factors(tmp_path / "f", fresh[8])
    loaded = influence.load_factors(tmp_path / "f")
    assert (loaded.num_batches, loaded.data_fingerprint) == (8, fresh[8].data_fingerprint)
