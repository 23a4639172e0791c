"""The validation batches each process feeds: together the rows of one process's batches, none
repeated, however many processes share them."""

from types import SimpleNamespace

import numpy as np
import pytest

from genai_jax.data import loader


def batches_as_processes(monkeypatch, processes: int, records, global_batch: int, max_batches: int) -> list[list]:
    """Each global validation batch as the sorted ids of its rows, gathered from `processes` processes."""
    per_process = []
    for index in range(processes):
        monkeypatch.setattr(loader, "jax", SimpleNamespace(process_index=lambda: index,
                                                           process_count=lambda: processes))
        per_process.append(loader.validation_batches(records, global_batch, max_batches, seed=3))
    assert len({len(batches) for batches in per_process}) == 1
    return [sorted(np.concatenate([batches[i]["id"] for batches in per_process]).tolist())
            for i in range(len(per_process[0]))]


@pytest.mark.parametrize("max_batches, expected", [(10, 5), (2, 2)])
def test_validation_batches_do_not_depend_on_the_process_count(monkeypatch, max_batches, expected):
    records = loader.Rows({"id": np.arange(21)})
    one = batches_as_processes(monkeypatch, 1, records, 4, max_batches)
    assert len(one) == expected and all(len(batch) == 4 for batch in one)
    rows = [row for batch in one for row in batch]
    assert len(set(rows)) == len(rows)  # whole batches only, no row twice
    assert batches_as_processes(monkeypatch, 2, records, 4, max_batches) == one
    assert batches_as_processes(monkeypatch, 4, records, 4, max_batches) == one


def test_too_few_records_for_a_validation_batch(monkeypatch):
    assert batches_as_processes(monkeypatch, 2, loader.Rows({"id": np.arange(3)}), 4, 5) == []
