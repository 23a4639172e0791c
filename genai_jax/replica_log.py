"""A run's log (metrics.jsonl) parsed, and a population's log read replica by replica
(docs/population.md). Kept apart from `genai_jax.rundir` and `genai_jax.population`, and free of
JAX, because the sweep report reads runs too.

A population's metrics.jsonl holds, per logged step, its mean and std records (`"population":
"mean"` / `"std"`) and one record per replica tagged with `TAGS`; the records of the whole run
(step 0's sizes, with `"replicas": N`) carry neither.
"""

from __future__ import annotations

import json

from genai_jax.config import UserError

TAGS = ("replica", "seed", "hyperparameters")
"""What a replica's record carries besides its metrics."""


def parse_records(text: str, path) -> list[dict]:
    """The records of a metrics.jsonl's `text` read from `path`; a line that is not a JSON object
    with a `step` is refused with the file and line."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not a JSON record ({error.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise UserError(f"{path}:{number}: not a metrics record (a JSON object with a 'step')")
        records.append(record)
    return records


def replica_records(records: list[dict], index: int) -> list[dict]:
    """A population's log as replica `index`'s own: its records without their tags, and the
    records of the whole run (step 0's sizes) without the replica count."""
    own = [{name: value for name, value in record.items() if name not in TAGS}
           for record in records if record.get("replica") == index]
    shared = [{name: value for name, value in record.items() if name != "replicas"}
              for record in records if "replica" not in record and "population" not in record]
    return sorted(shared + own, key=lambda record: record["step"])
