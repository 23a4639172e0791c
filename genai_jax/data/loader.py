"""grain pipelines: token windows, deterministic shuffling from the seed, sharding by process,
fixed-shape batches. The train iterator's state (`get_state`) goes into each checkpoint."""

from __future__ import annotations

import grain
import jax
import numpy as np

from genai_jax.config import UserError


class TokenWindows:
    """Random-access source: record i is the window tokens[i : i + seq_len + 1] as an LM example."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.tokens) - self.seq_len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        window = self.tokens[index : index + self.seq_len + 1]
        return {"inputs": window[:-1], "targets": window[1:], "weights": np.ones(self.seq_len, np.float32)}


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Head for training, tail for validation (nanoGPT's split); each must fit one window."""
    n_train = int(len(tokens) * (1 - val_fraction))
    train, val = tokens[:n_train], tokens[n_train:]
    if len(train) <= seq_len or (val_fraction > 0 and len(val) <= seq_len):
        raise UserError(
            f"the corpus has {len(tokens)} tokens: too few for windows of {seq_len + 1} in both the "
            f"train and the validation split (data.val_fraction={val_fraction})"
        )
    return train, val


def per_process_batch(global_batch: int, divisor: int) -> int:
    """This process's share of the global batch; it must split evenly over its devices."""
    processes = jax.process_count()
    if global_batch % processes or (global_batch // processes) % divisor:
        raise UserError(
            f"train.batch_size={global_batch} must split evenly over {processes} process(es) "
            f"x {divisor} device shard(s) each"
        )
    return global_batch // processes


def train_iterator(windows, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Endless batches: shuffled per epoch from `seed`, this process's rows only."""
    ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
    ds = ds[jax.process_index() :: jax.process_count()]
    return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())


def validation_batches(records, global_batch: int, max_batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    """The same batches every time (a stable validation set), this process's rows of each global
    batch: at most `max_batches`, and no more than `records` fills without repeating a row."""
    num_batches = min(max_batches, len(records) // global_batch)
    ds = grain.MapDataset.source(records).shuffle(seed=seed)[jax.process_index() :: jax.process_count()]
    ds = ds.batch(global_batch // jax.process_count(), drop_remainder=True)
    return [ds[i] for i in range(num_batches)]


class Rows:
    """Random-access source over prebuilt rows: a dict of equal-length arrays, one row per record."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: array[index] for name, array in self.arrays.items()}
