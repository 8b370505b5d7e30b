"""Tokenizers backed by the Hugging Face `tokenizers` library, read from `tokenizer.json`.

    tok = tokenizer.load('/path/to/hf_model')          # None if it has no tokenizer.json
    tok = tokenizer.train_bpe(documents, vocab_size=4096)
    tokens, mask = tok.encode_batch(texts, max_length=128)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tok.save(workdir)   # transformers.AutoTokenizer.from_pretrained(workdir) loads it too

Token conventions come from the checkpoint, as `transformers` takes them: the special tokens
that `tokenizer.json`'s post-processor puts around a text (Llama's and Gemma's `<bos>`, a
template's eos), the padding side and pad token of `tokenizer_config.json`, and its chat
template. `encode(text)` then gives the ids `AutoTokenizer.from_pretrained(folder)(text)` gives;
an explicit `add_bos=` / `add_eos=` / `padding_side=` overrides the checkpoint. Transformers 5
ignores `add_bos_token` / `add_eos_token` in `tokenizer_config.json` when a `tokenizer.json` is
present (the post-processor decides), and so does this module. Special-token strings that occur
*inside* a text (e.g. a literal '<|endoftext|>') become their special ids, as in Hugging Face;
`decode(..., skip_special_tokens=True)` then drops them.

Per-token text (pages that colour each token): `tok.token_pieces(ids)` gives one string per
token such that `''.join(pieces)` is the window's decoding. One token's own decoding is not its
text: a character made of several byte tokens (byte-level BPE, SentencePiece byte fallback)
decodes to U+FFFD piece by piece, and decoders join, strip and clean up across tokens. So the
pieces come from the decodings of the window's prefixes (`split_decoded`): each token gets what
its prefix adds, and a multi-byte character belongs to the token that completes it (the tokens
before it in the character get ''). `tok.token_label(id)` is one token's text on its own (lists
of tokens), with the bytes of a partial character written as \\xNN.
"""

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from interp import paths
from interp.models import chat_template as chat_template_lib

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_ROLES = ("bos", "eos", "pad")
REPLACEMENT = "\ufffd"  # What a decoder writes for bytes that are not (yet) a whole character.
_BLOCK, _LOOKBACK = 64, 16  # Tokens per block of a long window, and context before each.
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback: <0xC3>.
# Tokenizer classes whose default padding side in transformers is 'left' (their class
# attribute `padding_side`); every other class pads on the right unless its config says.
_LEFT_PADDING_CLASSES = frozenset(
    f"{name}Tokenizer{suffix}"
    for name in ("Llama", "CodeLlama", "Gemma", "Cohere", "XLNet", "Siglip2")
    for suffix in ("", "Fast")
)


class Tokenizer:
    """A `tokenizers.Tokenizer` with named bos/eos/pad tokens and NumPy batch encoding.

    Attributes:
        backend: The wrapped `tokenizers.Tokenizer`.
        bos_token: Beginning-of-sequence token string, or None.
        eos_token: End-of-sequence token string, or None.
        pad_token: Padding token string, or None (then `encode_batch` pads with eos, or 0).
        padding_side: 'right' or 'left': where `encode_batch` pads by default.
        chat_template: Jinja chat template, or None.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        *,
        padding_side: str = "right",
        chat_template: str | None = None,
    ):
        """Wraps `backend`; each named special token must be in its vocabulary.

        The post-processor of `backend` says which special tokens surround a text by default;
        padding and truncation configured in `backend` are ignored (`encode_batch` pads).
        """
        if backend.padding is not None or backend.truncation is not None:
            backend = tokenizers.Tokenizer.from_str(backend.to_str())  # A copy, left unchanged.
            backend.no_padding()
            backend.no_truncation()
        self.backend = backend
        for role, token in zip(_ROLES, (bos_token, eos_token, pad_token), strict=True):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(
                    f"{role}_token {token!r} is not in the vocabulary of this tokenizer "
                    f"(size {backend.get_vocab_size()}); pass a token it has, or None."
                )
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.padding_side = _check_padding_side(padding_side)
        self.chat_template = chat_template

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        **kwargs,
    ) -> "Tokenizer":
        """Reads a `tokenizer.json`, local or gs:// (`interp.paths`).

        Args:
            path: The `tokenizer.json` file.
            bos_token: Beginning-of-sequence token, or None.
            eos_token: End-of-sequence token, or None.
            pad_token: Padding token, or None.
            **kwargs: `padding_side`, `chat_template` (see the class).

        Returns:
            The tokenizer.
        """
        backend = _read_backend(path)
        return cls(backend, bos_token, eos_token, pad_token, **kwargs)

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

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode` puts a special token (the bos) first by default (the template)."""
        return bool(_template(self.backend)[0])

    @property
    def add_eos_token(self) -> bool:
        """Whether `encode` puts a special token (the eos) last by default (the template)."""
        return bool(_template(self.backend)[1])

    def encode(
        self, text: str, add_bos: bool | None = None, *, add_eos: bool | None = None
    ) -> list[int]:
        """Returns the token ids of `text`, with special tokens as `encode_many` adds them."""
        return self.encode_many([text], add_bos=add_bos, add_eos=add_eos)[0]

    def encode_many(
        self,
        texts: Sequence[str],
        add_bos: bool | None = None,
        *,
        add_eos: bool | None = None,
    ) -> list[list[int]]:
        """Encodes several texts at once (in parallel in Rust), without padding.

        By default each text gets the special tokens the checkpoint's post-processor adds
        (what `transformers` gives with `add_special_tokens=True`).

        Args:
            texts: The texts.
            add_bos: None: as the checkpoint does. True: the bos id first (added if the
                template lacks it). False: no special token before the text.
            add_eos: The same for the eos id last (False: none after the text).

        Returns:
            One list of ids per text.
        """
        prefix, suffix = self._special_ids(add_bos, add_eos)
        texts = _as_texts(texts)
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [prefix + encoding.ids + suffix for encoding in encodings]

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        *,
        add_eos: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads texts into one array, with a mask of the real tokens.

        Padding uses `pad_id`, else `eos_id`, else 0; the mask is what tells them apart (a
        pad id may also be a real token, e.g. pad == eos), so never rebuild it from the ids.
        With `max_length`, every row has exactly `max_length` tokens (fixed shapes for jit):
        longer texts keep their first `max_length` tokens (bos included). Without it, rows
        are as long as the longest text.

        Args:
            texts: B texts.
            add_bos: As for `encode_many` (None: the checkpoint's convention).
            max_length: Fixed row length T, or None for the longest text.
            padding_side: 'right' (pad after the tokens, for training and scoring) or 'left'
                (pad before, so the last column is each text's last token, for generation);
                None: the tokenizer's `padding_side`.
            add_eos: As for `encode_many`.

        Returns:
            (tokens, attention_mask), both int32 [B, T]; the mask is 1 at real tokens.
        """
        padding_side = _check_padding_side(padding_side or self.padding_side)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}.")
        sequences = self.encode_many(texts, add_bos=add_bos, add_eos=add_eos)
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

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        **template_kwargs,
    ) -> list[int] | str:
        """Renders a conversation with the checkpoint's chat template, as transformers does.

        The template is Jinja, rendered by `jinja2` in a sandbox with the settings and helpers
        transformers gives it (`raise_exception`, `strftime_now`, a `tojson` that keeps
        non-ASCII); special tokens the template writes (e.g. `{{ bos_token }}`) are in the
        text, so tokenizing adds none.

        Args:
            messages: [{'role': ..., 'content': ...}, ...]; keys whose value is None are
                dropped, as transformers does.
            add_generation_prompt: End with the header of an assistant turn.
            tokenize: Return ids (else the rendered text).
            chat_template: A template to use instead of the tokenizer's.
            **template_kwargs: More variables for the template (e.g. `tools`).

        Returns:
            The ids, or the text when `tokenize` is False.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "This tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                "or chat_template.jinja); pass chat_template=."
            )
        if not messages:
            raise ValueError("Cannot apply a chat template to an empty conversation.")
        variables = {
            f"{role}_token": getattr(self, f"{role}_token")
            for role in _ROLES
            if getattr(self, f"{role}_token") is not None
        }
        variables.update(template_kwargs)
        text = chat_template_lib.render(
            template, messages, add_generation_prompt=add_generation_prompt, **variables
        )
        return self.encode(text, add_bos=False, add_eos=False) if tokenize else text

    def _special_ids(self, add_bos: bool | None, add_eos: bool | None):
        """(prefix, suffix) ids around each text: the template's, overridden where asked."""
        prefix, suffix = _template(self.backend)  # Read each time: the backend may change.
        # False: nothing before (after) the text, whether or not the template's special
        # tokens are named bos (eos) anywhere; True: the bos (eos) id there, once.
        if add_bos is not None:
            if not add_bos:
                prefix = []
            elif self._require("bos") not in prefix:  # Bos may also be eos: prefix only.
                prefix = [self.bos_id] + prefix
        if add_eos is not None:
            if not add_eos:
                suffix = []
            elif self._require("eos") not in suffix:
                suffix = suffix + [self.eos_id]
        return prefix, suffix

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

    def token_pieces(
        self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False
    ) -> list[str]:
        """The text of each token of a window, such that the pieces joined are its decoding.

        A character made of several tokens (the bytes of 'É' in byte-level BPE, byte-fallback
        tokens like <0xC3><0x89>) is the text of the token that completes it; the tokens
        before it in that character get ''. Characters cut by the window's edges (a window of
        a packed row can start or end inside one) are left out, with no U+FFFD for them: the
        joined pieces are `decode(ids)` without the U+FFFD run at either end (see
        `split_decoded`). U+FFFD inside the window (bytes that are no text wherever the
        window is cut) stays.

        Args:
            ids: The window's token ids (1-D).
            skip_special_tokens: Give special tokens '' (default: their text, e.g. '<s>').

        Returns:
            One string per token.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"token_pieces takes a 1-D window of ids, got shape {ids.shape}.")
        ids = ids.tolist()
        if len(ids) <= _BLOCK + _LOOKBACK:
            return self._pieces(ids, skip_special_tokens, True, True)
        # Long rows: blocks of tokens, each read after the _LOOKBACK tokens before it (what a
        # completed character or a clean-up reaches back into), so the work is linear in the
        # row's length, not quadratic (2048 tokens: 3.4 s in one piece). Checked against the
        # whole decoding; any decoder for which the context was too short gets the slow way.
        pieces = []
        for start in range(0, len(ids), _BLOCK):
            context = max(0, start - _LOOKBACK)
            stop = min(len(ids), start + _BLOCK)
            # A character cut by the block's end goes whole to the next block's token that
            # completes it (read with this one's end as context): its bytes here get ''.
            block = self._pieces(ids[context:stop], skip_special_tokens, context == 0, True)
            pieces += block[start - context :]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if "".join(pieces) == text.strip(REPLACEMENT):
            return pieces
        return self._pieces(ids, skip_special_tokens, True, True)

    def _pieces(self, ids: list[int], skip_special_tokens: bool, start: bool, end: bool):
        """`split_decoded` of the decodings of every prefix of `ids`."""
        # One decode call each: `decode_batch` costs 10x more on short rows (threads).
        decode = self.backend.decode
        prefixes = [decode(ids[: k + 1], skip_special_tokens) for k in range(len(ids))]
        return split_decoded(prefixes, strip_start=start, strip_end=end)

    def token_label(self, token_id: int) -> str:
        """One token's text on its own, for lists of tokens (e.g. logit effects).

        Its decoding, except for a token that is not whole characters by itself (a byte of a
        multi-byte character, in byte-level BPE or byte fallback): then its bytes, with those
        that are no character written as \\xNN ('\\xc3' for the first byte of 'É').
        """
        text = self.backend.decode([int(token_id)], skip_special_tokens=False)
        if REPLACEMENT not in text:
            return text
        data = self._token_bytes(int(token_id))
        return text if data is None else data.decode("utf-8", "backslashreplace")

    def _token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a byte-level or byte-fallback token stands for, or None if unknown."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            return None
        byte = _BYTE_TOKEN.fullmatch(token)
        if byte:
            return bytes([int(byte.group(1), 16)])
        # A byte-level token is spelled in GPT-2's alphabet of 256 characters (U+FFFD is not
        # one of them, so a token of that literal character is not taken for bytes).
        inverse = _byte_level_inverse()
        if all(char in inverse for char in token):
            return bytes(inverse[char] for char in token)
        return None

    def save(self, folder: str | os.PathLike) -> None:
        """Writes `tokenizer.json` and a `tokenizer_config.json` to `folder`.

        The folder loads back with `load(folder)`, and with Hugging Face
        `PreTrainedTokenizerFast.from_pretrained(folder)` / `AutoTokenizer.from_pretrained`
        (same ids, padding side and chat template: the special tokens around a text come
        from the tokenizer.json post-processor, for both).

        Each file is written atomically (`interp.paths.write_text`), tokenizer.json last: a
        folder with a tokenizer.json is complete.

        Args:
            folder: Local folder or URL (gs://bucket/model); created if missing.
        """
        folder = paths.resolve(folder)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # Hugging Face's default clean-up would rewrite ' .' as '.' when decoding.
            "clean_up_tokenization_spaces": False,
            # Informational (transformers 4 read them): the post-processor decides.
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "padding_side": self.padding_side,
            "model_max_length": int(1e30),  # Hugging Face's value for "no limit".
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        for role in _ROLES:
            token = getattr(self, f"{role}_token")
            if token is not None:
                config[f"{role}_token"] = token
        paths.write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))
        paths.write_text(folder / TOKENIZER_FILE, self.backend.to_str(pretty=True))

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


def split_decoded(
    prefixes: Sequence[str], *, strip_start: bool = True, strip_end: bool = True
) -> list[str]:
    """Per-token text of a window from the decodings of its prefixes.

    Works with any decoder (byte-level BPE, Metaspace with byte fallback, WordPiece's '##'
    and clean-up, `transformers` tokenizers): token k gets what decoding the first k + 1
    tokens adds to decoding the first k. Where it also changes the end of that text (a byte
    that completes a character whose first bytes decoded to U+FFFD; a clean-up that joins
    " '" to the next word), the changed end moves to token k, so the earlier tokens keep only
    what stays. The pieces joined are then the decoding of the whole window, except at its
    edges: a U+FFFD run that starts the window (the end of a character cut by the window's
    start) or ends it (the start of one cut by its end) is left out, so that a window cut
    anywhere shows no replacement characters for what it cut.

    Args:
        prefixes: prefixes[k] is the decoding of the window's first k + 1 tokens.
        strip_start: Leave out the U+FFFD run that starts the window (False: the window
            continues one already shown, so its start is no edge).
        strip_end: The same for the run that ends it.

    Returns:
        len(prefixes) strings.
    """
    pieces: list[str] = []
    text = ""  # "".join(pieces)
    for prefix in prefixes:
        common = len(os.path.commonprefix([text, prefix]))
        excess, k = len(text) - common, len(pieces) - 1
        while excess:  # Take the changed end back from the tokens that had it, last first.
            cut = min(excess, len(pieces[k]))
            pieces[k] = pieces[k][: len(pieces[k]) - cut]
            excess, k = excess - cut, k - 1
        pieces.append(prefix[common:])
        text = prefix
    if strip_start:
        _strip_edge(pieces, range(len(pieces)), str.lstrip)
    if strip_end:
        _strip_edge(pieces, range(len(pieces) - 1, -1, -1), str.rstrip)
    return pieces


@functools.lru_cache(maxsize=1)
def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for."""
    # The alphabet lists the 256 characters; their order is GPT-2's bytes_to_unicode().
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + i): b for i, b in enumerate(others)})
    return mapping


def _strip_edge(pieces: list[str], order: Iterable[int], strip) -> None:
    """Strips U+FFFD from the pieces in `order` until one has text left."""
    for k in order:
        pieces[k] = strip(pieces[k], REPLACEMENT)
        if pieces[k]:
            return


def load(folder: str | os.PathLike, **overrides) -> Tokenizer | None:
    """Loads the tokenizer of a Hugging Face style folder, or None if it has none.

    Reads `tokenizer.json`, and takes bos/eos/pad tokens from `tokenizer_config.json`, then
    `special_tokens_map.json` for any it did not name (either may be missing; a token may be
    a string or an AddedToken dict `{"content": ...}`). As transformers does: the pad token
    and padding side may also come from the padding `tokenizer.json` configures; the padding
    side defaults to the tokenizer class's (left for Llama and Gemma, else right); the chat
    template is `chat_template.jinja` if present, else the config's `chat_template` (a string,
    or a list of named templates, of which 'default' is taken).

    Args:
        folder: Local folder or URL (e.g. `gs://bucket/model`).
        **overrides: Tokenizer arguments that replace the folder's (`bos_token`,
            `eos_token`, `pad_token`, `padding_side`, `chat_template`).

    Returns:
        The tokenizer, or None when the folder has no `tokenizer.json`.
    """
    folder = os.fspath(paths.resolve(folder))  # A URL that pathlib collapsed is an error.
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.isfile(_join(root, TOKENIZER_FILE)):
        return None
    special: dict[str, str | None] = {f"{role}_token": None for role in _ROLES}
    configs = [_read_json(fs, root, folder, name) for name in (CONFIG_FILE, SPECIAL_TOKENS_FILE)]
    for config in configs:
        for key, value in special.items():
            if value is None:
                special[key] = _token_content(config.get(key))
    config = configs[0]
    backend = _read_backend(_join(folder, TOKENIZER_FILE))
    padding = backend.padding or {}  # Padding set in tokenizer.json, as transformers reads it.
    if special["pad_token"] is None:
        special["pad_token"] = padding.get("pad_token")
    arguments = dict(
        special,
        padding_side=config.get("padding_side")
        or str(padding.get("direction", "")).lower()
        or ("left" if config.get("tokenizer_class") in _LEFT_PADDING_CLASSES else "right"),
        chat_template=_chat_template(fs, root, config),
    )
    unknown = set(overrides) - set(arguments)
    if unknown:
        raise TypeError(f"load() got unexpected arguments {sorted(unknown)}.")
    return Tokenizer(backend, **(arguments | overrides))


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


def _read_backend(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer` in a tokenizer.json file (local or gs://)."""
    try:
        with fsspec.open(os.fspath(paths.resolve(path)), "rt", encoding="utf-8") as f:
            content = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"No tokenizer file at {path}; give the path of a tokenizer.json, or use "
            f"tokenizer.load(folder)."
        ) from e
    try:
        return tokenizers.Tokenizer.from_str(content)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files.
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e


def _template(backend: tokenizers.Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single text: (prefix, suffix)."""
    if backend.post_processor is None:
        return [], []
    # Templates are the same for every text; a probe that yields some token of its own
    # (sequence id 0, where added special tokens have None) shows where the text goes.
    for probe in ("a", "Hello", "the", "0", " ", "."):
        try:
            encoding = backend.encode(probe, add_special_tokens=True)
        except Exception:  # E.g. a word-level model without an unknown token.
            continue
        inside = [i for i, s in enumerate(encoding.sequence_ids) if s is not None]
        if inside:
            return encoding.ids[: inside[0]], encoding.ids[inside[-1] + 1 :]
    return backend.encode("", add_special_tokens=True).ids, []  # Nothing encodes: a prefix.


def _check_padding_side(side: str) -> str:
    """`side` if it is 'right' or 'left'."""
    if side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}.")
    return side


def _read_json(fs, root: str, folder: str, name: str) -> dict[str, Any]:
    """The JSON object in `root/name`, or {} if there is no such file."""
    path = _join(root, name)
    if not fs.isfile(path):
        return {}
    with fs.open(path, "r", encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_join(folder, name)} is not valid JSON: {e}") from e


def _chat_template(fs, root: str, config: Mapping[str, Any]) -> str | None:
    """The folder's chat template: chat_template.jinja first, then the config's entry."""
    path = _join(root, CHAT_TEMPLATE_FILE)
    if fs.isfile(path):
        with fs.open(path, "r", encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


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
