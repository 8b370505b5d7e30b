"""Sparse autoencoders: modules, SAELens-compatible folders (`load`, `save`), evaluation."""

from interp.sae.io import load, read_metadata, save

__all__ = ["load", "read_metadata", "save"]
