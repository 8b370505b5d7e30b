"""Sparse autoencoders: modules, SAELens-compatible folders (`load`, `save`), evaluation."""

from interp.sae.io import load, save

__all__ = ["load", "save"]
