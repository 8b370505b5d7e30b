"""Influence functions with EK-FAC (Grosse et al. 2023): factors, queries, scores."""

from interp.influence.factors import Factors, fit_factors
from interp.influence.gradients import tracked_modules
from interp.influence.io import load_factors, load_scores, save_factors, save_scores
from interp.influence.queries import Measurement, log_prob, logit_margin, sae_feature
from interp.influence.scores import InfluenceScores, pairwise_scores, self_scores
from interp.influence.tfidf import TfidfIndex

__all__ = [
    "Factors",
    "InfluenceScores",
    "Measurement",
    "TfidfIndex",
    "fit_factors",
    "load_factors",
    "load_scores",
    "log_prob",
    "logit_margin",
    "pairwise_scores",
    "sae_feature",
    "save_factors",
    "save_scores",
    "self_scores",
    "tracked_modules",
]
