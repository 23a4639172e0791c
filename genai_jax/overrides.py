"""Config fields by their command-line names, and the pipeline's per-stage flags.

A stage command takes `--SECTION.FIELD VALUE` (tyro maps them onto the config dataclasses). The
pipeline runs four stages, so its flags name the stage as well:

    --STAGE.SECTION.FIELD VALUE   one stage (STAGE: base, sft, reward, ppo, its sub-directory),
                                  e.g. --ppo.optim.lr 3e-5, --reward.data.label-noise 0.16
    --ppo.FIELD VALUE             a field of the ppo section (read by the ppo stage alone),
                                  e.g. --ppo.kl-coef 0.1 (the same as --ppo.ppo.kl-coef)
    --model.FIELD VALUE           every stage (the stages load one another's weights)
    --train.seed, --train.population, --train.progress, --train.strategy,
    --train.mesh-data, --train.mesh-fsdp, --data.seed
                                  every stage

A stage's own flag wins over an every-stage one, whatever their order. Boolean fields take a value
(`true`/`false`) or none (`--sft.data.pack`, `--sft.data.no-pack`). Nothing here imports JAX: the
CLI parses with it before loading a model, and the sweep checks a spec's keys with it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from genai_jax.config import RunConfig, UserError

SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(RunConfig)}
PIPELINE_STAGES = ("base", "sft", "reward", "ppo")
# Fields an unqualified pipeline flag sets in every stage: None means every field of the section.
EVERY_STAGE: dict[str, frozenset[str] | None] = {
    "model": None,
    "train": frozenset({"seed", "population", "progress", "strategy", "mesh_data", "mesh_fsdp"}),
    "data": frozenset({"seed"}),
}


def flag_spelling(name: str) -> str:
    """A field's name as a flag spells it (dashes)."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class Field:
    section: str
    name: str
    type: Any
    """The resolved annotation: bool, int, float, str or a Literal of strings."""

    @property
    def flag(self) -> str:
        return f"{self.section}.{flag_spelling(self.name)}"


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_field(section: str, spelling: str) -> Field | None:
    """The field `spelling` (dashes or underscores) of config section `section`, None if there is none."""
    cls = SECTIONS.get(section)
    if cls is None:
        return None
    name = spelling.replace("-", "_")
    types = _field_types(cls)
    return Field(section, name, types[name]) if name in types else None


def negated_field(section: str, spelling: str) -> Field | None:
    """The boolean field `X` of a `no-X` spelling, None otherwise."""
    for prefix in ("no-", "no_"):
        if spelling.startswith(prefix):
            found = config_field(section, spelling[len(prefix):])
            if found is not None and found.type is bool:
                return found
    return None


@dataclass(frozen=True)
class PipelineFlag:
    stages: tuple[str, ...]
    field: Field
    negated: bool = False
    """Spelled `no-FIELD` (a boolean set to false)."""

    @property
    def every_stage(self) -> bool:
        return len(self.stages) > 1

    @property
    def canonical(self) -> str:
        """The shortest spelling of this flag (without `--` and `no-`)."""
        if self.every_stage or (self.field.section == "ppo" and self.stages == ("ppo",)):
            return self.field.flag
        return f"{self.stages[0]}.{self.field.flag}"


def _unknown(name: str, why: str) -> UserError:
    return UserError(f"unknown pipeline flag --{name}: {why} (flags: --STAGE.SECTION.FIELD with STAGE one of "
                     f"{', '.join(PIPELINE_STAGES)}, --ppo.FIELD, --model.FIELD; see genai-jax pipeline --help)")


def _field_or_negated(name: str, section: str, spelling: str) -> tuple[Field, bool]:
    found = config_field(section, spelling)
    if found is not None:
        return found, False
    found = negated_field(section, spelling)
    if found is not None:
        return found, True
    raise _unknown(name, f"the {section} section has no field {spelling!r}")


def pipeline_flag(name: str) -> PipelineFlag:
    """What pipeline flag `--name` sets, refusing a name that is not one (one line naming it)."""
    parts = name.split(".")
    if len(parts) == 3:
        stage, section, spelling = parts
        if stage not in PIPELINE_STAGES:
            raise _unknown(name, f"{stage!r} is not a stage")
        if section not in SECTIONS:
            raise _unknown(name, f"{section!r} is not a config section")
        field, negated = _field_or_negated(name, section, spelling)
        if section == "ppo" and stage != "ppo":
            raise UserError(f"--{name}: only the ppo stage reads the ppo section; use --ppo.{spelling}")
        return PipelineFlag((stage,), field, negated)
    if len(parts) == 2:
        head, spelling = parts
        if head == "ppo":
            field, negated = _field_or_negated(name, "ppo", spelling)
            return PipelineFlag(("ppo",), field, negated)
        if head in SECTIONS:
            field, negated = _field_or_negated(name, head, spelling)
            allowed = EVERY_STAGE.get(head, frozenset())
            if allowed is not None and field.name not in allowed:
                stages = ", ".join(f"--{stage}.{name}" for stage in PIPELINE_STAGES)
                raise UserError(f"--{name} would set every stage: name the stage ({stages})")
            return PipelineFlag(PIPELINE_STAGES, field, negated)
        if head in PIPELINE_STAGES:
            raise _unknown(name, f"{spelling!r} is not a config section with a field")
    raise _unknown(name, "not a stage's config field")


def convert(text: str, field: Field, flag: str) -> Any:
    """The value `text` of flag `--flag` as `field`'s type, refusing one that is not (one line)."""
    kind = field.type
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UserError(f"--{flag}: expected true or false, got {text!r}")
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if text not in choices:
            raise UserError(f"--{flag}: {text!r} is not one of {', '.join(map(str, choices))}")
        return text
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{flag}: expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{flag}: expected a number, got {text!r}") from None
    return text


def parse_pipeline_flags(argv: list[str]) -> tuple[list[str], dict[str, dict[str, dict[str, Any]]]]:
    """(the other arguments, {stage: {section: {field: value}}}) of a pipeline command line: every
    `--a.b[.c]` flag is taken out and checked here, the rest is left for tyro."""
    rest: list[str] = []
    every: dict[str, dict[str, Any]] = {}
    own: dict[str, dict[str, dict[str, Any]]] = {stage: {} for stage in PIPELINE_STAGES}
    i = 0
    while i < len(argv):
        token = argv[i]
        name, equals, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if "." not in name:
            rest.append(token)
            i += 1
            continue
        flag = pipeline_flag(name)
        text = inline if equals else None
        if not equals and i + 1 < len(argv) and not argv[i + 1].startswith("--") and not flag.negated:
            text = argv[i + 1]
            i += 1
        if flag.negated and text is not None:
            raise UserError(f"--{name} takes no value")
        if text is None and flag.field.type is not bool:
            raise UserError(f"--{name} needs a value")
        value = (not flag.negated) if text is None else convert(text, flag.field, name)
        targets = [every] if flag.every_stage else [own[flag.stages[0]]]
        for target in targets:
            target.setdefault(flag.field.section, {})[flag.field.name] = value
        i += 1
    merged = {}
    for stage in PIPELINE_STAGES:
        sections = {section: dict(values) for section, values in every.items()}
        for section, values in own[stage].items():
            sections.setdefault(section, {}).update(values)
        if sections:
            merged[stage] = sections
    return rest, merged


def parse_population_flags(argv: list[str]) -> tuple[list[str], tuple[tuple[str, tuple[float, ...]], ...]]:
    """(the other arguments, the `population.axes`) of a stage command line: each
    `--population.SECTION.FIELD v1,v2,...` is taken out, its field named and its values read as
    numbers; which fields a population may vary is the stage's check (`population.check`)."""
    rest: list[str] = []
    axes = []
    i = 0
    while i < len(argv):
        name, equals, inline = argv[i][2:].partition("=")
        if not argv[i].startswith("--population."):
            rest.append(argv[i])
            i += 1
            continue
        parts = name.split(".")
        found = config_field(parts[1], parts[2]) if len(parts) == 3 else None
        if found is None:
            raise UserError(f"--{name}: not a config field (--population.SECTION.FIELD v1,v2,...)")
        text = inline if equals else (argv[i + 1] if i + 1 < len(argv) else "")
        i += 1 if equals else 2
        if found.type not in (int, float) or not text:
            raise UserError(f"--{name}: a population varies numbers; give {found.section}.{found.name} comma-separated "
                            "numbers")
        field = Field(found.section, found.name, float)
        axes.append((f"{found.section}.{found.name}", tuple(convert(value, field, name) for value in text.split(","))))
    return rest, tuple(axes)
