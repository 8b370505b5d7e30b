"""Feature analysis of SAEs: statistics over a token stream, top contexts, logit effects,
feature search, plots and HTML dashboards."""

from interp.analysis.features import (
    FeatureStats,
    SearchResult,
    feature_stats,
    resolve_site,
    search_features,
)
from interp.analysis.logits import LogitEffects, logit_effects

__all__ = [
    "FeatureStats",
    "LogitEffects",
    "SearchResult",
    "feature_stats",
    "logit_effects",
    "resolve_site",
    "search_features",
]
