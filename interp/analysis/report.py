"""Everything the analysis of one SAE writes to a workdir, in one call (for jobs and notebooks).

    written = analyse(model, params, sae, sae_params, batches, f"{workdir}/analysis/{name}",
                      tokenizer=tokenizer, bos_id=tokenizer.bos_id)

Writes, under the folder (local or gs://):
  feature_stats.npz   `FeatureStats.save` (reload with `FeatureStats.load`)
  dashboard.html      `write_dashboard`, with logit effects where the SAE writes the residual
                      stream; past 128 features that fired, their panels are in
                      dashboard_files/ beside it (copy both)
  density.png         `plot_density_histogram`
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn

from interp import parallel, paths
from interp.analysis import dashboard, plots
from interp.analysis.features import FeatureStats, feature_stats
from interp.analysis.logits import logit_effects, why_no_direct_effect

STATS_FILE = "feature_stats.npz"
DASHBOARD_FILE = "dashboard.html"
DENSITY_FILE = "density.png"


def analyse(
    model: nn.Module,
    params,
    sae: nn.Module,
    sae_params,
    batches: Iterable[Any],
    folder: paths.PathLike,
    *,
    tokenizer: Any = None,
    logit_k: int = 10,
    title: str | None = None,
    **stats_options,
) -> dict[str, Any]:
    """Feature statistics, logit effects, dashboard and density plot of one SAE.

    Args:
      model, params, sae, sae_params, batches: As for `feature_stats`.
      folder: Where to write (local or gs://); in a multi-process job every process
        computes and process 0 writes (`parallel.on_main_process`).
      tokenizer: Token ids to text for the dashboard (see `write_dashboard`).
      logit_k: Tokens per side in the logit effects.
      title: The dashboard's title (default: the SAE's site).
      **stats_options: Passed to `feature_stats` (site, head_index, top_k, bos_id, ...).

    Returns:
      {'stats': the `FeatureStats`, 'stats_path', 'dashboard', 'density': paths as strings,
      'logit_effects': `LogitEffects` or None where the SAE does not write the residual
      stream}.
    """
    folder = paths.resolve(folder)
    stats: FeatureStats = feature_stats(model, params, sae, sae_params, batches, **stats_options)
    site = stats.site if sae.config.output_hook_name is None else None  # Else its output.
    effects = None  # attn/z, MLP hidden units, ...: no direct path through W_U alone.
    if why_no_direct_effect(model, sae_params, sae=sae, site=site) is None:
        # feature_stats checked (or was allowed) the site.
        effects = logit_effects(model, params, sae_params, k=logit_k, sae=sae, site=site,
                                allow_other_site=True)  # fmt: skip
    title = title or f"SAE at {stats.site}"

    def write():
        folder.mkdir(parents=True, exist_ok=True)
        stats.save(folder / STATS_FILE)
        dashboard.write_dashboard(folder / DASHBOARD_FILE, stats, logit_effects=effects,
                                  tokenizer=tokenizer, title=title)  # fmt: skip
        plots.plot_density_histogram(stats, folder / DENSITY_FILE)

    parallel.on_main_process(write)  # Every process computed; process 0 writes.
    return {
        "stats": stats,
        "stats_path": str(folder / STATS_FILE),
        "dashboard": str(folder / DASHBOARD_FILE),
        "density": str(folder / DENSITY_FILE),
        "logit_effects": effects,
    }
