"""Frozen dataclass configs and named presets.

Configs are hashable so they can be static arguments to `jax.jit`. The CLI maps
`--<section>.<field>` flags onto them with tyro; nothing here parses argv.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal


class UserError(Exception):
    """An error the user caused (bad file, flag or run directory); printed as one line."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the tokenizer (rounded up to `vocab_multiple`)."""
    vocab_multiple: int = 1
    """Pad the vocabulary to a multiple of this (64 suits GPUs: GPT-2's 50257 becomes 50304)."""
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention: each serves n_head / n_kv_head query heads); 0
    means n_head (multi-head attention)."""
    d_model: int = 128
    context_len: int = 64
    mlp_ratio: int = 4
    mlp_hidden: int = 0
    """The MLP's hidden width; 0 derives it from mlp_ratio (for swiglu, 2/3 of it, see
    `model.mlp_hidden`)."""
    dropout: float = 0.0
    bias: bool = False
    """Biases in every dense layer and LayerNorm (GPT-2)."""
    qkv_bias: bool = False
    """Biases in the query, key and value projections even with `bias` off (Qwen2)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    """Rotary base: the frequencies are rope_theta ** (-2i / head_dim)."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    gelu_approximate: bool = True
    """gelu: the tanh approximation (GPT-2's `gelu_new`), or the exact erf form (false)."""
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype; parameters are always float32."""
    remat: Literal["none", "full", "dots"] = "none"
    """Rematerialise each block in the backward pass: everything, or all but matmul outputs."""
    attention: Literal["auto", "xla", "cudnn", "einsum"] = "auto"
    """xla/cudnn: `jax.nn.dot_product_attention`'s implementations; einsum: plain einsums (fastest on
    CPU); auto: cudnn on a GPU in bfloat16, else einsum."""
    init_std: float = 0.02
    head: Literal["lm", "scalar"] = "lm"
    """The output head: next-token logits (policies), or one number per position (reward models)."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads, refusing one that does not divide n_head."""
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise UserError(f"model.n_kv_head={kv} does not divide model.n_head={self.n_head}")
        return kv


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int = 0
    """Cosine decay ends here; 0 means at `train.max_steps`."""
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    """Weight decay applies to matrices; embeddings, norms and biases are excluded unless this is on."""
    clip_norm: float = 1.0
    grad_accum: int = 1
    """Micro-batches per step; the batch is split and gradients summed inside one compiled step."""
    moments_dtype: Literal["float32", "bfloat16"] = "float32"
    """Adam's first moment (mu) dtype; bfloat16 halves its memory. The second moment (nu) stays
    float32: optax's adamw offers no dtype for it."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "world"
    """`world` (the embedded synthetic task world), `tfds:NAME` (e.g. tfds:tiny_shakespeare), or `text`."""
    path: str = ""
    """Pretraining: a text file or a folder of .txt files. SFT: a JSONL file. Overrides `source`."""
    tfds_split: str = "train"
    text_feature: str = "text"
    tokenizer: Literal["char", "byte", "sentencepiece", "hf"] = "char"
    """char (the corpus's characters only), byte (UTF-8 bytes: any text), sentencepiece (trained on
    the corpus unless tokenizer_path is given), or hf: a Hugging Face `tokenizer.json`
    (tokenizer_path: the file or its model folder)."""
    sp_vocab_size: int = 1024
    sp_model_type: Literal["bpe", "unigram"] = "bpe"
    tokenizer_path: str = ""
    """An existing sentencepiece .model file to use instead of training one; for hf, the
    tokenizer.json file or the Hugging Face model folder holding it."""
    val_fraction: float = 0.1
    seq_len: int = 0
    """Training sequence length; 0 means the model's context length; -1 (SEQ_LEN_FROM_DATA, the
    pretrained-* presets) the fine-tuning data's longest example, rounded up to a multiple of 64
    and at most the context length."""
    world_docs: int = 20000
    """Number of documents in the synthetic world's pretraining corpus."""
    world_chats: int = 8000
    """Number of instruction chats the synthetic world gives for SFT (held-out problems excluded)."""
    demo_error: float = 0.3
    """SFT, world data: the chance that a demonstration's answer is a near miss (demonstrators err)."""
    world_pairs: int = 3000
    """Reward model: preference pairs drawn from the world (SFT samples and perturbed answers)."""
    label_noise: float = 0.25
    """Reward model, world data: the chance that a pair's gold preference is flipped (human-like noise)."""
    max_responses: int = 8
    """Reward model: the most responses one ranked prompt may have."""
    pack: bool = False
    """SFT: pack several conversations per row (segment ids keep them apart)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """SFT: what to do with a conversation longer than the sequence length (counted in the log)."""
    skip_malformed: bool = False
    """JSONL: skip and count malformed lines instead of stopping at the first."""
    seed: int = 0
    shuffle_seed: int = -1
    """The seed of the training data's order (pretrain, sft, reward, dpo); -1 means data.seed. A
    population's replica k shuffles with this + k (docs/population.md)."""

    @property
    def resolved_source(self) -> str:
        return "text" if self.path else self.source

    @property
    def order_seed(self) -> int:
        return self.seed if self.shuffle_seed < 0 else self.shuffle_seed


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyperparameters of the stage's objective."""

    reward_centering: float = 0.0
    """Bradley-Terry: coefficient of the centering term mean((r_chosen + r_rejected)^2)."""


GOLD_PROMPTS = 1000
"""Held-out world prompts behind a gold score by default: at 200 the sampled score of one policy
moves by up to 4 points between sampling seeds."""


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (the dpo stage): the policy learns from preference pairs
    against a frozen reference, the init run (formulas in `objectives/dpo.py`)."""

    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """sigmoid: DPO; ipo: IPO (length-normalised); hinge: SLiC's hinge; simpo: SimPO (no reference)."""
    beta: float = 0.1
    """How far the policy may move from the reference (for ipo, the target margin is 1 / (2 beta))."""
    label_smoothing: float = 0.0
    """sigmoid and simpo: the assumed chance that a label is flipped (conservative DPO)."""
    simpo_gamma: float = 0.5
    """simpo: the reward margin gamma."""
    precompute_reference: bool = True
    """Score every pair under the reference once before training (cached in the run directory),
    or in each step (the reference then sits on every device: it is not sharded)."""
    gold_prompts: int = GOLD_PROMPTS
    """Task world: held-out prompts for the policy's gold score at the end."""
    max_new_tokens: int = 16
    """Task world: response tokens sampled for that gold score (as the tiny preset's PPO)."""


@dataclass(frozen=True)
class PPOConfig:
    """Stage 3 (RLHF), the RL stage of every algorithm. A step is one iteration: `group_size`
    rollouts for each of `train.batch_size` prompts, then `epochs` passes over `minibatches`
    minibatches of them (a prompt's group stays in one minibatch), one optimizer update each."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    """ppo: a value model and GAE; grpo, rloo: no value model, a baseline from the prompt's other
    samples (formulas in objectives/critic_free.py); they need group_size >= 2."""
    group_size: int = 1
    """Samples per prompt in each iteration."""
    scale_rewards: Literal["group", "none"] = "group"
    """grpo: divide each advantage by its group's standard deviation, or not (Dr. GRPO)."""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """How the policy loss averages: over every response token of the batch, or over sequences
    of their token means (the GRPO paper's choice)."""
    whiten_advantages: bool = False
    """rloo: whiten the advantages over the batch (ppo always whitens; grpo's are per group)."""
    policy: str = ""
    """SFT run directory: the policy starts from it and it stays the frozen reference."""
    reward: str = ""
    """Reward model run directory: it scores, and the value model starts from it. `gold`: the task
    world's gold checker scores instead (RL against the verifiable reward; the value model starts
    from the SFT trunk), the ceiling a learned reward model can reach. `python:MODULE:FUNCTION`:
    a function of yours, `(prompts: list[str], responses: list[str]) -> list[float]`, scores
    (MODULE imported from the working directory; the value model starts from the SFT trunk)."""
    epochs: int = 4
    minibatches: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    """Rollout sampling temperature; log-probabilities are taken under the same tempered softmax."""
    top_k: int = 0
    top_p: float = 1.0
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    value_lr: float = 0.0
    """Learning rate of the value model; 0 means optim.lr."""
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    """The KL penalty's beta (its start value with an adaptive controller): in the reward for ppo
    and rloo, the coefficient of the k3 term in the loss for grpo (0 allowed)."""
    kl_target: float = 0.0
    """Adaptive KL controller's target (per-sequence KL, nats); 0 keeps beta fixed."""
    kl_horizon: int = 10000
    kl_estimator: Literal["k1", "k3"] = "k1"
    no_end_penalty: float = 1.0
    """Subtracted from the score of a response that does not end its turn within max_new_tokens."""
    reward_clip: float = 5.0
    """Clip normalised scores to [-reward_clip, reward_clip] (0: off)."""
    whiten_rewards: bool = False
    pack_rows: int = 0
    """Updates: the sequences of a minibatch are packed, several per row of model.context_len
    tokens, into this many rows (0: enough for prompts plus half of max_new_tokens, and one more;
    -1: no packing). A minibatch that does not fit is trained unpacked: packing never changes a
    loss, only how much padding the step computes."""
    gold_prompts: int = GOLD_PROMPTS
    """Task world: held-out prompts for the gold score at each evaluation."""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT): add this times the LM loss on windows of pretraining text to every
    update (0: off). The text is the corpus of the pretraining run the policy was fine-tuned from."""

    @property
    def has_value_model(self) -> bool:
        return self.algorithm == "ppo"


LORA_TARGETS = r"h_\d+/(attn/(qkv|proj)|mlp/(fc|proj))/kernel"
"""Every attention and MLP kernel of every block (the parameter paths of `model.GPT`)."""


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, LoRA) for a fine-tuning stage: each targeted kernel W
    [in, out] is trained as W + (alpha / rank) * a @ b with W frozen (see `genai_jax/lora.py`)."""

    rank: int = 0
    """The adapters' rank r; 0 trains every parameter (no LoRA)."""
    alpha: float = 16.0
    """The adapters' scale is alpha / rank."""
    targets: str = LORA_TARGETS
    """A regular expression searched in each parameter's '/'-joined path (e.g.
    params/h_0/attn/qkv/kernel; ppo: policy/params/..., value/params/...): the 2-D kernels it
    matches get adapters."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 12
    """Global batch size (sequences per optimizer step, over all devices and micro-batches)."""
    max_steps: int = 2000
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    strategy: Literal["single", "mesh", "pmap"] = "mesh"
    mesh_data: int = -1
    """Size of the mesh's `data` axis; -1 takes all devices not used by `fsdp`."""
    mesh_fsdp: int = 1
    """Size of the mesh's `fsdp` axis: parameters and optimizer state are split over it."""
    sample_tokens: int = 200
    """Tokens sampled into samples.txt at the end of the run (0 to skip)."""
    init_from: str = ""
    """Run directory whose latest checkpoint initialises this stage (SFT: a pretraining run)."""
    progress: bool = True
    population: int = 1
    """Replicas trained together by one compiled step (`jax.vmap` of the step), replica k with
    train.seed + k and its own data order; crossed with any `population` hyperparameter values."""
    population_map: Literal["vmap", "loop"] = "vmap"
    """How a population's one program maps the step over its replicas: `vmap` (batched: what an
    accelerator wants), or `loop` (`jax.lax.map`, one replica after another in the same program:
    faster than vmap on CPUs, train.strategy=single only; docs/population.md)."""


@dataclass(frozen=True)
class PopulationConfig:
    """A population's hyperparameter axes (`--population.SECTION.FIELD v1,v2,...`): each
    `(field, values)` pair varies a number the train step reads; the replicas are every
    combination of the values, each with `train.population` seeds (docs/population.md)."""

    axes: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def __post_init__(self):  # config.json holds lists; a config must stay hashable
        object.__setattr__(self, "axes", tuple((name, tuple(values)) for name, values in self.axes))


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)


def replace(cfg, **sections):
    """`dataclasses.replace` for nested configs: `replace(cfg, model={"n_layer": 2})`."""
    updates = {
        name: dataclasses.replace(getattr(cfg, name), **value) if isinstance(value, dict) else value
        for name, value in sections.items()
    }
    return dataclasses.replace(cfg, **updates)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, where: str = "config") -> RunConfig:
    """Rebuild a RunConfig from `to_dict` output, naming any unknown field."""
    sections = {}
    for section in dataclasses.fields(RunConfig):
        cls = {"model": ModelConfig, "optim": OptimConfig, "data": DataConfig, "train": TrainConfig,
               "objective": ObjectiveConfig, "ppo": PPOConfig, "dpo": DPOConfig,
               "lora": LoRAConfig, "population": PopulationConfig}[section.name]
        values = data.get(section.name, {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{where}: unknown field(s) {section.name}.{', '.join(unknown)}")
        sections[section.name] = cls(**values)
    return RunConfig(**sections)


def dumps(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def diff(old, new, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two configs."""
    changed = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(a):
            changed += diff(a, b, prefix=name + ".")
        elif a != b:
            changed.append(name)
    return changed


_TINY = RunConfig(
    model=ModelConfig(n_layer=4, n_head=4, d_model=128, context_len=96),
    optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=50, weight_decay=0.1),
    data=DataConfig(source="world"),
    train=TrainConfig(batch_size=32, max_steps=600, eval_every=200, ckpt_every=200, eval_batches=8),
)

_SHAKESPEARE_CPU = RunConfig(
    model=ModelConfig(n_layer=4, n_head=4, d_model=128, context_len=64),
    optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, b2=0.99, weight_decay=0.1, clip_norm=1.0),
    data=DataConfig(source="tfds:tiny_shakespeare"),
    train=TrainConfig(batch_size=12, max_steps=2000, eval_every=250, ckpt_every=500, eval_batches=20),
)

_SHAKESPEARE_GPU = RunConfig(
    model=ModelConfig(n_layer=6, n_head=6, d_model=384, context_len=256, dropout=0.2),
    optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, b2=0.99, weight_decay=0.1, clip_norm=1.0),
    data=DataConfig(source="tfds:tiny_shakespeare"),
    train=TrainConfig(batch_size=64, max_steps=5000, eval_every=250, ckpt_every=1000, eval_batches=200),
)

_GPT2_SMALL = RunConfig(
    model=ModelConfig(
        n_layer=12, n_head=12, d_model=768, context_len=1024, vocab_multiple=64, dtype="bfloat16"
    ),
    optim=OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=2000, b2=0.95, weight_decay=0.1, clip_norm=1.0),
    data=DataConfig(source="tfds:lm1b", tokenizer="sentencepiece", sp_vocab_size=32000),
    train=TrainConfig(
        batch_size=64, max_steps=600000, eval_every=2000, ckpt_every=2000, eval_batches=50, sample_tokens=0
    ),
)

# Fine-tuning a model pretrained elsewhere (`import-hf`): every model field comes from the imported
# run, sequences are as long as the data needs (a real model's context, 8192 for SmolLM2, would
# not fit a CPU step), and learning rates are the field's usual ones for pretrained models
# (FINE_TUNING_LR). `pretrained-cpu` fits 2 CPU cores with a 135M model; `pretrained-gpu` one GPU.
SEQ_LEN_FROM_DATA = -1
_PRETRAINED_CPU = RunConfig(  # learning rates per stage: `preset` takes them from FINE_TUNING_LR
    optim=OptimConfig(warmup_steps=10, weight_decay=0.0, clip_norm=1.0),
    data=DataConfig(seq_len=SEQ_LEN_FROM_DATA, pack=True),
    train=TrainConfig(batch_size=8, max_steps=100, eval_every=25, ckpt_every=25, eval_batches=4, sample_tokens=0),
)
_PRETRAINED_GPU = replace(_PRETRAINED_CPU, optim={"warmup_steps": 50},
                          train={"batch_size": 32, "max_steps": 1000, "eval_every": 100, "ckpt_every": 100,
                                 "eval_batches": 16})
PRETRAINED_PRESETS = ("pretrained-cpu", "pretrained-gpu")

FINE_TUNING_LR: dict[str, tuple[float, float]] = {"sft": (2e-5, 2e-4), "reward": (1e-5, 1e-4), "dpo": (1e-6, 1e-5),
                                                  "ppo": (1e-6, 1e-5)}
"""The pretrained-* presets' learning rate per stage, (full fine-tuning, LoRA): SFT 2e-5 (as
Alpaca and TRL's SFT examples), a reward model 1e-5 (InstructGPT's 9e-6), DPO and RL 1e-6 (TRL's
DPO default; InstructGPT's PPO 9.65e-6 at 1.3B); adapters train with 10x the rate."""


def fine_tuning_lr(stage: str, lora_rank: int) -> dict:
    """The optim fields a pretrained-* preset sets for `stage`: lr and min_lr = lr / 10."""
    lr = FINE_TUNING_LR[stage][1 if lora_rank else 0]
    return {"lr": lr, "min_lr": lr / 10}


_PRETRAINED_STAGES = {
    "sft": {},
    "reward": {"model": {"head": "scalar"}},
    "dpo": {},
    "ppo": {"ppo": {"max_new_tokens": 64, "value_lr": 1e-5, "kl_coef": 0.05},
            "train": {"batch_size": 8, "max_steps": 50, "eval_every": 10, "ckpt_every": 10}},
}

# Per-stage changes to a preset (stages after pretraining fine-tune: fewer steps, lower rates).
STAGE_OVERRIDES: dict[str, dict[str, dict[str, dict]]] = {
    "reward": {
        "tiny": {"model": {"head": "scalar"}, "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 20, "weight_decay": 0.0},
                 "data": {"world_pairs": 8000, "seq_len": 48}, "objective": {"reward_centering": 0.1},
                 "train": {"max_steps": 400, "eval_every": 100, "ckpt_every": 400, "sample_tokens": 0}},
        "*": {"model": {"head": "scalar"}, "optim": {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 50, "weight_decay": 0.0},
              "train": {"max_steps": 1000, "sample_tokens": 0}},
    },
    "ppo": {
        "tiny": {"optim": {"lr": 2e-5, "min_lr": 2e-5, "warmup_steps": 0, "weight_decay": 0.0},
                 "ppo": {"max_new_tokens": 16, "value_lr": 1e-4, "kl_coef": 0.2},
                 "train": {"batch_size": 64, "max_steps": 150, "eval_every": 50, "ckpt_every": 50}},
        "*": {"optim": {"lr": 1e-6, "min_lr": 1e-6, "warmup_steps": 0, "weight_decay": 0.0},
              "ppo": {"value_lr": 1e-5},
              "train": {"batch_size": 64, "max_steps": 200, "eval_every": 20, "ckpt_every": 20}},
    },
    "dpo": {
        "tiny": {"optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 20, "weight_decay": 0.0},
                 "data": {"world_pairs": 8000, "seq_len": 48},
                 "train": {"max_steps": 400, "eval_every": 100, "ckpt_every": 200, "sample_tokens": 0}},
        "*": {"optim": {"lr": 5e-7, "min_lr": 5e-8, "warmup_steps": 50, "weight_decay": 0.0},
              "train": {"max_steps": 1000, "sample_tokens": 0}},
    },
    "sft": {
        "tiny": {"optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20}, "data": {"pack": True},
                 "train": {"max_steps": 600, "eval_every": 200, "ckpt_every": 300, "sample_tokens": 0}},
        "*": {"optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 50, "weight_decay": 0.0},
              "data": {"source": "tfds:databricks_dolly"},
              "train": {"max_steps": 1000, "sample_tokens": 0}},
    },
}

PRESETS: dict[str, RunConfig] = {
    "tiny": _TINY,
    "shakespeare-char-cpu": _SHAKESPEARE_CPU,
    "shakespeare-char": _SHAKESPEARE_GPU,
    "gpt2-small": _GPT2_SMALL,
    "pretrained-cpu": _PRETRAINED_CPU,
    "pretrained-gpu": _PRETRAINED_GPU,
}


def preset(name: str, stage: str = "pretrain") -> RunConfig:
    """A named preset's config for one stage of the pipeline."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    if name in PRETRAINED_PRESETS:
        if stage not in _PRETRAINED_STAGES:
            raise UserError(f"--preset {name} fine-tunes a model imported with import-hf (sft, reward, dpo, ppo), "
                            f"not {stage}")
        stage_fields = _PRETRAINED_STAGES[stage]
        return replace(PRESETS[name], **stage_fields, optim=fine_tuning_lr(stage, 0))
    overrides = STAGE_OVERRIDES.get(stage, {})
    return replace(PRESETS[name], **overrides.get(name, overrides.get("*", {})))
