"""Low-rank adapters (`genai_jax.lora`): the merge against numpy, which kernels get adapters and
the one-line errors of bad settings; LoRA runs of every fine-tuning stage (only adapters train,
the base stays bit-equal to the init run's, the optimizer holds no base state, exact resume,
the commands and later stages take the run, export-hf writes the merged model); PPO and GRPO
read their frozen reference (and PPO its reward model) from the adapters' base."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_one_error, cli_flags, init, random_tokens, run_cli, snapshot, tiny_model, tiny_run
from flax.traverse_util import flatten_dict, unflatten_dict
from peft import PeftModel
from safetensors.numpy import load_file, save_file

from genai_jax import cli, config, hf, lora, rlhf, rundir, runs, stages
from genai_jax.config import LoRAConfig, UserError
from genai_jax.model import GPT
from genai_jax.rlhf import experience

RANK = 4
LORA = LoRAConfig(rank=RANK, alpha=8.0)
SCALE = 8.0 / RANK
MODEL = tiny_model()  # 2 layers, d_model 32, MLP 128, tied embeddings, no biases


def block_kernels(n_layer: int, prefix: str = "params") -> list[str]:
    return [f"{prefix}/h_{i}/{name}/kernel" for i in range(n_layer)
            for name in ("attn/qkv", "attn/proj", "mlp/fc", "mlp/proj")]


def adapter_count(cfg, rank: int = RANK) -> int:
    """Adapter parameters of every block kernel, by hand: r * (in + out) each."""
    d, hidden = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    return cfg.n_layer * rank * ((d + 3 * d) + (d + d) + (d + hidden) + (hidden + d))


def randomized(tree, seed: int = 1):
    """A LoRA tree with every adapter (b too) and `full` leaf drawn at random, so merges differ."""
    rng = np.random.default_rng(seed)
    noisy = {part: jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), tree[part])
             for part in ("lora", "full")}
    return dict(tree, **noisy)


def numpy_merge(tree, scale: float) -> dict:
    """{path: array} of the merged params, by hand: W + scale * a @ b in float64."""
    merged = {path: np.asarray(x, np.float64) for path, x in flatten_dict(tree["base"]).items()}
    merged |= {path: np.asarray(x, np.float64) for path, x in flatten_dict(tree["full"]).items()}
    adapters = flatten_dict(tree["lora"])
    for path in {p[:-1] for p in adapters}:
        a, b = (np.asarray(adapters[path + (name,)], np.float64) for name in "ab")
        merged[path] = merged[path] + scale * a @ b
    return merged


def assert_flat_close(params, expected: dict, rtol=1e-6, atol=1e-7) -> None:
    flat = flatten_dict(params)
    assert set(flat) == set(expected)
    for path, value in expected.items():
        np.testing.assert_allclose(np.asarray(flat[path]), value, rtol=rtol, atol=atol, err_msg="/".join(path))


def assert_bit_equal(a, b) -> None:
    flat_a, flat_b = flatten_dict(a), flatten_dict(b)
    assert set(flat_a) == set(flat_b)
    for path in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]), err_msg="/".join(path))


# ---------------------------------------------------------------------------------------------
# The transform


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
    params = init(MODEL)
    tree = lora.wrap(params, LORA, jax.random.PRNGKey(3))
    assert_bit_equal(lora.merge(tree, LORA), params)
    tokens = random_tokens((2, 12))
    apply = jax.jit(GPT(MODEL).apply)
    np.testing.assert_array_equal(np.asarray(apply(lora.merge(tree, LORA), tokens)), np.asarray(apply(params, tokens)))
    # a is PEFT's Kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in)), b zero
    a = np.asarray(tree["lora"]["params"]["h_1"]["mlp"]["proj"]["kernel"]["a"])
    assert a.shape == (4 * MODEL.d_model, RANK) and 0 < np.abs(a).max() <= 1 / np.sqrt(4 * MODEL.d_model)
    assert not any(np.any(np.asarray(b)) for path, b in flatten_dict(tree["lora"]).items() if path[-1] == "b")


def test_merge_is_the_base_plus_the_scaled_product():
    params = init(MODEL, head="scalar")
    tree = randomized(lora.wrap(params, LORA, jax.random.PRNGKey(0)))
    assert sorted(flatten_dict(tree["full"])) == [("params", "scalar_head", "bias"), ("params", "scalar_head", "kernel")]
    expected = numpy_merge(tree, SCALE)
    assert_flat_close(lora.merge(tree, LORA), expected)
    assert_flat_close(jax.jit(lora.merge, static_argnums=1)(tree, LORA), expected)
    # the untargeted leaves are the base's own
    merged = flatten_dict(lora.merge(tree, LORA))
    np.testing.assert_array_equal(merged[("params", "wte")], params["params"]["wte"])
    assert not np.allclose(merged[("params", "h_0", "attn", "qkv", "kernel")],
                           params["params"]["h_0"]["attn"]["qkv"]["kernel"])
    # one model of several ({"policy", "value"}) merges alone, as the whole tree's part
    both = randomized(lora.wrap({"policy": init(MODEL), "value": params}, LORA, jax.random.PRNGKey(0)))
    assert_bit_equal(lora.merge_part(both, "value", LORA), lora.merge(both, LORA)["value"])
    assert_bit_equal(lora.merge_part(both, "policy", LORA), lora.merge(both, LORA)["policy"])


def test_which_kernels_get_adapters():
    params = init(MODEL, head="scalar")  # the scalar head trains in full, never through adapters
    names = [lora.path_name(p) for p in lora.target_paths(params, LORA)]
    assert sorted(names) == sorted(block_kernels(2))
    attention = LoRAConfig(rank=2, targets="attn.*kernel")
    assert sorted(lora.path_name(p) for p in lora.target_paths(params, attention)) == sorted(
        f"params/h_{i}/attn/{name}/kernel" for i in range(2) for name in ("qkv", "proj"))
    untied = init(tiny_model(tie_embeddings=False))
    assert "params/lm_head/kernel" in [lora.path_name(p) for p in lora.target_paths(untied, LoRAConfig(rank=2, targets="kernel"))]
    both = {"policy": init(MODEL), "value": params}
    assert sorted(lora.path_name(p) for p in lora.target_paths(both, LORA)) == sorted(
        block_kernels(2, "policy/params") + block_kernels(2, "value/params"))
    tree = lora.wrap(params, LORA, jax.random.PRNGKey(0))
    assert sum(x.size for x in jax.tree.leaves(tree["lora"])) == adapter_count(MODEL)


@pytest.mark.parametrize("settings, needles", [
    (dict(rank=-1), ["lora.rank=-1"]),
    (dict(alpha=0.0), ["lora.alpha=0.0"]),
    (dict(targets="nothing/like/this"), ["lora.targets='nothing/like/this'", "matches no parameter",
                                         "reads like params/h_0/"]),
    (dict(targets="ln_1"), ["lora.targets='ln_1'", "params/h_0/ln_1/scale", "2-D"]),
    (dict(targets="h_(0"), ["lora.targets='h_(0'", "not a regular expression"]),
])
def test_bad_settings_are_refused(settings, needles):
    with pytest.raises(UserError) as error:
        lora.target_paths(jax.eval_shape(lambda: init(MODEL)), LoRAConfig(**(dict(rank=RANK) | settings)))
    for needle in needles:
        assert needle in str(error.value)


# ---------------------------------------------------------------------------------------------
# A LoRA SFT run, and the commands and stages that take it

SFT_STEPS = 4
SMALL = dict(n_layer=2, n_head=2, d_model=32, context_len=64)


def sft_config(**sections) -> config.RunConfig:
    cfg = config.replace(
        config.preset("tiny", "sft"), model=SMALL, optim=dict(warmup_steps=2, lr=3e-3), data=dict(world_chats=64),
        train=dict(batch_size=8, max_steps=SFT_STEPS, log_every=1, eval_every=2, eval_batches=1, ckpt_every=2,
                   progress=False),
        lora=dict(rank=RANK, alpha=8.0))
    return config.replace(cfg, **sections)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base_run):
    """`genai-jax sft --lora.rank 4 --lora.alpha 8` from the base run; read-only."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    cli.main(sft_argv(run_dir, "--init-from", base_run))
    return run_dir


def sft_argv(run_dir, *flags) -> list[str]:
    argv = ["sft", *cli_flags(sft_config(), stage="sft"), "--run-dir", run_dir, *flags]
    assert "--lora.rank" in argv  # the flags as a user gives them
    return [str(arg) for arg in argv]


def without_timings(records: list[dict]) -> list[dict]:
    return [{name: value for name, value in record.items() if name != "tokens_per_s"} for record in records]


def saved_state(run_dir):
    """The latest TrainState of a stage run, as its checkpoint holds it (a LoRA tree's base too)."""
    return runs.restore_latest(run_dir, runs.make_run_init_fn(rundir.read_config(run_dir)))[0]


@pytest.mark.slow
def test_lora_sft_trains_only_the_adapters(sft_run, base_run):
    state = saved_state(sft_run)
    base_params = runs.load_trained(base_run)[2]
    assert_bit_equal(state.params["base"], base_params)  # frozen: bit for bit the init run's
    assert state.params["full"] == {}
    assert any(np.any(np.asarray(b)) for path, b in flatten_dict(state.params["lora"]).items() if path[-1] == "b")
    # Adam's two moments for the adapters, nothing for the base
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * adapter_count(rundir.read_config(sft_run).model)
    records = rundir.read_metrics(sft_run)
    assert records[0]["n_trainable_params"] == adapter_count(rundir.read_config(sft_run).model)
    assert records[0]["n_params"] == sum(x.size for x in jax.tree.leaves(base_params))
    # step 0 evaluates the base model itself
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0]

    # every command loads the merged model
    cfg, _, params = runs.load_trained(sft_run)
    assert cfg.lora.rank == RANK
    assert_flat_close(params, numpy_merge(state.params, SCALE))


@pytest.mark.slow
def test_lora_sft_resumes_exactly(tmp_path, sft_run, base_run):
    run_dir = shutil.copytree(sft_run, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / str(SFT_STEPS))
    stages.sft(sft_config(train=dict(init_from=str(base_run))), run_dir)
    assert without_timings(rundir.read_metrics(run_dir)) == without_timings(rundir.read_metrics(sft_run))
    resumed, uninterrupted = saved_state(run_dir), saved_state(sft_run)
    assert_bit_equal(resumed.params, uninterrupted.params)
    for x, y in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(uninterrupted.opt_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # its module's trained-run fixture is the cost
def test_changed_lora_settings_are_refused_on_resume(tmp_path, capsys, sft_run, base_run):
    before = snapshot(sft_run)
    code, _, err = run_cli(capsys, *sft_argv(sft_run, "--init-from", base_run, "--lora.rank", 8))
    assert_one_error(code, err, "lora.rank", str(sft_run))
    assert snapshot(sft_run) == before


def test_lora_errors_write_nothing(tmp_path, capsys, base_run):
    argv = sft_argv(tmp_path / "run", "--init-from", base_run)
    code, _, err = run_cli(capsys, *argv, "--lora.targets", "no-such-kernel")
    assert_one_error(code, err, "lora.targets='no-such-kernel'", "matches no parameter")
    code, _, err = run_cli(capsys, *argv, "--lora.rank", -2)
    assert_one_error(code, err, "lora.rank=-2")
    code, _, err = run_cli(capsys, "pretrain", "--run-dir", tmp_path / "run", "--lora.rank", 4)
    assert_one_error(code, err, "lora.rank=4", "pretraining")
    assert not (tmp_path / "run").exists()


def test_commands_take_a_lora_run(tmp_path, capsys, sft_run):
    code, out, err = run_cli(capsys, "eval", "--run", sft_run, "--num-prompts", 8, "--max-new-tokens", 4)
    assert code == 0, err
    assert "gold_score" in out + err and (sft_run / "eval.json").exists()
    code, out, err = run_cli(capsys, "generate", "--run", sft_run, "--prompt", "count", "--max-new-tokens", 4)
    assert code == 0, err


def test_export_hf_writes_the_merged_model(tmp_path, sft_run):
    hf.export_hf(sft_run, tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    cfg = rundir.read_config(sft_run)
    merged = numpy_merge(saved_state(sft_run).params, SCALE)
    params = unflatten_dict({path: jnp.asarray(value, jnp.float32) for path, value in merged.items()})
    tokens = random_tokens((2, 12), vocab=cfg.model.vocab_size)
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(GPT(cfg.model).apply(params, tokens)), theirs, atol=1e-4)


def test_peft_adapter_tensors_of_fused_and_untied_kernels(tmp_path):
    """Llama's q|k|v and gate|up fuse into one kernel here: each Hugging Face module gets the
    kernel's A and its columns of B, and PEFT's delta scale * B @ A of every module is the
    merged export's tensor minus the base export's (lm_head too, untied); PEFT itself loads them."""
    cfg = tiny_model(positions="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, tie_embeddings=False)
    targets = LoRAConfig(rank=3, alpha=6.0, targets="kernel")
    tree = randomized(lora.wrap(init(cfg), targets, jax.random.PRNGKey(0)))
    tensors = hf.adapter_tensors("llama", cfg, tree["lora"]["params"], "model.")

    def exported(params):
        flat = flatten_dict(params["params"])
        return {name: np.asarray(x, np.float64) for link in hf.links("llama", cfg, "model.")
                for name, x in zip(link.names, link.split(flat[link.path]))}

    base, merged = exported(tree["base"]), exported(lora.merge(tree, targets))
    modules = {name.removesuffix(".weight") for name in base if not np.array_equal(base[name], merged[name])}
    assert len(modules) == 2 * (3 + 1 + 2 + 1) + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert {name.removeprefix(hf.PEFT_PREFIX).rsplit(".lora_", 1)[0] for name in tensors} == modules
    for module in modules:
        a = tensors[f"{hf.PEFT_PREFIX}{module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"{hf.PEFT_PREFIX}{module}.lora_B.weight"].astype(np.float64)
        assert a.shape[0] == b.shape[1] == 3
        np.testing.assert_allclose(base[module + ".weight"] + 2.0 * b @ a, merged[module + ".weight"],
                                   rtol=1e-5, atol=1e-6, err_msg=module)

    # PEFT loads them onto transformers' Llama holding the base, and gives this model's merged logits
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf.hf_config("llama", cfg, None))).eval()
    hf_model.load_state_dict({name: torch.tensor(x, dtype=torch.float32) for name, x in base.items()})
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / hf.ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 3, "lora_alpha": 6.0, "lora_dropout": 0.0,
        "bias": "none", "target_modules": sorted(module.removeprefix("model.") for module in modules)}))
    save_file(tensors, folder / hf.ADAPTER_FILE, metadata={"format": "pt"})
    peft_model = PeftModel.from_pretrained(hf_model, folder).eval()
    tokens = random_tokens((2, 12), vocab=cfg.vocab_size)
    with torch.no_grad():
        theirs = peft_model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(GPT(cfg).apply(lora.merge(tree, targets), tokens))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_export_hf_adapter_only_is_peft_s_adapter(tmp_path, capsys, sft_run, base_run):
    """GPT-2's Conv1D weights are [in, out] (PEFT's fan_in_fan_out): the base run's export plus
    scale * (B @ A).T of each adapter is the LoRA run's merged export."""
    code, _, err = run_cli(capsys, "export-hf", "--run", sft_run, "--out", tmp_path / "adapter", "--adapter-only")
    assert code == 0, err
    adapter_config = json.loads((tmp_path / "adapter" / hf.ADAPTER_CONFIG).read_text())
    modules = [f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")]
    assert adapter_config | {"target_modules": sorted(adapter_config["target_modules"])} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 8.0, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": True, "inference_mode": True, "target_modules": sorted(modules),
        "base_model_name_or_path": str(base_run)}
    adapters = load_file(tmp_path / "adapter" / hf.ADAPTER_FILE)
    assert set(adapters) == {f"base_model.model.{m}.lora_{x}.weight" for m in modules for x in "AB"}
    hf.export_hf(base_run, tmp_path / "base")
    hf.export_hf(sft_run, tmp_path / "merged")
    base, merged = (load_file(tmp_path / name / hf.SAFETENSORS_FILE) for name in ("base", "merged"))
    for module in modules:
        a, b = (adapters[f"base_model.model.{module}.lora_{x}.weight"].astype(np.float64) for x in "AB")
        assert a.shape == (RANK, base[module + ".weight"].shape[0]) and b.shape == (base[module + ".weight"].shape[1], RANK)
        np.testing.assert_allclose(base[module + ".weight"] + SCALE * (b @ a).T, merged[module + ".weight"],
                                   rtol=1e-5, atol=1e-6, err_msg=module)
    untouched = [name for name in base if not any(name.startswith(m + ".weight") for m in modules)]
    assert untouched and all(np.array_equal(base[name], merged[name]) for name in untouched)
    # PEFT itself loads the folder onto the base export and gives the merged export's logits
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokens = torch.tensor(random_tokens((2, 12), vocab=rundir.read_config(sft_run).model.vocab_size))
    with torch.no_grad():
        theirs, ours = peft_model(tokens).logits.numpy(), merged_model(tokens).logits.numpy()
    assert not np.allclose(theirs, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")(tokens)
                           .logits.detach().numpy(), atol=1e-3)  # the adapters are really applied
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    code, _, err = run_cli(capsys, "export-hf", "--run", base_run, "--out", tmp_path / "none", "--adapter-only")
    assert_one_error(code, err, "--adapter-only", "not a LoRA run")
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------
# RL: the frozen models are the adapters' base

END, PROMPT, NEW = 1, 6, 5
RL_RUN = config.replace(tiny_run(), model=dict(vocab_size=48, n_layer=2, context_len=16, init_std=0.2),
                        ppo=dict(temperature=0.8, max_new_tokens=NEW, group_size=2), lora=dict(rank=RANK, alpha=8.0))


def rl_experience(cfg, params, reference, reward):
    """experience() of fixed prompts and responses (no end token, no padding: plain causal rows)."""
    prompt, response = random_tokens((4, PROMPT), seed=5), random_tokens((4, NEW), seed=6)
    assert END not in response and 0 not in response
    batch, stats = experience(params, reference, reward, {"gain": jnp.float32(1.5), "bias": jnp.float32(-0.2)},
                              prompt, np.ones(prompt.shape, bool), response, jnp.float32(0.1), cfg=cfg,
                              end_ids=(END,), pad_id=0)
    return jax.tree.map(np.asarray, batch), stats, np.concatenate([prompt, response], axis=1)


def numpy_logprobs(cfg, params, tokens: np.ndarray) -> np.ndarray:
    """log-probabilities of each response token at the sampling temperature, by hand."""
    logits = np.asarray(GPT(cfg.model).apply(params, tokens[:, :-1]), np.float64) / cfg.ppo.temperature
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    chosen = np.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return chosen[:, PROMPT - 1:]


def test_grpo_reference_logprobs_are_the_base_policy_s():
    cfg = config.replace(RL_RUN, ppo=dict(algorithm="grpo"))
    base = {"policy": init(cfg.model, seed=1)}
    tree = randomized(lora.wrap(base, cfg.lora, jax.random.PRNGKey(2)))
    reward = init(cfg.model, seed=3, head="scalar")
    batch, _, tokens = rl_experience(cfg, tree, None, reward)
    np.testing.assert_allclose(batch["ref_logprobs"][:, PROMPT - 1:], numpy_logprobs(cfg, base["policy"], tokens),
                               rtol=1e-4, atol=1e-5)
    merged = unflatten_dict({path[1:]: value for path, value in numpy_merge(tree, SCALE).items()})
    np.testing.assert_allclose(batch["old_logprobs"][:, PROMPT - 1:], numpy_logprobs(cfg, merged, tokens),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(batch["old_logprobs"], batch["ref_logprobs"], atol=1e-3)  # the adapters moved it


def test_ppo_scores_with_the_value_model_s_base():
    """PPO's value model starts as the reward model, so the reward model is the value's base: the
    experience of a LoRA tree with no frozen copies equals that of the merged models given the
    base models as reference and reward model."""
    base = {"policy": init(RL_RUN.model, seed=1), "value": init(RL_RUN.model, seed=3, head="scalar")}
    tree = randomized(lora.wrap(base, RL_RUN.lora, jax.random.PRNGKey(2)))
    shared_batch, shared_stats, _ = rl_experience(RL_RUN, tree, None, None)
    plain = config.replace(RL_RUN, lora=dict(rank=0))
    batch, stats, _ = rl_experience(plain, lora.merge(tree, RL_RUN.lora), base["policy"], base["value"])
    for name, value in batch.items():
        np.testing.assert_allclose(shared_batch[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, value in stats.items():
        np.testing.assert_allclose(shared_stats[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert stats["kl"] != 0


def reward_argv(run_dir, *flags) -> list[str]:
    cfg = config.replace(config.preset("tiny", "reward"), model=dict(SMALL, head="scalar"),
                         optim=dict(warmup_steps=2), data=dict(world_pairs=64),
                         train=dict(batch_size=8, max_steps=SFT_STEPS, log_every=1, eval_every=SFT_STEPS,
                                    eval_batches=1, ckpt_every=SFT_STEPS, progress=False),
                         lora=dict(rank=RANK, alpha=8.0))
    return [str(arg) for arg in ["reward", *cli_flags(cfg, stage="reward"), "--run-dir", run_dir, *flags]]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, sft_run):
    """`genai-jax reward --lora.rank 4` from the LoRA SFT run; read-only."""
    run_dir = tmp_path_factory.mktemp("reward") / "run"
    cli.main(reward_argv(run_dir, "--init-from", sft_run))
    return run_dir


@pytest.mark.slow
def test_lora_reward_model_trains_adapters_and_its_new_head(reward_run, sft_run):
    state = saved_state(reward_run)
    base = state.params["base"]["params"]
    sft_params = runs.load_trained(sft_run)[2]  # the init run is a LoRA run: its merged params
    assert_bit_equal({name: value for name, value in base.items() if name != "scalar_head"}, sft_params["params"])
    head = state.params["full"]["params"]["scalar_head"]
    assert not np.allclose(head["kernel"], base["scalar_head"]["kernel"])  # the new head trained
    cfg, _, params = runs.load_trained(reward_run)
    assert_flat_close(params, numpy_merge(state.params, SCALE))
    assert (reward_run / "reward_normalization.json").exists()


@pytest.mark.slow
def test_lora_dpo_starts_at_its_reference(tmp_path, sft_run):
    """DPO's reference is the init run, which is the adapters' base: at step 0 the policy is the
    reference exactly, so the held-out sigmoid loss is log 2."""
    cfg = config.replace(config.preset("tiny", "dpo"), model=SMALL, optim=dict(warmup_steps=2),
                         data=dict(world_pairs=64), dpo=dict(gold_prompts=8),
                         train=dict(batch_size=8, max_steps=2, log_every=1, eval_every=2, eval_batches=1,
                                    ckpt_every=2, progress=False, init_from=str(sft_run)),
                         lora=dict(rank=RANK, alpha=8.0))
    stages.dpo(cfg, tmp_path / "dpo")
    first_eval = next(r for r in rundir.read_metrics(tmp_path / "dpo") if "val_loss" in r)
    assert first_eval["step"] == 0 and first_eval["val_loss"] == pytest.approx(np.log(2.0), rel=1e-6)
    state = saved_state(tmp_path / "dpo")
    assert_bit_equal(state.params["base"], runs.load_trained(sft_run)[2])
    assert_flat_close(runs.load_trained(tmp_path / "dpo")[2], numpy_merge(state.params, SCALE))


PPO_CHANGES = dict(data=dict(world_chats=64), ppo=dict(epochs=2, minibatches=1, gold_prompts=8, max_new_tokens=8),
                   train=dict(batch_size=8, max_steps=2, eval_every=2, ckpt_every=2, progress=False),
                   lora=dict(rank=RANK, alpha=8.0))


@pytest.mark.slow
def test_lora_ppo_holds_no_second_copy_and_trains_only_adapters(tmp_path, sft_run, reward_run):
    cfg = config.replace(config.preset("tiny", "ppo"), model=SMALL, **PPO_CHANGES)
    cfg = config.replace(cfg, ppo=dict(policy=str(sft_run), reward=str(reward_run)))
    rlhf.ppo(cfg, tmp_path / "ppo")
    state = saved_state(tmp_path / "ppo")
    assert_bit_equal(state.params["base"]["policy"], runs.load_trained(sft_run)[2])
    assert_bit_equal(state.params["base"]["value"], runs.load_trained(reward_run)[2])
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    head = SMALL["d_model"] + 1  # the value head (kernel and bias) trains in full
    assert sum(x.size for x in moments) == 2 * (2 * adapter_count(rundir.read_config(sft_run).model) + head)
    records = rundir.read_metrics(tmp_path / "ppo")
    assert [r["step"] for r in records if "kl" in r] == [1, 2]
    assert records[0]["n_trainable_params"] == 2 * adapter_count(rundir.read_config(sft_run).model) + head
    assert records[0]["n_params"] == sum(x.size for x in jax.tree.leaves(state.params["base"]))  # the two models
    _, _, policy = runs.load_trained(tmp_path / "ppo")
    assert_flat_close(policy, {path[1:]: value for path, value in numpy_merge(state.params, SCALE).items()
                               if path[0] == "policy"})
