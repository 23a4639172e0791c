"""Tokenizers: characters, or a sentencepiece model trained on the corpus. Both save into and load
from a run directory (`tokenizer.json`, plus `tokenizer.model` for sentencepiece).

Both reserve the same special tokens, which no text can spell: id 0 is padding, and the chat
template's role and end-of-turn markers (used from SFT on) are in the vocabulary from pretraining
on, so every stage of a pipeline shares one tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from etils import epath

from genai_jax.config import DataConfig, UserError

PAD = "<pad>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, SYSTEM, USER, ASSISTANT, END)
TOKENIZER_FILE = "tokenizer.json"
SP_MODEL_FILE = "tokenizer.model"


class CharTokenizer:
    """One id per character of the corpus (sorted), after the special tokens."""

    specials = SPECIAL_TOKENS

    def __init__(self, chars: str):
        self.chars = chars
        self.id_of = {c: i + len(self.specials) for i, c in enumerate(chars)}

    @classmethod
    def build(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.chars)

    @property
    def pad_id(self) -> int:
        return 0

    def special_id(self, token: str) -> int:
        return self.specials.index(token)

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self.id_of[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as err:
            raise UserError(f"character {err.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        offset = len(self.specials)
        return "".join(self.chars[i - offset] if i >= offset else self.specials[i] for i in np.asarray(ids).tolist())

    def save(self, directory: epath.Path) -> "CharTokenizer":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(json.dumps({"type": "char", "chars": self.chars}))
        return self


class SentencePieceTokenizer:
    """A sentencepiece model (BPE or unigram) with byte fallback, so any text encodes.

    Newlines are a piece of their own: sentencepiece reads its input line by line, so text is
    encoded a line at a time and the newline id is put back between lines.
    """

    def __init__(self, model: bytes):
        """`model`: a serialized sentencepiece model (a .model file's bytes)."""
        import sentencepiece as spm  # imported where used: char-tokenizer runs never load it

        self.model = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.newline_id = self.sp.piece_to_id("\n")

    @classmethod
    def train(cls, text: str, vocab_size: int, model_type: str) -> "SentencePieceTokenizer":
        import sentencepiece as spm  # imported where used: char-tokenizer runs never load it

        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            raise UserError("cannot train a sentencepiece tokenizer on an empty corpus")
        with tempfile.TemporaryDirectory() as tmp:
            prefix = str(Path(tmp) / "sp")
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(lines),
                    model_prefix=prefix,
                    vocab_size=vocab_size,
                    model_type=model_type,
                    character_coverage=1.0,
                    # byte pieces need 256 slots beyond the specials, unk, "\n" and every corpus character
                    byte_fallback=vocab_size >= 256 + len(SPECIAL_TOKENS) + 2 + len(set(text)),
                    pad_id=0,
                    unk_id=1,
                    bos_id=-1,
                    eos_id=-1,
                    control_symbols=list(SPECIAL_TOKENS[1:]),  # never produced from text
                    user_defined_symbols=["\n"],
                    normalization_rule_name="identity",
                    remove_extra_whitespaces=False,
                    split_digits=True,
                    input_sentence_size=2_000_000,
                    shuffle_input_sentence=True,
                    minloglevel=2,
                )
            except RuntimeError as err:
                raise UserError(f"sentencepiece training failed: {err}") from None
            return cls(Path(prefix + ".model").read_bytes())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return 0

    def special_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def encode(self, text: str) -> np.ndarray:
        pieces: list[int] = []
        for i, ids in enumerate(self.sp.encode(text.split("\n"))):
            if i:
                pieces.append(self.newline_id)
            pieces.extend(ids)
        return np.asarray(pieces, dtype=np.int32)

    def decode(self, ids) -> str:
        lines, current = [], []
        for i in np.asarray(ids).tolist():
            if i == self.newline_id:
                lines.append(current)
                current = []
            else:
                current.append(i)
        lines.append(current)
        return "\n".join(self.sp.decode(line) for line in lines)

    def save(self, directory: epath.Path) -> "SentencePieceTokenizer":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SP_MODEL_FILE).write_bytes(self.model)
        (directory / TOKENIZER_FILE).write_text(json.dumps({"type": "sentencepiece", "model": SP_MODEL_FILE}))
        return self


Tokenizer = CharTokenizer | SentencePieceTokenizer


def build_tokenizer(cfg: DataConfig, text: str, directory: epath.Path) -> Tokenizer:
    """A tokenizer for `text` as the data config asks, saved into `directory`."""
    if cfg.tokenizer == "char":
        tokenizer = CharTokenizer.build(text)
    elif cfg.tokenizer_path:
        model_file = epath.Path(cfg.tokenizer_path)
        if not model_file.is_file():
            raise UserError(f"data.tokenizer_path: {cfg.tokenizer_path} does not exist")
        tokenizer = SentencePieceTokenizer(model_file.read_bytes())
    else:
        tokenizer = SentencePieceTokenizer.train(text, cfg.sp_vocab_size, cfg.sp_model_type)
    return tokenizer.save(directory)


def load_tokenizer(directory: epath.Path) -> Tokenizer:
    path = directory / TOKENIZER_FILE
    if not path.exists():
        raise UserError(f"{directory}: no {TOKENIZER_FILE}")
    spec = json.loads(path.read_text())
    if spec["type"] == "char":
        return CharTokenizer(spec["chars"])
    return SentencePieceTokenizer((directory / spec["model"]).read_bytes())


# The chat template: every message is its role token, its content and the end-of-turn token,
#     <|system|>You are terse.<|end|><|user|>reverse abc<|end|><|assistant|>cba<|end|>
# with no other separators. A prompt for generation ends with the assistant's role token, and the
# model answers until it emits <|end|>.
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def encode_chat(tokenizer: Tokenizer, messages: list[dict], generation_prompt: bool = False):
    """(tokens, loss_mask) of a conversation in the chat template. loss_mask is 1 exactly on the
    assistant's content tokens and their end-of-turn token: what SFT learns to produce."""
    tokens: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    end = tokenizer.special_id(END)
    for message in messages:
        content = tokenizer.encode(message["content"])
        learned = 1.0 if message["role"] == "assistant" else 0.0
        tokens += [np.array([tokenizer.special_id(ROLE_TOKENS[message["role"]])], np.int32), content,
                   np.array([end], np.int32)]
        mask += [np.zeros(1, np.float32), np.full(len(content) + 1, learned, np.float32)]
    if generation_prompt:
        tokens.append(np.array([tokenizer.special_id(ASSISTANT)], np.int32))
        mask.append(np.zeros(1, np.float32))
    return np.concatenate(tokens), np.concatenate(mask)


def decode_response(tokenizer: Tokenizer, ids) -> tuple[str, bool]:
    """(text, ended): the generated tokens up to the first end-of-turn, and whether there was one."""
    ids = np.asarray(ids).tolist()
    end = tokenizer.special_id(END)
    ended = end in ids
    if ended:
        ids = ids[: ids.index(end)]
    specials = {tokenizer.special_id(token) for token in SPECIAL_TOKENS}
    return tokenizer.decode([i for i in ids if i not in specials]), ended
