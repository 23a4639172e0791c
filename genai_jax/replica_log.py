"""A population's log read replica by replica (docs/population.md). Kept apart from
`genai_jax.population`, and free of JAX, because the sweep report reads population runs too.

A population's metrics.jsonl holds, per logged step, its mean and std records (`"population":
"mean"` / `"std"`) and one record per replica tagged with `TAGS`; the records of the whole run
(step 0's sizes, with `"replicas": N`) carry neither.
"""

from __future__ import annotations

TAGS = ("replica", "seed", "hyperparameters")
"""What a replica's record carries besides its metrics."""


def replica_records(records: list[dict], index: int) -> list[dict]:
    """A population's log as replica `index`'s own: its records without their tags, and the
    records of the whole run (step 0's sizes) without the replica count."""
    own = [{name: value for name, value in record.items() if name not in TAGS}
           for record in records if record.get("replica") == index]
    shared = [{name: value for name, value in record.items() if name != "replicas"}
              for record in records if "replica" not in record and "population" not in record]
    return sorted(shared + own, key=lambda record: record["step"])
