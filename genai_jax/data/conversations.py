"""Supervised fine-tuning data as conversations: lists of `{"role", "content"}` messages.

A local JSONL file holds one conversation per line, as `{"prompt", "response"}` (optionally
`"system"`) or `{"messages": [...]}`; TFDS `databricks_dolly` maps instruction (+ context) to the
user turn and the response to the assistant's. Bad lines are a UserError naming `path:line`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from genai_jax.config import UserError

ROLES = ("system", "user", "assistant")


class _BadLine(Exception):
    """What is wrong with one line; the reader adds the file and line number."""


def read_jsonl_conversations(path: str | Path, skip_malformed: bool = False) -> tuple[list[list[dict]], int]:
    """Conversations of a JSONL file and the number of malformed lines skipped.

    Each non-blank line is `{"prompt": str, "response": str}` (optionally `"system": str`), read as
    [system?, user, assistant], or `{"messages": [{"role": ..., "content": ...}, ...]}`. A malformed
    line raises UserError("<path>:<line>: <what is wrong>"), or is skipped and counted when
    `skip_malformed` is set."""
    conversations, skipped = [], 0
    for number, line in _jsonl_lines(path):
        try:
            conversations.append(_conversation(_json_object(line)))
        except _BadLine as err:
            if not skip_malformed:
                raise UserError(f"{path}:{number}: {err}") from None
            skipped += 1
    if not conversations:
        raise UserError(f"{path}: no conversations" + (f" ({skipped} malformed lines skipped)" if skipped else ""))
    return conversations, skipped


def read_prompts_jsonl(path: str | Path) -> list[str]:
    """The "prompt" of each line of a JSONL file (`{"prompt": str}` per line), for batch generation."""
    prompts = []
    for number, line in _jsonl_lines(path):
        try:
            prompts.append(_text_field(_json_object(line), "prompt"))
        except _BadLine as err:
            raise UserError(f"{path}:{number}: {err}") from None
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def dolly_conversations(split: str = "train") -> list[list[dict]]:
    """TFDS `databricks_dolly` as [user, assistant] conversations, read as a data source (ArrayRecord,
    no TensorFlow). The dataset must already be prepared in TFDS's data dir."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source("databricks_dolly", split=split)
    except Exception as err:  # TFDS raises many types for a missing or unprepared dataset
        raise UserError(f"tfds:databricks_dolly split {split!r} could not be loaded: "
                        f"{type(err).__name__}: {err}") from None
    return [dolly_record_to_conversation(source[i]) for i in range(len(source))]


def dolly_record_to_conversation(record: dict) -> list[dict]:
    """user = instruction, plus "\\n\\n" + context when there is one; assistant = response.
    Values may be bytes (TFDS text features) or str."""
    instruction, context, response = (_decode(record[key]) for key in ("instruction", "context", "response"))
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def _decode(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line; a line that is not UTF-8 is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{number}: not UTF-8 text (invalid byte at column {err.start + 1})") from None
        if line.strip():
            yield number, line


def _json_object(line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadLine(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise _BadLine(f"expected a JSON object, got {type(value).__name__}")
    return value


def _text_field(record: dict, key: str) -> str:
    """`record[key]`, which must be a string that is not blank."""
    value = record.get(key)
    if not isinstance(value, str):
        raise _BadLine(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise _BadLine(f'"{key}" is empty')
    return value


def _conversation(record: dict) -> list[dict]:
    has_pair = "prompt" in record and "response" in record
    if has_pair and "messages" in record:
        raise _BadLine('has both "prompt"/"response" and "messages"; use one form')
    if has_pair:
        return _prompt_response(record)
    if "messages" in record:
        return _messages(record["messages"])
    raise _BadLine(f'expected "prompt" and "response", or "messages" (found keys: {sorted(record)})')


def _prompt_response(record: dict) -> list[dict]:
    messages = [{"role": "user", "content": _text_field(record, "prompt")},
                {"role": "assistant", "content": _text_field(record, "response")}]
    if "system" in record:
        if not isinstance(record["system"], str):
            raise _BadLine(f'"system" must be a string, got {type(record["system"]).__name__}')
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def _messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _BadLine('"messages" must be a non-empty list')
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _BadLine(f'message {i} must be an object with string "role" and "content"')
        if message["role"] not in ROLES:
            raise _BadLine(f"message {i} has unknown role {message['role']!r} (use one of: {', '.join(ROLES)})")
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise _BadLine("no assistant message")
    if next((role for role in roles if role != "system"), None) != "user":
        raise _BadLine("the first message after any system messages must be from the user")
    return [{"role": message["role"], "content": message["content"]} for message in messages]
