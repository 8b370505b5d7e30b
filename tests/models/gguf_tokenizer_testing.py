"""GGUF files with a Hugging Face tokenizer's vocabulary, written as llama.cpp's converter does.

    write_gguf(tmp_path / "tok.gguf", folder, architecture="qwen2", pre="qwen2")

`write_tokenizer` follows convert_hf_to_gguf.py: byte-level BPE folders through
`get_vocab_base` + `_set_vocab_gpt2` (the vocabulary from `transformers.AutoTokenizer`, added
tokens CONTROL when special or special-looking, else USER_DEFINED and pre-normalized), folders
with a SentencePiece `tokenizer.model` through `_create_vocab_sentencepiece` +
`_set_vocab_sentencepiece` (pieces, scores and types from `sentencepiece`, then the
`added_tokens_decoder` of tokenizer_config.json); bos/eos/pad/unk ids, add_bos/add_eos, merges
and the chat template come from the `gguf` package's own `gguf.SpecialVocab`, as in the
converter. The pre-tokenizer name is given (the converter finds it by hashing the ids of a
probe text, a table only real checkpoints are in).
"""

import json
import pathlib

import gguf
import transformers


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's `does_token_look_special`: added tokens marked CONTROL anyway."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def write_tokenizer(
    writer: gguf.GGUFWriter, folder: str | pathlib.Path, *, pre: str | None = None
) -> None:
    """Adds the tokenizer of a Hugging Face folder to `writer`'s metadata.

    Args:
        writer: The writer (its architecture set; nothing written to the file yet).
        folder: A folder with a SentencePiece `tokenizer.model` (written as tokenizer model
            'llama'), else a byte-level BPE tokenizer (tokenizer.json or vocab.json +
            merges.txt; model 'gpt2').
        pre: `tokenizer.ggml.pre` for a byte-level BPE (e.g. 'gpt-2', 'llama-bpe', 'qwen2',
            'smollm'); None for SentencePiece, whose pre is always 'default'.

    Raises:
        ValueError: A byte-level folder without `pre`, or `pre` given for SentencePiece.
    """
    folder = pathlib.Path(folder)
    if (folder / "tokenizer.model").is_file():
        if pre is not None:
            raise ValueError("A SentencePiece vocabulary's pre-tokenizer is 'default'; no pre=.")
        _write_sentencepiece(writer, folder)
    else:
        if pre is None:
            raise ValueError(
                "A byte-level BPE needs pre= (llama.cpp's tokenizer.ggml.pre, e.g. 'gpt-2')."
            )
        _write_byte_level(writer, folder, pre)


def write_gguf(
    path: str | pathlib.Path,
    folder: str | pathlib.Path,
    *,
    architecture: str,
    pre: str | None = None,
) -> None:
    """Writes a vocabulary-only GGUF file (metadata, no tensors) with `folder`'s tokenizer."""
    writer = gguf.GGUFWriter(str(path), architecture)
    write_tokenizer(writer, folder, pre=pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_byte_level(writer: gguf.GGUFWriter, folder: pathlib.Path, pre: str) -> None:
    """get_vocab_base + _set_vocab_gpt2."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(max(vocab.values()) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if token not in added:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
            continue
        # llama.cpp matches added tokens in raw text: the converter stores them as text.
        if not decoder[i].normalized:
            token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
        if decoder[i].special or looks_special(token):
            types.append(gguf.TokenType.CONTROL)
        else:
            token = token.replace("\u2581", " ")
            types.append(gguf.TokenType.USER_DEFINED)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)


def _write_sentencepiece(writer: gguf.GGUFWriter, folder: pathlib.Path) -> None:
    """_create_vocab_sentencepiece + _set_vocab_sentencepiece (+ Gemma's add_space_prefix)."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    model = folder / "tokenizer.model"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tokens, scores, types = [], [], []
    for i in range(processor.vocab_size()):
        tokens.append(processor.IdToPiece(i))
        scores.append(processor.GetScore(i))
        kind = gguf.TokenType.NORMAL  # User-defined pieces too, as the converter has them.
        if processor.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif processor.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif processor.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif processor.IsByte(i):
            kind = gguf.TokenType.BYTE
        types.append(kind)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        i, token = int(key), entry["content"]
        if entry.get("special") or looks_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            token = token.replace("\u2581", " ")  # "pre-normalize user-defined spaces"
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i], scores[i] = token, -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    if not proto.normalizer_spec.add_dummy_prefix:  # Gemma's converter writes False.
        writer.add_add_space_prefix(False)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
