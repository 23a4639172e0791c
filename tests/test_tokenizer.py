"""Char and sentencepiece tokenizers: round trips, unknown characters, save and load."""

import numpy as np
import pytest
from conftest import CORPUS

from genai_jax.config import DataConfig, UserError
from genai_jax.tokenizer import (SPECIAL_TOKENS, ByteTokenizer, CharTokenizer, SentencePieceTokenizer, build_tokenizer,
                                 encode_chat, load_tokenizer)

TEXTS = [
    "To be, or not\n\nto be:\n",
    "  leading spaces\nand  double  spaces ",
    "\n",
    "trailing newlines\n\n",
]


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    return build_tokenizer(DataConfig(tokenizer="sentencepiece", sp_vocab_size=400), CORPUS, directory), directory


@pytest.mark.parametrize("text", TEXTS)
def test_char_round_trip(text):
    tokenizer = CharTokenizer.build(CORPUS + text)
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text)
    assert tokenizer.pad_id not in ids
    assert tokenizer.decode(ids) == text


def test_char_unknown_character_is_a_user_error():
    tokenizer = CharTokenizer.build("abc\n")
    with pytest.raises(UserError, match="'z'"):
        tokenizer.encode("abz")


def test_char_save_and_load(tmp_path):
    tokenizer = CharTokenizer.build(CORPUS)
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer) and loaded.vocab_size == tokenizer.vocab_size
    np.testing.assert_array_equal(loaded.encode(CORPUS), tokenizer.encode(CORPUS))


@pytest.mark.parametrize("text", TEXTS + ["unseen characters: é ü ☃ Zq"])
def test_sentencepiece_round_trip(sentencepiece, text):
    tokenizer, _ = sentencepiece
    ids = tokenizer.encode(text)
    assert tokenizer.pad_id not in ids
    assert np.all((ids >= 0) & (ids < tokenizer.vocab_size))
    assert tokenizer.decode(ids) == text


def test_sentencepiece_compresses_its_corpus(sentencepiece):
    tokenizer, _ = sentencepiece
    assert tokenizer.vocab_size == 400
    assert len(tokenizer.encode(CORPUS)) < len(CORPUS) / 2


def test_sentencepiece_save_and_load(sentencepiece, tmp_path):
    tokenizer, directory = sentencepiece
    loaded = load_tokenizer(directory)
    assert isinstance(loaded, SentencePieceTokenizer)
    np.testing.assert_array_equal(loaded.encode(CORPUS), tokenizer.encode(CORPUS))

    # An existing model given by data.tokenizer_path is copied into the new run directory.
    reused = build_tokenizer(
        DataConfig(tokenizer="sentencepiece", tokenizer_path=str(directory / "tokenizer.model")), "", tmp_path
    )
    assert (tmp_path / "tokenizer.model").read_bytes() == (directory / "tokenizer.model").read_bytes()
    np.testing.assert_array_equal(load_tokenizer(tmp_path).encode(CORPUS), reused.encode(CORPUS))


def test_load_from_a_directory_without_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_special_tokens_are_distinct_ids_that_no_text_spells(sentencepiece):
    from genai_jax.tokenizer import SPECIAL_TOKENS

    text = "".join(SPECIAL_TOKENS)
    for tokenizer in (CharTokenizer.build(CORPUS + text), sentencepiece[0]):
        special_ids = [tokenizer.special_id(token) for token in SPECIAL_TOKENS]
        assert special_ids[0] == tokenizer.pad_id == 0
        assert len(set(special_ids)) == len(SPECIAL_TOKENS)
        assert not set(tokenizer.encode(text).tolist()) & set(special_ids)


@pytest.mark.parametrize("text", ["", "reverse abc: cba", "na\u00efve \u20ac 5 \U0001F600\n\ttabs"])
def test_byte_round_trip_of_any_text(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert ids.min(initial=len(SPECIAL_TOKENS)) >= len(SPECIAL_TOKENS) and ids.max(initial=0) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text


def test_byte_decodes_specials_and_a_cut_sequence():
    tokenizer = ByteTokenizer()
    tokens, mask = encode_chat(tokenizer, [{"role": "user", "content": "\u20ac"},
                                           {"role": "assistant", "content": "ok"}])
    assert tokenizer.decode(tokens) == "<|user|>\u20ac<|end|><|assistant|>ok<|end|>"
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert tokenizer.decode(tokenizer.encode("\u20ac")[:2]) == "\ufffd"  # 2 of the sign's 3 bytes


def test_byte_save_and_load(tmp_path):
    built = build_tokenizer(DataConfig(tokenizer="byte"), "any corpus", tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.vocab_size == built.vocab_size == len(SPECIAL_TOKENS) + 256
    assert loaded.encode("\u00e9").tolist() == [len(SPECIAL_TOKENS) + 0xC3, len(SPECIAL_TOKENS) + 0xA9]
