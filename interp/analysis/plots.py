"""Plots of SAE features (PNG, matplotlib): firing density, one feature's activations, and the
L0 / FVU frontier of an SAE sweep.

Each function returns the PNG's bytes and, given `path` (local or gs://), also writes them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from interp import paths
from interp.analysis.features import FeatureStats, check_features


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # No display: files only.
    import matplotlib.pyplot as plt

    return plt


def _finish(figure, path) -> bytes:
    plt = _pyplot()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    data = buffer.getvalue()
    if path is not None:
        paths.write_bytes(path, data)
    return data


def plot_density_histogram(
    stats: FeatureStats, path: paths.PathLike | None = None, *, bins: int = 50
) -> bytes:
    """Histogram of log10 firing density over features (dead features counted in the title).

    Dense features sit near 0 (they fire on every token), rare ones far left; the usual
    health check of an SAE (SAELens, Anthropic's "Towards Monosemanticity").
    """
    plt = _pyplot()
    density = stats.density
    alive = density[density > 0]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    if alive.size:
        axes.hist(np.log10(alive), bins=bins, color="#3a6fb0")
    axes.set_xlabel("log10 firing density (fraction of tokens)")
    axes.set_ylabel("features")
    dead = int((density == 0).sum())
    axes.set_title(f"{stats.num_latents} features, {dead} dead, {stats.num_tokens} tokens",
                   fontsize=10)  # fmt: skip
    return _finish(figure, path)


def plot_activation_histogram(
    stats: FeatureStats, feature: int, path: paths.PathLike | None = None
) -> bytes:
    """One feature's activations where it fires, from the binned counts (log-spaced x).

    Raises:
      ValueError: for a feature outside the SAE.
    """
    (feature,) = check_features([feature], stats.num_latents)
    plt = _pyplot()
    counts = stats.histogram[feature]
    edges = stats.bin_edges
    figure, axes = plt.subplots(figsize=(6, 3.5))
    used = np.nonzero(counts)[0]
    if used.size:
        lo, hi = used[0], used[-1] + 1
        axes.stairs(counts[lo:hi], edges[lo : hi + 1], fill=True, color="#d0603a")
        axes.set_xscale("log")
    axes.set_xlabel("activation")
    axes.set_ylabel("tokens")
    axes.set_title(f"feature {feature}: density {stats.density[feature]:.3g}, "
                   f"max {stats.max[feature]:.3g}", fontsize=10)  # fmt: skip
    return _finish(figure, path)


def plot_frontier(
    points: Sequence[Mapping[str, Any]],
    path: paths.PathLike | None = None,
    *,
    x: str = "l0",
    y: str = "fvu",
    group: str = "architecture",
    label: str = "label",
) -> bytes:
    """The sparsity / reconstruction frontier of an SAE sweep: FVU against L0, log-log.

    Args:
      points: One mapping per SAE, e.g. `interp.sae.evaluate.evaluate`'s metrics with extra
        keys: `x` and `y` values, optionally `group` (one line per group, sorted by x) and
        `label` (written beside the point).
      path: Where to write the PNG (optional).
      x, y, group, label: The keys to read.

    Raises:
      ValueError: with no points, or a point missing `x` or `y`.
    """
    if not points:
        raise ValueError("plot_frontier got no points.")
    for point in points:
        missing = [key for key in (x, y) if key not in point]
        if missing:
            raise ValueError(f"A frontier point lacks {missing}: {dict(point)}.")
    plt = _pyplot()
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for point in points:
        groups.setdefault(str(point.get(group, "")), []).append(point)
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, members in sorted(groups.items()):
        members = sorted(members, key=lambda p: float(p[x]))
        xs = [float(p[x]) for p in members]
        ys = [float(p[y]) for p in members]
        axes.plot(xs, ys, marker="o", label=name or None)
        for point, px, py in zip(members, xs, ys, strict=True):
            if label in point:
                axes.annotate(str(point[label]), (px, py), fontsize=7,
                              textcoords="offset points", xytext=(4, 4))  # fmt: skip
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(x.upper() if x == "l0" else x)
    axes.set_ylabel(y.upper() if y == "fvu" else y)
    axes.set_title("Sparsity / reconstruction frontier (lower left is better)", fontsize=10)
    if any(groups):
        axes.legend(fontsize=8)
    return _finish(figure, path)


def plot_steering_sweep(
    settings: Sequence[Mapping[str, Any]],
    unsteered: Mapping[str, Any],
    path: paths.PathLike | None = None,
) -> bytes:
    """A steering sweep (`interp.jobs.steer`): per strength, the share of completions that
    mention the concept (left) and their fluency, the unsteered model's loss on them (right),
    one line per method and positions, the unsteered values dashed (AxBench's two axes)."""
    plt = _pyplot()
    figure, (share_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    lines: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for setting in settings:
        lines.setdefault((setting["method"], setting["positions"]), []).append(setting)
    for (method, positions), points in lines.items():
        points = sorted(points, key=lambda p: p["strength"])
        strengths = [p["strength"] for p in points]
        label = f"{method}, {positions} positions"
        share_axis.plot(strengths, [p["concept_share"] for p in points], "o-", label=label)
        loss_axis.plot(strengths, [p["fluency_loss"] for p in points], "o-", label=label)
    share_axis.axhline(unsteered["concept_share"], color="grey", ls="--", label="unsteered")
    loss_axis.axhline(unsteered["fluency_loss"], color="grey", ls="--", label="unsteered")
    share_axis.set(xlabel="strength (x the feature's max activation)",
                   ylabel="completions mentioning the concept", ylim=(-0.02, 1.02))  # fmt: skip
    loss_axis.set(xlabel="strength (x the feature's max activation)",
                  ylabel="unsteered model's loss on the text (nats/token)")  # fmt: skip
    share_axis.legend(fontsize=8)
    return _finish(figure, path)
