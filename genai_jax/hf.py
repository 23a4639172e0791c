"""Hugging Face checkpoints in and out: `import_hf` turns a local model folder (GPT-2, Llama,
Qwen2) into an ordinary run directory, `export_hf` writes a run's policy as a folder that
`transformers` loads.

Both directions go through one table per family, `links`: each of this model's parameters with
the checkpoint tensors it is made of and the two functions between them (transpose a
`torch.nn.Linear` weight, fuse q|k|v or gate|up into one kernel, split them again). The model
config comes from config.json field by field (`model_config`), refusing any field this model
cannot express; see docs/hf.md.

Rotary embeddings need no permutation: `model.rotate` uses Hugging Face Llama's half-rotation
layout (dimension i pairs with i + head_dim / 2) and the same frequencies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax.traverse_util import flatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from genai_jax import gguf_file, rundir
from genai_jax.checkpoint import Checkpointer
from genai_jax.config import DataConfig, ModelConfig, RunConfig, UserError
from genai_jax.distributed import say
from genai_jax.model import grow_vocab, init_params, mlp_hidden
from genai_jax.parallel import Mesh, host_peak_mib
from genai_jax.reward import NORMALIZATION_FILE, load_normalization
from genai_jax.runs import load_saved, load_trained, with_vocab
from genai_jax.tokenizer import CHAT_TEMPLATE, END, HFTokenizer

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PEFT's tensor names start with: the wrapped model's module path follows."""
FAMILIES = ("gpt2", "llama", "qwen2")

# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


class _Fields:
    """The fields of a config.json, each read with its family's default; `where` names the file
    in errors."""

    def __init__(self, hf: dict, where: str, defaults: dict):
        self.hf, self.where, self.defaults = hf, where, defaults

    def __getitem__(self, name: str):
        if name in self.hf and self.hf[name] is not None:
            return self.hf[name]
        if name in self.defaults:
            return self.defaults[name]
        raise UserError(f"{self.where}: no {name}")

    def require(self, name: str, ok: bool, why: str) -> None:
        if not ok:
            raise UserError(f"{self.where}: {name}={self.hf.get(name, self.defaults.get(name))!r} is not supported ({why})")


# The defaults of transformers' config classes, for fields a config.json may leave out.
_GPT2_DEFAULTS = {"n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                  "tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                  "add_cross_attention": False, "initializer_range": 0.02}
_LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
                   "mlp_bias": False, "head_dim": None, "num_key_value_heads": None, "rope_theta": 10000.0,
                   "rope_scaling": None, "rope_parameters": None, "initializer_range": 0.02,
                   "use_sliding_window": False, "layer_types": None, "max_position_embeddings": 2048}
_GELU = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


def _gpt2_config(f: _Fields) -> ModelConfig:
    d_model = f["n_embd"]
    f.require("activation_function", f["activation_function"] in _GELU, f"one of {', '.join(_GELU)}")
    f.require("scale_attn_weights", f["scale_attn_weights"], "attention is always scaled by 1/sqrt(head_dim)")
    f.require("scale_attn_by_inverse_layer_idx", not f["scale_attn_by_inverse_layer_idx"], "no per-layer scaling")
    f.require("add_cross_attention", not f["add_cross_attention"], "decoder-only")
    return ModelConfig(
        vocab_size=f["vocab_size"], n_layer=f["n_layer"], n_head=f["n_head"], d_model=d_model,
        context_len=f.hf.get("n_positions") or f["n_ctx"], mlp_hidden=f["n_inner"] or 4 * d_model, bias=True,
        norm="layernorm", norm_eps=f["layer_norm_epsilon"], positions="learned", mlp="gelu",
        gelu_approximate=_GELU[f["activation_function"]], tie_embeddings=f["tie_word_embeddings"],
        init_std=f["initializer_range"],
    )


def _rope_theta(f: _Fields) -> float:
    """The rotary base, refusing any rope scaling: `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5) must be absent or of the default type."""
    for name in ("rope_scaling", "rope_parameters"):
        scaling = f[name] or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        f.require(name, kind == "default", f"rope type {kind!r}: only unscaled rotary embeddings are implemented")
    return float((f["rope_parameters"] or {}).get("rope_theta", f["rope_theta"]))


def _llama_config(f: _Fields, family: str) -> ModelConfig:
    d_model, heads = f["hidden_size"], f["num_attention_heads"]
    kv_heads = f["num_key_value_heads"] or heads
    f.require("num_key_value_heads", heads % kv_heads == 0, "it must divide num_attention_heads")
    f.require("hidden_act", f["hidden_act"] == "silu", "SwiGLU uses silu")
    f.require("head_dim", f["head_dim"] in (None, d_model // heads), "head_dim must be hidden_size / num_attention_heads")
    f.require("use_sliding_window", not f["use_sliding_window"], "attention is always full")
    f.require("layer_types", set(f["layer_types"] or ["full_attention"]) == {"full_attention"},
              "attention is always full")
    if family == "qwen2":  # Qwen2 has biases on q, k and v only
        bias, qkv_bias = False, True
    else:  # Llama's attention_bias covers o_proj too, which shares this model's `bias` with the MLP
        f.require("mlp_bias", f["mlp_bias"] == f["attention_bias"], "mlp_bias must equal attention_bias")
        bias = qkv_bias = f["attention_bias"]
    return ModelConfig(
        vocab_size=f["vocab_size"], n_layer=f["num_hidden_layers"], n_head=heads,
        n_kv_head=kv_heads, d_model=d_model, context_len=f["max_position_embeddings"],
        mlp_hidden=f["intermediate_size"], bias=bias, qkv_bias=qkv_bias, norm="rmsnorm", norm_eps=f["rms_norm_eps"],
        positions="rope", rope_theta=_rope_theta(f), mlp="swiglu", tie_embeddings=f["tie_word_embeddings"],
        init_std=f["initializer_range"],
    )


def model_config(hf: dict, where: str) -> tuple[str, ModelConfig]:
    """(family, ModelConfig) of a Hugging Face config.json's contents; `where` names the file."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"{where}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
    if family == "gpt2":
        cfg = _gpt2_config(_Fields(hf, where, _GPT2_DEFAULTS))
    else:
        cfg = _llama_config(_Fields(hf, where, _LLAMA_DEFAULTS), family)
    return family, cfg


def export_family(cfg: ModelConfig, where: str) -> str:
    """The Hugging Face family that expresses `cfg` exactly: gpt2 (learned positions, LayerNorm,
    GELU; missing biases export as zeros), llama or qwen2 (rotary, RMSNorm, SwiGLU)."""
    shape = (cfg.positions, cfg.norm, cfg.mlp)
    if shape == ("learned", "layernorm", "gelu"):
        if cfg.kv_heads != cfg.n_head:
            raise UserError(f"{where}: model.n_kv_head={cfg.n_kv_head} cannot be exported (gpt2 has no grouped-query attention)")
        return "gpt2"
    if shape == ("rope", "rmsnorm", "swiglu"):
        return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
    raise UserError(f"{where}: model.positions={cfg.positions}, model.norm={cfg.norm}, model.mlp={cfg.mlp} match no "
                    "exportable architecture (gpt2: learned, layernorm, gelu; llama, qwen2: rope, rmsnorm, swiglu)")


def _token_fields(tokenizer) -> dict:
    """config.json's bos/eos/pad ids of an HF tokenizer (eos a list when there are several)."""
    if not isinstance(tokenizer, HFTokenizer):
        return {}
    eos = tokenizer.eos_ids
    return {"bos_token_id": tokenizer.special["bos_id"], "pad_token_id": tokenizer.special["pad_id"],
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}


def hf_config(family: str, cfg: ModelConfig, tokenizer) -> dict:
    """The config.json of `cfg` exported as `family` (written in transformers 4's field names,
    which transformers 5 reads too)."""
    common = {"model_type": family, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "torch_dtype": "float32", **_token_fields(tokenizer)}
    if family == "gpt2":
        return common | {
            "architectures": ["GPT2LMHeadModel"], "n_positions": cfg.context_len, "n_ctx": cfg.context_len,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": mlp_hidden(cfg),
            "activation_function": "gelu_new" if cfg.gelu_approximate else "gelu",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,
        }
    config = common | {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "hidden_size": cfg.d_model, "intermediate_size": mlp_hidden(cfg), "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.context_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "hidden_act": "silu", "attention_dropout": 0.0,
    }
    if family == "qwen2":
        return config | {"use_sliding_window": False, "sliding_window": None}
    return config | {"head_dim": cfg.head_dim, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


# ---------------------------------------------------------------------------------------------
# parameters <-> checkpoint tensors


@dataclass(frozen=True)
class Link:
    """One of this model's parameters (`path` in the param tree) and the checkpoint tensors it is
    made of (`names`): `fuse` makes the parameter from them, `split` gives them back."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    fuse: Callable
    split: Callable


def _same(path, name) -> Link:
    return Link(path, (name,), lambda xs: xs[0], lambda x: [x])


def _linear(path, name) -> Link:
    """A torch.nn.Linear weight [out, in]: this model's kernel is its transpose."""
    return Link(path, (name,), lambda xs: xs[0].T, lambda x: [x.T])


def _fused(path, names, sizes, transpose: bool) -> Link:
    """Tensors side by side along the output axis (q|k|v, gate|up), transposed first if Linear."""
    cuts = np.cumsum(sizes)[:-1].tolist()
    orient = (lambda x: x.T) if transpose else (lambda x: x)
    return Link(path, tuple(names), lambda xs: jnp.concatenate([orient(x) for x in xs], axis=-1),
                lambda x: [orient(part) for part in jnp.split(x, cuts, axis=-1)])


def _gpt2_links(cfg: ModelConfig, prefix: str) -> list[Link]:
    """GPT-2: Conv1D weights are stored [in, out] like this model's kernels; c_attn is q|k|v."""
    links = [_same(("wte",), f"{prefix}wte.weight"), _same(("wpe",), f"{prefix}wpe.weight"),
             _same(("ln_f", "scale"), f"{prefix}ln_f.weight"), _same(("ln_f", "bias"), f"{prefix}ln_f.bias")]
    for i in range(cfg.n_layer):
        h = f"{prefix}h.{i}."
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            links += [_same((f"h_{i}", ours, "scale"), f"{h}{theirs}.weight"),
                      _same((f"h_{i}", ours, "bias"), f"{h}{theirs}.bias")]
        for ours, theirs in (("attn", "qkv"), "attn.c_attn"), (("attn", "proj"), "attn.c_proj"), \
                            (("mlp", "fc"), "mlp.c_fc"), (("mlp", "proj"), "mlp.c_proj"):
            links += [_same((f"h_{i}", *ours, "kernel"), f"{h}{theirs}.weight"),
                      _same((f"h_{i}", *ours, "bias"), f"{h}{theirs}.bias")]
    if not cfg.tie_embeddings:
        links.append(_linear(("lm_head", "kernel"), "lm_head.weight"))
    return links


def _llama_links(cfg: ModelConfig, prefix: str) -> list[Link]:
    """Llama and Qwen2: Linear weights [out, in]; q, k, v fuse into qkv and gate, up into fc."""
    qkv_sizes = [cfg.n_head * cfg.head_dim] + 2 * [cfg.kv_heads * cfg.head_dim]
    hidden = mlp_hidden(cfg)
    links = [_same(("wte",), f"{prefix}embed_tokens.weight"), _same(("ln_f", "scale"), f"{prefix}norm.weight")]
    for i in range(cfg.n_layer):
        h = f"{prefix}layers.{i}."
        qkv = [f"{h}self_attn.{p}_proj" for p in "qkv"]
        fc = [f"{h}mlp.gate_proj", f"{h}mlp.up_proj"]
        links += [
            _same((f"h_{i}", "ln_1", "scale"), f"{h}input_layernorm.weight"),
            _same((f"h_{i}", "ln_2", "scale"), f"{h}post_attention_layernorm.weight"),
            _fused((f"h_{i}", "attn", "qkv", "kernel"), [n + ".weight" for n in qkv], qkv_sizes, True),
            _linear((f"h_{i}", "attn", "proj", "kernel"), f"{h}self_attn.o_proj.weight"),
            _fused((f"h_{i}", "mlp", "fc", "kernel"), [n + ".weight" for n in fc], [hidden, hidden], True),
            _linear((f"h_{i}", "mlp", "proj", "kernel"), f"{h}mlp.down_proj.weight"),
        ]
        if cfg.bias or cfg.qkv_bias:
            links.append(_fused((f"h_{i}", "attn", "qkv", "bias"), [n + ".bias" for n in qkv], qkv_sizes, False))
        if cfg.bias:
            links += [_same((f"h_{i}", "attn", "proj", "bias"), f"{h}self_attn.o_proj.bias"),
                      _fused((f"h_{i}", "mlp", "fc", "bias"), [n + ".bias" for n in fc], [hidden, hidden], False),
                      _same((f"h_{i}", "mlp", "proj", "bias"), f"{h}mlp.down_proj.bias")]
    if not cfg.tie_embeddings:
        links.append(_linear(("lm_head", "kernel"), "lm_head.weight"))
    return links


def links(family: str, cfg: ModelConfig, prefix: str) -> list[Link]:
    """Every parameter of `cfg`'s LM with its checkpoint tensors, whose names start with `prefix`
    (`transformer.` or `model.` in a ...ForCausalLM checkpoint, empty in a bare model's)."""
    return (_gpt2_links if family == "gpt2" else _llama_links)(cfg, prefix)


# Tensors a checkpoint may hold that are no parameters: old GPT-2 files store the causal mask,
# old Llama files the rotary frequencies.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _prefix(family: str, names) -> str:
    if family == "gpt2":
        return "transformer." if "transformer.wte.weight" in names else ""
    return "model." if "model.embed_tokens.weight" in names else ""


def _abstract_params(cfg: ModelConfig) -> dict:
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), head="lm"))["params"]


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# reading a model folder


def tensor_files(folder: epath.Path) -> dict[str, epath.Path]:
    """{tensor name: safetensors file} of a model folder, sharded (model.safetensors.index.json)
    or not; only the files' headers are read."""
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{index}: not a safetensors index ({err})") from None
        for file in sorted(set(weight_map.values())):
            if not (folder / file).exists():
                raise UserError(f"{index}: shard {file} does not exist")
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SAFETENSORS_FILE
    if not single.exists():
        raise UserError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (only safetensors checkpoints are read)")
    with safe_open(os.fspath(single), framework="numpy") as f:
        return {name: single for name in f.keys()}


def _shapes(files: dict[str, epath.Path]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the safetensors headers (no data is read)."""
    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(os.fspath(file), framework="numpy") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


@dataclass(frozen=True)
class Tensors:
    """A checkpoint's tensors by Hugging Face name: `shapes` (known without reading the data),
    `where(name)` (the file a tensor is in, for errors), `source` (what defined the shapes:
    config.json or a GGUF file's metadata) and `open()`, a context whose value reads one tensor by
    name as an array."""

    shapes: dict[str, tuple[int, ...]]
    where: Callable[[str], str]
    source: str
    open: Callable[[], contextlib.AbstractContextManager]


def safetensors_tensors(folder: epath.Path) -> Tensors:
    """The tensors of a model folder's safetensors files (`tensor_files`)."""
    files = tensor_files(folder)

    @contextlib.contextmanager
    def open_files():
        with contextlib.ExitStack() as stack:
            handles = {file: stack.enter_context(safe_open(os.fspath(file), framework="flax"))
                       for file in sorted(set(files.values()))}
            yield lambda name: handles[files[name]].get_tensor(name)

    return Tensors(_shapes(files), lambda name: files[name].name, "config.json", open_files)


def gguf_tensors(file) -> Tensors:
    """The tensors of a `gguf_file.GGUFFile`, dequantized as they are read."""
    shapes, where, read = gguf_file.tensors(file, gguf_file.hf_config(file))
    return Tensors(shapes, where, f"{os.path.basename(file.path)}'s metadata", lambda: contextlib.nullcontext(read))


def check_tensors(family: str, cfg: ModelConfig, tensors: Tensors, folder: epath.Path) -> list[Link]:
    """The links of `cfg`, once every tensor they need is there with the shape `cfg` implies and
    no tensor is left over (but buffers, and a tied model's redundant lm_head.weight)."""
    shapes = tensors.shapes
    table = links(family, cfg, _prefix(family, shapes))
    abstract = _abstract_params(cfg)
    for link in table:
        expected = jax.eval_shape(link.split, _get(abstract, link.path))
        for name, want in zip(link.names, expected):
            if name not in shapes:
                raise UserError(f"{folder}: tensor {name} is missing from the checkpoint")
            if shapes[name] != want.shape:
                raise UserError(f"{tensors.where(name)}: tensor {name} has shape {list(shapes[name])}, "
                                f"{tensors.source} implies {list(want.shape)}")
    used = {name for link in table for name in link.names}
    for name in shapes:
        ignorable = name.endswith(_BUFFER_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings)
        if name not in used and not ignorable:
            raise UserError(f"{tensors.where(name)}: tensor {name} has no place in a {family} language model")
    return table


def read_params(table: list[Link], tensors: Tensors, shardings: dict | None = None) -> dict:
    """The param tree, read tensor by tensor (each converted to float32 as it is placed, so the
    checkpoint never sits in memory whole beside the params): on the default device, or with
    `shardings` (a tree like the params', `Mesh.model_sharding`) each param made on the host and
    put straight onto its devices as FSDP shards, so no device holds the whole model."""
    params: dict = {}
    staging = None if shardings is None else jax.devices("cpu")[0]
    with tensors.open() as read:
        for link in table:
            with jax.default_device(staging):
                param = link.fuse([jnp.asarray(read(name), jnp.float32) for name in link.names])
            _set(params, link.path, param if shardings is None else jax.device_put(param, _get(shardings, link.path)))
    return {"params": params}


def _read_config(folder: epath.Path) -> dict:
    path = folder / rundir.CONFIG_FILE
    if not folder.is_dir():
        raise UserError(f"--from {folder}: no such folder")
    if not path.exists():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def _check_empty(directory: epath.Path, flag: str) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"{flag} {directory} is not empty; choose a new directory")


def _import_mesh(fsdp: int) -> Mesh | None:
    """The mesh an import with `--fsdp` places its params on (None: the first device)."""
    if fsdp < 1 or jax.device_count() % fsdp:
        raise UserError(f"--fsdp {fsdp} does not divide the {jax.device_count()} devices")
    return Mesh(fsdp=fsdp) if fsdp > 1 else None


def _read_source(source: epath.Path) -> tuple[str, ModelConfig, HFTokenizer, Tensors, dict]:
    """(family, model config, tokenizer, tensors, record fields) of a Hugging Face model folder or
    of a GGUF file (`gguf_file`: read as the folder it was converted from, dequantized)."""
    if source.suffix != ".gguf":
        family, cfg = model_config(_read_config(source), str(source / rundir.CONFIG_FILE))
        return family, cfg, HFTokenizer.from_path(source), safetensors_tensors(source), {}
    file = gguf_file.GGUFFile(source)
    family, cfg = model_config(gguf_file.hf_config(file), f"{source}'s metadata")
    special, tokenizer_config = gguf_file.special_tokens(file)
    tokenizer = HFTokenizer(gguf_file.tokenizer_json(file), special, tokenizer_config)
    return family, cfg, tokenizer, gguf_tensors(file), {"gguf_types": gguf_file.quantization(file)}


def import_hf(folder: str | os.PathLike, run_dir: str | os.PathLike, fsdp: int = 1) -> dict:
    """Make `run_dir` a run directory holding the Hugging Face model in `folder` (a model folder
    or a `.gguf` file, dequantized to float32): its config as
    this project's (model section from config.json, data.tokenizer=hf), its tokenizer, and a step-0
    checkpoint of the params alone (`runs.load_trained` reads only those) that every stage and
    command loads. A model
    without a chat template gets this project's role and end-of-turn tokens, and its embedding
    grows if they do not fit in its vocabulary (`grow_vocab`). With `fsdp` > 1 each parameter
    goes onto the devices as FSDP shards over `fsdp` of them as it is read (`read_params`), the
    way `train.mesh_fsdp` splits them, for a model that does not fit one device. Every
    check runs before anything is written. Returns the import's record (also in metrics.jsonl)."""
    start = time.perf_counter()
    folder, run_dir = epath.Path(folder), epath.Path(run_dir)
    mesh = _import_mesh(fsdp)
    family, source_cfg, tokenizer, tensors, source_record = _read_source(folder)
    if tokenizer.chat_template is None:  # chats will use this project's template: add its tokens
        tokenizer = tokenizer.with_chat_tokens()
    model_cfg = dataclasses.replace(source_cfg, vocab_size=max(source_cfg.vocab_size, tokenizer.vocab_size))
    cfg = with_vocab(RunConfig(model=model_cfg, data=DataConfig(tokenizer="hf", tokenizer_path=os.fspath(folder))),
                     tokenizer)
    table = check_tensors(family, source_cfg, tensors, folder)
    _check_empty(run_dir, "--run-dir")

    shardings = None if mesh is None else mesh.model_sharding(_abstract_params(source_cfg))
    params = read_params(table, tensors, shardings)
    if model_cfg.vocab_size > source_cfg.vocab_size:
        params = grow_vocab(params, model_cfg.vocab_size)
        params = mesh.place_model(params) if mesh else params  # the grown embedding as shards too
    rundir.write_config(run_dir, cfg)
    tokenizer.save(run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    checkpointer.save(0, {"step": jnp.zeros((), jnp.int32), "params": params}, {})  # no optimizer state
    checkpointer.close()
    record = {"step": 0, "imported_from": os.fspath(folder), "family": family,
              "n_params": sum(x.size for x in jax.tree.leaves(params)),
              "chat_template": "model" if tokenizer.chat_template is not None else "genai-jax",
              "source_vocab_size": source_cfg.vocab_size, "fsdp": fsdp, **source_record,
              "import_seconds": time.perf_counter() - start, "host_peak_mib": host_peak_mib()}
    writer = rundir.MetricsWriter(run_dir)
    writer.write(record)
    writer.close()
    placed = f" as FSDP shards over {fsdp} devices" if mesh else ""
    say(f"imported {family} ({record['n_params']:,} params) from {folder} into {run_dir}{placed} in "
        f"{record['import_seconds']:.1f} s; host memory peak {record['host_peak_mib']:.0f} MiB")
    return record


# ---------------------------------------------------------------------------------------------
# writing a model folder


def _zero_filled(params: dict, export_cfg: ModelConfig) -> dict:
    """The param tree `params` (under "params") with every parameter of `export_cfg` it lacks as
    zeros: the biases of a model without them (the same function as zero biases)."""
    filled = jax.tree.map(lambda x: x, params)
    present = {path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params(export_cfg))[0]:
        if path not in present:
            _set(filled, tuple(k.key for k in path), jnp.zeros(leaf.shape, leaf.dtype))
    return filled


def _tokenizer_files(tokenizer) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json of an HF tokenizer (none for the other kinds); a
    tokenizer with this project's chat tokens and no template of its own gets this project's
    template as its `chat_template`."""
    if not isinstance(tokenizer, HFTokenizer):
        return {}
    config = dict(tokenizer.tokenizer_config or {"tokenizer_class": "PreTrainedTokenizerFast"})
    if tokenizer.chat_template is None and tokenizer.tokenizer.token_to_id(END) is not None:
        config["chat_template"] = CHAT_TEMPLATE
    return {"tokenizer.json": tokenizer.tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2)}


def _export_cfg(family: str, cfg: ModelConfig) -> ModelConfig:
    """The model as `family` writes it: GPT-2 always has biases (zeros where this model has none)."""
    return dataclasses.replace(cfg, bias=True) if family == "gpt2" else cfg


def adapter_tensors(family: str, cfg: ModelConfig, adapters: dict, prefix: str) -> dict[str, np.ndarray]:
    """PEFT's tensors of one model's LoRA adapters (a LoRA tree's "lora" part, `genai_jax.lora`):
    for each Hugging Face module a targeted kernel is made of, `lora_A.weight` [r, in] and
    `lora_B.weight` [out, r], so that the module's weight moves by scale * B @ A (transposed for
    GPT-2's Conv1D, stored [in, out]: PEFT's fan_in_fan_out). A fused kernel's modules (q|k|v,
    gate|up) share its A and split its B by output columns, which `Link.split` does."""
    flat = flatten_dict(adapters)
    tensors = {}
    for link in links(family, _export_cfg(family, cfg), prefix):
        if link.path + ("a",) not in flat:
            continue
        a, b = flat[link.path + ("a",)], flat[link.path + ("b",)]
        for name, part in zip(link.names, link.split(b)):
            module = PEFT_PREFIX + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = np.asarray(a.T, np.float32)
            tensors[f"{module}.lora_B.weight"] = np.asarray(part.T if family == "gpt2" else part, np.float32)
    return tensors


def _hf_source(run: str) -> str:
    """The Hugging Face folder a run was imported from (`import_hf`'s record), else the run."""
    return rundir.imported_from(run) or run


def _export_adapter(run_dir: epath.Path, out: epath.Path, family: str) -> dict:
    """`export_hf(..., adapter_only=True)`: a PEFT LoRA adapter folder of a LoRA run's policy."""
    cfg, _, tree = load_saved(run_dir)
    if not cfg.lora.rank:
        raise UserError(f"--adapter-only: {run_dir} is not a LoRA run (lora.rank=0); export it without the flag")
    adapters = tree["lora"].get("policy", {}) if cfg.ppo.policy else tree["lora"]
    prefix = "transformer." if family == "gpt2" else "model."
    tensors = adapter_tensors(family, cfg.model, adapters.get("params", {}), prefix)
    if not tensors:
        raise UserError(f"--adapter-only: {run_dir}'s lora.targets={cfg.lora.targets!r} put no adapter on the policy")
    base = cfg.ppo.policy or cfg.train.init_from
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": family == "gpt2", "inference_mode": True,
              "target_modules": sorted({name.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for name in tensors}),
              "base_model_name_or_path": _hf_source(base)}
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, os.fspath(out / ADAPTER_FILE), metadata={"format": "pt"})
    source = config["base_model_name_or_path"]
    note = ""
    if source == base:
        note = " (a run directory: export it with genai-jax export-hf to load the adapters onto it)"
    say(f"exported {run_dir}'s adapters ({family}, r={cfg.lora.rank}) into {out}; their base model is {source}{note}")
    return {"family": family, "out": os.fspath(out), "files": [ADAPTER_CONFIG, ADAPTER_FILE]}


_CLASSIFIER = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
               "qwen2": "Qwen2ForSequenceClassification"}


def _reward_config(family: str, config: dict, head_bias: float, normalization: dict | None, pad_id: int) -> dict:
    """config.json of a reward model exported as a one-label sequence classifier (as TRL stores
    reward models). Its `score` layer has no bias, so the logit is this project's raw reward minus
    the head's bias; the bias and the run's normalisation are kept under `genai_jax_reward`:
    normalised reward = gain * (logit + head_bias) + bias. transformers reads the logit at each
    row's last token that is not `pad_token_id`, which a classifier needs even for one row."""
    if config.get("pad_token_id") is None:
        config = config | {"pad_token_id": pad_id}
    return config | {"architectures": [_CLASSIFIER[family]], "num_labels": 1, "id2label": {"0": "LABEL_0"},
                     "label2id": {"LABEL_0": 0}, "problem_type": "regression",
                     "genai_jax_reward": {"head_bias": head_bias, "normalization": normalization}}


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, adapter_only: bool = False) -> dict:
    """Write a run's latest model into the folder `out` as a Hugging Face model: a policy (an RLHF
    run's too; a LoRA run's adapters merged) as a causal LM, a reward model (model.head=scalar) as
    a one-label sequence classifier (`_reward_config`); config.json, model.safetensors (float32)
    and, for a run with an hf tokenizer, its tokenizer.json and tokenizer_config.json. With
    `adapter_only`, a LoRA run's adapters alone as a PEFT adapter folder (adapter_config.json,
    adapter_model.safetensors). Returns {"family", "out", "files"}."""
    run_dir, out = epath.Path(run_dir), epath.Path(out)
    cfg = rundir.read_config(run_dir)
    if cfg.model.head not in ("lm", "scalar") and not cfg.ppo.policy:
        raise UserError(f"{run_dir}: model.head={cfg.model.head}: only policies and reward models can be exported")
    reward_model = cfg.model.head == "scalar" and not cfg.ppo.policy
    family = export_family(cfg.model, str(run_dir))
    _check_empty(out, "--out")
    if adapter_only:
        return _export_adapter(run_dir, out, family)
    cfg, tokenizer, params = load_trained(run_dir)
    export_cfg = _export_cfg(family, cfg.model)
    trunk_cfg = dataclasses.replace(export_cfg, tie_embeddings=True) if reward_model else export_cfg  # no lm_head
    params = _zero_filled(params["params"], trunk_cfg)
    prefix = "transformer." if family == "gpt2" else "model."
    tensors = {}
    for link in links(family, trunk_cfg, prefix):
        tensors.update(zip(link.names, (np.asarray(x, np.float32) for x in link.split(_get(params, link.path)))))
    config = hf_config(family, export_cfg, tokenizer)
    if reward_model:
        head = params["scalar_head"]
        tensors["score.weight"] = np.asarray(head["kernel"], np.float32).T
        normalization = load_normalization(run_dir) if (run_dir / NORMALIZATION_FILE).exists() else None
        config = _reward_config(family, config, float(head["bias"][0]), normalization, tokenizer.pad_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / rundir.CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, os.fspath(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    written = [rundir.CONFIG_FILE, SAFETENSORS_FILE]
    for name, text in _tokenizer_files(tokenizer).items():
        (out / name).write_text(text)
        written.append(name)
    if not isinstance(tokenizer, HFTokenizer):
        say(f"{run_dir}'s {cfg.data.tokenizer} tokenizer has no Hugging Face form: only the model was written")
    say(f"exported {run_dir} as {config['architectures'][0]} into {out}: {', '.join(written)}")
    return {"family": family, "out": os.fspath(out), "files": written}
