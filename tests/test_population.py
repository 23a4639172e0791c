"""Populations (docs/population.md): replica k of a population logs what a standalone run with its
seeds and hyperparameters logs (pretrain, SFT, reward model), replicas differ, a population run
resumes exactly, `extract` writes a replica as an ordinary run, and bad populations are refused
in one line each."""

import json

import jax
import numpy as np
import pytest
from conftest import assert_one_error, cases, cli_flags, run_cli, snapshot, tiny_run

from genai_jax import config, population, rlhf, rundir, runs, stages
from genai_jax.config import UserError
from genai_jax.evaluation import gold_eval
from genai_jax.parallel import check_fits
from genai_jax.replica_log import TAGS

SINGLE = dict(strategy="single", sample_tokens=0)
NOISY = dict(dropout=0.1)  # so that each replica's own dropout keys matter
TOLERANCE = dict(rtol=2e-4, atol=1e-5)


def pretrain_config(**sections) -> config.RunConfig:
    cfg = tiny_run(model=NOISY, train=SINGLE)
    return config.replace(cfg, **{name: dict(values) for name, values in sections.items()})


def with_train(cfg: config.RunConfig, **train) -> config.RunConfig:
    return config.replace(cfg, train=train)


# Differ between any two runs: throughput, PPO's rollout phases, host memory.
TIMINGS = ("tokens_per_s", "generate_s", "experience_s", "train_s", "generate_tokens_per_s", "host_peak_mib")


def logged(records: list[dict], kind: str) -> dict[int, dict[str, float]]:
    """{step: metrics} of the records holding `kind` (`loss`: train, `val_loss`: eval, ...),
    without timings and tags."""
    return {r["step"]: {name: value for name, value in r.items() if name not in ("step", *TIMINGS, *TAGS)}
            for r in records if kind in r}


def replica_log(run_dir, index: int, kind: str = "loss") -> dict[int, dict[str, float]]:
    return logged([r for r in rundir.read_metrics(run_dir) if r.get("replica") == index], kind)


def standalone_log(run_dir, kind: str = "loss") -> dict[int, dict[str, float]]:
    return logged(rundir.read_metrics(run_dir), kind)


def assert_same_log(replica: dict, standalone: dict) -> None:
    assert replica.keys() == standalone.keys() and replica
    for step in standalone:
        assert replica[step].keys() == standalone[step].keys(), step
        for name, value in standalone[step].items():
            np.testing.assert_allclose(replica[step][name], value, **TOLERANCE, err_msg=f"step {step}: {name}")


def assert_replica_is_the_standalone_run(runner, cfg: config.RunConfig, run_dir, index: int, alone_dir,
                                         kinds=("loss", "val_loss"), alone: config.RunConfig | None = None) -> None:
    """Run replica `index`'s ordinary run (`standalone`, or `alone`) with `runner` into `alone_dir`
    and compare each kind of record it logs (train, eval, ...) with the replica's."""
    runner(alone or standalone(cfg, index), alone_dir)
    for kind in kinds:
        assert_same_log(replica_log(run_dir, index, kind), standalone_log(alone_dir, kind))


def standalone(cfg: config.RunConfig, index: int) -> config.RunConfig:
    """Replica `index`'s ordinary run, spelled out independently of `population.replica_config`:
    train.seed + k and data order data.seed + k, with k = index mod train.population."""
    k = index % cfg.train.population
    return config.replace(cfg, train=dict(seed=cfg.train.seed + k, population=1), data=dict(shuffle_seed=cfg.data.seed + k),
                          population=config.PopulationConfig())


def trained(tmp_path_factory, runner, cfg: config.RunConfig, name: str):
    """(cfg, run directory) of `runner(cfg)` in a new directory; read-only for the tests sharing it."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    runner(cfg, run_dir)
    return cfg, run_dir


@pytest.fixture(scope="module")
def pretrain_population(tmp_path_factory):
    """A tiny pretraining population of 3 (seeds 0, 1, 2), dropout on, evaluated at steps 0, 2, 4."""
    return trained(tmp_path_factory, stages.pretrain, with_train(pretrain_config(), population=3, eval_every=2),
                   "population")


def test_pretrain_replica_equals_a_standalone_run(tmp_path, pretrain_population):
    cfg, run_dir = pretrain_population
    assert_replica_is_the_standalone_run(stages.pretrain, cfg, run_dir, 2, tmp_path / "alone")


def test_replicas_differ_and_the_population_logs_their_mean_and_std(pretrain_population):
    cfg, run_dir = pretrain_population
    records = rundir.read_metrics(run_dir)
    losses = np.array([[replica_log(run_dir, k)[step]["loss"] for step in (1, 2, 3, 4)] for k in range(3)])
    assert len({tuple(row) for row in losses}) == 3  # own init, data order and dropout each
    assert [replica_log(run_dir, k)[4] != replica_log(run_dir, 0)[4] for k in (1, 2)] == [True, True]
    tags = [r for r in records if r.get("replica") == 1 and "loss" in r][0]
    assert tags["seed"] == 1 and tags["hyperparameters"] == {}
    for kind, expected in (("mean", losses.mean(axis=0)), ("std", losses.std(axis=0))):
        logged_moment = [r["loss"] for r in records if r.get("population") == kind and "loss" in r]
        np.testing.assert_allclose(logged_moment, expected, rtol=1e-6)
    assert records[0]["replicas"] == 3
    assert runs.final_record(run_dir)["loss"] == pytest.approx(losses[:, -1].mean())
    boards = sorted(p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir())
    assert boards == ["population_mean", "population_std", "replica_0", "replica_1", "replica_2"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", cases(
    "replicas-over-data", **{"replicas-over-data": dict(mesh_data=4, mesh_fsdp=2), "replicas-whole": dict(mesh_data=8)}))
def test_a_population_on_the_mesh_equals_one_on_one_device(tmp_path, pretrain_population, mesh):
    """Four replicas: over the data axis (each replica's rows over fsdp), or, three not dividing
    eight, whole on every device with their rows over all of them."""
    cfg, run_dir = pretrain_population
    size = 4 if "mesh_fsdp" in mesh else 3
    meshed = with_train(cfg, strategy="mesh", population=size, **mesh)
    stages.pretrain(meshed, tmp_path / "mesh")
    reference = run_dir if size == 3 else tmp_path / "single"
    if size == 4:
        stages.pretrain(with_train(cfg, population=4), reference)
    for k in range(size):
        assert_same_log(replica_log(tmp_path / "mesh", k), replica_log(reference, k))


@pytest.mark.slow
def test_learning_rate_axis_replica_equals_a_standalone_run_with_that_rate(tmp_path):
    cfg = config.replace(pretrain_config(), population=config.PopulationConfig((("optim.lr", (1e-3, 6e-3)),)))
    stages.pretrain(cfg, tmp_path / "population")
    # replica 1: lr 6e-3, the whole schedule scaled by 6e-3 / optim.lr (min_lr too), seed and data order 0
    alone = config.replace(standalone(cfg, 1), optim=dict(lr=6e-3, min_lr=cfg.optim.min_lr * 6e-3 / cfg.optim.lr))
    assert_replica_is_the_standalone_run(stages.pretrain, cfg, tmp_path / "population", 1, tmp_path / "alone",
                                         ("loss",), alone)
    hyper = [r["hyperparameters"] for r in rundir.read_metrics(tmp_path / "population") if r.get("replica") == 1]
    assert hyper[0] == {"optim.lr": 6e-3}
    lrs = [replica_log(tmp_path / "population", k)[4]["lr"] for k in (0, 1)]
    assert lrs[1] == pytest.approx(6 * lrs[0])


def test_a_looped_population_equals_the_vmapped_one(tmp_path, pretrain_population):
    """train.population_map=loop (`jax.lax.map`) trains the same replicas as `jax.vmap`."""
    cfg, run_dir = pretrain_population
    stages.pretrain(with_train(cfg, population_map="loop"), tmp_path / "loop")
    for k in range(3):
        assert_same_log(replica_log(tmp_path / "loop", k), replica_log(run_dir, k))
        assert_same_log(replica_log(tmp_path / "loop", k, "val_loss"), replica_log(run_dir, k, "val_loss"))


@pytest.mark.slow
def test_population_resumes_exactly(tmp_path):
    cfg = with_train(pretrain_config(), population=2, max_steps=4, ckpt_every=2)
    stages.pretrain(cfg, tmp_path / "straight")
    stages.pretrain(with_train(cfg, max_steps=2), tmp_path / "resumed")
    stages.pretrain(cfg, tmp_path / "resumed")
    for k in (0, 1):
        assert replica_log(tmp_path / "resumed", k) == replica_log(tmp_path / "straight", k)
    steps = [(r["step"], r["replica"]) for r in rundir.read_metrics(tmp_path / "resumed") if "loss" in r and "replica" in r]
    assert len(steps) == len(set(steps)), "a step is logged twice"


def test_a_population_that_does_not_fit_is_refused_with_the_number_that_fits():
    class Device:
        device_kind = "TestAccelerator"

        def memory_stats(self):
            return {"bytes_limit": 1000 * 2**20, "bytes_in_use": 0}

    advice = population.Population(with_train(pretrain_config(), population=8)).memory_advice
    with pytest.raises(UserError, match="about 3 of its 8 replicas fit") as error:
        check_fits({"peak": 2600.0, "arguments": 0.0}, Device(), advice=advice)
    assert "train.population" in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Fine-tuning stages: SFT and the reward model, every replica from the same init run

SMALL = dict(n_layer=2, n_head=2, d_model=32, context_len=64)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    stages.pretrain(tiny_run(model=SMALL, data=dict(world_docs=200), train=SINGLE), run_dir)
    return run_dir


def sft_config(base_run, **train) -> config.RunConfig:
    return config.replace(
        config.preset("tiny", "sft"), model=SMALL | NOISY, optim=dict(warmup_steps=2), data=dict(world_chats=64),
        train=dict(batch_size=8, max_steps=4, log_every=1, eval_every=2, eval_batches=1, ckpt_every=4,
                   progress=False, init_from=str(base_run), **SINGLE) | train,
    )


@pytest.fixture(scope="module")
def sft_population(tmp_path_factory, base_run):
    return trained(tmp_path_factory, stages.sft, sft_config(base_run, population=2), "sft")


@pytest.mark.slow
def test_sft_replica_equals_a_standalone_run(tmp_path, sft_population):
    cfg, run_dir = sft_population
    assert_replica_is_the_standalone_run(stages.sft, cfg, run_dir, 1, tmp_path / "alone")
    assert replica_log(run_dir, 0)[4]["loss"] != replica_log(run_dir, 1)[4]["loss"]


@pytest.mark.slow
def test_extract_writes_a_replica_as_an_ordinary_run(tmp_path, capsys, sft_population):
    cfg, run_dir = sft_population
    code, _, err = run_cli(capsys, "extract", "--run", run_dir, "--replica", 1, "--run-dir", tmp_path / "one")
    assert code == 0, err
    saved = rundir.read_config(tmp_path / "one")
    assert saved == population.replica_config(rundir.read_config(run_dir), population.replicas(cfg)[1])
    assert saved.train.seed == 1 and saved.data.shuffle_seed == 1 and saved.train.population == 1
    assert standalone_log(tmp_path / "one") == replica_log(run_dir, 1)

    # `eval` of the extracted run scores the replica's own parameters
    code, _, err = run_cli(capsys, "eval", "--run", tmp_path / "one", "--num-prompts", 16, "--max-new-tokens", 8)
    assert code == 0, err
    extracted = json.loads((tmp_path / "one" / "eval.json").read_text())
    stacked = runs.restore_latest(run_dir, runs.make_stage_init_fn(rundir.read_config(run_dir)))[0].params
    replica_cfg, tokenizer, _ = runs.load_trained(tmp_path / "one")
    direct = gold_eval(replica_cfg, population.take(stacked, 1), tokenizer, 16, max_new_tokens=8, temperature=0.0,
                       seed=0)
    assert extracted["gold_score"] == direct["gold_score"]
    assert [e["response"] for e in extracted["examples"]] == [e["response"] for e in direct["examples"]]

    # and it resumes as an ordinary run, from the replica's data position
    final = stages.sft(config.replace(saved, train=dict(max_steps=6)), tmp_path / "one")
    assert final["step"] == 6


@pytest.mark.slow
def test_sft_replica_i_starts_from_replica_i_of_a_pretraining_population(tmp_path, capsys):
    stages.pretrain(tiny_run(model=SMALL, data=dict(world_docs=200), train=SINGLE | dict(population=2)),
                    tmp_path / "base")
    assert run_cli(capsys, "extract", "--run", tmp_path / "base", "--replica", 1, "--run-dir", tmp_path / "base1")[0] == 0
    cfg = sft_config(tmp_path / "base", population=2)
    stages.sft(cfg, tmp_path / "population")
    assert_replica_is_the_standalone_run(stages.sft, cfg, tmp_path / "population", 1, tmp_path / "alone", ("loss",),
                                         config.replace(standalone(cfg, 1), train=dict(init_from=str(tmp_path / "base1"))))
    with pytest.raises(UserError, match="population of 2 replicas and this run's has 3"):
        stages.sft(sft_config(tmp_path / "base", population=3), tmp_path / "three")
    assert not (tmp_path / "three").exists()


@pytest.mark.slow
def test_reward_replica_equals_a_standalone_run(tmp_path, base_run):
    stages.sft(sft_config(base_run), tmp_path / "sft")
    cfg = config.replace(
        config.preset("tiny", "reward"), model=SMALL, optim=dict(warmup_steps=2), data=dict(world_pairs=64),
        train=dict(batch_size=8, max_steps=3, log_every=1, eval_every=3, eval_batches=1, ckpt_every=3,
                   progress=False, init_from=str(tmp_path / "sft"), population=2, **SINGLE),
    )
    stages.reward(cfg, tmp_path / "population")
    # train and held-out losses, and the normalisation fitted afterwards
    assert_replica_is_the_standalone_run(stages.reward, cfg, tmp_path / "population", 1, tmp_path / "alone",
                                         ("loss", "val_loss", "gain"))
    normalizations = json.loads((tmp_path / "population" / "reward_normalization.json").read_text())["replicas"]
    assert normalizations[0] != normalizations[1]


@pytest.mark.slow
def test_dpo_beta_axis_replica_equals_a_standalone_run_with_that_beta(tmp_path, base_run):
    """dpo.beta reaches the objective as a traced keyword; the final evaluation (the implicit
    reward's pair accuracy, gold) uses each replica's own beta too."""
    stages.sft(sft_config(base_run, max_steps=2), tmp_path / "sft")
    cfg = config.replace(
        config.preset("tiny", "dpo"), model=SMALL, optim=dict(warmup_steps=2), data=dict(world_pairs=64),
        dpo=dict(gold_prompts=16, max_new_tokens=8),
        train=dict(batch_size=8, max_steps=3, log_every=1, eval_every=3, eval_batches=1, ckpt_every=3,
                   progress=False, init_from=str(tmp_path / "sft"), **SINGLE),
        population=config.PopulationConfig((("dpo.beta", (0.1, 0.5)),)),
    )
    stages.dpo(cfg, tmp_path / "population")
    assert_replica_is_the_standalone_run(stages.dpo, cfg, tmp_path / "population", 1, tmp_path / "alone",
                                         ("loss", "val_loss", "val_pair_accuracy"),
                                         config.replace(standalone(cfg, 1), dpo=dict(beta=0.5)))
    assert replica_log(tmp_path / "population", 0)[3]["loss"] != replica_log(tmp_path / "population", 1)[3]["loss"]


def reward_config(init_from, **train) -> config.RunConfig:
    return config.replace(
        config.preset("tiny", "reward"), model=SMALL, optim=dict(warmup_steps=2), data=dict(world_pairs=64),
        train=dict(batch_size=8, max_steps=3, log_every=1, eval_every=3, eval_batches=1, ckpt_every=3,
                   progress=False, init_from=str(init_from), **SINGLE) | train,
    )


def ppo_config(policy, reward, **train) -> config.RunConfig:
    return config.replace(
        config.preset("tiny", "ppo"), model=SMALL, data=dict(world_chats=64),
        ppo=dict(policy=str(policy), reward=str(reward), epochs=1, minibatches=2, gold_prompts=16, max_new_tokens=8),
        train=dict(batch_size=8, max_steps=2, eval_every=2, ckpt_every=2, progress=False, **SINGLE) | train,
    )


@pytest.mark.slow
def test_reward_and_ppo_replica_i_start_from_replica_i_of_their_populations(tmp_path, capsys, sft_population):
    """The recipe as populations: reward replica i from SFT replica i (its trunk, its own world
    pairs and normalisation samples), PPO replica i from SFT replica i (policy, reference) and
    reward replica i (reward model, value init, normalisation), each equal to the standalone run
    from the extracted replicas."""
    sft_cfg, sft_dir = sft_population

    def extract(run_dir, name: str):
        assert run_cli(capsys, "extract", "--run", run_dir, "--replica", 1, "--run-dir", tmp_path / name)[0] == 0
        return tmp_path / name

    cfg = reward_config(sft_dir, population=2)
    stages.reward(cfg, tmp_path / "reward")
    assert_replica_is_the_standalone_run(stages.reward, cfg, tmp_path / "reward", 1, tmp_path / "reward_alone",
                                         ("loss", "val_loss", "gain", "val_label_accuracy"),
                                         config.replace(standalone(cfg, 1), train=dict(init_from=str(extract(sft_dir, "sft1")))))
    data_records = [r for r in rundir.read_metrics(tmp_path / "reward") if "pairs" in r and "replica" in r]
    assert [r["replica"] for r in data_records] == [0, 1]  # each replica's own pairs, counted at step 0

    cfg = ppo_config(sft_dir, tmp_path / "reward", population=2)
    rlhf.ppo(cfg, tmp_path / "ppo")
    alone = config.replace(standalone(cfg, 1), ppo=dict(policy=str(tmp_path / "sft1"),
                                                        reward=str(extract(tmp_path / "reward", "reward1"))))
    assert_replica_is_the_standalone_run(rlhf.ppo, cfg, tmp_path / "ppo", 1, tmp_path / "ppo_alone",
                                         ("proxy_reward", "val_gold_score"), alone)


def test_fine_tuning_from_a_population_of_another_size_is_refused(tmp_path, capsys, pretrain_population):
    _, run_dir = pretrain_population
    for argv, needles in (
        (["sft", "--init-from", run_dir, "--train.population", "2"], ["--init-from", "population of 3", "has 2"]),
        (["sft", "--init-from", run_dir], ["population of 3", "genai-jax extract"]),
        (["ppo", "--policy", run_dir, "--reward", "gold", "--train.strategy", "single", "--train.population", "2"],
         ["--policy", "population of 3", "has 2"]),
    ):
        assert_one_error(*run_cli(capsys, *argv, "--run-dir", tmp_path / "run")[::2], *needles)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The RL stage: each replica its own prompt order, rollouts, beta and value head

@pytest.mark.slow
def test_ppo_replica_equals_a_standalone_run(tmp_path, capsys, base_run):
    stages.sft(sft_config(base_run, max_steps=2), tmp_path / "sft")
    cfg = config.replace(
        config.preset("tiny", "ppo"), model=SMALL, data=dict(world_chats=64),
        ppo=dict(policy=str(tmp_path / "sft"), reward="gold", epochs=2, minibatches=2, gold_prompts=16,
                 max_new_tokens=8),
        train=dict(batch_size=8, max_steps=2, eval_every=2, ckpt_every=2, progress=False, population=2, **SINGLE),
        population=config.PopulationConfig((("ppo.kl_coef", (0.1, 0.3)), ("ppo.clip_ratio", (0.15,)))),
    )
    rlhf.ppo(cfg, tmp_path / "population")
    # replica 3: kl_coef 0.3 (the second value), clip_ratio 0.15, seed and prompt order 1
    assert_replica_is_the_standalone_run(rlhf.ppo, cfg, tmp_path / "population", 3, tmp_path / "alone",
                                         ("proxy_reward", "val_gold_score"),
                                         config.replace(standalone(cfg, 3), ppo=dict(kl_coef=0.3, clip_ratio=0.15)))
    assert replica_log(tmp_path / "population", 1)[2]["beta"] == 0.1
    losses = [replica_log(tmp_path / "population", k, "proxy_reward")[1]["loss"] for k in (0, 1)]
    assert losses[0] != losses[1]  # seeds 0 and 1: their own prompts, rollouts and value heads

    assert run_cli(capsys, "extract", "--run", tmp_path / "population", "--replica", 3, "--run-dir",
                   tmp_path / "three")[0] == 0
    extracted_cfg, _, extracted = runs.load_trained(tmp_path / "three")
    assert extracted_cfg.ppo.kl_coef == 0.3 and extracted_cfg.ppo.clip_ratio == 0.15 and extracted_cfg.train.seed == 1
    _, _, policy = runs.load_trained(tmp_path / "alone")
    for a, b in zip(jax.tree.leaves(extracted), jax.tree.leaves(policy)):
        np.testing.assert_allclose(a, b, **TOLERANCE)


# ---------------------------------------------------------------------------------------------
# Refusals: one line each, nothing written


@pytest.mark.parametrize("flags, needles", [
    (["--population.model.n-layer", "2,4"], ["--population.model.n_layer", "changes shapes"]),
    (["--population.dpo.beta", "0.1,0.2"], ["--population.dpo.beta", "the pretrain stage does not read"]),
    (["--population.optim.nope", "1"], ["--population.optim.nope", "not a config field"]),
    (["--population.optim.lr", "1e-3,fast"], ["--population.optim.lr", "expected a number"]),
    (["--train.population", "2", "--train.strategy", "pmap"], ["train.strategy=single or mesh"]),
    (["--train.population", "0"], ["train.population=0"]),
    (["--train.population", "2", "--train.strategy", "mesh", "--train.population-map", "loop"],
     ["train.population_map=loop", "train.strategy=single"]),
])
def test_bad_populations_are_refused_in_one_line(tmp_path, capsys, flags, needles):
    argv = ["pretrain", *cli_flags(pretrain_config()), "--run-dir", tmp_path / "run", *flags]
    assert_one_error(*run_cli(capsys, *argv)[::2], *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, needles", [
    (["--train.strategy", "mesh"], ["the ppo stage runs under train.strategy=single"]),
    (["--train.strategy", "single", "--ppo.algorithm", "grpo", "--ppo.group-size", "2",
      "--population.ppo.kl-coef", "0,0.1"],
     ["--population.ppo.kl_coef", "grpo"]),
])
def test_the_rl_stage_refuses_what_its_population_cannot_vary(tmp_path, capsys, flags, needles):
    code, _, err = run_cli(capsys, "ppo", "--policy", tmp_path, "--reward", "gold", "--run-dir", tmp_path / "run",
                           "--train.population", "2", *flags)
    assert_one_error(code, err, *needles)


def test_a_population_pipeline_refuses_what_a_stage_cannot_train_before_the_first_stage(tmp_path, capsys):
    argv = ["pipeline", "--run-dir", tmp_path / "run", "--train.population", "2", "--train.strategy", "mesh"]
    assert_one_error(*run_cli(capsys, *argv)[::2], "ppo stage runs under train.strategy=single")
    assert not (tmp_path / "run").exists()


def test_commands_refuse_a_population_run_and_extract_an_unknown_replica(tmp_path, capsys, pretrain_population):
    _, run_dir = pretrain_population
    before = snapshot(run_dir)
    assert_one_error(*run_cli(capsys, "eval", "--run", run_dir)[::2], "population of 3", "genai-jax extract")
    assert_one_error(*run_cli(capsys, "extract", "--run", run_dir, "--replica", 3, "--run-dir", tmp_path / "x")[::2],
                     "--replica 3", "0 to 2")
    assert snapshot(run_dir) == before and not (tmp_path / "x").exists()


def test_a_population_cannot_resume_with_another_size(tmp_path, capsys, pretrain_population):
    cfg, run_dir = pretrain_population
    with pytest.raises(UserError, match="train.population"):
        stages.pretrain(with_train(cfg, population=2), run_dir)


# ---------------------------------------------------------------------------------------------
# LoRA populations: each replica its own adapters (from its own key) over its own copy of the base

LORA = dict(rank=4, alpha=8.0)


@pytest.mark.slow
def test_lora_sft_replica_equals_a_standalone_lora_run(tmp_path, base_run):
    cfg = config.replace(sft_config(base_run, population=2), lora=LORA)
    stages.sft(cfg, tmp_path / "population")
    assert_replica_is_the_standalone_run(stages.sft, cfg, tmp_path / "population", 1, tmp_path / "alone")
    records = rundir.read_metrics(tmp_path / "population")
    assert records[0]["n_trainable_params"] == rundir.read_metrics(tmp_path / "alone")[0]["n_trainable_params"]
    assert replica_log(tmp_path / "population", 0)[4]["loss"] != replica_log(tmp_path / "population", 1)[4]["loss"]


@pytest.mark.slow
def test_lora_ppo_replica_equals_a_standalone_lora_run(tmp_path, base_run):
    """The reference is each replica's base and the value model's base the frozen critic init."""
    stages.sft(sft_config(base_run, max_steps=2), tmp_path / "sft")
    cfg = config.replace(
        config.preset("tiny", "ppo"), model=SMALL, data=dict(world_chats=64), lora=LORA,
        ppo=dict(policy=str(tmp_path / "sft"), reward="gold", epochs=1, minibatches=2, gold_prompts=16,
                 max_new_tokens=8),
        train=dict(batch_size=8, max_steps=2, eval_every=2, ckpt_every=2, progress=False, population=2, **SINGLE),
    )
    rlhf.ppo(cfg, tmp_path / "population")
    assert_replica_is_the_standalone_run(rlhf.ppo, cfg, tmp_path / "population", 1, tmp_path / "alone",
                                         ("proxy_reward", "val_gold_score"))
