"""Tokenizers: characters, UTF-8 bytes, a sentencepiece model trained on the corpus, or a Hugging
Face model's own `tokenizer.json`. All save into and load from a run directory (`tokenizer.json`, plus
`tokenizer.model` for sentencepiece, `hf_tokenizer.json` and the model's token settings for hf).

The first three reserve the same special tokens, which no text can spell: id 0 is padding, and the
chat template's role and end-of-turn markers (used from SFT on) are in the vocabulary from
pretraining on, so every stage of a pipeline shares one tokenizer. A Hugging Face tokenizer has
the model's own special tokens instead (its end-of-sequence ids, `eos_ids`).
"""

from __future__ import annotations

import functools
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
HF_TOKENIZER_FILE = "hf_tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "hf_tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class _SpecialsFirst:
    """The special tokens at ids 0 to 4 (padding first), before the tokenizer's own ids."""

    specials = SPECIAL_TOKENS

    @property
    def pad_id(self) -> int:
        return 0

    def special_id(self, token: str) -> int:
        return self.specials.index(token)


class CharTokenizer(_SpecialsFirst):
    """One id per character of the corpus (sorted), after the special tokens."""

    def __init__(self, chars: str):
        self.chars = chars
        self.id_of = {c: i + len(self.specials) for i, c in enumerate(chars)}

    @classmethod
    def build(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self.id_of[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as err:
            raise UserError(f"character {err.args[0]!r} is not in the tokenizer's vocabulary (a char tokenizer "
                            "has only its pretraining corpus's characters; data.tokenizer=byte encodes any "
                            "text)") from None

    def decode(self, ids) -> str:
        offset = len(self.specials)
        return "".join(self.chars[i - offset] if i >= offset else self.specials[i] for i in np.asarray(ids).tolist())

    def save(self, directory: epath.Path) -> "CharTokenizer":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(json.dumps({"type": "char", "chars": self.chars}))
        return self


class ByteTokenizer(_SpecialsFirst):
    """UTF-8 bytes, one id each after the special tokens: any text encodes, whatever corpus the
    tokenizer saw first (a fine-tuning file may hold characters pretraining never met)."""

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + len(self.specials)

    def decode(self, ids) -> str:
        """The text of `ids`; special tokens as their names, a cut UTF-8 sequence as U+FFFD."""
        offset, pieces, run = len(self.specials), [], bytearray()
        for i in np.asarray(ids).tolist():
            if i >= offset:
                run.append(i - offset)
                continue
            pieces += [run.decode("utf-8", errors="replace"), self.specials[i]]
            run = bytearray()
        return "".join(pieces) + run.decode("utf-8", errors="replace")

    def save(self, directory: epath.Path) -> "ByteTokenizer":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(json.dumps({"type": "byte"}))
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


def _read_json(path: epath.Path) -> dict:
    """A JSON file's object ({} when the file is absent), naming the file if it is not JSON."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def _token_ids(value, tokenizer) -> list[int]:
    """Ids of a config's special-token value: an id, a list of ids, a token string, or a
    serialized AddedToken ({"content": ...}); tokens the vocabulary lacks are left out."""
    if value is None:
        return []
    if isinstance(value, list):
        return [i for item in value for i in _token_ids(item, tokenizer)]
    if isinstance(value, int):
        return [value]
    token_id = tokenizer.token_to_id(value["content"] if isinstance(value, dict) else value)
    return [] if token_id is None else [token_id]


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


class HFTokenizer:
    """A Hugging Face `tokenizer.json` run by the `tokenizers` library, with the model's special
    token ids: `eos_ids` (every end-of-sequence id the model, generation and tokenizer configs
    name: a chat model may stop on several), `bos_id` and `pad_id`, which is the model's pad
    token, else its first end-of-sequence token, else 0 (padding is always masked out).

    Text is encoded without added special tokens (no BOS): the stages place the tokens they need.
    Decoding is the tokenizer's own decoder, without transformers' optional space clean-up.
    """

    def __init__(self, tokenizer_json: str, special: dict, tokenizer_config: dict | None = None):
        """`special`: {"eos_ids": [...], "bos_id": id or None, "pad_id": id or None};
        `tokenizer_config`: the model's tokenizer_config.json, kept for export."""
        from tokenizers import Tokenizer as RustTokenizer  # imported where used: other kinds never load it

        self.tokenizer_json = tokenizer_json
        self.tokenizer = RustTokenizer.from_str(tokenizer_json)
        self.special = special
        self.tokenizer_config = tokenizer_config

    @classmethod
    def from_path(cls, path: epath.Path) -> "HFTokenizer":
        """The tokenizer of a Hugging Face model folder (or of a tokenizer.json file in one):
        tokenizer.json, with the special tokens that config.json, generation_config.json and
        tokenizer_config.json beside it name, and the chat template of tokenizer_config.json or
        chat_template.jinja."""
        folder = path if path.is_dir() else path.parent
        path = folder / "tokenizer.json" if path.is_dir() else path
        if not path.exists():
            raise UserError(f"{path}: no such file (a Hugging Face fast tokenizer's tokenizer.json is needed)")
        config = _read_json(folder / "tokenizer_config.json")
        if (folder / CHAT_TEMPLATE_FILE).exists():  # where transformers >= 4.43 saves the template
            config["chat_template"] = (folder / CHAT_TEMPLATE_FILE).read_text()
        tokenizer = cls(path.read_text(), {}, config or None)
        model, generation = _read_json(folder / "config.json"), _read_json(folder / "generation_config.json")
        tok_config = tokenizer.tokenizer_config or {}
        rust = tokenizer.tokenizer
        ids = {
            name: _unique(_token_ids(model.get(f"{name}_token_id"), rust)
                          + _token_ids(generation.get(f"{name}_token_id"), rust)
                          + _token_ids(tok_config.get(f"{name}_token"), rust))
            for name in ("eos", "bos", "pad")
        }
        tokenizer.special = {"eos_ids": ids["eos"], "bos_id": (ids["bos"] or [None])[0],
                             "pad_id": (ids["pad"] or [None])[0]}
        return tokenizer

    def with_chat_tokens(self) -> "HFTokenizer":
        """This tokenizer with this project's chat template's role and end-of-turn tokens added as
        special tokens (after the model's own ids), for a model that has no chat template."""
        from tokenizers import AddedToken

        grown = type(self)(self.tokenizer_json, self.special, self.tokenizer_config)
        grown.tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                            for token in (SYSTEM, USER, ASSISTANT, END)])
        grown.tokenizer_json = grown.tokenizer.to_str()
        return grown

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_ids(self) -> list[int]:
        return list(self.special["eos_ids"])

    @property
    def pad_id(self) -> int:
        if self.special["pad_id"] is not None:
            return self.special["pad_id"]
        return self.eos_ids[0] if self.eos_ids else 0

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template (tokenizer_config.json's `chat_template`; of a list of
        named templates, the one named "default"), or None."""
        template = (self.tokenizer_config or {}).get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (role markers, end of turn, end of text)."""
        return frozenset(i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special)

    @functools.cached_property
    def template_stop_ids(self) -> tuple[int, ...]:
        """`stop_ids` under the model's chat template, found once by rendering a probe turn."""
        probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
        tokens, mask = _encode_template_chat(self, probe, False)
        closing = [int(i) for i in tokens[mask > 0] if int(i) in self.special_ids]
        ids = tuple(dict.fromkeys(closing + self.eos_ids))
        if not ids:
            raise UserError("the model's chat template closes an assistant turn with no special token and the "
                            "model names no eos_token_id: generation could not stop")
        return ids

    def special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"the Hugging Face tokenizer has no token {token!r} and its tokenizer_config.json no "
                            "chat_template: add a chat_template to the model folder's tokenizer_config.json "
                            "before import-hf")
        return token_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

    def save(self, directory: epath.Path) -> "HFTokenizer":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / HF_TOKENIZER_FILE).write_text(self.tokenizer_json)
        spec = {"type": "hf", "model": HF_TOKENIZER_FILE, **self.special}
        if self.tokenizer_config is not None:
            (directory / HF_TOKENIZER_CONFIG_FILE).write_text(json.dumps(self.tokenizer_config, indent=2))
            spec["config"] = HF_TOKENIZER_CONFIG_FILE
        (directory / TOKENIZER_FILE).write_text(json.dumps(spec))
        return self


Tokenizer = CharTokenizer | ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def build_tokenizer(cfg: DataConfig, text: str, directory: epath.Path) -> Tokenizer:
    """A tokenizer for `text` as the data config asks, saved into `directory`."""
    if cfg.tokenizer == "char":
        tokenizer = CharTokenizer.build(text)
    elif cfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    elif cfg.tokenizer == "hf":
        if not cfg.tokenizer_path:
            raise UserError("data.tokenizer=hf needs data.tokenizer_path (a tokenizer.json or a Hugging Face model folder)")
        tokenizer = HFTokenizer.from_path(epath.Path(cfg.tokenizer_path))
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
    if spec["type"] == "byte":
        return ByteTokenizer()
    if spec["type"] == "hf":
        config = json.loads((directory / spec["config"]).read_text()) if "config" in spec else None
        special = {name: spec[name] for name in ("eos_ids", "bos_id", "pad_id")}
        return HFTokenizer((directory / spec["model"]).read_text(), special, config)
    return SentencePieceTokenizer((directory / spec["model"]).read_bytes())


# The chat template: every message is its role token, its content and the end-of-turn token,
#     <|system|>You are terse.<|end|><|user|>reverse abc<|end|><|assistant|>cba<|end|>
# with no other separators. A prompt for generation ends with the assistant's role token, and the
# model answers until it emits <|end|>. A Hugging Face tokenizer with a chat template uses the
# model's own template instead (`_encode_template_chat`).
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# The same template in Hugging Face's Jinja form, written into an export's tokenizer_config.json
# so that other tools (transformers' apply_chat_template, vLLM) render chats as the model learned.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _uses_model_template(tokenizer: Tokenizer) -> bool:
    return isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is not None


def encode_chat(tokenizer: Tokenizer, messages: list[dict], generation_prompt: bool = False):
    """(tokens, loss_mask) of a conversation in the chat template. loss_mask is 1 exactly on the
    assistant's content tokens and their end-of-turn token(s): what SFT learns to produce."""
    if _uses_model_template(tokenizer):
        return _encode_template_chat(tokenizer, messages, generation_prompt)
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


def _render(tokenizer: "HFTokenizer", messages: list[dict], generation_prompt: bool) -> str:
    """The conversation as text in the model's chat template, rendered by transformers (the hf
    extra), which implements Hugging Face's template environment."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        raise UserError("this run's tokenizer has a chat template, which needs transformers: "
                        "pip install 'genai-jax[hf]'") from None
    config = tokenizer.tokenizer_config or {}
    tokens = {name: value["content"] if isinstance(value, dict) else value
              for name in ("bos_token", "eos_token", "pad_token", "unk_token")
              if isinstance(value := config.get(name), (str, dict))}
    try:
        rendered, _ = render_jinja_template([messages], chat_template=tokenizer.chat_template,
                                            add_generation_prompt=generation_prompt, **tokens)
    except Exception as err:  # the template's own raise_exception(), or a Jinja error
        raise UserError(f"the model's chat template refused the conversation: {err}") from None
    return rendered[0]


def _encode_template_chat(tokenizer: "HFTokenizer", messages: list[dict], generation_prompt: bool):
    """(tokens, loss_mask) in the model's template. The text is rendered a prefix at a time, up to
    each assistant turn's start (the template's generation prompt) and up to its end, and each
    piece is encoded on its own, so a prompt encodes exactly as it does for generation; the mask
    is 1 on the assistant pieces (the content and the template's end of turn)."""
    pieces, mask, done = [], [], ""

    def add(text: str, learned: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise UserError("the model's chat template does not render a conversation as a prefix of its "
                            "continuation (e.g. it rewrites earlier turns), so prompts and responses cannot be split")
        ids = tokenizer.encode(text[len(done):])
        pieces.append(ids)
        mask.append(np.full(len(ids), float(learned), np.float32))
        done = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            add(_render(tokenizer, messages[:i], True), False)
        add(_render(tokenizer, messages[: i + 1], False), message["role"] == "assistant")
    if generation_prompt:
        add(_render(tokenizer, messages, True), False)
    return np.concatenate(pieces).astype(np.int32), np.concatenate(mask)


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens that end an assistant's turn: <|end|> in this project's template; in a model's
    own template the special tokens that close an assistant turn (e.g. <|im_end|>, <|eot_id|>)
    and the model's end-of-sequence ids (config.json's eos_token_id may be a list)."""
    if _uses_model_template(tokenizer):
        return tokenizer.template_stop_ids
    return (tokenizer.special_id(END),)


def decode_response(tokenizer: Tokenizer, ids) -> tuple[str, bool]:
    """(text, ended): the generated tokens up to the first end of turn (`stop_ids`), special tokens
    left out, and whether there was one."""
    ids = np.asarray(ids).tolist()
    stops = set(stop_ids(tokenizer))
    end = next((position for position, i in enumerate(ids) if i in stops), None)
    if end is not None:
        ids = ids[:end]
    if isinstance(tokenizer, HFTokenizer):
        specials = tokenizer.special_ids
    else:
        specials = {tokenizer.special_id(token) for token in SPECIAL_TOKENS}
    return tokenizer.decode([i for i in ids if i not in specials]), end is not None
