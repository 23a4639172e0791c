"""Stage runners: each builds its data, model, objective and strategy, then calls `train.fit`.

They take a config and a run directory and touch nothing else, so scripts and tests drive them
without the CLI. Running a stage again on the same directory resumes it.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Callable

import jax
import numpy as np
from etils import epath

from genai_jax import config as config_lib
from genai_jax import dpo as dpo_lib
from genai_jax import lora
from genai_jax import population as population_lib
from genai_jax import reward as reward_lib
from genai_jax import rundir
from genai_jax.checkpoint import Checkpointer
from genai_jax.config import SEQ_LEN_FROM_DATA, RunConfig, UserError
from genai_jax.data import chat as chat_data
from genai_jax.data import loader, sources
from genai_jax.data.chat import build_preference_rows, fitted_seq_len, longest_response
from genai_jax.data.preferences import preference_line
from genai_jax.distributed import say
from genai_jax.evaluation import policy_gold, respond
from genai_jax.model import GPT, count_params, with_scalar_head
from genai_jax.objectives.bradley_terry import make_bradley_terry_objective
from genai_jax.objectives.dpo import make_dpo_objective
from genai_jax.objectives.lm import make_lm_objective
from genai_jax.objectives.masked_lm import make_masked_lm_objective
from genai_jax.optim import make_stage_optimizer, schedule
from genai_jax.parallel import compile_step, host_copy, host_peak_mib, make_strategy, peak_record, sync_processes, to_host
from genai_jax.runs import final_record, load_replicas, make_stage_init_fn, open_run, restore_target, with_vocab
from genai_jax.sampling import check_length, generate
from genai_jax.tokenizer import Tokenizer, build_tokenizer
from genai_jax.train import fit, make_eval_step, make_train_step


def seq_len(cfg: RunConfig) -> int:
    length = cfg.data.seq_len or cfg.model.context_len
    if length > cfg.model.context_len:
        raise UserError(f"data.seq_len={length} is longer than model.context_len={cfg.model.context_len}")
    return length


def with_data_seq_len(cfg: RunConfig, length: int) -> RunConfig:
    """`cfg` with the sequence length its data gave when it asked for one (data.seq_len =
    SEQ_LEN_FROM_DATA), so that the run's config.json records it and a resumed run compares alike."""
    return config_lib.replace(cfg, data={"seq_len": length}) if cfg.data.seq_len == SEQ_LEN_FROM_DATA else cfg


def check_config(cfg: RunConfig, stage: str) -> int:
    """The sequence length, once the settings a run directory cannot fix later are checked (so a
    bad flag fails before anything is written), the lora.* settings against the model's params
    among them."""
    population_lib.check(cfg, stage)
    divisor = make_strategy(cfg.train, population_lib.Population(cfg).strategy_size).batch_divisor
    loader.per_process_batch(cfg.train.batch_size, divisor * cfg.optim.grad_accum)
    if cfg.lora.rank:
        jax.eval_shape(make_stage_init_fn(cfg))  # raises on bad lora.* settings
    return seq_len(cfg)


def train_stage(cfg: RunConfig, run_dir: epath.Path, *, make_objective, train_source, val_source,
                initial_params=None, summary: dict | list[dict] | None = None):
    """The loop every stage shares: strategy, grain iterators, restore or init, compile, fit.

    `make_objective(apply_fn, deterministic, **keywords)` builds the stage's objective (a
    population's axes may set keywords); train_source and val_source are random-access records
    of one LM row each, or lists of one per replica of a population (the reward stage's from an
    SFT population), and the step-0 `summary` a list of one record per replica then too. The
    state starts from `initial_params(index, seed)` of each replica (a fine-tuning stage) or from
    a fresh init, unless the run directory holds a checkpoint, which always wins. A population
    (`population.Population`) stacks its replicas' states and maps the step over them. The train step is compiled ahead of time, so a step too big for the device
    fails before training; its memory is printed and logged at step 0 (`step_memory_mib`, per
    device). With lora.rank > 0 the state's params are a LoRA tree of the initial params
    (`genai_jax.lora`) and only its adapters (and a scalar head) train.
    Returns the final params as the model takes them (a LoRA tree merged), stacked over a
    population's replicas.
    """
    population = population_lib.Population(cfg)
    strategy = make_strategy(cfg.train, population.strategy_size)
    batch_size = loader.per_process_batch(cfg.train.batch_size, strategy.batch_divisor * cfg.optim.grad_accum)
    train_iter = population.train_iterator(train_source, batch_size)
    val_batches = []
    if val_source is not None:
        val_batches = population.validation_batches(val_source, cfg.train.batch_size, cfg.train.eval_batches,
                                                    seed=cfg.data.seed + 1)

    init_fn = make_stage_init_fn(cfg)
    abstract_state = jax.eval_shape(init_fn)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(restore_target(abstract_state, strategy))
        state = strategy.place_state(state)
        train_iter.set_state(data_state)
    else:
        state = strategy.compile_init(make_stage_init_fn(cfg, initial_params), abstract_state)()
    start_step = int(to_host(strategy.state_to_host(state).step).flat[0])

    train_step, eval_step = stage_steps(cfg, population, make_objective, strategy.reduce)
    merged = population.map(partial(lora.merge, cfg=cfg.lora))
    example_batch = jax.tree.map(lambda x: np.zeros((batch_size, *np.shape(x)), np.asarray(x).dtype),
                                 population.first_source(train_source)[0])

    step_fn, memory = compile_step(
        strategy, train_step, abstract_state,
        example=(state, strategy.place_batch(population.stack_like(example_batch)),
                 population.keys(to_host(strategy.state_to_host(state).rng), 0)),
        advice=population.memory_advice,
    )
    eval_fn = strategy.compile_eval(eval_step, abstract_state)
    writer = rundir.MetricsWriter(run_dir, start_step)
    if start_step == 0:
        size = population.size  # the counts are one replica's
        model_params = jax.eval_shape(merged, abstract_state.params)
        writer.write({"step": 0, "n_params": count_params(model_params) // size,
                      "n_params_non_embedding": count_params(model_params, embeddings=False) // size,
                      "n_trainable_params": count_params(lora.trainable(abstract_state.params, cfg.lora)) // size,
                      **({"replicas": population.size} if population.stacked else {}),
                      **peak_record("step_memory_mib", memory), **(summary if isinstance(summary, dict) else {})})
        if isinstance(summary, list):
            writer.write_all(population.log(0, summary))
    try:  # closed on preemption too, so TensorBoard gets every record
        state = fit(
            state,
            step_fn=step_fn,
            eval_fn=eval_fn,
            strategy=strategy,
            train_iter=train_iter,
            val_batches=val_batches,
            checkpointer=checkpointer,
            writer=writer,
            cfg=cfg.train,
            tokens_per_step=cfg.train.batch_size * seq_len(cfg),
            lr_fn=schedule(cfg.optim, cfg.train.max_steps),
            population=population,
        )
    finally:
        writer.close()
        checkpointer.close()
    return merged(strategy.state_to_host(state).params)


def stage_steps(cfg: RunConfig, population: population_lib.Population, make_objective, reduce):
    """(train step, eval step) of a stage: `train.make_train_step` and `make_eval_step` of
    `make_objective(apply_fn, deterministic, **keywords)`, mapped over the population's replicas,
    each replica's objective keywords and learning-rate scale traced numbers (`step_values`)."""
    apply_fn = GPT(cfg.model).apply

    def objective(deterministic: bool, values: dict):
        keywords = {k: v for k, v in values.items() if k != "lr_scale"}
        return lora.objective(make_objective(apply_fn, deterministic, **keywords), cfg.lora)

    def train_step(values: dict):
        return make_train_step(objective(False, values), make_stage_optimizer(cfg, values.get("lr_scale")),
                               reduce, cfg.optim.grad_accum)

    return (population.map_step(train_step),
            population.map_step(lambda values: make_eval_step(objective(True, values), reduce)))


def pretrain(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Stage 1: train a GPT with the LM loss on the configured corpus. Returns the final metrics."""
    run_dir = epath.Path(run_dir)
    if cfg.lora.rank:
        raise UserError(f"lora.rank={cfg.lora.rank}: adapters fine-tune a trained model (sft, reward, dpo, ppo), "
                        "not a pretraining run")
    length = check_config(cfg, "pretrain")
    text = sources.load_text(cfg.data)
    cfg, tokenizer = open_run(cfg, run_dir, lambda directory: build_tokenizer(cfg.data, text, directory))

    train_tokens, val_tokens = loader.split_tokens(tokenizer.encode(text), cfg.data.val_fraction, length)
    val_source = loader.TokenWindows(val_tokens, length) if cfg.data.val_fraction > 0 else None
    params = train_stage(
        cfg, run_dir, make_objective=make_lm_objective, train_source=loader.TokenWindows(train_tokens, length),
        val_source=val_source, summary={"train_tokens": len(train_tokens)},
    )
    if cfg.train.sample_tokens:
        params = host_copy(params)  # a collective: every process takes part
        if jax.process_index() == 0:
            prompt = val_tokens[:1] if len(val_tokens) else train_tokens[:1]
            new = min(cfg.train.sample_tokens, cfg.model.context_len - 1)
            samples = [sample_text(cfg, replica_params, tokenizer, prompt, new, seed=replica.seed)
                       for replica, replica_params in population_lib.Population(cfg).split(params)]
            (run_dir / "samples.txt").write_text("".join(sample + "\n" for sample in samples))
        # The others wait here rather than at a barrier that times out (JAX's at exit, orbax's in
        # the next stage's restore), however long the sample takes.
        sync_processes("pretrain: sampled")
    return final_record(run_dir)


def sft(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Stage 2: fine-tune the `train.init_from` run on conversations with the response-masked loss."""
    run_dir = epath.Path(run_dir)
    cfg, tokenizer, base_params, _ = load_init(cfg, "sft", "sft needs --init-from RUN_DIR (a pretraining run)")
    length = check_config(cfg, "sft")
    train_chats, val_chats = chat_data.load_conversations(cfg.data)
    train_rows, train_stats = chat_data.encode_rows(train_chats, tokenizer, cfg.data, length,
                                                    limit=cfg.model.context_len)
    length = train_stats["seq_len"]
    cfg = with_data_seq_len(cfg, length)
    val_rows = None
    if val_chats:
        val_rows = chat_data.encode_rows(val_chats, tokenizer, cfg.data, length, first=len(train_chats) + 1)[0]
    cfg, _ = open_run(cfg, run_dir, tokenizer.save)
    say(f"sft data: {train_stats}")
    train_stage(
        cfg, run_dir, make_objective=make_masked_lm_objective, train_source=loader.Rows(train_rows),
        val_source=None if val_rows is None else loader.Rows(val_rows),
        initial_params=lambda index, seed: base_params(index),
        summary=train_stats,
    )
    return final_record(run_dir)


def load_init(cfg: RunConfig, stage: str, missing: str) -> tuple[RunConfig, Tokenizer, Callable, bool]:
    """(config with vocab, tokenizer, `params(index)`, whether they differ per replica) of the
    `train.init_from` run a stage starts from: every replica from that run, or replica i from
    replica i of a population run (`runs.load_replicas`). A run whose model differs from this
    stage's is refused (dropout and head may differ), and so is a population this stage cannot
    train (`population.check`)."""
    population_lib.check(cfg, stage)
    if not cfg.train.init_from:
        raise UserError(missing)
    base_cfg, tokenizer, base_params, per_replica = load_replicas(
        cfg.train.init_from, population_lib.Population(cfg).size, "--init-from")
    cfg = with_vocab(cfg, tokenizer)
    mismatched = [name for name in config_lib.diff(base_cfg.model, cfg.model) if name not in ("dropout", "head")]
    if mismatched:
        differences = ", ".join(
            f"model.{name}={getattr(base_cfg.model, name)!r} there, {getattr(cfg.model, name)!r} here"
            for name in mismatched)
        raise UserError(
            f"--init-from {cfg.train.init_from} was trained with a different model config ({differences}); "
            "leave out those --model flags (the CLI takes them from the --init-from run)"
        )
    return cfg, tokenizer, base_params, per_replica


def reward(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Stage 2b: a reward model (the SFT trunk + a scalar head) trained with Bradley-Terry on
    preference groups, then normalised on the SFT policy's samples for the ends of the training
    prompts (`reward.normalization_prompts`). Returns the final metrics. A run stopped after its
    last checkpoint but before its normalisation is unfinished (`completion.finished`): run again,
    it restores that checkpoint, trains no step and fits the normalisation.
    A population from an SFT population: replica i's trunk, world pairs and normalisation samples
    come from SFT replica i."""
    run_dir = epath.Path(run_dir)
    if cfg.model.head != "scalar":
        raise UserError("a reward model needs model.head=scalar")
    cfg, tokenizer, sft_of, per_replica = load_init(cfg, "reward", "reward needs --init-from RUN_DIR (an SFT run)")
    policy_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head="lm"))
    length = check_config(cfg, "reward")
    population = population_lib.Population(cfg)
    policies = [sft_of(index) for index in range(population.size if per_replica else 1)]
    data = [preference_rows(cfg, policy_cfg, policy, tokenizer, length) for policy in policies]
    cfg = with_data_seq_len(cfg, max(stats["seq_len"] for *_, stats in data))
    prompts = [reward_lib.normalization_prompts(cfg, tokenizer, train_groups) for train_groups, *_ in data]
    cfg, _ = open_run(cfg, run_dir, tokenizer.save)
    for *_, stats in data:
        say(f"reward data: {stats}")

    def per_policy(sources: list):
        """What `train_stage` takes: one source for every replica, or one per replica."""
        return sources if per_replica else sources[0]

    val_sources = [None if val_rows is None else loader.Rows(val_rows) for _, _, val_rows, _, _ in data]
    reward_params = train_stage(
        cfg, run_dir, make_objective=partial(make_bradley_terry_objective, centering=cfg.objective.reward_centering),
        train_source=per_policy([loader.Rows(train_rows) for _, train_rows, *_ in data]),
        val_source=None if val_sources[0] is None else per_policy(val_sources),
        initial_params=lambda index, seed: with_scalar_head(sft_of(index), cfg.model, jax.random.PRNGKey(seed + 1)),
        summary=per_policy([stats for *_, stats in data]),
    )
    reward_params = host_copy(reward_params)  # a collective: every process takes part
    if jax.process_index() == 0:  # the others wait at the barrier below
        def evaluated(index: int, reward_params) -> dict:
            """Normalised on the policy's samples for training prompts; checked on a second,
            independent draw; the held-out pairs' accuracies."""
            own = index if per_replica else 0  # the replica's policy and data
            _, _, val_rows, val_agrees, _ = data[own]
            fit_samples, check_samples = (
                [r.text for r in respond(policy_cfg, policies[own], tokenizer, prompts[own],
                                         max_new_tokens=reward_lib.SAMPLE_TOKENS, temperature=1.0,
                                         seed=cfg.data.seed + offset)]
                for offset in (11, 13)
            )
            normalization = reward_lib.fit_normalization(
                reward_lib.raw_scores(cfg, reward_params, tokenizer, prompts[own], fit_samples))
            check = reward_lib.scores(cfg, reward_params, tokenizer, prompts[own], check_samples, normalization)
            result = {**normalization, "normalized_mean": float(np.mean(check)), "normalized_std": float(np.std(check))}
            if val_agrees is not None and val_rows is not None:
                accuracy = reward_lib.pair_accuracy(cfg, reward_params, val_rows)
                result |= {"val_label_accuracy": float(accuracy.mean()),
                           "val_gold_accuracy": float(reward_lib.gold_accuracy(accuracy, val_agrees).mean()),
                           "val_label_gold_agreement": float(np.mean(val_agrees))}
            return result

        results = [evaluated(replica.index, replica_params) for replica, replica_params in population.split(reward_params)]
        reward_lib.save_normalization(run_dir, population.result_file(
            [{name: result[name] for name in ("gain", "bias")} for result in results]))
        writer = rundir.MetricsWriter(run_dir, cfg.train.max_steps)
        writer.write_all(population.log(cfg.train.max_steps, results))
        writer.close()
    sync_processes("reward: normalised")  # a later stage of this launch (the pipeline's ppo) reads it
    return final_record(run_dir)


def dpo(cfg: RunConfig, run_dir: str | os.PathLike) -> dict:
    """Stage 2c: direct preference optimisation of the `train.init_from` run (an SFT policy, also
    the frozen reference) on preference groups: the reward stage's data, world pairs by default.
    At the end, process 0 logs the implicit reward's held-out pair accuracy (against gold too, on
    world data) and the policy's held-out gold score. Returns the final metrics."""
    run_dir = epath.Path(run_dir)
    if cfg.model.head != "lm":
        raise UserError("dpo trains a policy: model.head must be lm")
    cfg, tokenizer, sft_of, per_replica = load_init(cfg, "dpo", "dpo needs --init-from RUN_DIR (an SFT run)")
    if per_replica:
        raise UserError(f"--init-from {cfg.train.init_from} is a population: a dpo population starts every replica "
                        f"from one SFT run, its reference; `genai-jax extract --run {cfg.train.init_from} --replica I "
                        "--run-dir OUT` writes one replica as a run")
    sft_params = sft_of(0)
    length = check_config(cfg, "dpo")
    _, train_rows, val_rows, val_agrees, stats = preference_rows(cfg, cfg, sft_params, tokenizer, length)
    cfg = with_data_seq_len(cfg, stats["seq_len"])
    cfg, _ = open_run(cfg, run_dir, tokenizer.save)
    say(f"dpo data: {stats}")
    named_rows = {"train": train_rows} | ({"val": val_rows} if val_rows is not None else {})
    reference_free = cfg.dpo.loss == "simpo"
    if reference_free or cfg.dpo.precompute_reference:
        reference = ({name: np.zeros(rows["tokens"].shape[:2], np.float32) for name, rows in named_rows.items()}
                     if reference_free else dpo_lib.cached_reference_logprobs(cfg, run_dir, sft_params, named_rows))
        named_rows = {name: dict(rows, ref_logprobs=reference[name]) for name, rows in named_rows.items()}
    on_the_fly = None if reference_free or cfg.dpo.precompute_reference else jax.device_get(sft_params)
    objective = partial(make_dpo_objective, loss=cfg.dpo.loss, beta=cfg.dpo.beta,
                        label_smoothing=cfg.dpo.label_smoothing, simpo_gamma=cfg.dpo.simpo_gamma,
                        reference_params=on_the_fly)
    params = train_stage(
        cfg, run_dir, make_objective=objective, train_source=loader.Rows(named_rows["train"]),
        val_source=loader.Rows(named_rows["val"]) if "val" in named_rows else None,
        initial_params=lambda index, seed: sft_params, summary=stats,
    )
    params = host_copy(params)  # a collective: every process takes part
    if jax.process_index() == 0:  # the others wait at the barrier below
        population = population_lib.Population(cfg)

        def evaluated(replica: population_lib.Replica, policy_params) -> dict:
            # the implicit reward is beta * log-ratio: each replica's own beta
            replica_cfg = population_lib.replica_config(cfg, replica)
            result = {}
            if val_rows is not None:
                accuracy = dpo_lib.implicit_pair_accuracy(replica_cfg, policy_params, sft_params, val_rows)
                result["val_pair_accuracy"] = float(accuracy.mean())
                if val_agrees is not None:
                    result["val_gold_accuracy"] = float(reward_lib.gold_accuracy(accuracy, val_agrees).mean())
            return result | policy_gold(cfg, policy_params, tokenizer, cfg.dpo.gold_prompts, cfg.dpo.max_new_tokens,
                                        temperature=1.0)

        results = [evaluated(*replica_params) for replica_params in population.split(params)]
        writer = rundir.MetricsWriter(run_dir, cfg.train.max_steps)
        writer.write_all(population.log(cfg.train.max_steps, results,
                                        lambda replica: {"host_peak_mib": host_peak_mib()}))
        writer.close()
    sync_processes("dpo: evaluated")
    return final_record(run_dir)


def preference_rows(cfg: RunConfig, policy_cfg: RunConfig, policy_params, tokenizer: Tokenizer, length: int):
    """(train groups, train rows, validation rows or None, whether each validation label agrees
    with gold or None, stats) of the reward and DPO stages (`reward_lib.preference_data`); a
    `length` of SEQ_LEN_FROM_DATA is the longest prompt and response's (`fitted_seq_len`), and
    stats' `seq_len` says which was used."""
    train_groups, val_groups, val_agrees = reward_lib.preference_data(cfg, policy_cfg, policy_params, tokenizer)
    if length == SEQ_LEN_FROM_DATA:
        length = fitted_seq_len(longest_response(train_groups + val_groups, tokenizer), cfg.model.context_len)

    def name(number: int) -> str:
        if cfg.data.resolved_source != "text":
            return f"preference group {number}"
        return f"{cfg.data.path}:{preference_line(cfg.data.path, number, cfg.data.max_responses)}"

    train_rows, stats = build_preference_rows(train_groups, tokenizer, length, cfg.data.overlong, name=name)
    val_rows = None
    if val_groups:
        # World pairs are short and never dropped, which keeps them aligned with val_agrees.
        overlong = "truncate" if val_agrees is not None else cfg.data.overlong
        val_rows, _ = build_preference_rows(val_groups, tokenizer, length, overlong, first=len(train_groups) + 1,
                                            name=name)
    return train_groups, train_rows, val_rows, val_agrees, stats | {"seq_len": length}


def sample_text(cfg: RunConfig, params, tokenizer: Tokenizer, prompt: np.ndarray, max_new_tokens: int,
                seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> str:
    """The prompt and its continuation as text."""
    check_length(cfg.model, len(prompt), max_new_tokens)
    tokens = generate(
        params, prompt[None].astype(np.int32), np.ones((1, len(prompt)), bool), jax.random.PRNGKey(seed),
        cfg=cfg.model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
    )
    return tokenizer.decode(np.concatenate([prompt, np.asarray(tokens[0])]))
