"""Tokenizers built from a GGUF file's metadata (llama.cpp's `tokenizer.ggml.*` keys).

    reader = gguf.GGUFReader("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = gguf_tokenizer.tokenizer_from_gguf(gguf_tokenizer.read_metadata(reader))
    tok.encode("Hello")   # the ids llama.cpp and the model's Hugging Face tokenizer give

A GGUF file has no tokenizer.json: it stores the vocabulary (`tokenizer.ggml.tokens`, one
string per id), each token's type (`token_type`: NORMAL, CONTROL, USER_DEFINED, BYTE, ...),
the BPE merges or the SentencePiece scores, the bos/eos/pad/unk ids and flags, and names the
tokenizer (`tokenizer.ggml.model`) and, for byte-level BPE, its pre-tokenizer
(`tokenizer.ggml.pre`); the pre-tokenizer itself is code in llama.cpp (src/llama-vocab.cpp).
`tokenizer_from_gguf` rebuilds the `tokenizers` pipeline those keys stand for:

- **"gpt2": byte-level BPE** (GPT-2, Llama 3, Qwen 2/3, SmolLM, ...): the merges as given,
  GPT-2's byte alphabet, and the split regexes of the named pre-tokenizer, each applied in turn
  with the pieces between matches kept (llama.cpp's `unicode_regex_split`, Hugging Face's
  `Split(behavior='isolated')`). The regexes are the original ones of each model's
  tokenizer.json, which llama.cpp rewrites only for its own regex engine (`PRE_TOKENIZERS`; a
  name not in it is an error). Llama 3 and Tekken also look a whole piece up in the vocabulary
  before merging (`ignore_merges`), as llama.cpp and Llama 3's tokenizer.json do.
- **"llama": SentencePiece BPE** (Llama 1/2, Mistral v0.1, Gemma 2/3, ...): spaces become '▁',
  characters outside the vocabulary <0xNN> byte tokens, and with
  `tokenizer.ggml.add_space_prefix` (llama.cpp's default: true) each stretch of text between
  special or user-defined tokens starts with a '▁', as in llama.cpp and Llama 2's tokenizer.json
  (a `Prepend` normalizer); SentencePiece itself adds it at the start of the text only.
  SentencePiece and llama.cpp merge the adjacent pair whose joined token scores highest; here
  the BPE's merges are every split of a token into two tokens, ranked by the joined token's
  score (as `transformers` reads a tokenizer.model). Merges stored in the file (converted from
  a tokenizer.json, whose scores may rank nothing) are used as they are; llama.cpp ignores
  them.

Tokens of type CONTROL or UNKNOWN, and the bos/eos/pad/unk tokens, become special added tokens:
found whole in a text (a literal '<|im_end|>' is that token), dropped by
`decode(skip_special_tokens=True)`. USER_DEFINED tokens (e.g. '<think>') are found whole too
but are text. llama.cpp's converter stores a user-defined SentencePiece token with ' ' for '▁'
(it matches raw text); the '▁' is put back, as in the model's tokenizer.json. `add_bos_token` /
`add_eos_token` (defaults as llama.cpp's: bos for SentencePiece and for the Llama 3 and Tekken
pre-tokenizers) become the post-processor, so `encode` adds what llama.cpp adds. The chat
template is `tokenizer.chat_template`. Padding is on the right (a GGUF file does not say; set
`padding_side` on the result to change it).

Decoding is exact where the vocabulary allows (byte-level: `decode(encode(text)) == text`);
llama.cpp's clean-up of spaces before punctuation (`clean_spaces`, on for most byte-level
vocabularies) is not applied, as in `Tokenizer`.

Not supported (errors naming them): the other tokenizer models ("bert" WordPiece, "t5"
Unigram, "rwkv", "plamo2", "gemma4", ...) and pre-tokenizers outside `PRE_TOKENIZERS`
(DeepSeek's, whose regexes are long Unicode tables; Chameleon's; digit-grouping ones such as
superbpe and afmoe).

Reference: llama.cpp src/llama-vocab.cpp (`llama_vocab::impl::load`, `llm_tokenizer_bpe`,
`llm_tokenizer_spm_session`) and convert_hf_to_gguf.py (`get_vocab_base`,
`_create_vocab_sentencepiece`); the GGUF specification,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import gguf
import numpy as np
import tokenizers
from absl import logging
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from interp.models import tokenizer as tokenizer_lib

MODEL_KEY = "tokenizer.ggml.model"
PRE_KEY = "tokenizer.ggml.pre"
TOKENS_KEY = "tokenizer.ggml.tokens"
TOKEN_TYPE_KEY = "tokenizer.ggml.token_type"
SCORES_KEY = "tokenizer.ggml.scores"
MERGES_KEY = "tokenizer.ggml.merges"
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"
ADD_EOS_KEY = "tokenizer.ggml.add_eos_token"
ADD_SPACE_PREFIX_KEY = "tokenizer.ggml.add_space_prefix"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
}
# llama.cpp's ids when a SentencePiece file names none (SentencePiece's own conventions).
_SENTENCEPIECE_DEFAULT_IDS = {"bos": 1, "eos": 2, "unk": 0}

# Token types (llama.cpp's llama_token_type); BYTE (<0xNN>) and UNUSED tokens are plain
# vocabulary entries here.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = (
    int(gguf.TokenType.NORMAL),
    int(gguf.TokenType.UNKNOWN),
    int(gguf.TokenType.CONTROL),
    int(gguf.TokenType.USER_DEFINED),
)
_SPACE = "\u2581"  # SentencePiece's '▁', which stands for a space.

# --------------------------------------------------------------- pre-tokenizers (regexes)

# GPT-2's split (openai/gpt-2 encoder.py); Hugging Face's ByteLevel adds `|\s+`, which changes
# no split: what it would match is a single whitespace character left between two matches,
# which an isolated split keeps as a piece of its own anyway.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclasses.dataclass(frozen=True)
class _Pre:
    """A llama.cpp pre-tokenizer type: its split regexes (applied in turn) and flags."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # A piece that is a token is that token, merges or not.
    add_bos: bool = False  # llama.cpp's add_bos when the file has no add_bos_token.


def _table() -> dict[str, _Pre]:
    """tokenizer.ggml.pre -> _Pre, from llama.cpp's `llama_vocab::impl::load`."""
    groups = {
        # The default is llama.cpp's own (files without a pre name), not GPT-2's.
        ("default",): _Pre(
            (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
        ),
        (
            "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
            "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion",
            "granite-docling", "exaone4",
        ): _Pre((_GPT2,)),
        (
            "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
            "lfm2", "jina-v5-nano",
        ): _Pre((_LLAMA3,), ignore_merges=True, add_bos=True),
        ("dbrx", "smaug-bpe", "glm4", "chatglm-bpe"): _Pre((_LLAMA3,)),
        (
            "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
            "solar-open", "grok-2",
        ): _Pre((_QWEN2,)),
        ("qwen35",): _Pre((_QWEN35,)),
        (
            "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
            "mellum2",
        ): _Pre((r"\p{N}", _GPT2)),
        ("falcon",): _Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
        ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"): _Pre((_GPT4O,)),
        ("tekken",): _Pre((_TEKKEN,), ignore_merges=True, add_bos=True),
        ("seed-coder",): _Pre((_SEED_CODER,)),
        ("bloom", "poro-chat", "gpt3-finnish"): _Pre((_BLOOM,)),
        ("viking",): _Pre((_BLOOM, r"\p{N}")),
    }  # fmt: skip
    return {name: pre for names, pre in groups.items() for name in names}


PRE_TOKENIZERS = _table()


# --------------------------------------------------------------- reading a GGUF file


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The key-value metadata of a GGUF file as plain Python values.

    Strings become `str` (UTF-8), numbers `int`/`float`, booleans `bool`, arrays lists of
    those. Numeric arrays (token types, scores) are read as one NumPy view of the file; string
    arrays (tokens, merges) one string at a time, which is what their length prefixes allow.
    The reader's header entries (`GGUF.version`, `GGUF.tensor_count`, `GGUF.kv_count`) are not
    metadata and are left out.

    Args:
        reader: An open `gguf.GGUFReader`.

    Returns:
        {key: value} for every key-value field, in file order.

    Raises:
        ValueError: A string that is not UTF-8, or an array of arrays (which the reader
            flattens, so its shape is lost).
    """
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        metadata[name] = _field_value(reader, name, field)
    return metadata


def _field_value(reader: gguf.GGUFReader, name: str, field: gguf.ReaderField) -> Any:
    """The Python value of one ReaderField."""
    kind = field.types[0]
    if kind == gguf.GGUFValueType.STRING:
        return _utf8(field.parts[field.data[0]], name)
    if kind != gguf.GGUFValueType.ARRAY:
        return field.parts[field.data[0]].tolist()[0]
    if not field.data:
        return []
    item = field.types[1]
    if item == gguf.GGUFValueType.ARRAY:
        raise ValueError(
            f"GGUF key {name!r} is an array of arrays, which gguf.GGUFReader flattens; "
            "read it from reader.fields directly."
        )
    if item == gguf.GGUFValueType.STRING:
        return [_utf8(field.parts[i], name) for i in field.data]
    # Numeric items lie back to back after the array header: view them all at once. The parts
    # before the first item (key, types, length) give its offset in the file.
    first = field.parts[field.data[0]]
    start = field.offset + sum(int(part.nbytes) for part in field.parts[: field.data[0]])
    values = reader.data[start : start + first.itemsize * len(field.data)].view(first.dtype)
    return values.tolist()


def _utf8(data: np.ndarray, name: str) -> str:
    """The UTF-8 string in a uint8 array."""
    try:
        return data.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"GGUF key {name!r} holds a string that is not UTF-8: {e}") from e


# --------------------------------------------------------------- building the tokenizer


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> tokenizer_lib.Tokenizer:
    """The tokenizer a GGUF file's metadata describes (see the module docstring).

    Args:
        metadata: The file's key-value metadata as `read_metadata` gives it (strings as str,
            arrays as lists): `tokenizer.ggml.model`, `.tokens`, `.token_type`, `.merges`
            (byte-level BPE) or `.scores` (SentencePiece), `.pre`, the bos/eos/pad/unk ids,
            `.add_bos_token`, `.add_eos_token`, `.add_space_prefix`, `tokenizer.chat_template`.

    Returns:
        The tokenizer: ids are the file's (0..len(tokens)-1), bos/eos/pad named by the file's
        ids, `encode` adding the bos/eos the file asks for.

    Raises:
        ValueError: No tokenizer in the metadata, a tokenizer model or pre-tokenizer not
            supported, missing or inconsistent arrays (tokens, types, scores, merges),
            duplicate tokens, a special id outside the vocabulary, or add_bos/add_eos set
            without the token's id.
    """
    model = metadata.get(MODEL_KEY)
    if model is None:
        raise ValueError(
            f"The GGUF metadata has no {MODEL_KEY!r}, so it carries no tokenizer; pass the "
            "metadata of a file converted with its vocabulary (llama.cpp's "
            "convert_hf_to_gguf.py writes one), or load the tokenizer from the model's "
            "Hugging Face folder."
        )
    tokens = _tokens(metadata)
    types = _numbers(metadata, TOKEN_TYPE_KEY, len(tokens), default=_NORMAL, kind=int)
    if model == "gpt2":
        pre = _pre(metadata)
        backend = _byte_level_bpe(metadata, tokens, pre)
        add_bos_default = pre.add_bos
        ids = _special_ids(metadata, len(tokens), defaults={})
    elif model == "llama":
        tokens = [
            token.replace(" ", _SPACE) if kind == _USER_DEFINED else token
            for token, kind in zip(tokens, types, strict=True)
        ]
        _check_unique(tokens)
        ids = _special_ids(metadata, len(tokens), defaults=_SENTENCEPIECE_DEFAULT_IDS)
        backend = _sentencepiece_bpe(metadata, tokens, types, ids["unk"])
        add_bos_default = True
    else:
        raise ValueError(
            f"GGUF tokenizer model {model!r} ({MODEL_KEY}) is not supported; supported: 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece BPE)."
        )
    _add_special_tokens(backend, tokens, types, ids)
    add_bos = _flag(metadata, ADD_BOS_KEY, add_bos_default)
    add_eos = _flag(metadata, ADD_EOS_KEY, False)
    for role, add, key in (("bos", add_bos, ADD_BOS_KEY), ("eos", add_eos, ADD_EOS_KEY)):
        if add and ids[role] is None:
            raise ValueError(
                f"{key} is true but the GGUF metadata names no {role} token "
                f"({_ID_KEYS[role]}); the file is inconsistent (llama.cpp refuses it too)."
            )
    backend.post_processor = _post_processor(
        tokens,
        ids["bos"] if add_bos else None,
        ids["eos"] if add_eos else None,
    )
    chat_template = metadata.get(CHAT_TEMPLATE_KEY)
    if chat_template is not None and not isinstance(chat_template, str):
        raise ValueError(f"{CHAT_TEMPLATE_KEY} must be a string, got {type(chat_template)}.")
    names = {role: None if i is None else tokens[i] for role, i in ids.items()}
    return tokenizer_lib.Tokenizer(
        backend,
        bos_token=names["bos"],
        eos_token=names["eos"],
        pad_token=names["pad"],
        chat_template=chat_template,
    )


def _tokens(metadata: Mapping[str, Any]) -> list[str]:
    """The token strings, empty ones renamed as llama.cpp does ('[EMPTY_i]')."""
    tokens = metadata.get(TOKENS_KEY)
    if not tokens:
        raise ValueError(
            f"The GGUF metadata names tokenizer model {metadata.get(MODEL_KEY)!r} but has no "
            f"{TOKENS_KEY!r} (the vocabulary); the file is incomplete."
        )
    if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{TOKENS_KEY} must be a list of strings.")
    return [token or f"[EMPTY_{i}]" for i, token in enumerate(tokens)]


def _check_unique(tokens: Sequence[str]) -> None:
    """Raises on a token string that has two ids (llama.cpp refuses such files)."""
    if len(set(tokens)) == len(tokens):
        return
    first: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in first:
            raise ValueError(
                f"Duplicate token in the GGUF vocabulary: {token!r} has ids {first[token]} "
                f"and {i}; the file is malformed."
            )
        first[token] = i


def _numbers(metadata: Mapping[str, Any], key: str, count: int, *, default, kind) -> list:
    """The first `count` items of a per-token array, or `default` for each if absent."""
    values = metadata.get(key)
    if values is None:
        return [default] * count
    if len(values) < count:
        raise ValueError(
            f"GGUF {key} has {len(values)} entries for {count} tokens; the file is malformed."
        )
    return [kind(v) for v in values[:count]]


def _flag(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean key, or `default` if absent."""
    value = metadata.get(key, default)
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"GGUF {key} must be a boolean, got {value!r}.")
    return bool(value)


def _special_ids(
    metadata: Mapping[str, Any], size: int, defaults: Mapping[str, int]
) -> dict[str, int | None]:
    """{'bos', 'eos', 'pad', 'unk'} -> id from the metadata (or the model's default), or None."""
    ids: dict[str, int | None] = {}
    for role, key in _ID_KEYS.items():
        value = metadata.get(key)
        if value is None:
            value = defaults.get(role)
            if value is not None and value >= size:
                value = None  # llama.cpp disables a default outside the vocabulary.
        elif not 0 <= int(value) < size:
            raise ValueError(
                f"GGUF {key} is {value}, outside the vocabulary of {size} tokens; the file is "
                "malformed."
            )
        ids[role] = None if value is None else int(value)
    return ids


def _pre(metadata: Mapping[str, Any]) -> _Pre:
    """The byte-level pre-tokenizer the file names."""
    name = metadata.get(PRE_KEY)
    if name is None:
        # What llama.cpp does, warning that "generation quality will be degraded": files
        # converted before May 2024 have no name, and the model's own split is unknown.
        logging.warning(
            "GGUF metadata has no %s; using llama.cpp's 'default' pre-tokenizer, which may not "
            "be the model's (reconvert the model with a recent llama.cpp).",
            PRE_KEY,
        )
        name = "default"
    if name not in PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {name!r} ({PRE_KEY}) is not supported; known: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}."
        )
    return PRE_TOKENIZERS[name]


def _merges(metadata: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """The file's merges as pairs, split at the first space after the first character."""
    merges = metadata.get(MERGES_KEY)
    if merges is None:
        return None
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # As llama.cpp: a left part may itself start with ' '.
        if cut < 0:
            raise ValueError(f"GGUF merge {merge!r} ({MERGES_KEY}) is not 'left right'.")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


def _bpe(**kwargs) -> models.BPE:
    """models.BPE, its errors (a merge naming a token not in the vocabulary) as ValueError."""
    try:
        return models.BPE(**kwargs)
    except Exception as e:  # tokenizers raises a bare Exception.
        raise ValueError(f"The GGUF vocabulary and merges do not make a BPE model: {e}") from e


def _byte_level_bpe(
    metadata: Mapping[str, Any], tokens: list[str], pre: _Pre
) -> tokenizers.Tokenizer:
    """Byte-level BPE with the file's merges and the pre-tokenizer `pre`."""
    _check_unique(tokens)
    merges = _merges(metadata)
    if merges is None:
        raise ValueError(
            f"The GGUF metadata has a byte-level BPE vocabulary but no {MERGES_KEY!r}; the "
            "file is incomplete (llama.cpp refuses it too)."
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(
        _bpe(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges)
    )
    splits = [
        pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated") for regex in pre.regexes
    ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    metadata: Mapping[str, Any], tokens: list[str], types: list[int], unk: int | None
) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback: merges from the file, else from the scores."""
    merges = _merges(metadata)
    if merges is None:
        if metadata.get(SCORES_KEY) is None:
            raise ValueError(
                f"The GGUF metadata has a SentencePiece vocabulary but neither {SCORES_KEY!r} "
                f"nor {MERGES_KEY!r}, so nothing ranks the merges; the file is incomplete."
            )
        scores = _numbers(metadata, SCORES_KEY, len(tokens), default=0.0, kind=float)
        merges = _merges_from_scores(tokens, scores, types)
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(
        _bpe(
            vocab=vocab,
            merges=merges,
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_space_prefix = _flag(metadata, ADD_SPACE_PREFIX_KEY, True)
    # Added tokens are cut out first and each stretch between them normalized on its own, so
    # every stretch gets the prefix: llama.cpp's `is_prev_special` rule.
    steps = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # The prefix the encoder added.
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best joined score first (SentencePiece's order).

    Only NORMAL and USER_DEFINED tokens take part (control, byte and unused tokens are never
    merged in SentencePiece). Ties go to the lower id of the joined token, then of the left
    part (SentencePiece breaks ties by position, which a list of merges cannot express).
    """
    ids = {
        token: i
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (_NORMAL, _USER_DEFINED)
    }
    ranked = []
    for token, i in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(
    backend: tokenizers.Tokenizer,
    tokens: Sequence[str],
    types: Sequence[int],
    ids: Mapping[str, int | None],
) -> None:
    """Control/unknown and role tokens as special added tokens, user-defined as plain ones."""
    roles = {i for i in ids.values() if i is not None}
    special = [
        tokenizers.AddedToken(token, special=True, normalized=False)
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (_CONTROL, _UNKNOWN) or i in roles
    ]
    plain = [
        tokenizers.AddedToken(token, special=False, normalized=False)
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind == _USER_DEFINED and i not in roles
    ]
    # Every one is already in the model's vocabulary, so each keeps the file's id.
    backend.add_special_tokens(special)
    backend.add_tokens(plain)


def _post_processor(
    tokens: Sequence[str], bos: int | None, eos: int | None
) -> processors.TemplateProcessing | None:
    """The template that puts bos (eos) around a text, as Llama's tokenizer.json does."""
    if bos is None and eos is None:
        return None

    def around(sequence: str, type_id: int) -> list[str]:
        before = [] if bos is None else [f"{tokens[bos]}:{type_id}"]
        after = [] if eos is None else [f"{tokens[eos]}:{type_id}"]
        return [*before, f"${sequence}:{type_id}", *after]

    return processors.TemplateProcessing(
        single=around("A", 0),
        pair=around("A", 0) + around("B", 1),
        special_tokens=[(tokens[i], i) for i in sorted({bos, eos} - {None})],
    )
