"""Feature analysis of SAEs: statistics over a token stream, top contexts, logit effects,
feature search, plots and HTML dashboards."""

from interp.analysis.dashboard import write_dashboard
from interp.analysis.features import (
    FeatureStats,
    SearchResult,
    feature_stats,
    resolve_site,
    search_features,
)
from interp.analysis.logits import LogitEffects, logit_effects
from interp.analysis.plots import (
    plot_activation_histogram,
    plot_density_histogram,
    plot_frontier,
)
from interp.analysis.report import analyse

__all__ = [
    "analyse",
    "FeatureStats",
    "LogitEffects",
    "SearchResult",
    "feature_stats",
    "logit_effects",
    "plot_activation_histogram",
    "plot_density_histogram",
    "plot_frontier",
    "resolve_site",
    "search_features",
    "write_dashboard",
]
