"""Sparse autoencoders: modules, SAELens-compatible folders (`load`, `save`), released SAEs by
name (`load_pretrained`), evaluation."""

from interp.sae.io import load, read_metadata, save
from interp.sae.released import load_pretrained

__all__ = ["load", "load_pretrained", "read_metadata", "save"]
