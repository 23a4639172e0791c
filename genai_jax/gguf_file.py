"""A GGUF file (llama.cpp's format) read as a Hugging Face model folder would be: the config.json
fields its metadata implies, its tensors under Hugging Face names, dequantized to float32 on the
host one at a time, and a `tokenizer.json` rebuilt from the vocabulary and merges it stores, with
its chat template. `hf.import_hf` then treats it like any folder (docs/hf.md).

Reading needs the `gguf` package (the `real` extra). Two conventions of llama.cpp's converter are
undone here: a tensor's shape is stored innermost axis first (so [in, out] lists as [out, in]'s
reverse, and the data comes back as torch's [out, in]), and for the `llama` architecture the rows
of q and k are permuted per head from the half-rotation rotary layout to the interleaved one
(`unpermute_rotary` restores the half-rotation layout this model and transformers use).
"""

from __future__ import annotations

import os

import numpy as np

from genai_jax.config import UserError

ARCHITECTURES = ("llama", "qwen2")
"""GGUF architectures read: both are Hugging Face families `hf.model_config` supports."""

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4
"""llama.cpp's token types (tokenizer.ggml.token_type) that matter here."""

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as the original models' tokenizer.json files split
# text before byte-level BPE (None: GPT-2's own split, which byte-level BPE applies itself).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": ("gpt2", None),
    "default": ("gpt2", None),
    "smollm": ("digits", None),  # SmolLM2: every digit its own piece, then GPT-2's split
    "starcoder": ("digits", None),
    "llama-bpe": ("split", _LLAMA3_SPLIT),
    "llama3": ("split", _LLAMA3_SPLIT),
    "qwen2": ("split", _QWEN2_SPLIT),
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("reading a .gguf file needs the gguf package: pip install 'genai-jax[real]'") from None
    return gguf


class GGUFFile:
    """One GGUF file's metadata (`fields`: key -> value) and tensors (read lazily)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise UserError(f"--from {self.path}: no such file")
        gguf = _gguf()
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as err:  # the reader's own ValueError for a bad magic number or a truncated file
            raise UserError(f"{self.path}: not a readable GGUF file ({err})") from None
        self.fields = {key: field.contents() for key, field in self.reader.fields.items()}
        self.architecture = self.fields.get("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"{self.path}: general.architecture {self.architecture!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")

    def arch(self, key: str, default=None):
        """The architecture's own metadata key (`llama.block_count`, ...)."""
        value = self.fields.get(f"{self.architecture}.{key}", default)
        if value is None:
            raise UserError(f"{self.path}: no {self.architecture}.{key} in its metadata")
        return value


def hf_config(file: GGUFFile) -> dict:
    """The config.json (transformers' field names) that the file's metadata implies; the vocabulary
    size is the tokenizer's when the architecture does not state it, and the embedding is tied
    when the file has no separate output matrix."""
    names = {t.name for t in file.reader.tensors}
    heads = file.arch("attention.head_count")
    return {
        "model_type": file.architecture,
        "vocab_size": file.arch("vocab_size", len(file.fields.get("tokenizer.ggml.tokens", []))),
        "hidden_size": file.arch("embedding_length"),
        "intermediate_size": file.arch("feed_forward_length"),
        "num_hidden_layers": file.arch("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": file.arch("attention.head_count_kv", heads),
        "max_position_embeddings": file.arch("context_length"),
        "rms_norm_eps": float(file.arch("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(file.arch("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": file.architecture == "llama" and "blk.0.attn_q.bias" in names,
        "mlp_bias": file.architecture == "llama" and "blk.0.ffn_up.bias" in names,
    }


_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str | None:
    """The Hugging Face tensor name of a llama/qwen2 GGUF tensor name (None: no such tensor,
    e.g. `rope_freqs`, which the config's rope theta already gives)."""
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{kind}"
    return None


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head reordering of q or k rows ([out, ...], out = heads * head_dim):
    it interleaves each head's two rotary halves (row 2i from i, 2i+1 from i + head_dim / 2)."""
    per_head = weight.shape[0] // heads
    return (weight.reshape(heads, per_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def tensors(file: GGUFFile, config: dict):
    """(shapes, where, read) of the file's tensors under Hugging Face names: each shape, the file
    and GGUF name a tensor comes from (for errors), and `read(name)`, the tensor as float32 [out,
    in] as torch stores it (q and k un-permuted for `llama`)."""
    gguf = _gguf()
    by_name = {}
    for tensor in file.reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name != "rope_freqs.weight":
                raise UserError(f"{file.path}: tensor {tensor.name} has no place in a {file.architecture} model")
            continue
        by_name[name] = tensor
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    def read(name: str) -> np.ndarray:
        tensor = by_name[name]
        weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        weight = weight.reshape(tuple(reversed([int(n) for n in tensor.shape])))
        projection = name.split(".")[-2]
        if file.architecture == "llama" and projection in heads:
            weight = unpermute_rotary(weight, heads[projection])
        return weight

    shapes = {name: tuple(reversed([int(n) for n in t.shape])) for name, t in by_name.items()}
    return shapes, lambda name: f"{os.path.basename(file.path)} ({by_name[name].name})", read


def tokenizer_json(file: GGUFFile) -> str:
    """A `tokenizer.json` for the file's byte-level BPE vocabulary (`tokenizer.ggml.model` gpt2):
    its tokens and merges, the pre-tokenizer its `tokenizer.ggml.pre` names, control tokens as
    special added tokens and user-defined ones as plain added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = file.fields.get("tokenizer.ggml.model"), file.fields.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"{file.path}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{file.path}: tokenizer.ggml.pre {pre!r} is not supported "
                        f"(supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = file.fields["tokenizer.ggml.tokens"]
    types = file.fields.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in file.fields.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                     ignore_merges=pre in ("llama-bpe", "llama3")))
    split, regex = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split != "split")
    if split == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split == "split":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == TOKEN_USER_DEFINED])
    return tokenizer.to_str()


def special_tokens(file: GGUFFile) -> tuple[dict, dict]:
    """(the `HFTokenizer` special ids, a tokenizer_config.json): bos/eos/pad/unk ids and tokens,
    and the chat template the file carries."""
    tokens = file.fields["tokenizer.ggml.tokens"]
    ids = {name: file.fields.get(f"tokenizer.ggml.{key}") for name, key in
           (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"), ("unk", "unknown_token_id"))}
    eos_ids = [ids["eos"]] + [file.fields[key] for key in ("tokenizer.ggml.eot_token_id",) if key in file.fields]
    special = {"eos_ids": list(dict.fromkeys(i for i in eos_ids if i is not None)), "bos_id": ids["bos"],
               "pad_id": ids["pad"]}
    config = {f"{name}_token": tokens[i] for name, i in ids.items() if i is not None}
    if "tokenizer.chat_template" in file.fields:
        config["chat_template"] = file.fields["tokenizer.chat_template"]
    return special, config


def quantization(file: GGUFFile) -> list[str]:
    """The tensor types the file stores (e.g. F32, Q4_1, Q8_0), for the import's record."""
    return sorted({t.tensor_type.name for t in file.reader.tensors})
