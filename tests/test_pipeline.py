"""The whole recipe end to end (pretrain -> sft -> reward -> ppo) on a very small config, PPO's
exact resume, and the errors of the ppo command."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import assert_one_error, assert_trees_close, run_cli, snapshot

from genai_jax import completion, config, pipeline, rlhf, rundir, runs
from genai_jax.sweeps import report

pytestmark = pytest.mark.slow  # the four stages end to end

SMALL = dict(n_layer=2, n_head=2, d_model=32, context_len=64)
SHORT = dict(batch_size=8, max_steps=4, ckpt_every=4, eval_every=4, eval_batches=1, progress=False)
STAGE_CHANGES = {
    "base": dict(data=dict(world_docs=200), train=dict(SHORT, sample_tokens=0)),
    "sft": dict(data=dict(world_chats=64), train=SHORT),
    "reward": dict(data=dict(world_pairs=64), train=SHORT),
    "ppo": dict(data=dict(world_chats=64), ppo=dict(epochs=2, minibatches=1, gold_prompts=16, max_new_tokens=8),
                train=dict(batch_size=8, max_steps=2, eval_every=2, ckpt_every=2, progress=False)),
}
# Rollout timings and the host memory peak differ between runs; everything else in a record must not.
TIMINGS = ("generate_s", "experience_s", "train_s", "generate_tokens_per_s", "host_peak_mib")


def small_configs(run_dir) -> dict[str, config.RunConfig]:
    configs = pipeline.pipeline_configs("tiny", run_dir, {"model": SMALL})
    return {stage: config.replace(cfg, **STAGE_CHANGES[stage]) for stage, cfg in configs.items()}


@pytest.fixture(scope="module")
def finished_pipeline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    summary = pipeline.run_pipeline(small_configs(run_dir), run_dir, gold_prompts=16)
    return run_dir, summary


def test_pipeline_runs_every_stage_and_summarises(finished_pipeline, capsys):
    run_dir, summary = finished_pipeline
    for stage in pipeline.STAGES:
        assert completion.finished(run_dir / stage, small_configs(run_dir)[stage].train.max_steps), stage
    assert set(summary) == set(pipeline.STAGES)
    for stage in ("base", "sft", "ppo"):
        assert 0.0 <= summary[stage]["gold_sampled"] <= 100.0 and 0.0 <= summary[stage]["gold_greedy"] <= 100.0
    assert 0.0 <= summary["reward"]["val_gold_accuracy"] <= 1.0
    assert np.isfinite(summary["ppo"]["kl"]) and np.isfinite(summary["base"]["val_loss"])
    ppo_records = rundir.read_metrics(run_dir / "ppo")
    assert [r["step"] for r in ppo_records if "proxy_reward" in r] == [1, 2]
    assert ppo_records[0]["step_memory_mib"] > 0  # PPO's step, too, is compiled ahead of time
    # The stages are wired: ppo starts from this pipeline's sft and reward runs.
    ppo_cfg = rundir.read_config(run_dir / "ppo")
    assert (ppo_cfg.ppo.policy, ppo_cfg.ppo.reward) == (str(run_dir / "sft"), str(run_dir / "reward"))
    assert rundir.read_config(run_dir / "reward").train.init_from == str(run_dir / "sft")


def test_pipeline_skips_finished_stages(finished_pipeline, capsys):
    run_dir, summary = finished_pipeline
    before = {stage: snapshot(run_dir / stage / "checkpoints") for stage in pipeline.STAGES}
    capsys.readouterr()
    again = pipeline.run_pipeline(small_configs(run_dir), run_dir, gold_prompts=16)
    out = capsys.readouterr().out
    assert out.count("already finished") == len(pipeline.STAGES)
    assert {stage: snapshot(run_dir / stage / "checkpoints") for stage in pipeline.STAGES} == before
    assert again == summary  # the same policies, the same greedy evaluation
    table = pipeline.format_summary(summary)
    assert all(line.split()[0] in ("stage", *pipeline.STAGES) for line in table.splitlines())


def test_a_population_pipeline_trains_replica_i_of_each_stage_from_replica_i(tmp_path, capsys):
    """--train.population 2 for the whole recipe: every stage a population (the replica chains are
    the stages' tests in test_population.py), PPO under train.strategy=single, and a summary of
    each replica's own policies (checked against `eval` of an extracted replica) with their means,
    which the sweep report reads per replica."""
    configs = pipeline.pipeline_configs("tiny", tmp_path / "run", {"model": SMALL, "train": {"population": 2}})
    configs = {stage: config.replace(cfg, **STAGE_CHANGES[stage]) for stage, cfg in configs.items()}
    summary = pipeline.run_pipeline(configs, tmp_path / "run", gold_prompts=16)
    assert [rundir.read_config(tmp_path / "run" / stage).train.population for stage in pipeline.STAGES] == [2] * 4
    assert rundir.read_config(tmp_path / "run" / "ppo").train.strategy == "single"

    replicas = summary["replicas"]
    assert len(replicas) == 2 and replicas[0]["ppo"] != replicas[1]["ppo"]
    for stage in pipeline.STAGES:
        for name, mean in summary[stage].items():
            np.testing.assert_allclose(mean, np.mean([replica[stage][name] for replica in replicas]), err_msg=name)
    assert replicas[1]["base"]["val_loss"] == runs.final_record(tmp_path / "run" / "base", 1)["val_loss"]

    code, _, err = run_cli(capsys, "extract", "--run", tmp_path / "run" / "ppo", "--replica", 1,
                           "--run-dir", tmp_path / "ppo1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", "--run", tmp_path / "ppo1", "--num-prompts", 16, "--max-new-tokens", 32)
    assert code == 0, err
    greedy = json.loads((tmp_path / "ppo1" / "eval.json").read_text())["gold_score"]
    assert replicas[1]["ppo"]["gold_greedy"] == 100 * greedy

    table = pipeline.format_summary(summary)
    assert [line.split()[0] for line in table.splitlines()] == [
        "stage", *pipeline.STAGES, *(f"{stage}/{k}" for k in (0, 1) for stage in pipeline.STAGES)]
    metrics = report.final_metrics(str(tmp_path / "run"), "pipeline", 1)
    assert metrics["ppo.gold_greedy"] == replicas[1]["ppo"]["gold_greedy"]
    assert metrics["base.val_loss"] == replicas[1]["base"]["val_loss"]


def test_a_ppo_population_after_ordinary_stages_shares_their_rows(finished_pipeline, tmp_path):
    """--ppo.train.population 2 alone: PPO's seeds over the finished base, SFT and reward runs,
    whose summary rows are every replica's (and the ordinary pipeline's)."""
    run_dir, ordinary = finished_pipeline
    for stage in ("base", "sft", "reward"):
        shutil.copytree(run_dir / stage, tmp_path / "run" / stage)
    configs = pipeline.pipeline_configs("tiny", tmp_path / "run", {"model": SMALL},
                                        {"ppo": {"train": {"population": 2}}})
    configs = {stage: config.replace(cfg, **STAGE_CHANGES[stage]) for stage, cfg in configs.items()}
    summary = pipeline.run_pipeline(configs, tmp_path / "run", gold_prompts=16)
    assert rundir.read_config(tmp_path / "run" / "ppo").train.strategy == "single"
    first, second = summary["replicas"]
    for stage in ("base", "sft", "reward"):
        assert first[stage] == second[stage] == summary[stage] == ordinary[stage], stage
    assert first["ppo"] != second["ppo"]


def test_ppo_resumes_exactly(finished_pipeline, tmp_path):
    """Stop after iteration 2 of 4, relaunch: the same records and the same final policy as a run
    that never stopped (policy, value, optimizer, KL controller, PRNG and prompt stream)."""
    run_dir, _ = finished_pipeline
    cfg = config.replace(small_configs(run_dir)["ppo"], train=dict(max_steps=4, ckpt_every=2, keep_checkpoints=5),
                         ppo=dict(kl_target=1.0, kl_horizon=100))  # beta changes every iteration
    rlhf.ppo(cfg, tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for step in ("3", "4"):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / step, ignore_errors=True)
    rlhf.ppo(cfg, tmp_path / "resumed")

    def records(name):
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rundir.read_metrics(tmp_path / name)]

    straight, resumed = records("straight"), records("resumed")
    assert [r["step"] for r in straight if "proxy_reward" in r] == [1, 2, 3, 4]
    assert len({r["beta"] for r in straight if "beta" in r}) == 4
    assert resumed == straight
    assert_trees_close(runs.load_trained(tmp_path / "resumed")[2], runs.load_trained(tmp_path / "straight")[2],
                       rtol=0, atol=0)


def test_ppo_refuses_runs_of_the_wrong_kind(finished_pipeline, tmp_path, capsys):
    run_dir, _ = finished_pipeline
    flags = ["--train.no-progress", "--run-dir", tmp_path / "ppo"]
    code, _, err = run_cli(capsys, "ppo", *flags)
    assert_one_error(code, err, "--policy", "--reward")
    code, _, err = run_cli(capsys, "ppo", "--policy", run_dir / "reward", "--reward", run_dir / "reward", *flags)
    assert_one_error(code, err, str(run_dir / "reward"), "not a policy run")
    code, _, err = run_cli(capsys, "ppo", "--ppo.policy", run_dir / "sft", "--ppo.reward", run_dir / "sft", *flags)
    assert_one_error(code, err, str(run_dir / "sft"), "not a reward model run")
    code, _, err = run_cli(capsys, "sft", "--policy", run_dir / "sft", *flags)
    assert_one_error(code, err, "--policy and --reward belong to `genai-jax ppo`")
    assert not (tmp_path / "ppo").exists()


def test_ppo_batch_must_split_into_minibatches(finished_pipeline, tmp_path):
    run_dir, _ = finished_pipeline
    cfg = config.replace(small_configs(run_dir)["ppo"], ppo=dict(minibatches=3))
    with pytest.raises(config.UserError, match="ppo.minibatches=3"):
        rlhf.ppo(cfg, tmp_path / "ppo")
    assert not (tmp_path / "ppo").exists()


def test_a_ppo_run_loads_as_its_policy(finished_pipeline):
    run_dir, _ = finished_pipeline
    cfg, _, params = runs.load_trained(run_dir / "ppo")
    sft_params = runs.load_trained(run_dir / "sft")[2]
    assert cfg.model.head == "lm"
    assert jax.tree.structure(params) == jax.tree.structure(sft_params)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), params, sft_params))
    assert any(changed)  # PPO moved the policy


def test_ppo_against_the_gold_checker(finished_pipeline, tmp_path):
    """`ppo.reward=gold`: the score of each rollout is the gold checker's, so the logged proxy
    reward is exactly the logged gold score of the same samples."""
    run_dir, _ = finished_pipeline
    cfg = config.replace(small_configs(run_dir)["ppo"], ppo=dict(reward="gold"))
    rlhf.ppo(cfg, tmp_path / "ppo")
    iterations = [r for r in rundir.read_metrics(tmp_path / "ppo") if "proxy_reward" in r]
    assert [r["step"] for r in iterations] == [1, 2]
    for record in iterations:
        assert record["proxy_reward"] == pytest.approx(record["gold_score"], abs=1e-6)
    assert rundir.read_config(tmp_path / "ppo").ppo.reward == "gold"
    assert runs.load_trained(tmp_path / "ppo")[0].model.head == "lm"


def test_ppo_against_gold_needs_the_task_world(finished_pipeline, tmp_path):
    run_dir, _ = finished_pipeline
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "reverse the word abc"}\n')
    cfg = config.replace(small_configs(run_dir)["ppo"], ppo=dict(reward="gold"), data=dict(path=str(prompts)))
    with pytest.raises(config.UserError, match="gold needs the task world"):
        rlhf.ppo(cfg, tmp_path / "ppo")


def test_ppo_compiles_its_rollout_once_ahead_of_time(finished_pipeline, tmp_path, caplog, capsys):
    """Generation and `experience` are compiled before the first iteration, their memory printed
    and logged at step 0, and both iterations reuse them."""
    run_dir, _ = finished_pipeline
    cfg = config.replace(small_configs(run_dir)["ppo"], ppo=dict(max_new_tokens=6))  # shapes not compiled yet
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        rlhf.ppo(cfg, tmp_path / "run")
    first = rundir.read_metrics(tmp_path / "run")[0]
    assert first["generate_memory_mib"] > 0 and first["experience_memory_mib"] > 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rollout ")]
    assert [line.split(" memory")[0] for line in printed] == ["rollout generate", "rollout experience"]
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(")]
    rollout_prompts = f"int32[{cfg.train.batch_size},{first['prompt_len']}]"  # the held-out evaluation's differ
    assert sum(m.startswith("Compiling jit(generate)") and rollout_prompts in m for m in compiles) == 1
    assert sum(m.startswith("Compiling jit(experience)") for m in compiles) == 1


# ---------------------------------------------------------------------------------------------
# Critic-free RL (GRPO, RLOO) and rewards from code, in the same RL stage

GRPO = dict(algorithm="grpo", group_size=4, kl_coef=0.1)


def critic_free_config(run_dir, **ppo) -> config.RunConfig:
    """4 prompts x a group of 4 per iteration: the 16 rollouts of 2 minibatches."""
    return config.replace(small_configs(run_dir)["ppo"], train=dict(batch_size=4),
                          ppo=dict(GRPO, minibatches=2) | ppo)


def test_grpo_ptx_resumes_exactly_and_stores_no_value_model(finished_pipeline, tmp_path):
    """GRPO with PPO-ptx's pretraining term: its windows, too, are drawn again after a resume."""
    run_dir, _ = finished_pipeline
    cfg = config.replace(critic_free_config(run_dir, ptx_coef=0.5),
                         train=dict(max_steps=4, ckpt_every=2, keep_checkpoints=5))
    rlhf.ppo(cfg, tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    rlhf.ppo(cfg, tmp_path / "resumed")

    def records(name):
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rundir.read_metrics(tmp_path / name)]

    straight = records("straight")
    iterations = [r for r in straight if "proxy_reward" in r]
    assert [r["step"] for r in iterations] == [1, 2, 3, 4]
    assert all(r["reference_kl"] >= 0 and "value_loss" not in r and "explained_variance" not in r for r in iterations)
    assert all(r["ptx_loss"] > 0 for r in iterations)
    assert [r["step"] for r in straight if "val_pretrain_loss" in r] == [0, 2, 4]
    assert records("resumed") == straight
    assert_trees_close(runs.load_trained(tmp_path / "resumed")[2], runs.load_trained(tmp_path / "straight")[2],
                       rtol=0, atol=0)
    # No value model is stored: every saved leaf (params, Adam's moments) is under the policy.
    def saved_params(checkpoint):
        paths = json.loads((checkpoint / "state" / "_METADATA").read_text())["tree_metadata"]
        return {path.split(", ")[1] for path in paths if path.startswith("('params'")}

    assert saved_params(tmp_path / "straight" / "checkpoints" / "4") == {"'policy'"}
    assert saved_params(run_dir / "ppo" / "checkpoints" / "2") == {"'policy'", "'value'"}  # PPO's has both


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_against_the_gold_checker(finished_pipeline, tmp_path, algorithm):
    run_dir, _ = finished_pipeline
    cfg = critic_free_config(run_dir, algorithm=algorithm, reward="gold", kl_coef=0.0 if algorithm == "grpo" else 0.1)
    rlhf.ppo(cfg, tmp_path / "run")
    iterations = [r for r in rundir.read_metrics(tmp_path / "run") if "proxy_reward" in r]
    assert [r["step"] for r in iterations] == [1, 2]
    for record in iterations:
        assert record["proxy_reward"] == pytest.approx(record["gold_score"], abs=1e-6)
        assert ("reference_kl" in record) is False  # grpo at kl_coef 0 computes no KL term; rloo has none


REWARD_MODULE = '''
def length(prompts, responses):
    return [float(len(r)) for r in responses]

def short(prompts, responses):
    return [1.0]

def broken(prompts, responses):
    raise RuntimeError("no scorer today")

def infinite(prompts, responses):
    return [float("inf")] * len(responses)
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)  # MODULE is imported from the working directory
    monkeypatch.delitem(__import__("sys").modules, "my_rewards", raising=False)
    return tmp_path


def test_a_reward_function_of_code_scores_the_rollouts(finished_pipeline, reward_module):
    run_dir, _ = finished_pipeline
    cfg = critic_free_config(run_dir, reward="python:my_rewards:length")
    rlhf.ppo(cfg, reward_module / "run")
    iterations = [r for r in rundir.read_metrics(reward_module / "run") if "proxy_reward" in r]
    # the score is each response's length in characters: at most max_new_tokens, and not all zero
    assert all(0 < r["proxy_reward"] <= cfg.ppo.max_new_tokens for r in iterations)


@pytest.mark.parametrize("function, message", [
    ("python:no_such_module:f", "cannot import no_such_module (ModuleNotFoundError"),
    ("python:my_rewards:missing", "my_rewards has no function missing"),
    ("python:my_rewards", "expected python:MODULE:FUNCTION"),
    ("python:my_rewards:short", "returned 1 score(s) of shape (1,) for 16 responses"),
    ("python:my_rewards:broken", "failed: RuntimeError: no scorer today"),
    ("python:my_rewards:infinite", "returned inf for response 0"),
])
def test_reward_function_errors_are_one_line(finished_pipeline, reward_module, capsys, function, message):
    run_dir, _ = finished_pipeline
    flags = ["--policy", run_dir / "sft", "--reward", function, "--run-dir", reward_module / "run",
             "--model.n-layer", 2, "--model.n-head", 2, "--model.d-model", 32, "--model.context-len", 64,
             "--train.batch-size", 4, "--train.max-steps", 1, "--train.no-progress", "--data.world-chats", 64,
             "--ppo.algorithm", "grpo", "--ppo.group-size", 4, "--ppo.minibatches", 2, "--ppo.max-new-tokens", 8,
             "--ppo.gold-prompts", 16]
    code, _, err = run_cli(capsys, "ppo", *flags)
    assert_one_error(code, err, f"--reward {function}", message)
    checkpoints = reward_module / "run" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # no checkpoint touched


def test_every_rl_run_logs_its_pretraining_loss_and_ptx_needs_the_lineage(finished_pipeline, tmp_path):
    """The alignment tax: the policy's held-out LM loss on the pretraining text of its lineage, at
    every evaluation of every algorithm (here PPO's own run); without the lineage, ptx is refused."""
    run_dir, _ = finished_pipeline
    evaluations = [r for r in rundir.read_metrics(run_dir / "ppo") if "val_gold_score" in r]
    assert evaluations and all(np.isfinite(r["val_pretrain_loss"]) for r in evaluations)
    orphan = tmp_path / "sft"
    shutil.copytree(run_dir / "sft", orphan)
    saved = rundir.read_config(orphan)
    rundir.write_config(orphan, config.replace(saved, train=dict(init_from=str(tmp_path / "gone"))))
    cfg = config.replace(small_configs(run_dir)["ppo"], ppo=dict(policy=str(orphan), ptx_coef=1.0))
    with pytest.raises(config.UserError, match="ppo.ptx-coef needs the pretraining run"):
        rlhf.ppo(cfg, tmp_path / "ppo")
    assert not (tmp_path / "ppo").exists()
