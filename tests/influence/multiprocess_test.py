"""Factors and scores from two real `jax.distributed` CPU processes equal one process's."""

import textwrap

import numpy as np

from interp import influence
from tests import multiprocess
from tests.influence import testing

_WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from interp import parallel

    port, process_id, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2,
                                    process_id=process_id)
    import jax
    from interp import influence
    from tests.influence import testing

    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    model, params = testing.model_and_params()
    # Every process passes the same global batches; each computes on its own devices' rows.
    batches = testing.split(testing.data(24, seed=0), 8)
    queries = testing.data(4, seed=1, prompt=4)
    mesh = parallel.make_mesh(data=4, model=2)  # 'data' spans both processes.
    factors = influence.fit_factors(
        model, params, batches, sample_labels=False, mesh=mesh,
        checkpoint_dir=os.path.join(out_dir, "partial"), checkpoint_every=1)
    scores = influence.pairwise_scores(model, params, factors, [queries], batches,
                                       per_layer=True, per_token=True, mesh=mesh)
    own = influence.self_scores(model, params, factors, batches, mesh=mesh)
    if process_id == 0:
        influence.save_factors(os.path.join(out_dir, "factors"), factors)
    np.savez(os.path.join(out_dir, f"scores_{process_id}.npz"), total=scores.total,
             per_layer=scores.per_layer, per_token=scores.per_token, own=own)
    """
)


def test_two_processes_fit_and_score_as_one(tmp_path):
    port = multiprocess.free_port()
    workers = multiprocess.start_workers(
        _WORKER, [(port, i, tmp_path) for i in range(2)], timeout=100
    )
    # The single-process reference while the workers run.
    model, params = testing.model_and_params()
    batches = testing.split(testing.data(24, seed=0), 8)
    queries = testing.data(4, seed=1, prompt=4)
    plain = influence.fit_factors(model, params, batches, sample_labels=False)
    want = influence.pairwise_scores(
        model, params, plain, [queries], batches, per_layer=True, per_token=True
    )
    want_own = influence.self_scores(model, params, plain, batches)

    workers.wait()
    fitted = influence.load_factors(tmp_path / "factors")
    assert fitted.num_tokens == plain.num_tokens
    assert fitted.num_sequences == plain.num_sequences
    for name, values in plain.arrays.items():
        for key in ("eig_A", "eig_S", "Lambda"):
            scale = np.abs(values[key]).max()
            np.testing.assert_allclose(
                fitted.arrays[name][key], values[key], atol=1e-4 * scale, err_msg=f"{name} {key}"
            )
    scale = np.abs(want.total).max()
    for i in range(2):  # Each process holds the whole result.
        with np.load(tmp_path / f"scores_{i}.npz") as got:
            np.testing.assert_allclose(got["total"], want.total, atol=1e-3 * scale)
            np.testing.assert_allclose(got["per_layer"], want.per_layer, atol=1e-3 * scale)
            np.testing.assert_allclose(got["per_token"], want.per_token, atol=1e-3 * scale)
            np.testing.assert_allclose(got["own"], want_own, rtol=1e-4)
    # Both processes checkpointed one fit: the last covariance pass is on disk once.
    assert (tmp_path / "partial" / "covariance").is_dir()


_NOTICE_BETWEEN_PASSES = textwrap.dedent(
    """
    import os, signal, sys, time
    from interp import parallel, preemption

    port, process_id, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2,
                                    process_id=process_id)
    from interp import influence
    from tests.influence import testing

    model, params = testing.model_and_params()
    batches = testing.split(testing.data(24, seed=0), 8)  # 3 batches a pass.

    class NoticeBetweenPasses:
        # Process 0 gets SIGTERM as the correction pass reads its first batch, after the
        # covariance pass's last sync id (3). The wait lets JAX's sync protocol agree on its
        # point (one past the largest id any process reported) before the next id is given.
        read = 0

        def __len__(self):
            return len(batches)

        def __iter__(self):
            for batch in batches:
                if self.read == len(batches):
                    if process_id == 0:
                        os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier catches it.
                    time.sleep(3)
                self.read += 1
                yield batch

    try:
        influence.fit_factors(model, params, NoticeBetweenPasses(), sample_labels=False,
                              mesh=parallel.make_mesh(data=4, model=2),
                              checkpoint_dir=os.path.join(out_dir, "partial"),
                              checkpoint_every=10)
        print("RESULT finished")
    except preemption.Preempted as stopped:
        print(f"RESULT {stopped}")
    """
)


def test_a_notice_between_the_passes_stops_both_processes_in_the_second(tmp_path):
    port = multiprocess.free_port()
    outputs = multiprocess.start_workers(
        _NOTICE_BETWEEN_PASSES, [(port, i, tmp_path) for i in range(2)], timeout=100
    ).wait()
    for output in outputs:
        results = [line for line in output.splitlines() if line.startswith("RESULT")]
        # Not missed: the correction pass's sync ids follow the covariance pass's (4, 5, 6),
        # so its first batch is the agreed point on both processes.
        assert results == [
            "RESULT The correction pass preempted (SIGTERM) at step 1 of 3; rerun the same "
            "command to resume."
        ], output[-3000:]
    # Saved there as step 3 + 1, the ids and steps being one numbering.
    assert sorted(p.name for p in (tmp_path / "partial" / "correction").iterdir()) == ["4"]
