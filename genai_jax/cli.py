"""`genai-jax <command>`: every stage takes the same shape of flags.

    genai-jax pretrain --preset NAME --run-dir DIR [--data.path FILE] [--<section>.<field> VALUE]
    genai-jax sft --init-from PRETRAIN_RUN --preset NAME --run-dir DIR [...the same flags]
    genai-jax reward --init-from SFT_RUN --preset NAME --run-dir DIR [...the same flags]
    genai-jax dpo --init-from SFT_RUN --preset NAME --run-dir DIR [--dpo.loss sigmoid|ipo|hinge|simpo] [...]
    genai-jax ppo --policy SFT_RUN --reward REWARD_RUN --preset NAME --run-dir DIR [...]
    genai-jax pipeline --preset NAME --run-dir DIR [--<stage>.<section>.<field> VALUE]   (all four stages)
    genai-jax sweep SPEC.toml --sweep-dir DIR [--list | --only I | --jobs N | --report]   (many runs)
    genai-jax score --run REWARD_RUN --in FILE.jsonl --out OUT.jsonl
    genai-jax eval --run DIR                 (gold score on held-out world prompts)
    genai-jax generate --run DIR --prompt TEXT | --prompts FILE.jsonl [--out OUT.jsonl]
    genai-jax chat --run DIR
    genai-jax import-hf --from HF_MODEL_FOLDER --run-dir DIR   (a Hugging Face checkpoint as a run)
    genai-jax export-hf --run DIR --out FOLDER [--adapter-only] (a run's policy for transformers; PEFT adapters)
    genai-jax extract --run POPULATION_RUN --replica I --run-dir OUT   (one replica as a run)

The preset supplies the defaults and tyro maps the remaining flags onto the frozen config
dataclasses. This module is the only place that wires stages together.

Each command imports the modules it runs inside its own function: `genai-jax --help` and a
mistyped flag answer without loading the model, orbax and the data stack. These are the only
function-level imports of the package besides optional libraries; the package's modules import
one way (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass, field
from typing import Annotated, Callable

import jax
import tyro
from etils import epath

from genai_jax import distributed, overrides, rundir
from genai_jax.config import (GOLD_PROMPTS, PRETRAINED_PRESETS, DataConfig, DPOConfig, LoRAConfig, ModelConfig,
                              ObjectiveConfig, OptimConfig, PopulationConfig, PPOConfig, RunConfig, TrainConfig, UserError,
                              fine_tuning_lr, preset)
from genai_jax.distributed import say

FINE_TUNING_STAGES = ("sft", "reward", "dpo")
"""Stages whose --init-from run supplies the model section's defaults."""


@dataclass(frozen=True)
class StageArgs:
    """Train one stage. Running it again on the same --run-dir resumes from the latest checkpoint."""

    preset: str = "tiny"
    """Named preset supplying every default (tiny, shakespeare-char-cpu, shakespeare-char, gpt2-small;
    pretrained-cpu, pretrained-gpu for a model imported with import-hf, chosen by default when the
    --init-from or --policy run descends from one)."""
    run_dir: str = ""
    """Run directory (default runs/<preset>-<stage>)."""
    init_from: str = ""
    """Run directory to start from (sft: a pretraining run; reward, dpo: an SFT run); stored as train.init_from."""
    policy: str = ""
    """ppo: the SFT run to optimise; stored as ppo.policy."""
    reward: str = ""
    """ppo: the reward model run (or `gold`); stored as ppo.reward."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def run_config(self) -> RunConfig:
        train = dataclasses.replace(self.train, init_from=self.init_from) if self.init_from else self.train
        runs = {name: value for name, value in (("policy", self.policy), ("reward", self.reward)) if value}
        return RunConfig(model=self.model, optim=self.optim, data=self.data, train=train, objective=self.objective,
                         ppo=dataclasses.replace(self.ppo, **runs), dpo=self.dpo, lora=self.lora)


@dataclass(frozen=True)
class GenerateArgs:
    """Continue a text prompt, or answer a JSONL file of chat prompts, from a run's latest
    checkpoint (KV cache, jit-compiled)."""

    run: str
    """Run directory to load."""
    prompt: str = "\n"
    """Raw text to continue (no chat template)."""
    prompts: str = ""
    """A JSONL file of {"prompt": ...} lines, each answered in the chat template."""
    out: str = ""
    """With --prompts: the JSONL file to write {"prompt", "response"} lines to (default: stdout)."""
    max_new_tokens: int = 200
    temperature: float = 0.8
    """0 means greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (1: off)."""
    num_samples: int = 1
    seed: int = 0


def _flag_value(argv: list[str], flag: str, default: str = "") -> str:
    """The value of `--flag VALUE` or `--flag=VALUE` in argv, read before tyro parses it."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return default


def _given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)


def _preset_name(argv: list[str], start_run: str = "") -> str:
    """--preset's value; without one, `tiny`, or for a stage starting from a model imported with
    import-hf (`start_run`'s lineage) the pretrained preset of this machine: pretrained-gpu where
    JAX has an accelerator, else pretrained-cpu."""
    if _given(argv, "--preset") or not start_run or not rundir.pretrained_elsewhere(start_run):
        return _flag_value(argv, "--preset", StageArgs.preset)
    import jax

    name = "pretrained-cpu" if jax.default_backend() == "cpu" else "pretrained-gpu"
    say(f"preset {name}: {start_run} descends from a model imported with import-hf (--preset to choose another)")
    return name


def _with_lora_lr(args: StageArgs, argv: list[str], stage: str) -> StageArgs:
    """A pretrained preset's learning rates for LoRA when lora.rank is set (FINE_TUNING_LR's second
    column), unless --optim.lr or --optim.min-lr is given (then the flags and the preset's rates)."""
    if (args.preset not in PRETRAINED_PRESETS or not args.lora.rank
            or _given(argv, "--optim.lr") or _given(argv, "--optim.min-lr")):
        return args
    return dataclasses.replace(args, optim=dataclasses.replace(args.optim, **fine_tuning_lr(stage, args.lora.rank)))


def _init_run_model(stage_model: ModelConfig, init_run: str) -> ModelConfig:
    """The model section of the run a fine-tuning stage starts from, with this stage's dropout and
    head: the defaults of its --model flags, so that a run of another shape (an imported Hugging
    Face model above all) needs no --model flags. An explicit flag that differs is still refused."""
    init_model = rundir.read_config(epath.Path(init_run)).model
    return dataclasses.replace(init_model, dropout=stage_model.dropout, head=stage_model.head)


@dataclass(frozen=True)
class EvalArgs:
    """A run's policy on held-out prompts: the synthetic world's gold score, or with --prompts and
    --reward your own task's mean reward, greedy and sampled, with 95% intervals over the prompts."""

    run: str
    num_prompts: int = GOLD_PROMPTS
    """World: held-out prompts scored."""
    max_new_tokens: int = 32
    temperature: float = 0.0
    """World: 0 is greedy decoding. Your task: the sampled answers' temperature (greedy is always
    measured too); 0 means 1.0."""
    batch_size: int = 64
    seed: int = 0
    prompts: str = ""
    """Your task: a JSONL file of {"prompt": ...} lines (with --reward)."""
    reward: str = ""
    """Your task: python:MODULE:FUNCTION, `(prompts, responses) -> list[float]` (MODULE imported from
    the working directory), or a reward model run directory."""
    out: str = ""
    """Your task: where each prompt's answers and scores go (default RUN/eval_responses.jsonl)."""


@dataclass(frozen=True)
class ChatArgs:
    """Chat with a run's policy in the terminal (/reset starts over, /exit or Ctrl-D quits)."""

    run: str
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class ScoreArgs:
    """Score prompt/response pairs with a reward model run (normalised rewards)."""

    run: str
    """Reward model run directory."""
    input: Annotated[str, tyro.conf.arg(name="in")]
    """JSONL of {"prompt", "response"} (or {"messages": [...]} ending with the assistant's turn)."""
    out: str = ""
    """JSONL to write the input lines with a "score" added (default: stdout)."""
    batch_size: int = 64


@dataclass(frozen=True)
class ImportHFArgs:
    """Make a run directory of a local Hugging Face model folder (GPT-2, Llama, Qwen2: config.json,
    model.safetensors or its sharded index, tokenizer.json) or of a llama.cpp GGUF file (Llama,
    Qwen2; dequantized to float32, tokenizer and chat template from its metadata: the `real`
    extra); every stage's --init-from, ppo's --policy, eval, generate and chat then take it."""

    source: Annotated[str, tyro.conf.arg(name="from")]
    """The Hugging Face model folder, or a .gguf file."""
    run_dir: str
    """The run directory to create (must be new or empty)."""
    fsdp: int = 1
    """Put each parameter onto this many devices as FSDP shards as it is read (as train.mesh-fsdp
    splits them), for a model that does not fit one device; 1: the whole model on the first."""


@dataclass(frozen=True)
class ExportHFArgs:
    """Write a run's latest policy (a causal LM) or reward model (a one-label sequence classifier)
    as a Hugging Face model folder (config.json, model.safetensors, and the tokenizer files of a run
    with an hf tokenizer) that transformers' from_pretrained loads."""

    run: str
    """Run directory to export."""
    out: str
    """The folder to write (must be new or empty)."""
    adapter_only: bool = False
    """A LoRA run: write only its adapters, as a PEFT adapter folder (adapter_config.json,
    adapter_model.safetensors), instead of the merged model."""


@dataclass(frozen=True)
class ExtractArgs:
    """Write one replica of a population run as the ordinary run it equals (its config, latest
    checkpoint, records): every command that takes a run directory then takes it."""

    run: str
    """The population run directory."""
    replica: int
    """The replica's index (its records' `replica`)."""
    run_dir: str
    """The run directory to create (must be new or empty)."""


@dataclass(frozen=True)
class PipelineArgs:
    """pretrain -> sft -> reward -> ppo on one preset into one directory; finished stages are
    skipped, an unfinished one resumes; ends with a summary table (summary.json).

    Any stage's config field is a flag: --STAGE.SECTION.FIELD VALUE with STAGE one of base, sft,
    reward, ppo (e.g. --ppo.optim.lr 3e-5, --reward.data.label-noise 0.16); --ppo.FIELD for the
    ppo section (e.g. --ppo.kl-coef 0.1); --model.FIELD, --train.seed, --train.population,
    --train.progress, --train.strategy, --train.mesh-data, --train.mesh-fsdp and --data.seed set
    every stage (a stage's own flag wins). --train.population N trains every stage as N replicas,
    replica i of each stage from replica i of the one before (docs/population.md). Booleans:
    --sft.data.pack / --sft.data.no-pack, or a true/false value."""

    preset: str = "tiny"
    run_dir: str = ""
    """Directory holding base/, sft/, reward/ and ppo/ (default runs/<preset>-pipeline)."""
    gold_prompts: int = GOLD_PROMPTS
    """Held-out prompts behind each policy's gold scores in the summary."""


def parse_stage(argv: list[str], stage: str) -> tuple[RunConfig, str]:
    """(config, run_dir) from `--preset NAME` defaults for `stage`, overridden by the other flags
    (`--population.SECTION.FIELD v1,v2,...` fill `population.axes`)."""
    argv, axes = overrides.parse_population_flags(argv)
    start_run = _flag_value(argv, "--policy" if stage == "ppo" else "--init-from")
    name = _preset_name(argv, start_run if stage != "pretrain" else "")
    base = preset(name, stage)
    init_run = _flag_value(argv, "--init-from") if stage in FINE_TUNING_STAGES else ""
    if init_run:
        base = dataclasses.replace(base, model=_init_run_model(base.model, init_run))
    defaults = StageArgs(preset=name, model=base.model, optim=base.optim, data=base.data, train=base.train,
                         objective=base.objective, ppo=base.ppo, dpo=base.dpo, lora=base.lora)
    args = tyro.cli(StageArgs, default=defaults, args=argv, prog=f"genai-jax {stage}")
    if args.preset != name:
        raise UserError("--preset was given twice with different values")
    args = _with_lora_lr(args, argv, stage)
    if stage != "ppo" and (args.policy or args.reward):
        raise UserError(f"--policy and --reward belong to `genai-jax ppo`, not `genai-jax {stage}`")
    cfg = dataclasses.replace(args.run_config(), population=PopulationConfig(axes))
    return cfg, args.run_dir or f"runs/{name}-{stage}"


def cmd_pretrain(argv: list[str]) -> None:
    from genai_jax import stages

    cfg, run_dir = parse_stage(argv, "pretrain")
    rundir.print_final("pretrain", run_dir, stages.pretrain(cfg, run_dir))


def cmd_sft(argv: list[str]) -> None:
    from genai_jax import stages

    cfg, run_dir = parse_stage(argv, "sft")
    rundir.print_final("sft", run_dir, stages.sft(cfg, run_dir))


def cmd_reward(argv: list[str]) -> None:
    from genai_jax import stages

    cfg, run_dir = parse_stage(argv, "reward")
    rundir.print_final("reward", run_dir, stages.reward(cfg, run_dir))


def cmd_dpo(argv: list[str]) -> None:
    from genai_jax import stages

    cfg, run_dir = parse_stage(argv, "dpo")
    rundir.print_final("dpo", run_dir, stages.dpo(cfg, run_dir))


def cmd_ppo(argv: list[str]) -> None:
    from genai_jax import rlhf

    cfg, run_dir = parse_stage(argv, "ppo")
    rundir.print_final("ppo", run_dir, rlhf.ppo(cfg, run_dir))


def cmd_pipeline(argv: list[str]) -> None:
    from genai_jax import pipeline

    name = _preset_name(argv)
    preset(name, "pretrain")  # an unknown preset is named before anything else
    rest, stage_overrides = overrides.parse_pipeline_flags(argv)
    args = tyro.cli(PipelineArgs, default=PipelineArgs(preset=name), args=rest, prog="genai-jax pipeline")
    run_dir = args.run_dir or f"runs/{name}-pipeline"
    configs = pipeline.pipeline_configs(name, run_dir, stage_overrides=stage_overrides)
    pipeline.run_pipeline(configs, run_dir, args.gold_prompts)


def cmd_score(argv: list[str]) -> None:
    from genai_jax import reward, runs
    from genai_jax.data.conversations import read_jsonl_conversations

    args = tyro.cli(ScoreArgs, args=argv, prog="genai-jax score")
    cfg, tokenizer, params = runs.load_trained(args.run)
    if cfg.model.head != "scalar":
        raise UserError(f"{args.run} is not a reward model run (model.head={cfg.model.head})")
    normalization = reward.load_normalization(args.run)
    chats, _ = read_jsonl_conversations(args.input)
    for number, chat in enumerate(chats, start=1):
        if chat[-1]["role"] != "assistant":
            raise UserError(f"{args.input}: conversation {number} does not end with the assistant's response")
    scores = reward.scores(cfg, params, tokenizer, [chat[:-1] for chat in chats], [chat[-1]["content"] for chat in chats],
                           normalization, args.batch_size)
    # the reader accepted every line: echo each with its score
    records = [json.loads(line) for line in epath.Path(args.input).read_text().splitlines() if line.strip()]
    _write_jsonl([record | {"score": float(score)} for record, score in zip(records, scores)], args.out, "scores")


def _task_scorer(spec: str, policy_cfg):
    """`score(prompts, responses)` of `eval --reward`: a user's function (`scorers`), or a reward
    model run (its normalised scores; its vocabulary must be the policy's)."""
    from genai_jax import reward, runs, scorers

    if spec.startswith(scorers.CODE_REWARD):
        function = scorers.load_reward_function(spec)
        return lambda prompts, responses: scorers.checked_scores(function, spec, prompts, responses)
    cfg, tokenizer, params = runs.load_trained(spec)
    if cfg.model.head != "scalar":
        raise UserError(f"--reward {spec} is not a reward model run (model.head={cfg.model.head}) nor python:MODULE:FUNCTION")
    if cfg.model.vocab_size != policy_cfg.model.vocab_size:
        raise UserError(f"--reward {spec} has vocabulary {cfg.model.vocab_size}, the policy {policy_cfg.model.vocab_size}")
    normalization = reward.load_normalization(spec)
    return lambda prompts, responses: reward.scores(cfg, params, tokenizer, [[{"role": "user", "content": p}]
                                                                             for p in prompts], responses, normalization)


def _eval_task(args: EvalArgs) -> None:
    from genai_jax import runs
    from genai_jax.data.conversations import read_prompts_jsonl
    from genai_jax.evaluation import task_eval

    if not (args.prompts and args.reward):
        raise UserError("eval on your task needs both --prompts FILE.jsonl and --reward (python:MODULE:FUNCTION or a "
                        "reward model run)")
    prompts = read_prompts_jsonl(args.prompts)
    cfg, tokenizer, params = runs.load_trained(args.run)
    score = _task_scorer(args.reward, cfg)
    summary, records = task_eval(cfg, params, tokenizer, prompts, score, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature or 1.0, seed=args.seed, batch_size=args.batch_size)
    summary = {"prompts_file": args.prompts, "reward": args.reward, **summary}
    if jax.process_index() == 0:  # every process computed the same
        (epath.Path(args.run) / "eval.json").write_text(json.dumps(summary, indent=2))
    _write_jsonl(records, args.out or str(epath.Path(args.run) / "eval_responses.jsonl"), "answers")
    for mode in ("greedy", "sampled"):
        result = summary[mode]
        say(f"{args.run} {mode} (temperature {result['temperature']:g}): reward {result['mean']:.4g} "
            f"[{result['ci95'][0]:.4g}, {result['ci95'][1]:.4g}] over {len(prompts)} prompts of {args.prompts}, "
            f"ended {100 * result['ended']:.1f}%, response_tokens {result['response_tokens']:.1f}")


def cmd_eval(argv: list[str]) -> None:
    from genai_jax import runs
    from genai_jax.evaluation import gold_eval

    args = tyro.cli(EvalArgs, args=argv, prog="genai-jax eval")
    if args.prompts or args.reward:
        return _eval_task(args)
    cfg, tokenizer, params = runs.load_trained(args.run)
    result = gold_eval(cfg, params, tokenizer, args.num_prompts, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed, batch_size=args.batch_size)
    if jax.process_index() == 0:  # every process computed the same
        (epath.Path(args.run) / "eval.json").write_text(json.dumps(result, indent=2))
    for example in result["examples"]:
        say(f"  {example['prompt']!r} -> {example['response']!r} (gold {example['gold']:.2f})")
    say(f"{args.run}: gold_score {100 * result['gold_score']:.1f}/100, exact {100 * result['exact']:.1f}%, "
          f"ended {100 * result['ended']:.1f}%, response_tokens {result['response_tokens']:.1f} "
          f"({args.num_prompts} held-out prompts)")


def cmd_chat(argv: list[str]) -> None:
    from genai_jax import runs
    from genai_jax.evaluation import respond

    args = tyro.cli(ChatArgs, args=argv, prog="genai-jax chat")
    if jax.process_count() > 1:
        raise UserError("chat is interactive: run it in one process (without the GENAI_JAX_* variables)")
    cfg, tokenizer, params = runs.load_trained(args.run)
    history: list[dict] = []
    print("chat: /reset starts over, /exit quits")
    for turn in itertools.count():
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset" or not line:
            history = [] if line else history
            continue
        history.append({"role": "user", "content": line})
        try:
            (reply,) = respond(cfg, params, tokenizer, [history], max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed + turn, batch_size=1)
        except UserError as err:
            print(f"({err}; /reset to start over)")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply.text})
        print(f"assistant> {reply.text}")


def cmd_generate(argv: list[str]) -> None:
    from genai_jax import runs, stages

    args = tyro.cli(GenerateArgs, args=argv, prog="genai-jax generate")
    cfg, tokenizer, params = runs.load_trained(args.run)
    if args.prompts:
        _answer_prompts_file(args, cfg, tokenizer, params)
        return
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise UserError("--prompt is empty after tokenization")
    for i in range(args.num_samples):
        text = stages.sample_text(cfg, params, tokenizer, prompt, args.max_new_tokens, seed=args.seed + i,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        say(text)
        if i + 1 < args.num_samples:
            say("-" * 40)


def _answer_prompts_file(args: GenerateArgs, cfg, tokenizer, params) -> None:
    from genai_jax.data.conversations import read_prompts_jsonl
    from genai_jax.evaluation import respond

    prompts = read_prompts_jsonl(args.prompts)
    responses = respond(cfg, params, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed)
    _write_jsonl([{"prompt": p, "response": r.text} for p, r in zip(prompts, responses)], args.out, "responses")


def cmd_import_hf(argv: list[str]) -> None:
    from genai_jax import hf

    args = tyro.cli(ImportHFArgs, args=argv, prog="genai-jax import-hf")
    hf.import_hf(args.source, args.run_dir, args.fsdp)


def cmd_export_hf(argv: list[str]) -> None:
    from genai_jax import hf

    args = tyro.cli(ExportHFArgs, args=argv, prog="genai-jax export-hf")
    hf.export_hf(args.run, args.out, adapter_only=args.adapter_only)


def cmd_extract(argv: list[str]) -> None:
    from genai_jax import runs

    args = tyro.cli(ExtractArgs, args=argv, prog="genai-jax extract")
    runs.extract(args.run, args.replica, args.run_dir)
    say(f"wrote replica {args.replica} of {args.run} to {args.run_dir}")


def cmd_sweep(argv: list[str]) -> None:
    from genai_jax import sweeps

    sweeps.main(argv)


def _write_jsonl(records: list[dict], out: str, what: str) -> None:
    """One JSON line per record into `out`, or onto stdout when `out` is empty (by process 0: every
    process computed the same)."""
    lines = "".join(json.dumps(record) + "\n" for record in records)
    if out and jax.process_index() == 0:
        epath.Path(out).write_text(lines)
    if out:
        say(f"wrote {len(records)} {what} to {out}")
    elif lines:
        say(lines.rstrip("\n"))


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "pretrain": cmd_pretrain,
    "sft": cmd_sft,
    "reward": cmd_reward,
    "dpo": cmd_dpo,
    "ppo": cmd_ppo,
    "pipeline": cmd_pipeline,
    "score": cmd_score,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "import-hf": cmd_import_hf,
    "export-hf": cmd_export_hf,
    "extract": cmd_extract,
    "sweep": cmd_sweep,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"genai-jax: error: unknown command {argv[0]!r} (commands: {known})", file=sys.stderr)
            sys.exit(2)
        print(f"usage: genai-jax <command> [flags]   commands: {known}\n"
              "       genai-jax <command> --help   shows a command's flags")
        return
    from genai_jax.train import Preempted

    try:
        if argv[0] != "sweep":  # a sweep only launches commands: it joins no cluster and claims no device
            distributed.initialize()
        COMMANDS[argv[0]](argv[1:])
    except UserError as err:
        print(f"genai-jax: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as stop:
        print(f"genai-jax: {stop}; relaunch the same command to resume", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: schedulers restart the job rather than mark it done


if __name__ == "__main__":
    main()
