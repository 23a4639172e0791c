"""A sweep's spec file: read and checked before anything runs, expanded into runs, and reconciled
with the runs an earlier launch recorded in runs.jsonl.

Every key a spec overrides is checked against the config dataclasses (through
`genai_jax.overrides`, the CLI's own names), so a typo stops the sweep with one line naming the
file and the key before a single run starts. Values are not checked here: a bad one fails its run,
which the sweep records while the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from genai_jax import overrides
from genai_jax.config import PRESETS, UserError

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")
COMMANDS = (*STAGES, "pipeline")
TOP_KEYS = ("command", "preset", "seeds", "population", "metrics", "frontiers", "fixed", "grid", "cells",
            "description")
# A stage command's flags that are not config fields: the run directories it starts from.
STAGE_FLAGS = {"init-from": STAGES, "policy": ("ppo",), "reward": ("ppo",)}
RESERVED = {
    "preset": "set `preset` at the top of the spec",
    "run-dir": "the sweep gives each run its own --run-dir",
    "train.seed": "each run's --train.seed comes from `seeds`",
    "train.population": "`population = true` at the top of the spec trains each cell's seeds as one population",
}
MAX_NAME = 96


@dataclass(frozen=True)
class Key:
    """An override key as the command line spells it (without `--`)."""

    flag: str
    boolean: bool

    def args(self, value: Any) -> list[str]:
        """The arguments that give this key `value`: `--flag VALUE`, or for a boolean field
        `--flag` / `--no-flag` (tyro's spelling, which the pipeline accepts too)."""
        if self.boolean and isinstance(value, bool):
            head, _, last = self.flag.rpartition(".")
            return [f"--{self.flag}"] if value else [f"--{head + '.' if head else ''}no-{last}"]
        return [f"--{self.flag}", value_text(value)]


def value_text(value: Any) -> str:
    """A value as it goes on the command line and into a run's name (floats: the shortest text
    that reads back the same, e.g. 1e-05)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def resolve_key(command: str, raw: str, where: str) -> Key:
    """The flag that spec key `raw` sets for `command`, refusing one that is none (one line
    naming `where` and the key)."""
    spelled = raw.replace("_", "-")
    if spelled in RESERVED:
        raise UserError(f"{where} key {raw!r}: {RESERVED[spelled]}")
    if command == "pipeline":
        if spelled == "gold-prompts":
            return Key(spelled, False)
        try:
            flag = overrides.pipeline_flag(spelled)
        except UserError as err:
            raise UserError(f"{where} key {raw!r}: {err}") from None
        if flag.negated:
            raise UserError(f"{where} key {raw!r}: write {flag.canonical!r} = false")
        if flag.canonical in RESERVED:
            raise UserError(f"{where} key {raw!r}: {RESERVED[flag.canonical]}")
        return Key(flag.canonical, flag.field.type is bool)
    if spelled in STAGE_FLAGS:
        if command not in STAGE_FLAGS[spelled]:
            owners = " or ".join(f"genai-jax {c}" for c in STAGE_FLAGS[spelled])
            raise UserError(f"{where} key {raw!r}: --{spelled} belongs to `{owners}`")
        return Key(spelled, False)
    section, dot, name = spelled.partition(".")
    if not dot or section not in overrides.SECTIONS:
        others = ", ".join(k for k, c in STAGE_FLAGS.items() if command in c)
        raise UserError(f"{where} key {raw!r}: unknown key (a {command} flag is SECTION.FIELD with SECTION one of "
                        f"{', '.join(overrides.SECTIONS)}, or {others})")
    field = overrides.config_field(section, name)
    if field is None:
        negated = overrides.negated_field(section, name)
        hint = f"; write {negated.flag!r} = false" if negated else ""
        raise UserError(f"{where} key {raw!r}: unknown key: the {section} section has no field {name!r}{hint}")
    return Key(field.flag, field.type is bool)


@dataclass(frozen=True)
class Cell:
    name: str
    overrides: dict[str, Any]
    """The cell's own overrides (flag -> value), on top of the spec's [fixed] ones."""


@dataclass(frozen=True)
class Spec:
    path: str
    command: str
    preset: str
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    fixed: dict[str, Any]
    axes: dict[str, list]
    """The [grid]: flag -> values (empty for a spec of named cells)."""
    cells: tuple[Cell, ...]
    keys: dict[str, Key]
    """Every flag the spec sets."""
    frontiers: tuple[tuple[str, str], ...] = ()
    """(x, y) metric pairs the report plots against each other, one point per cell."""
    population: bool = False
    """Each cell's seeds as one population run (`--train.population`, docs/population.md)."""


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _table(data: dict, name: str, where: str) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise UserError(f"{where}: `{name}` must be a table ([{name}])")
    return value


def _overrides(command: str, table: dict, where: str, keys: dict[str, Key], grid: bool = False) -> dict[str, Any]:
    """A table's overrides by flag, each key resolved; grid values must be lists of distinct scalars."""
    resolved: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for raw, value in table.items():
        key = resolve_key(command, raw, where)
        if key.flag in resolved:
            raise UserError(f"{where} keys {spelled[key.flag]!r} and {raw!r} set the same flag --{key.flag}")
        if grid:
            if not isinstance(value, list) or not value:
                raise UserError(f"{where} key {raw!r}: a grid axis is a non-empty list of values")
            bad = [v for v in value if not _scalar(v)]
            if bad:
                raise UserError(f"{where} key {raw!r}: {bad[0]!r} is not a number, string or boolean")
            texts = [value_text(v) for v in value]
            if len(set(texts)) < len(texts):
                raise UserError(f"{where} key {raw!r}: a value is listed twice")
        elif not _scalar(value):
            raise UserError(f"{where} key {raw!r}: {value!r} is not a number, string or boolean")
        keys[key.flag] = key
        resolved[key.flag] = value
        spelled[key.flag] = raw
    return resolved


def load_spec(path: str) -> Spec:
    """Read and check a spec file; every problem is one line naming the file and the key."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise UserError(f"{path}: no such spec file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the spec file ({err.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None
    unknown = [key for key in data if key not in TOP_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (a spec has {', '.join(TOP_KEYS)}; overrides go in "
                        "[fixed], [grid] or [[cells]])")
    command = data.get("command")
    if command not in COMMANDS:
        what = "is missing" if command is None else f"= {command!r} is not a training command"
        raise UserError(f"{path}: key 'command' {what} (one of {', '.join(COMMANDS)})")
    preset = data.get("preset", "tiny")
    if preset not in PRESETS:
        raise UserError(f"{path}: key 'preset' = {preset!r} is not a preset (one of {', '.join(PRESETS)})")
    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise UserError(f"{path}: key 'seeds' must be a non-empty list of integers, e.g. seeds = [0, 1, 2]")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"{path}: key 'seeds' lists a seed twice")
    population = data.get("population", False)
    if not isinstance(population, bool):
        raise UserError(f"{path}: key 'population' must be true or false")
    if population and sorted(seeds) != list(range(min(seeds), min(seeds) + len(seeds))):
        raise UserError(f"{path}: key 'population' = true trains seeds train.seed + i: key 'seeds' must be "
                        f"consecutive integers, e.g. seeds = [0, 1, 2] (not {seeds})")
    metrics = data.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise UserError(f"{path}: key 'metrics' must be a list of metric names (strings), "
                        "e.g. metrics = [\"ppo.gold_sampled\"]")
    frontiers = data.get("frontiers", [])
    if not isinstance(frontiers, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, str) and m for m in pair)
            for pair in frontiers):
        raise UserError(f"{path}: key 'frontiers' must be a list of [x, y] metric-name pairs, "
                        "e.g. frontiers = [[\"ppo.kl\", \"ppo.gold_sampled\"]]")
    keys: dict[str, Key] = {}
    fixed = _overrides(command, _table(data, "fixed", path), f"{path}: [fixed]", keys)
    if "grid" in data and "cells" in data:
        raise UserError(f"{path}: keys 'grid' and 'cells': a spec has a [grid] or a list of [[cells]], not both")
    if "grid" in data:
        axes = _overrides(command, _table(data, "grid", path), f"{path}: [grid]", keys, grid=True)
        if not axes:
            raise UserError(f"{path}: key 'grid' is empty: give each axis a list of values, "
                            "e.g. \"optim.lr\" = [1e-4, 3e-4]")
        cells = _grid_cells(axes)
    elif "cells" in data:
        axes = {}
        cells = _named_cells(command, data["cells"], path, keys)
    else:
        raise UserError(f"{path}: no key 'grid' or 'cells': add a [grid], or [[cells]] (for seeds alone: "
                        "[[cells]] with name = \"baseline\")")
    return Spec(path=path, command=command, preset=preset, seeds=tuple(seeds), metrics=tuple(metrics), fixed=fixed,
                axes=axes, cells=cells, keys=keys, frontiers=tuple(tuple(pair) for pair in frontiers),
                population=population)


def _grid_cells(axes: dict[str, list]) -> tuple[Cell, ...]:
    combos: list[dict[str, Any]] = [{}]
    for flag, values in axes.items():
        combos = [dict(combo, **{flag: value}) for combo in combos for value in values]
    return _name_cells([(None, combo) for combo in combos])


def _named_cells(command: str, cells: Any, path: str, keys: dict[str, Key]) -> tuple[Cell, ...]:
    if not isinstance(cells, list) or not cells or not all(isinstance(c, dict) for c in cells):
        raise UserError(f"{path}: key 'cells' must be a non-empty list of tables ([[cells]] blocks)")
    given = []
    for number, table in enumerate(cells, start=1):
        table = dict(table)
        name = table.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise UserError(f"{path}: [[cells]] number {number}: key 'name' must be a non-empty string")
        given.append((name, _overrides(command, table, f"{path}: [[cells]] number {number}", keys)))
    names = [name for name, _ in given if name is not None]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise UserError(f"{path}: [[cells]] key 'name': {twice!r} names two cells")
    seen: dict[str, int] = {}
    for number, (_, values) in enumerate(given, start=1):
        text = json.dumps({k: value_text(v) for k, v in values.items()}, sort_keys=True)
        if text in seen:
            raise UserError(f"{path}: [[cells]] numbers {seen[text]} and {number} have the same overrides")
        seen[text] = number
    return _name_cells(given)


def _labels(flags: list[str]) -> dict[str, str]:
    """Each flag's shortest dotted suffix that no other flag ends with (kl-coef for ppo.kl-coef)."""
    labels = {}
    for flag in flags:
        parts = flag.split(".")
        labels[flag] = flag
        for n in range(1, len(parts)):
            suffix = ".".join(parts[-n:])
            if not any(other != flag and (other == suffix or other.endswith("." + suffix)) for other in flags):
                labels[flag] = suffix
                break
    return labels


def _safe(text: str, keep: str = "") -> str:
    text = re.sub(rf"[^A-Za-z0-9._+@{re.escape(keep)}-]", "_", text)
    return "_" + text if text.startswith(".") or not text else text


def _digest(data: Any) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:6]


def _name_cells(given: list[tuple[str | None, dict[str, Any]]]) -> tuple[Cell, ...]:
    """Names a person can read: a given name, else `label=value,...` of the cell's overrides; a
    short hash of the overrides is added where names would collide or run too long."""
    labels = _labels(list(dict.fromkeys(flag for _, values in given for flag in values)))
    names = []
    for name, values in given:
        if name is None:
            name = ",".join(f"{labels[flag]}={_safe(value_text(value))}" for flag, value in values.items()) or "default"
        name = _safe(name, keep="=,")
        if len(name) > MAX_NAME:
            name = name[:MAX_NAME - 7] + "-" + _digest(values)
        names.append(name)
    cells = []
    for (_, values), name in zip(given, names):
        if names.count(name) > 1:
            name = f"{name}-{_digest({k: value_text(v) for k, v in values.items()})}"
        cells.append(Cell(name, values))
    return tuple(cells)


@dataclass
class Run:
    """One (cell, seed) of a sweep: an ordinary run directory made by one command; in a
    population sweep one cell's seeds `seed` ... `seed + population - 1`, as one population run."""

    name: str
    cell: str
    overrides: dict[str, Any]
    seed: int
    flags: dict[str, str]
    """Every override the command gets ([fixed] and the cell's), flag -> value text."""
    command: str
    preset: str
    args: list[str]
    """The override arguments, --train.seed included."""
    index: int = -1
    population: int = 1

    @property
    def seeds_name(self) -> str:
        """The seed part of its name: `seed=S`, or `seeds=S-E` for a population."""
        last = self.seed + self.population - 1
        return f"seed={self.seed}" if self.population == 1 else f"seeds={self.seed}-{last}"

    def run_dir(self, sweep_dir: str) -> str:
        return os.path.join(sweep_dir, self.name)

    def argv(self, sweep_dir: str) -> list[str]:
        return ["genai-jax", self.command, "--preset", self.preset, "--run-dir", self.run_dir(sweep_dir), *self.args]

    def identity(self) -> tuple:
        return (self.command, self.preset, self.seed, self.population, tuple(sorted(self.flags.items())))

    def record(self, sweep_dir: str) -> dict:
        """Its line of runs.jsonl."""
        argv = self.argv(sweep_dir)
        return {"index": self.index, "name": self.name, "cell": self.cell, "overrides": self.overrides,
                "seed": self.seed, "subcommand": self.command, "preset": self.preset, "flags": self.flags,
                "run_dir": self.run_dir(sweep_dir), "argv": argv, "command": shlex.join(argv),
                **({"population": self.population} if self.population > 1 else {})}


def expand(spec: Spec) -> list[Run]:
    """Every (cell, seed) of the spec, cell by cell, without indices; with `population`, one run
    per cell of all its seeds."""
    runs = []
    size = len(spec.seeds) if spec.population else 1
    for cell in spec.cells:
        merged = dict(spec.fixed)
        merged.update(cell.overrides)
        args = [arg for flag, value in merged.items() for arg in spec.keys[flag].args(value)]
        flags = {flag: value_text(value) for flag, value in merged.items()}
        for seed in (min(spec.seeds),) if spec.population else spec.seeds:
            run = Run(name="", cell=cell.name, overrides=dict(cell.overrides), seed=seed, flags=flags,
                      command=spec.command, preset=spec.preset, population=size,
                      args=[*args, "--train.seed", str(seed), *(["--train.population", str(size)] if size > 1 else [])])
            run.name = f"{cell.name}/{run.seeds_name}"
            runs.append(run)
    return runs


def _identity(record: dict) -> tuple:
    return (record["subcommand"], record["preset"], record["seed"], record.get("population", 1),
            tuple(sorted(record["flags"].items())))


def _change(record: dict, proposed: list[Run], spec: Spec) -> str:
    """Why the spec would change the recorded run `record`, field by field."""
    same = [run for run in proposed if run.name == record["name"]]
    if same:
        new, how = same[0], "the spec changes it"
    else:
        pool = [run for run in proposed if run.seed == record["seed"]] or proposed
        new = max(pool, key=lambda run: sum(record["flags"].get(k) == v for k, v in run.flags.items()))
        how = f"the spec no longer makes it (nearest: {new.name!r})"
    changes = [f"{what} {old!r} -> {now!r}" for what, old, now in
               (("command", record["subcommand"], new.command), ("preset", record["preset"], new.preset),
                ("population", record.get("population", 1), new.population)) if old != now]
    if record["seed"] not in spec.seeds:
        changes.append(f"seed {record['seed']} is not in seeds")
    for flag in dict.fromkeys([*record["flags"], *new.flags]):
        old, now = record["flags"].get(flag, "(unset)"), new.flags.get(flag, "(unset)")
        if old != now:
            changes.append(f"{flag} {old} -> {now}")
    return (f"{spec.path}: run {record['index']} {record['name']!r} has started and {how}: {'; '.join(changes)}. "
            "A changed spec may only add cells or seeds: change it back, or use another --sweep-dir")


def plan(spec: Spec, recorded: list[dict], started: Callable[[dict], bool]) -> list[Run]:
    """The spec's runs with their indices: a run recorded before keeps its index, name and cell; a
    recorded run the spec would change or drop is refused if it has `started`, forgotten if not;
    new runs get the next indices (and the cell name their recorded cell-mates have)."""
    proposed = expand(spec)
    by_identity = {_identity(record): record for record in recorded}
    alias: dict[str, str] = {}  # a cell's name now -> its recorded name
    kept: dict[str, dict] = {}  # recorded cell name -> its flags
    for run in proposed:
        record = by_identity.pop(run.identity(), None)
        if record is not None:
            alias[run.cell] = record["cell"]
            run.index, run.name, run.cell = record["index"], record["name"], record["cell"]
            kept[run.cell] = run.flags
    for record in sorted(by_identity.values(), key=lambda r: r["index"]):
        if started(record):
            raise UserError(_change(record, proposed, spec))
    next_index = max((record["index"] for record in recorded), default=-1) + 1
    for run in proposed:
        if run.index >= 0:
            continue
        cell = alias.get(run.cell, run.cell)
        if kept.get(cell, run.flags) != run.flags:  # the name is a kept cell's, with other settings
            cell = f"{cell}-{_digest(run.flags)}"
        run.cell, run.name, run.index = cell, f"{cell}/{run.seeds_name}", next_index
        next_index += 1
    return sorted(proposed, key=lambda run: run.index)


def recorded_runs(path: str) -> list[dict]:
    """The lines of a sweep's runs.jsonl (none before its first launch)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record["index"], int) or not isinstance(record["name"], str):
                    raise TypeError("index and name")
                _identity(record)  # the other fields a plan reads
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise UserError(f"{path}:{number}: not a run record ({err})") from None
            records.append(record)
    return records


def write_records(path: str, records: list[dict]) -> None:
    """runs.jsonl, replaced at once (jobs on other hosts may read it meanwhile)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    if os.path.exists(path):
        with open(path) as file:
            if file.read() == text:
                return
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as file:
        file.write(text)
    os.replace(partial, path)
