"""Hugging Face checkpoints in and out (`genai_jax.hf`), against `transformers` itself: tiny random
GPT-2, Llama (grouped-query attention at 1 and 2 key/value heads, tied and untied) and Qwen2
(q/k/v biases) models saved with a `tokenizers` BPE tokenizer; no download."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_one_error, assert_trees_close, init, run_cli, tiny_model
from etils import epath
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from genai_jax import cli, config, hf, rundir, runs
from genai_jax.checkpoint import Checkpointer
from genai_jax.config import SEQ_LEN_FROM_DATA, DataConfig, RunConfig, UserError
from genai_jax.model import GPT, init_cache, with_scalar_head
from genai_jax.optim import make_optimizer
from genai_jax.parallel import Mesh, fsdp_spec
from genai_jax.sampling import generate
from genai_jax.tokenizer import (CharTokenizer, HFTokenizer, build_tokenizer, decode_response, encode_chat,
                                 load_tokenizer, stop_ids)
from genai_jax.train import make_init_fn

VOCAB = 300  # the model's vocabulary: the tokenizer's 262 tokens, padded as real checkpoints are
TEXT = "the quick brown fox jumps over the lazy dog; hello world, hello fox!\n"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

ARCHITECTURES = {
    "gpt2": ("gpt2", dict(n_layer=2, n_head=2, n_embd=16, n_positions=32, n_inner=24)),
    "llama-kv1-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-kv2-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen2-bias-untied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
}
LLAMA_SHAPE = dict(hidden_size=16, num_attention_heads=4, num_hidden_layers=2, intermediate_size=40,
                   max_position_embeddings=32, rope_theta=500.0)
CLASSES = {"gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def bpe_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on TEXT, with three special tokens (ids 0-2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=262, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT] * 10, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                                additional_special_tokens=SPECIALS[1:])


def save_model(name: str, folder, **config_overrides) -> torch.nn.Module:
    """A random `name` model of ARCHITECTURES saved with the BPE tokenizer into `folder`. Weights
    are N(0, 0.3): large enough that every layer moves the logits."""
    family, shape = ARCHITECTURES[name]
    config_cls, model_cls = CLASSES[family]
    shape = shape if family == "gpt2" else LLAMA_SHAPE | shape
    config = config_cls(**dict(vocab_size=VOCAB, eos_token_id=0, bos_token_id=0) | shape | config_overrides)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def imported(request, tmp_path_factory):
    """(name, folder, transformers model, run dir) of each architecture, imported once."""
    root = tmp_path_factory.mktemp(request.param)
    model = save_model(request.param, root / "hf")
    hf.import_hf(root / "hf", root / "run")
    return request.param, root / "hf", model, root / "run"


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def tokens_of(seed: int, shape=(2, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def test_logits_equal_transformers_full_and_token_by_token(imported):
    _, _, model, run_dir = imported
    cfg, _, params = runs.load_trained(run_dir)
    tokens = tokens_of(1)
    expected = torch_logits(model, tokens)
    np.testing.assert_allclose(GPT(cfg.model).apply(params, tokens), expected, atol=1e-4)

    cache = init_cache(cfg.model, batch_size=2, max_len=tokens.shape[1])
    step = jax.jit(lambda p, t, c: GPT(cfg.model).apply(p, t, cache=c))
    for t in range(tokens.shape[1]):
        logits, cache = step(params, tokens[:, t: t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], expected[:, t], atol=1e-4, err_msg=f"position {t}")


def test_greedy_generation_equals_transformers_generate(imported):
    _, _, model, run_dir = imported
    cfg, _, params = runs.load_trained(run_dir)
    prompt = tokens_of(2, (2, 5))
    ours = generate(params, prompt, np.ones(prompt.shape, bool), jax.random.PRNGKey(0), cfg=cfg.model,
                    max_new_tokens=10, temperature=0.0)
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.ones(prompt.shape),
                                do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours), theirs[:, prompt.shape[1]:].numpy())


def test_export_loads_in_transformers_and_imports_back(imported, tmp_path):
    _, _, model, run_dir = imported
    hf.export_hf(run_dir, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = tokens_of(3)
    np.testing.assert_allclose(torch_logits(reloaded, tokens), torch_logits(model, tokens), atol=1e-5)

    hf.import_hf(tmp_path / "out", tmp_path / "again")
    first, second = runs.load_trained(run_dir), runs.load_trained(tmp_path / "again")
    assert first[0].model == second[0].model
    assert_trees_close(first[2], second[2], rtol=0, atol=0)
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert fast.encode(TEXT, add_special_tokens=False) == second[1].encode(TEXT).tolist()


def test_tokenizer_encodes_and_decodes_like_the_fast_tokenizer(imported):
    _, folder, _, run_dir = imported
    fast = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(run_dir)
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == len(fast) + 4  # no chat template: 4 chat tokens
    for text in (TEXT, "unseen wörds ünd ☃ <|im_end|> too", "  spaces\n\nand lines "):
        ids = ours.encode(text)
        assert ids.tolist() == fast.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == fast.decode(ids.tolist()) == text
    assert ours.special_id("<|im_end|>") == fast.convert_tokens_to_ids("<|im_end|>") == 2
    assert ours.eos_ids == [0] and ours.pad_id == 0


def test_a_list_of_eos_ids_is_kept_and_exported(tmp_path):
    """eos ids from config.json (a list) and tokenizer_config.json, in that order, once each."""
    save_model("llama-kv1-tied", tmp_path / "hf", eos_token_id=[2, 0], pad_token_id=1)
    tokenizer = HFTokenizer.from_path(tmp_path / "hf")
    assert tokenizer.eos_ids == [2, 0] and tokenizer.pad_id == 1
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    assert load_tokenizer(tmp_path / "run").eos_ids == [2, 0]
    hf.export_hf(tmp_path / "run", tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["eos_token_id"] == [2, 0] and exported["pad_token_id"] == 1


def test_sharded_checkpoint_imports_the_same_params(tmp_path):
    model = save_model("llama-kv2-untied", tmp_path / "hf")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for file in (tmp_path / "hf").glob("tokenizer*"):
        shutil.copy(file, tmp_path / "sharded")
    assert (tmp_path / "sharded" / hf.SAFETENSORS_INDEX).exists()
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    hf.import_hf(tmp_path / "sharded", tmp_path / "run-sharded")
    assert_trees_close(runs.load_trained(tmp_path / "run")[2], runs.load_trained(tmp_path / "run-sharded")[2],
                       rtol=0, atol=0)


def test_an_fsdp_import_puts_each_param_on_its_shards_and_saves_the_same_params(tmp_path, capsys):
    """--fsdp 4: the large params arrive split over 4 of the 8 devices (a quarter each), the small
    ones replicated as `fsdp_spec` has it, and the run holds exactly the one-device import's params."""
    save_model("llama-kv2-untied", tmp_path / "hf", hidden_size=64, intermediate_size=256)
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    code, out, err = run_cli(capsys, "import-hf", "--from", tmp_path / "hf", "--run-dir", tmp_path / "run-fsdp",
                             "--fsdp", 4)
    assert code == 0 and "as FSDP shards over 4 devices" in out, err
    assert rundir.read_metrics(tmp_path / "run-fsdp")[0]["fsdp"] == 4
    assert_trees_close(runs.load_trained(tmp_path / "run")[2], runs.load_trained(tmp_path / "run-fsdp")[2],
                       rtol=0, atol=0)

    family, cfg = hf.model_config(json.loads((tmp_path / "hf" / "config.json").read_text()), "config.json")
    files = hf.safetensors_tensors(epath.Path(tmp_path / "hf"))
    table = hf.check_tensors(family, cfg, files, tmp_path / "hf")
    mesh = Mesh(fsdp=4)
    abstract = jax.eval_shape(lambda: hf.read_params(table, files))
    placed = hf.read_params(table, files, mesh.model_sharding(abstract["params"]))
    split = 0
    for path, x in jax.tree_util.tree_flatten_with_path(placed)[0]:
        spec = fsdp_spec(x.shape, 4)
        assert x.sharding.spec == spec, path
        if spec != P():
            split += 1
            assert {shard.data.size for shard in x.addressable_shards} == {x.size // 4}, path
    assert split == 2 * 2 + 2  # each layer's MLP kernels, the embedding and the untied head (qkv is too small)
    assert_trees_close(placed, hf.read_params(table, files), rtol=0, atol=0)

    code, _, err = run_cli(capsys, "import-hf", "--from", tmp_path / "hf", "--run-dir", tmp_path / "run-3",
                           "--fsdp", 3)
    assert_one_error(code, err, "--fsdp 3 does not divide the 8 devices")
    assert not (tmp_path / "run-3").exists()


def test_a_bfloat16_checkpoint_imports_as_float32(tmp_path):
    model = save_model("qwen2-bias-untied", tmp_path / "hf").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    params = runs.load_trained(tmp_path / "run")[2]["params"]
    expected = model.model.layers[1].self_attn.k_proj.bias.detach().float().numpy()
    qkv_bias = np.asarray(params["h_1"]["attn"]["qkv"]["bias"])
    assert qkv_bias.dtype == np.float32
    np.testing.assert_array_equal(qkv_bias[16:24], expected)  # after the 4 query heads of 4 dims


def test_the_cli_imports_and_exports(capsys, tmp_path):
    save_model("gpt2", tmp_path / "hf")
    code, out, err = run_cli(capsys, "import-hf", "--from", tmp_path / "hf", "--run-dir", tmp_path / "run")
    assert code == 0 and "imported gpt2" in out and "host memory peak" in out, err
    code, out, err = run_cli(capsys, "export-hf", "--run", tmp_path / "run", "--out", tmp_path / "out")
    assert code == 0 and "tokenizer.json" in out, err
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "gpt2"


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def edit_tensors(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


BAD_INPUTS = {
    "no-config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "model-type": (lambda f: edit_config(f, model_type="mistral"), "model_type 'mistral' is not supported"),
    "rope-scaling": (lambda f: edit_config(f, rope_scaling={"rope_type": "llama3", "factor": 8.0},
                                           rope_parameters=None), "rope_scaling"),
    "activation": (lambda f: edit_config(f, hidden_act="gelu"), "hidden_act='gelu'"),
    "kv-heads": (lambda f: edit_config(f, num_key_value_heads=3), "num_key_value_heads=3"),
    "missing-tensor": (lambda f: edit_tensors(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "tensor model.layers.1.mlp.up_proj.weight is missing"),
    "shape": (lambda f: edit_tensors(f, lambda t: t.update({"model.norm.weight": np.ones(17, np.float32)})),
              "tensor model.norm.weight has shape [17], config.json implies [16]"),
    "extra-tensor": (lambda f: edit_tensors(f, lambda t: t.update({"score.weight": np.ones((1, 16), np.float32)})),
                     "tensor score.weight has no place"),
    "no-tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json: no such file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, capsys, tmp_path):
    save_model("llama-kv2-untied", tmp_path / "hf")
    damage, needle = BAD_INPUTS[case]
    damage(tmp_path / "hf")
    code, _, err = run_cli(capsys, "import-hf", "--from", tmp_path / "hf", "--run-dir", tmp_path / "run")
    assert_one_error(code, err, needle)
    assert not (tmp_path / "run").exists()


def test_export_refuses_what_it_cannot_express(tmp_path):
    save_model("gpt2", tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    with pytest.raises(UserError, match="is not empty"):
        hf.export_hf(tmp_path / "run", tmp_path / "hf")
    cfg = runs.load_trained(tmp_path / "run")[0].model
    with pytest.raises(UserError, match="model.norm=rmsnorm"):
        hf.export_family(dataclasses.replace(cfg, norm="rmsnorm"), "run")


def test_a_model_without_biases_exports_as_gpt2_with_zero_biases(tmp_path):
    """The tiny preset's architecture (no biases) is GPT-2 with zero biases: same logits."""
    cfg = RunConfig(model=tiny_model(gelu_approximate=False))
    params = init(cfg.model, seed=3)
    rundir.write_config(tmp_path / "run", cfg)
    CharTokenizer.build("abcdefghijklmnopqrstuvwxyz").save(tmp_path / "run")
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints")
    checkpointer.save(0, make_init_fn(lambda _: params, make_optimizer(cfg.optim, 10), 0)(), {})
    checkpointer.close()
    hf.export_hf(tmp_path / "run", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = tokens_of(4, (2, 10)) % cfg.model.vocab_size
    np.testing.assert_allclose(torch_logits(model, tokens), GPT(cfg.model).apply(params, tokens), atol=1e-4)


def test_data_tokenizer_hf_builds_from_a_file_or_folder(tmp_path):
    """Any stage may use a Hugging Face tokenizer (data.tokenizer=hf), e.g. to pretrain with it."""
    bpe_tokenizer().save_pretrained(tmp_path / "hf")
    for i, path in enumerate([tmp_path / "hf", tmp_path / "hf" / "tokenizer.json"]):
        built = build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(path)), TEXT, epath.Path(tmp_path / f"run{i}"))
        assert load_tokenizer(epath.Path(tmp_path / f"run{i}")).encode(TEXT).tolist() == built.encode(TEXT).tolist()
    with pytest.raises(UserError, match="needs data.tokenizer_path"):
        build_tokenizer(DataConfig(tokenizer="hf"), TEXT, epath.Path(tmp_path / "run"))


# Chat templates: the model's own, from its tokenizer_config.json / chat_template.jinja

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello fox"},
        {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "the dog?"},
        {"role": "assistant", "content": "lazy"}]


def save_chat_model(folder) -> transformers.PreTrainedTokenizerFast:
    """The tiny Qwen2 model with a ChatML template (saved by transformers, as Qwen's is) and room
    for a templated prompt and its answer (the byte-level template text takes many tokens)."""
    save_model("qwen2-bias-untied", folder, max_position_embeddings=128)
    tokenizer = bpe_and_template()
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_the_model_chat_template_gives_transformers_tokens_and_masks_the_answers(tmp_path):
    theirs = save_chat_model(tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    ours = load_tokenizer(tmp_path / "run")
    tokens, mask = encode_chat(ours, CHAT)
    assert tokens.tolist() == list(theirs.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    answers = [ours.decode(tokens[start:end]) for start, end in runs_of_ones(mask)]
    assert answers == ["hello world<|im_end|>\n", "lazy<|im_end|>\n"]
    prompt, prompt_mask = encode_chat(ours, CHAT[:2], generation_prompt=True)
    assert prompt.tolist() == list(theirs.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True,
                                                              return_dict=False))
    assert not prompt_mask.any()
    im_end = theirs.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(ours) == (im_end, 0)  # the template's end of turn, then config.json's eos_token_id
    text, ended = decode_response(ours, ours.encode("cba<|im_end|>\nmore"))
    assert (text, ended) == ("cba", True)


def runs_of_ones(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_a_model_without_a_chat_template_gets_the_project_tokens_and_a_grown_embedding(tmp_path):
    """GPT-2 with a vocabulary exactly its tokenizer's (262): the four chat tokens grow it to 266;
    the old tokens' logits are transformers' (the new rows are the mean of the old)."""
    model = save_model("gpt2", tmp_path / "hf", vocab_size=262)
    record = hf.import_hf(tmp_path / "hf", tmp_path / "run")
    cfg, tokenizer, params = runs.load_trained(tmp_path / "run")
    assert record["source_vocab_size"] == 262 and cfg.model.vocab_size == tokenizer.vocab_size == 266
    assert record["chat_template"] == "genai-jax"
    tokens, mask = encode_chat(tokenizer, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fox"}])
    assert tokenizer.decode(tokens) == "<|user|>hello<|end|><|assistant|>fox<|end|>"
    assert stop_ids(tokenizer) == (tokenizer.special_id("<|end|>"),)
    wte = np.asarray(params["params"]["wte"])
    np.testing.assert_allclose(wte[262:], np.broadcast_to(wte[:262].mean(0), (4, wte.shape[1])), atol=1e-7)
    prompt = tokens_of(5, (2, 10)) % 262
    logits = np.asarray(GPT(cfg.model).apply(params, prompt))
    np.testing.assert_allclose(logits[..., :262], torch_logits(model, prompt), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("template", ["model", "genai-jax"])
def test_sft_and_generate_from_an_imported_chat_model(capsys, tmp_path, template):
    """import-hf -> sft (no --model flags: they come from the import) -> generate -> export-hf, in
    the model's own template (Qwen2 with ChatML) or, for a model without one (GPT-2), this project's."""
    if template == "model":
        save_chat_model(tmp_path / "hf")
    else:
        save_model("gpt2", tmp_path / "hf", n_positions=128)
    hf.import_hf(tmp_path / "hf", tmp_path / "run")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"hello {w}", "response": f"the {w}"}) + "\n"
                             for w in ["fox", "dog", "world", "brown", "lazy"] * 4))
    code, _, err = run_cli(capsys, "sft", "--init-from", tmp_path / "run", "--run-dir", tmp_path / "sft",
                           "--data.path", chats, "--data.seq-len", 64, "--train.batch-size", 8, "--train.max-steps", 3,
                           "--train.eval-every", 3, "--train.eval-batches", 1, "--train.sample-tokens", 0,
                           "--train.no-progress")
    assert code == 0, err
    assert rundir.read_config(tmp_path / "sft").model == dataclasses.replace(
        rundir.read_config(tmp_path / "run").model, dropout=0.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello fox"}) + "\n")
    code, _, err = run_cli(capsys, "generate", "--run", tmp_path / "sft", "--prompts", prompts,
                           "--out", tmp_path / "out.jsonl", "--max-new-tokens", 8, "--temperature", 0)
    assert code == 0, err
    response = json.loads((tmp_path / "out.jsonl").read_text())["response"]
    assert not any(token in response for token in ("<|im_end|>", "<|im_start|>", "<|end|>", "<|assistant|>"))
    code, _, err = run_cli(capsys, "export-hf", "--run", tmp_path / "sft", "--out", tmp_path / "out")
    assert code == 0, err
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    if template == "model":
        assert exported.apply_chat_template(CHAT, tokenize=False) == bpe_and_template().apply_chat_template(
            CHAT, tokenize=False)
    else:  # the added tokens, the grown embedding and the project's template travel with the export
        ours = load_tokenizer(tmp_path / "sft")
        assert exported.convert_tokens_to_ids("<|end|>") == ours.special_id("<|end|>")
        assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == VOCAB
        for generation_prompt in (False, True):
            theirs = exported.apply_chat_template(CHAT, tokenize=True, return_dict=False,
                                                  add_generation_prompt=generation_prompt)
            assert list(theirs) == encode_chat(ours, CHAT, generation_prompt)[0].tolist()
        # imported back, the template renders the same tokens and loss mask, and <|end|> still stops
        hf.import_hf(tmp_path / "out", tmp_path / "again")
        again = load_tokenizer(tmp_path / "again")
        for a, b in zip(encode_chat(again, CHAT), encode_chat(ours, CHAT)):
            np.testing.assert_array_equal(a, b)
        assert stop_ids(again)[0] == ours.special_id("<|end|>")


@pytest.mark.slow
def test_the_readme_recipe_on_an_imported_chat_model(capsys, tmp_path):
    """README's "Pretrained models from Hugging Face" commands, as a user runs them on a
    downloaded chat model (here the tiny Qwen2 with ChatML): import-hf -> sft on chats -> reward
    on preference pairs -> ppo on prompts against that reward model (and dpo from the same SFT run)
    -> export-hf, whose PPO policy transformers loads with our policy's logits."""
    save_chat_model(tmp_path / "hf")
    words = ["fox", "dog", "world", "brown", "lazy"]
    files = {
        "chats": [{"prompt": f"hello {w}", "response": f"the {w}"} for w in words * 4],
        "pairs": [{"prompt": f"hello {w}", "chosen": f"the {w}", "rejected": "hello"} for w in words * 4],
        "prompts": [{"prompt": f"hello {w}"} for w in words * 4],
    }
    for name, lines in files.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    short = ["--train.batch-size", 8, "--train.max-steps", 2, "--train.eval-every", 2, "--train.eval-batches", 1,
             "--train.no-progress"]  # every other setting from the pretrained-cpu preset
    commands = [
        ["import-hf", "--from", tmp_path / "hf", "--run-dir", tmp_path / "run"],
        ["sft", "--init-from", tmp_path / "run", "--run-dir", tmp_path / "sft", "--data.path", tmp_path / "chats.jsonl",
         "--train.sample-tokens", 0, *short],
        ["reward", "--init-from", tmp_path / "sft", "--run-dir", tmp_path / "rm", "--data.path",
         tmp_path / "pairs.jsonl", *short],
        ["ppo", "--policy", tmp_path / "sft", "--reward", tmp_path / "rm", "--run-dir", tmp_path / "ppo",
         "--data.path", tmp_path / "prompts.jsonl", "--ppo.max-new-tokens", 8, "--ppo.epochs", 1,
         "--ppo.minibatches", 1, "--train.batch-size", 8, "--train.max-steps", 2, "--train.no-progress"],
        ["dpo", "--init-from", tmp_path / "sft", "--run-dir", tmp_path / "dpo", "--data.path",
         tmp_path / "pairs.jsonl", *short],
        ["export-hf", "--run", tmp_path / "ppo", "--out", tmp_path / "out"],
    ]
    for argv in commands:
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, (argv[0], err)
    # the import's lineage has no pretraining text here: no alignment-tax loss, and PPO-ptx is refused
    assert not any("val_pretrain_loss" in record for record in rundir.read_metrics(tmp_path / "ppo"))
    ptx = [*commands[3][:6], tmp_path / "ptx", *commands[3][7:], "--ppo.ptx-coef", 0.1]
    assert_one_error(*run_cli(capsys, *ptx)[::2], "ppo.ptx-coef", "imported from")
    assert not (tmp_path / "ptx").exists()
    policy_cfg, _, policy = runs.load_trained(tmp_path / "ppo")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = tokens_of(6, (2, 10)) % 262
    np.testing.assert_allclose(np.asarray(GPT(policy_cfg.model).apply(policy, tokens)),
                               torch_logits(exported, tokens), atol=1e-4)


def bpe_and_template() -> transformers.PreTrainedTokenizerFast:
    tokenizer = bpe_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


def test_the_import_checkpoint_holds_the_params_alone_and_is_not_resumed(capsys, tmp_path):
    """No optimizer state in the import's checkpoint (a third of the bytes: no Adam moments), and a
    stage pointed at the import's directory itself is refused, leaving it as it was."""
    save_model("llama-kv2-untied", tmp_path / "hf")
    record = hf.import_hf(tmp_path / "hf", tmp_path / "run")
    stored = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoints").rglob("*") if f.is_file())
    assert stored < 1.5 * 4 * record["n_params"]  # float32 params, plus orbax's metadata
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "pretrain", "--run-dir", tmp_path / "run", "--train.max-steps", 1)
    assert code == 2 and "holds an imported model" in err and "--init-from" in err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", ["gpt2", "llama-kv2-untied"])
def test_a_reward_model_exports_as_a_one_label_sequence_classifier(tmp_path, name):
    """A scalar-head run as transformers' ...ForSequenceClassification: its logit plus the head's
    bias (kept in config.json with the normalisation) is our reward at the last token."""
    save_model(name, tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "lm")
    lm_cfg, tokenizer, lm_params = runs.load_trained(tmp_path / "lm")
    cfg = dataclasses.replace(lm_cfg, model=dataclasses.replace(lm_cfg.model, head="scalar"))
    params = with_scalar_head(lm_params, cfg.model, jax.random.PRNGKey(1))
    params["params"]["scalar_head"]["bias"] = params["params"]["scalar_head"]["bias"] + 0.3
    run = tmp_path / "rm"
    rundir.write_config(run, cfg)
    tokenizer.save(run)
    (run / "reward_normalization.json").write_text(json.dumps({"gain": 2.0, "bias": -1.0}))
    checkpointer = Checkpointer(run / "checkpoints")
    checkpointer.save(0, {"step": np.int32(0), "params": params}, {})
    checkpointer.close()
    hf.export_hf(run, tmp_path / "out")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert model.config.num_labels == 1 and model.config.genai_jax_reward == {
        "head_bias": pytest.approx(0.3), "normalization": {"gain": 2.0, "bias": -1.0}}
    tokens = tokens_of(6, (2, 10)) % 262
    tokens[tokens == model.config.pad_token_id] = 5  # no padding: the logit is read at the last token
    with torch.no_grad():
        logits = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()[:, 0]
    ours = np.asarray(GPT(cfg.model).apply(params, tokens, head="scalar"))[:, -1]
    np.testing.assert_allclose(logits + 0.3, ours, atol=1e-4)



def test_a_stage_from_an_import_takes_the_pretrained_preset(capsys, tmp_path):
    """Without --preset, a stage from an imported model (or from a run fine-tuned from one) takes
    pretrained-cpu (no accelerator here): the field's fine-tuning rate, LoRA's with --lora.rank
    unless --optim.lr or --optim.min-lr is given, and sequences sized by the data; --preset still
    chooses, and the pretrained presets refuse to pretrain."""
    save_chat_model(tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "run")

    def parsed(stage, *argv):
        cfg, _ = cli.parse_stage([str(a) for a in argv], stage)
        return cfg

    assert parsed("sft", "--init-from", tmp_path / "run").data.seq_len == SEQ_LEN_FROM_DATA
    optims = {name: parsed("sft", "--init-from", tmp_path / "run", *flags).optim for name, flags in [
        ("full", []), ("lora", ["--lora.rank", 2]), ("explicit", ["--lora.rank", 2, "--optim.lr", 5e-5]),
        ("tiny", ["--preset", "tiny"])]}
    expected = {"full": (2e-5, 2e-6), "lora": (2e-4, 2e-5), "explicit": (5e-5, 2e-6), "tiny": (1e-3, 1e-4)}
    for name, (lr, min_lr) in expected.items():
        assert (optims[name].lr, optims[name].min_lr) == pytest.approx((lr, min_lr)), name
    assert "preset pretrained-cpu" in capsys.readouterr().out
    (tmp_path / "sft").mkdir()
    rundir.write_config(tmp_path / "sft", config.replace(config.preset("tiny", "sft"),
                                                         train={"init_from": str(tmp_path / "run")}))
    assert parsed("ppo", "--policy", tmp_path / "sft", "--reward", "gold").optim.lr == 1e-6  # a descendant too
    assert parsed("sft", "--init-from", tmp_path / "sft").optim.lr == 2e-5
    assert_one_error(*run_cli(capsys, "pretrain", "--preset", "pretrained-cpu", "--run-dir", tmp_path / "p")[::2],
                     "--preset pretrained-cpu fine-tunes a model imported with import-hf")
