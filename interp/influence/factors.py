"""Curvature factors for influence functions: K-FAC covariances, eigenbases, EK-FAC correction.

    factors = fit_factors(model, params, batches, strategy="ekfac", sample_labels=True)

For each tracked layer y = W x + b (see `gradients.py`), following Grosse et al. 2023,
"Studying Large Language Model Generalization with Influence Functions", sections 2.2-2.3:

    A = E_t[a_t a_t^T]   [I, I]   token average of layer inputs (with a 1 for a bias)
    S = E_t[g_t g_t^T]   [O, O]   token average of output gradients
    A = Q_A diag(eig_A) Q_A^T,  S = Q_S diag(eig_S) Q_S^T
    Lambda = E_n[(Q_S^T G_n Q_A)^2]   [O, I]  the EK-FAC eigenvalue correction (George et al.
             2018), an average over training *sequences* of the per-sequence gradient
             G_n = sum_t g_t a_t^T rotated into the Kronecker eigenbasis, squared elementwise

The targets g is taken against are sampled from the model's own predictive distribution by
default (the true Fisher, equal in expectation to the Gauss-Newton matrix for a softmax
output), or the data's next tokens with `sample_labels=False` (the empirical Fisher,
deterministic, what cross-library checks use). All statistics are float32 sums with their
token and sequence counts, so partial fits merge exactly.

Strategies (`strategy`): 'ekfac' (the above), 'kfac' (Lambda = eig_S eig_A^T), 'diagonal'
(Lambda = E_n[G_n^2], no rotation), 'identity' (no curvature: plain gradient dot products).
Legend: I layer inputs (+1 for a bias), O layer outputs, B batch, T positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from interp import checkpoint, parallel, paths, preemption
from interp.data import fingerprint as data_fingerprint_lib
from interp.influence import gradients
from interp.influence.gradients import TrackedModule
from interp.models.fingerprint import fingerprint

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
DEFAULT_DAMPING_FRACTION = 0.1  # Damping per module = this x mean(Lambda) (Grosse et al.).


@dataclasses.dataclass
class Factors:
    """Fitted curvature for a set of tracked layers of one model.

    Attributes:
      strategy: One of `STRATEGIES`.
      modules: The tracked layers, in model order.
      arrays: {module name: {'eig_A', 'Q_A', 'eig_S', 'Q_S', 'Lambda'}} for kfac/ekfac
        ('Lambda' [O, I] is the curvature in the eigenbasis), {'Lambda'} (the gradient
        second moment [O, I]) for diagonal, {} for identity. float32 NumPy arrays.
      num_tokens: Tokens the covariances averaged over.
      num_sequences: Sequences the correction (or diagonal) averaged over.
      model_fingerprint: `interp.models.fingerprint.fingerprint` of the model they fit.
      sample_labels: Whether targets were sampled from the model.
      num_batches: Training batches they were fitted on (0 for 'identity', which reads none).
      data_fingerprint: `data_fingerprint(model, batches)` of those batches ('' for
        'identity', and for factors saved before fits recorded their data).
    """

    strategy: str
    modules: tuple[TrackedModule, ...]
    arrays: dict[str, dict[str, np.ndarray]]
    num_tokens: int
    num_sequences: int
    model_fingerprint: str
    sample_labels: bool
    num_batches: int = 0
    data_fingerprint: str = ""

    def curvature(self, name: str) -> np.ndarray | None:
        """Lambda [O, I] of a module (None for 'identity')."""
        return self.arrays[name].get("Lambda")

    def default_damping(self, name: str) -> float:
        """0.1 x mean(Lambda) of the module (Grosse et al. 2023); 0 for 'identity'."""
        curvature = self.curvature(name)
        if curvature is None:
            return 0.0
        return DEFAULT_DAMPING_FRACTION * float(np.mean(curvature))

    def check_model(self, model, params) -> None:
        """Raises unless these factors were fitted for this model (config and weights)."""
        got = fingerprint(model.config, params)
        if got != self.model_fingerprint:
            raise ValueError(
                f"These factors were fitted for another model (fingerprint "
                f"{self.model_fingerprint}, this one is {got}); fit factors for this model "
                "(fit_factors) before scoring with it."
            )


def _reiterable(batches: Iterable[Any], passes: int) -> Iterable[Any]:
    if passes > 1 and iter(batches) is batches:
        raise TypeError(
            f"batches is a one-shot iterator, but this strategy reads the data {passes} times "
            "(covariances, then the eigenvalue correction); pass a list, or an object whose "
            "__iter__ starts again."
        )
    return batches


def _checked(model, batch) -> dict[str, np.ndarray]:
    return gradients.check_batch(batch, model.config.max_len, "training")


def data_fingerprint(model, batches: Iterable[Mapping[str, Any]]) -> str:
    """16 hex digits identifying training batches as a fit reads them (`Factors.data_fingerprint`).

    The digest of each batch's tokens and masks (with the defaults `fit_factors` fills in, so
    a batch without an attention mask equals one with an all-ones mask), in order.

    Raises:
      ValueError: For malformed batches (see `gradients.check_batch`).
    """
    return data_fingerprint_lib.sequence_digest(
        data_fingerprint_lib.batch_digest(_checked(model, batch)) for batch in batches
    )


@functools.partial(jax.jit, static_argnums=(0, 2))
def _covariance_sums(model, params, modules, batch, key):
    stats = gradients.inputs_and_grads(model, params, batch, modules, key=key)
    out = {}
    for name, (a, g) in stats.items():
        a2 = a.reshape(-1, a.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        out[name] = (a2.T @ a2, g2.T @ g2)
    return out, batch["attention_mask"].sum()


def per_sequence_gradients(a: jax.Array, g: jax.Array) -> jax.Array:
    """G_n = sum_t g_t a_t^T for each sequence: [B, O, I]."""
    return jnp.einsum("bto,bti->boi", g, a, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _correction_sums(model, params, modules, batch, key, rotate, bases):
    stats = gradients.inputs_and_grads(model, params, batch, modules, key=key)
    out = {}
    for name, (a, g) in stats.items():
        if rotate:
            q_a, q_s = bases[name]
            a = jnp.einsum("bti,ij->btj", a, q_a)
            g = jnp.einsum("bto,os->bts", g, q_s)
        out[name] = jnp.square(per_sequence_gradients(a, g)).sum(axis=0)
    return out


def fit_factors(
    model,
    params: Any,
    batches: Iterable[Mapping[str, Any]],
    strategy: str = "ekfac",
    sample_labels: bool = True,
    *,
    modules: Sequence[str] | None = None,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    checkpoint_dir: Any = None,
    checkpoint_every: int = 100,
) -> Factors:
    """Fits influence-function curvature factors on training batches.

    Args:
      model: A `Transformer`.
      params: Its parameters.
      batches: Iterable of {'tokens': int [B, T], 'loss_mask': float [B, T] (optional: all
        targets), 'attention_mask': [B, T] (optional)}; read twice for 'ekfac', so a list or
        another re-iterable, not a generator.
      strategy: 'ekfac' (default), 'kfac', 'diagonal' or 'identity'.
      sample_labels: Targets drawn from the model (true Fisher) rather than the data's own
        next tokens (empirical Fisher; deterministic).
      modules: Tracked layer names or patterns (`gradients.tracked_modules`); default every
        MLP projection.
      seed: For the sampled targets.
      mesh, rules: Run data-parallel on this mesh (batches over the 'batch' axes, params by
        the rules); the sums are the same as on one device, up to float32 summation order.
      checkpoint_dir: Local or gs:// folder for the running sums, which record the
        digest of every batch they summed: a fit given the same folder resumes where it
        stopped when the batches it summed come first again, in the same order, and is
        extended when more follow them (a finished fit over 4 batches, rerun with those 4
        and 4 more, gives the 8-batch fit: the covariances go on, and the eigenvalue
        correction, whose eigenbasis changed, is computed again over all 8). Other batches
        at an index already summed, or fewer batches than the folder summed, are a
        ValueError. With it, SIGTERM/SIGINT stop the fit after the batch under way, once
        its sums are saved (`preemption.Preempted`), and a damaged newest checkpoint falls
        back to the one before it.
      checkpoint_every: Batches between checkpoints.

    Returns:
      The `Factors`.

    Raises:
      ValueError: For an unknown strategy or module name, malformed batches (see
        `gradients.check_batch`), no data, non-finite statistics, or a `checkpoint_dir`
        holding a fit of other batches (or of more batches than given).
      TypeError: If 'ekfac' gets a one-shot iterator.
      preemption.Preempted: On SIGTERM/SIGINT with a `checkpoint_dir`, after saving.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    tracked = gradients.tracked_modules(model, modules)
    identity = fingerprint(model.config, params)
    placement = gradients.Placement.of(mesh, rules)
    params = placement.params(model, params)
    resume = None
    if checkpoint_dir is not None:
        resume = Resume(checkpoint_dir, checkpoint_every, {
            "model_fingerprint": identity, "strategy": strategy, "seed": seed,
            "sample_labels": sample_labels, "modules": [m.name for m in tracked],
        })  # fmt: skip
    # Each pass runs under the mesh; the decompositions in between are dealt over its devices.
    return _fit(model, params, batches, strategy, sample_labels, tracked, identity, seed,
                placement, resume)  # fmt: skip


def _label_key(seed: int, sample_labels: bool, stage: int, index: int):
    """The key for batch `index` of pass `stage` (None: the data's own targets)."""
    if not sample_labels:
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage), index)


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a fit checkpoints its running sums, so an interrupted fit resumes.

    Attributes:
      directory: Local or gs:// folder; each stage keeps an orbax checkpoint under it.
      every: Batches between checkpoints (the end of a stage is always saved).
      identity: What the sums belong to (model fingerprint, modules, labels, seed): a
        checkpoint of another fit in the same folder is an error, never added to. What data
        they summed is recorded beside it, per batch (`_accumulate`).
    """

    directory: Any
    every: int
    identity: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class _Pass:
    """What a pass summed: the sums, their count, and the batches they cover."""

    sums: dict[str, dict[str, jax.Array]]
    count: int
    batches: int  # How many batches the pass read (all of them, resumed or not).
    data: str  # `data_fingerprint` of those batches.


def _accumulate(stage: str, batches, step, check, resume: Resume | None, first_step: int = 0,
                basis: str = "none") -> _Pass:  # fmt: skip
    """Sums `step(index, checked batch) -> ({name: {key: array}}, count)` over the batches,
    each first passed through `check` (-> {name: NumPy array}).

    With `resume`, restores the newest intact checkpoint of this stage, skips the batches it
    covered, and saves every `resume.every` batches and at the end; sums continue in the
    same order, so a resumed fit equals an uninterrupted one bit for bit. A preemption
    notice (`interp.preemption`) saves the batches done so far and raises `Preempted`.

    Each checkpoint records the digest of every batch it summed (`data_fingerprint`), and
    `basis`, what the pass's statistic depends on besides the batches (the covariance data
    that gave the correction pass its eigenbasis). A rerun checks the batches it skips
    against those digests: the same batches resume (and more after them extend the sums);
    another batch at an index already summed, or fewer batches than were summed, is a
    ValueError; a checkpoint of another `basis` is stale (sums in an eigenbasis that is no
    more) and is deleted, the pass starting over.

    The checkpoint after `done` batches is step `first_step + done`, and that is also the
    preemption sync id (`Preemption.reached`): a later pass numbers on from the earlier
    pass's last step, so the ids grow through the fit, as the multi-process sync point
    needs (a notice between two passes sets it one past the first pass's last id, which the
    second pass then reaches at its first batch, instead of never).
    """
    sums: dict[str, dict[str, jax.Array]] = {}
    count, start, ckpt, summed = 0, 0, None, None
    if resume is not None:
        ckpt, saved_step, saved = _open_stage(resume, stage)
        if saved is not None:
            record = saved.get("data")
            if record is not None and record["basis"] != basis:
                logging.info(
                    "The %s pass in %s/%s was summed in another eigenbasis (the covariances "
                    "now cover other batches): computing it again over all batches.",
                    stage, resume.directory, stage,
                )  # fmt: skip
                ckpt = _discard_stage(ckpt, resume, stage)
            else:
                if record is None:
                    # Saved before checkpoints recorded their data: its batches cannot be
                    # checked. A step up to `first_step` was numbered from 0 (interp did so
                    # for every pass before; a pass has as many batches as the first).
                    start = saved_step - first_step if saved_step > first_step else saved_step
                    logging.warning(
                        "%s/%s was saved without a record of its batches; resuming after %d "
                        "batches without checking that they are these.",
                        resume.directory, stage, start,
                    )  # fmt: skip
                else:
                    start = int(record["batches"])
                    summed = _split_digests(record["digests"])
                sums, count = saved["sums"], int(saved["count"])
                logging.info("Resuming the %s pass after %d batches.", stage, start)
    done, digests = start, []
    # Only with checkpoints: without, a stop would lose the work it was meant to keep.
    catcher = preemption.Preemption() if ckpt is not None else contextlib.nullcontext()

    def snapshot():
        data = {"batches": done, "digests": "".join(digests[:done]), "basis": basis}
        return {"sums": sums, "count": int(count), "identity": dict(resume.identity),
                "data": data}  # fmt: skip

    try:
        with catcher as preempt:
            for index, batch in enumerate(batches):
                checked = check(batch)
                digests.append(data_fingerprint_lib.batch_digest(checked))
                if index < start:
                    if summed is not None and digests[index] != summed[index]:
                        raise _other_data(resume, stage, start, f"batch {index} differs")
                    continue
                out, tokens = step(index, checked)
                count = count + tokens
                for name, values in out.items():
                    if name in sums:
                        sums[name] = {k: sums[name][k] + v for k, v in values.items()}
                    else:
                        sums[name] = dict(values)
                done = index + 1
                if ckpt is not None and done % resume.every == 0:
                    ckpt.save(first_step + done, snapshot())
                # The checkpoint step is the sync id, as orbax's saves report it to the
                # multi-process sync point.
                if preempt is not None and preempt.reached(first_step + done):
                    if first_step + done not in ckpt.all_steps():
                        ckpt.save(first_step + done, snapshot())
                    ckpt.wait()
                    raise preempt.stop(done, _length(batches, done), f"The {stage} pass")
        if len(digests) < start:
            raise _other_data(resume, stage, start, f"only {len(digests)} batches are given")
        if ckpt is not None and done != start and first_step + done not in ckpt.all_steps():
            ckpt.save(first_step + done, snapshot())
    finally:
        if ckpt is not None:
            ckpt.close()
    return _Pass(sums, int(count), done, data_fingerprint_lib.sequence_digest(digests))


def _open_stage(resume: Resume, stage: str):
    """(checkpointer, newest intact step, its state) of a stage; (ckpt, None, None) if none."""
    # Two kept: a damaged newest one falls back to the one before.
    ckpt = checkpoint.Checkpointer(paths.resolve(resume.directory) / stage, max_to_keep=2)
    if not ckpt.latest_step():
        return ckpt, None, None
    saved_step, saved = ckpt.restore_newest_intact()
    if saved is not None and saved["identity"] != dict(resume.identity):
        ckpt.close()
        raise ValueError(
            f"{resume.directory}/{stage} holds a partial fit of something else "
            f"({saved['identity']}, now {dict(resume.identity)}); use another "
            "checkpoint directory or delete it."
        )
    return ckpt, saved_step, saved


def _discard_stage(ckpt, resume: Resume, stage: str):
    """Deletes a stage's checkpoints (process 0; all wait) and opens it afresh, empty."""
    ckpt.close()
    parallel.on_main_process(lambda: (paths.resolve(resume.directory) / stage).rmtree())
    return checkpoint.Checkpointer(paths.resolve(resume.directory) / stage, max_to_keep=2)


def _split_digests(joined: str) -> list[str]:
    width = data_fingerprint_lib.DIGEST_CHARS
    return [joined[i : i + width] for i in range(0, len(joined), width)]


def _other_data(resume: Resume, stage: str, summed: int, difference: str) -> ValueError:
    return ValueError(
        f"{resume.directory}/{stage} holds sums over {summed} other batches than these "
        f"({difference}): a checkpoint resumes only with the batches it summed, in the same "
        "order (more may follow them). Give those batches, or another checkpoint_dir (or "
        "delete this one) to fit these from scratch."
    )


def _length(batches, done: int) -> int:
    """How many batches a pass has (`done` if they do not say)."""
    try:
        return len(batches)
    except TypeError:
        return done


def covariance_sums(
    model, params, batches, modules, *, sample_labels=True, seed=0, placement=None, resume=None
) -> tuple[dict[str, dict[str, jax.Array]], int]:
    """Stage 1: ({module: {'A': sum_t a a^T [I, I], 'S': sum_t g g^T [O, O]}}, tokens).

    Sums, not averages: partial sums over disjoint batches add up to the whole.
    """
    summed = _covariance_pass(
        model, params, batches, modules, sample_labels=sample_labels, seed=seed,
        placement=placement, resume=resume,
    )  # fmt: skip
    return summed.sums, summed.count


def _covariance_pass(
    model, params, batches, modules, *, sample_labels=True, seed=0, placement=None, resume=None
) -> _Pass:
    """`covariance_sums` with the batches it covers."""
    placement = placement or gradients.Placement()

    def step(index, batch):
        key = _label_key(seed, sample_labels, 0, index)
        out, tokens = _covariance_sums(model, params, modules, placement.batch(batch), key)
        return {name: {"A": aa, "S": gg} for name, (aa, gg) in out.items()}, tokens

    check = functools.partial(_checked, model)
    return _accumulate("covariance", batches, step, check, resume)


def eigendecompose(
    sums, num_tokens: int, devices: Sequence[jax.Device] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Stage 2: {module: {'eig_A', 'Q_A', 'eig_S', 'Q_S'}} of the token-averaged covariances.

    With `devices`, the 2 x modules decompositions are dealt round-robin over them and run
    concurrently (JAX dispatches asynchronously); results are read back once all are queued.

    Raises:
      ValueError: With no tokens, or non-finite covariances.
    """
    if num_tokens == 0:
        raise ValueError("batches held no tokens; give at least one training batch.")
    devices = list(devices or [None])
    pending, slot = {}, 0
    for name, values in sums.items():
        results = []
        for key in ("A", "S"):
            matrix = values[key]
            _check_finite(name, "covariances", matrix)
            device = devices[slot % len(devices)]
            slot += 1
            matrix = jnp.asarray(matrix) if device is None else jax.device_put(matrix, device)
            results.append(_eigh(matrix / num_tokens))
        pending[name] = results
    return {
        name: dict(
            eig_A=np.asarray(eig_a),
            Q_A=np.asarray(q_a),
            eig_S=np.asarray(eig_s),
            Q_S=np.asarray(q_s),
        )  # fmt: skip
        for name, ((eig_a, q_a), (eig_s, q_s)) in pending.items()
    }


_eigh = jax.jit(jnp.linalg.eigh)


def correction_sums(
    model,
    params,
    batches,
    modules,
    bases=None,
    *,
    sample_labels=True,
    seed=0,
    placement=None,
    resume=None,
    first_step=0,
    basis="none",
) -> tuple[dict[str, dict[str, jax.Array]], int]:
    """Stage 3: ({module: {'Lambda': sum_n (Q_S^T G_n Q_A)^2 [O, I]}}, number of sequences).

    With `bases` None, the unrotated sum_n G_n^2 (the 'diagonal' strategy's statistic).
    `first_step`: the covariance pass's batch count, after which this pass's checkpoint
    steps and preemption sync ids go on (see `_accumulate`). `basis`: what `bases` were
    computed from (the covariance pass's batches), so a checkpoint summed in other bases
    is never continued.
    """
    return _correction_pass(
        model, params, batches, modules, bases, sample_labels=sample_labels, seed=seed,
        placement=placement, resume=resume, first_step=first_step, basis=basis,
    )[:2]  # fmt: skip


def _correction_pass(model, params, batches, modules, bases, *, sample_labels, seed,
                     placement, resume, first_step, basis) -> tuple:  # fmt: skip
    """`correction_sums` with the batches it covers."""
    placement = placement or gradients.Placement()
    rotate = bases is not None
    if not rotate:
        bases = {m.name: (None, None) for m in modules}
    else:
        bases = {n: (jnp.asarray(v["Q_A"]), jnp.asarray(v["Q_S"])) for n, v in bases.items()}

    def step(index, batch):
        key = _label_key(seed, sample_labels, 1, index)
        out = _correction_sums(model, params, modules, placement.batch(batch), key, rotate, bases)
        return {name: {"Lambda": v} for name, v in out.items()}, batch["tokens"].shape[0]

    check = functools.partial(_checked, model)
    summed = _accumulate("correction", batches, step, check, resume, first_step, basis)
    return summed.sums, summed.count, summed.batches, summed.data


def _fit(model, params, batches, strategy, sample_labels, tracked, identity, seed, placement,
         resume):  # fmt: skip
    options = dict(sample_labels=sample_labels, seed=seed, placement=placement, resume=resume)
    arrays: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in tracked}
    num_tokens = num_sequences = num_batches = 0
    data, basis = "", "none"
    if strategy in ("kfac", "ekfac"):
        batches = _reiterable(batches, 2 if strategy == "ekfac" else 1)
        with placement.context():
            covariances = _covariance_pass(model, params, batches, tracked, **options)
        sums, num_tokens = covariances.sums, covariances.count
        num_batches, data = covariances.batches, covariances.data
        # The eigenbases are those of these batches' covariances: a correction pass summed
        # in the bases of other batches (a fit since extended) is not to be continued.
        basis = f"covariances of {num_batches} batches {data}"
        # One process: deal the decompositions over the mesh's devices (multi-host: issue 12).
        single = placement.mesh is not None and jax.process_count() == 1
        devices = list(placement.mesh.devices.flat) if single else None
        arrays.update(eigendecompose(sums, num_tokens, devices))
        logging.info("Covariances of %d modules over %d tokens.", len(tracked), num_tokens)
    if strategy == "kfac":
        for values in arrays.values():
            # Eigenvalues of a PSD matrix come out slightly negative in float32: clip to 0.
            eig_s, eig_a = np.maximum(values["eig_S"], 0), np.maximum(values["eig_A"], 0)
            values["Lambda"] = np.outer(eig_s, eig_a).astype(np.float32)
    if strategy in ("ekfac", "diagonal"):
        bases = arrays if strategy == "ekfac" else None
        with placement.context():
            totals, num_sequences, num_batches, data = _correction_pass(
                model, params, batches, tracked, bases, first_step=num_batches,
                basis=basis if strategy == "ekfac" else "none", **options,
            )  # fmt: skip
        if num_sequences == 0:
            raise ValueError("batches held no sequences; give at least one training batch.")
        for name, values in totals.items():
            total = jnp.asarray(values["Lambda"])
            _check_finite(name, "eigenvalue correction", total)
            arrays[name]["Lambda"] = np.asarray(total / num_sequences, np.float32)
    return Factors(
        strategy=strategy,
        modules=tracked,
        arrays=arrays,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        model_fingerprint=identity,
        sample_labels=sample_labels,
        num_batches=num_batches,
        data_fingerprint=data,
    )


def _check_finite(name: str, what: str, *values) -> None:
    for value in values:
        if not bool(jnp.all(jnp.isfinite(value))):
            raise ValueError(
                f"The {what} of {name} hold NaN or inf: the model's outputs or gradients "
                "overflow on these batches (check the params, or fit in float32)."
            )


def precondition(
    factors: Factors, name: str, gradient: jax.Array, damping: float | None = None
) -> jax.Array:
    """The damped inverse curvature applied to gradients [..., O, I] of one module.

    ekfac/kfac: Q_S [(Q_S^T G Q_A) / (Lambda + damping)] Q_A^T; diagonal: G / (Lambda +
    damping); identity: G. `damping` None takes `factors.default_damping(name)`.
    """
    damping = factors.default_damping(name) if damping is None else damping
    return apply_inverse(factors.strategy, factors.arrays[name], gradient, damping)


def apply_inverse(strategy: str, values: Mapping[str, Any], gradient, damping: float):
    """`precondition` on one module's arrays (traceable: the arrays may be jit arguments)."""
    if strategy == "identity":
        return gradient
    denominator = jnp.asarray(values["Lambda"]) + damping
    if strategy == "diagonal":
        return gradient / denominator
    q_a, q_s = jnp.asarray(values["Q_A"]), jnp.asarray(values["Q_S"])
    rotated = jnp.einsum("os,...oi,ij->...sj", q_s, gradient, q_a)
    return jnp.einsum("os,...sj,ij->...oi", q_s, rotated / denominator, q_a)
