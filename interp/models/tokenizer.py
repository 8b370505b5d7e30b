"""Tokenizers backed by the Hugging Face `tokenizers` library, read from `tokenizer.json`.

    tok = tokenizer.load('/path/to/hf_model')          # None if it has no tokenizer.json
    tok = tokenizer.train_bpe(documents, vocab_size=4096)
    tokens, mask = tok.encode_batch(texts, max_length=128, padding_side='left')
    tok.save(workdir)   # transformers.AutoTokenizer.from_pretrained(workdir) loads it too

Special tokens are explicit: `encode` adds a bos only when asked (`add_bos=True`) and never
runs the tokenizer's post-processor, so no family-specific template slips in. Special-token
strings that occur *inside* a text (e.g. a literal '<|endoftext|>') become their special ids,
as in Hugging Face; `decode(..., skip_special_tokens=True)` then drops them.
"""

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_ROLES = ("bos", "eos", "pad")


class Tokenizer:
    """A `tokenizers.Tokenizer` with named bos/eos/pad tokens and NumPy batch encoding.

    Attributes:
        backend: The wrapped `tokenizers.Tokenizer`.
        bos_token: Beginning-of-sequence token string, or None.
        eos_token: End-of-sequence token string, or None.
        pad_token: Padding token string, or None (then `encode_batch` pads with eos, or 0).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        """Wraps `backend`; each named special token must be in its vocabulary."""
        self.backend = backend
        for role, token in zip(_ROLES, (bos_token, eos_token, pad_token), strict=True):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(
                    f"{role}_token {token!r} is not in the vocabulary of this tokenizer "
                    f"(size {backend.get_vocab_size()}); pass a token it has, or None."
                )
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> "Tokenizer":
        """Reads a `tokenizer.json` (local or any fsspec URL such as gs://).

        Args:
            path: The `tokenizer.json` file.
            bos_token: Beginning-of-sequence token, or None.
            eos_token: End-of-sequence token, or None.
            pad_token: Padding token, or None.

        Returns:
            The tokenizer.
        """
        try:
            with fsspec.open(os.fspath(path), "rt", encoding="utf-8") as f:
                content = f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"No tokenizer file at {path}; give the path of a tokenizer.json, or use "
                f"tokenizer.load(folder)."
            ) from e
        try:
            backend = tokenizers.Tokenizer.from_str(content)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files.
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        return cls(backend, bos_token, eos_token, pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are 0..vocab_size-1)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Id of the bos token, or None."""
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        """Id of the eos token, or None."""
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """Id of the pad token, or None."""
        return self._id(self.pad_token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Returns the token ids of `text`, with the bos id first if `add_bos`."""
        return self.encode_many([text], add_bos=add_bos)[0]

    def encode_many(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Encodes several texts at once (in parallel in Rust), without padding.

        Args:
            texts: The texts.
            add_bos: Put the bos id first in each.

        Returns:
            One list of ids per text.
        """
        prefix = [self._require("bos")] if add_bos else []
        texts = _as_texts(texts)
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [prefix + encoding.ids for encoding in encodings]

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool = False,
        max_length: int | None = None,
        padding_side: str = "right",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads texts into one array, with a mask of the real tokens.

        Padding uses `pad_id`, else `eos_id`, else 0; the mask is what tells them apart.
        With `max_length`, every row has exactly `max_length` tokens (fixed shapes for jit):
        longer texts keep their first `max_length` tokens (bos included). Without it, rows
        are as long as the longest text.

        Args:
            texts: B texts.
            add_bos: Put the bos id first in each row's tokens.
            max_length: Fixed row length T, or None for the longest text.
            padding_side: 'right' (pad after the tokens, for training and scoring) or 'left'
                (pad before, so the last column is each text's last token, for generation).

        Returns:
            (tokens, attention_mask), both int32 [B, T]; the mask is 1 at real tokens.
        """
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}.")
        sequences = self.encode_many(texts, add_bos=add_bos)
        if max_length is not None:
            sequences = [ids[:max_length] for ids in sequences]
            length = max_length
        else:
            length = max((len(ids) for ids in sequences), default=0)
        pad = next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)
        tokens = np.full((len(sequences), length), pad, np.int32)
        mask = np.zeros((len(sequences), length), np.int32)
        for row, ids in enumerate(sequences):
            columns = (
                slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            )
            tokens[row, columns] = ids
            mask[row, columns] = 1
        return tokens, mask

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Returns the text of a 1-D sequence of ids.

        Args:
            ids: Token ids (a list, or a 1-D array of any integer dtype).
            skip_special_tokens: Drop special tokens (bos/eos/pad and other added specials).

        Returns:
            The text. For byte-level BPE, `decode(encode(text), False) == text` exactly.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(
                f"decode takes a 1-D sequence of ids, got shape {ids.shape}; decode each row."
            )
        return self.backend.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | os.PathLike) -> None:
        """Writes `tokenizer.json` and a `tokenizer_config.json` to `folder`.

        The folder loads back with `load(folder)`, and with Hugging Face
        `PreTrainedTokenizerFast.from_pretrained(folder)` / `AutoTokenizer.from_pretrained`
        (same ids; bos is not added, matching `encode`'s default, unless the tokenizer.json
        has a post-processor that adds it).

        Args:
            folder: Local folder or fsspec URL; created if missing.
        """
        folder = os.fspath(folder)
        fs, root = fsspec.core.url_to_fs(folder)
        fs.makedirs(root, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # Hugging Face's default clean-up would rewrite ' .' as '.' when decoding.
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": int(1e30),  # Hugging Face's value for "no limit".
        }
        for role in _ROLES:
            token = getattr(self, f"{role}_token")
            if token is not None:
                config[f"{role}_token"] = token
        with fs.open(_join(root, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(self.backend.to_str(pretty=True))
        with fs.open(_join(root, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    def _id(self, token: str | None) -> int | None:
        """Id of `token`, or None for None."""
        return None if token is None else self.backend.token_to_id(token)

    def _require(self, role: str) -> int:
        """Id of the `role` token; raises if the tokenizer has none."""
        token_id = getattr(self, f"{role}_id")
        if token_id is None:
            raise ValueError(
                f"This tokenizer has no {role} token; set {role}_token (in "
                f"tokenizer_config.json, or Tokenizer(..., {role}_token=...))."
            )
        return token_id

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r})"
        )


def load(folder: str | os.PathLike) -> Tokenizer | None:
    """Loads the tokenizer of a Hugging Face style folder, or None if it has none.

    Reads `tokenizer.json`, and takes bos/eos/pad tokens from `tokenizer_config.json`, then
    `special_tokens_map.json` for any it did not name (either may be missing; a token may be
    a string or an AddedToken dict `{"content": ...}`).

    Args:
        folder: Local folder or fsspec URL (e.g. `gs://bucket/model`).

    Returns:
        The tokenizer, or None when the folder has no `tokenizer.json`.
    """
    folder = os.fspath(folder)
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.isfile(_join(root, TOKENIZER_FILE)):
        return None
    special: dict[str, str | None] = {f"{role}_token": None for role in _ROLES}
    for name in (CONFIG_FILE, SPECIAL_TOKENS_FILE):
        path = _join(root, name)
        if not fs.isfile(path):
            continue
        with fs.open(path, "r", encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{_join(folder, name)} is not valid JSON: {e}") from e
        for key, value in special.items():
            if value is None:
                special[key] = _token_content(config.get(key))
    return Tokenizer.from_file(_join(folder, TOKENIZER_FILE), **special)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 4096,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    min_frequency: int = 2,
) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style) on `texts`.

    Byte-level pre-tokenization (GPT-2's split regex, no prefix space) and decoding, with all
    256 byte symbols in the initial alphabet: any text encodes, and decodes back exactly.
    Special tokens get the first ids; the first one serves as bos, eos and pad.

    Args:
        texts: Training texts (any iterable; read once).
        vocab_size: Target vocabulary size, special tokens included (>= 256 + number of
            special tokens); smaller if the texts have fewer distinct merges.
        special_tokens: Added tokens that are never split; ids 0, 1, ...
        min_frequency: Minimum count of a pair to be merged.

    Returns:
        The tokenizer.
    """
    special_tokens = list(special_tokens)
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size must be at least {smallest} (256 bytes + {len(special_tokens)} "
            f"special tokens), got {vocab_size}."
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    default = special_tokens[0] if special_tokens else None
    return Tokenizer(backend, bos_token=default, eos_token=default, pad_token=default)


def _token_content(value: Any) -> str | None:
    """The token string of a config entry: a string, an AddedToken dict, or None."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _join(folder: str, name: str) -> str:
    """`folder/name` for local paths and URLs alike."""
    return folder.rstrip("/") + "/" + name


def _as_texts(texts: Sequence[str]) -> list[str]:
    """`texts` as a list, refusing a lone string (which would encode character by character)."""
    if isinstance(texts, str):
        raise TypeError("Expected a sequence of texts, got one str; wrap it in a list.")
    texts = list(texts)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"Expected texts of type str, got {type(text).__name__}.")
    return texts
