"""What a computation read: short digests of token batches and documents.

Results that resume or are reused (factor fits, activation caches, job workdirs) record the
digest of the data they were computed on, so that a rerun on other data (a corpus file edited
at the same path, other batches, fewer batches) is continued only when the data it has
already summed is the same, and is otherwise refused or recomputed instead of silently
mixing two data sets. `interp.models.fingerprint` is the model's counterpart.

    digests = [batch_digest(batch) for batch in batches]   # one per batch, 16 hex digits
    sequence_digest(digests)                               # the whole ordered sequence
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DIGEST_CHARS = 16  # Hex digits of a digest (64 bits).


def _canonical(value: Any) -> np.ndarray:
    """The array as the values it holds: integers (and bools) as int64, floats as float64, so
    the same tokens or masks hash alike whatever integer or float type carries them."""
    array = np.asarray(value)
    if array.dtype.kind in "biu":
        return np.ascontiguousarray(array, np.int64)
    if array.dtype.kind == "f":
        return np.ascontiguousarray(array, np.float64)
    raise TypeError(f"Cannot fingerprint an array of {array.dtype}; give ints or floats.")


def batch_digest(batch: Mapping[str, Any] | Any) -> str:
    """16 hex digits identifying a batch: its keys, shapes and values.

    Args:
      batch: {name: array} (e.g. {'tokens', 'loss_mask', 'attention_mask'}) or one array.
        Values count as numbers: int32 and int64 tokens with the same values hash alike.

    Returns:
      sha256 of the sorted keys with each array's shape and values, 16 hex digits.
    """
    items = sorted(batch.items()) if isinstance(batch, Mapping) else [("", batch)]
    digest = hashlib.sha256()
    for name, value in items:
        array = _canonical(value)
        digest.update(f"{name}:{array.dtype.name}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:DIGEST_CHARS]


def sequence_digest(digests: Iterable[str]) -> str:
    """16 hex digits identifying an ordered sequence of digests (of batches, say).

    Order and count matter: [a, b], [b, a] and [a] differ.
    """
    digest = hashlib.sha256()
    count = 0
    for value in digests:
        digest.update(f"{value};".encode())
        count += 1
    digest.update(f"#{count}".encode())
    return digest.hexdigest()[:DIGEST_CHARS]


def documents_digest(documents: Iterable[str]) -> str | None:
    """16 hex digits identifying a list of documents (their text, in order); None for a
    lazily read stream (`text.DocumentStream`), which is not read whole just to hash it."""
    if not isinstance(documents, Sequence):
        return None
    digest = hashlib.sha256()
    for document in documents:
        data = document.encode("utf-8", "surrogatepass")
        digest.update(f"{len(data)}:".encode())  # Lengths keep ['ab'] and ['a', 'b'] apart.
        digest.update(data)
    digest.update(f"#{len(documents)}".encode())
    return digest.hexdigest()[:DIGEST_CHARS]


def first_difference(saved: Sequence[str], current: Sequence[str]) -> int | None:
    """The first index where two digest sequences differ (a length counts); None if equal."""
    for index, (old, new) in enumerate(zip(saved, current, strict=False)):
        if old != new:
            return index
    return None if len(saved) == len(current) else min(len(saved), len(current))
