"""Text sources for pretraining: the synthetic world, text files (local or gs://), TFDS catalog datasets."""

from __future__ import annotations

from collections.abc import Iterator

from etils import epath

from genai_jax.config import DataConfig, UserError
from genai_jax.data import world


def load_text(cfg: DataConfig) -> str:
    """The whole corpus of the configured source as one string."""
    source = cfg.resolved_source
    if source == "world":
        return world.corpus(cfg.seed, cfg.world_docs)
    if source == "text":
        if not cfg.path:
            raise UserError("data.source=text needs --data.path FILE_OR_FOLDER")
        return read_text_path(epath.Path(cfg.path))
    if source.startswith("tfds:"):
        return tfds_text(source.removeprefix("tfds:"), cfg.tfds_split, cfg.text_feature)
    raise UserError(f"data.source: unknown source {source!r} (use world, text or tfds:NAME)")


def read_text_file(path: epath.Path) -> str:
    """A UTF-8 text file's contents; empty, binary or undecodable files are a UserError."""
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path}: the file is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{path}: binary file (NUL byte at offset {nul}), expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {err.start})") from None


def text_files(folder: epath.Path) -> Iterator[epath.Path]:
    """Every *.txt file under `folder`, by listing each level (epath refuses recursive globs in
    buckets, and its walk loses the gs:// prefix)."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from text_files(child)
        elif child.name.endswith(".txt"):
            yield child


def read_text_path(path: epath.Path) -> str:
    """A text file, or every *.txt file under a folder (sorted by path) joined by newlines."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(text_files(path), key=lambda file: file.parts)
        if not files:
            raise UserError(f"{path}: the folder holds no .txt files")
        return "\n".join(read_text_file(f) for f in files)
    return read_text_file(path)


def tfds_text(name: str, split: str, feature: str) -> str:
    """The `feature` of every record of a TFDS dataset's split, read as a data source (ArrayRecord,
    no TensorFlow) and joined by newlines. The dataset must already be prepared in TFDS's data dir."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split)
    except Exception as err:  # TFDS raises many types for a missing or unprepared dataset
        raise UserError(f"tfds:{name} split {split!r} could not be loaded: {type(err).__name__}: {err}") from None
    texts = []
    for i in range(len(source)):
        record = source[i]
        if feature not in record:
            raise UserError(f"tfds:{name}: records have no feature {feature!r} (they have {sorted(record)})")
        value = record[feature]
        texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    text = "\n".join(texts)
    if not text.strip():
        raise UserError(f"tfds:{name} split {split!r} holds no text")
    return text
