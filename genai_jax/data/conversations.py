"""Supervised fine-tuning data as conversations: lists of `{"role", "content"}` messages.

A JSONL file (local or gs://) holds one conversation per line, as `{"prompt", "response"}` (optionally
`"system"`) or `{"messages": [...]}`; TFDS `databricks_dolly` maps instruction (+ context) to the
user turn and the response to the assistant's. Bad lines are a UserError naming `path:line`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

from etils import epath

from genai_jax.config import UserError

ROLES = ("system", "user", "assistant")
T = TypeVar("T")


class BadLine(Exception):
    """What is wrong with one line; the reader adds the file and line number."""


def read_jsonl_records(path: str | os.PathLike, parse: Callable[[dict], T], what: str,
                       skip_malformed: bool = False, skip_flag: str = "") -> tuple[list[T], int]:
    """`parse(obj)` of the JSON object on each non-blank line, and the number of lines skipped.
    A line that is not a JSON object or that `parse` rejects (BadLine) raises
    UserError("<path>:<line>: <what is wrong>"), or is skipped and counted with `skip_malformed`.
    `skip_flag`, the option that sets `skip_malformed` where a command has one, ends the error:
    real files have a few bad lines, and a user cannot guess the way past them.
    `what` names the items for the error on a file that yields none."""
    items, skipped = [], 0
    for number, line in _jsonl_lines(path):
        try:
            items.append(parse(_json_object(line)))
        except BadLine as err:
            if not skip_malformed:
                hint = f" ({skip_flag} skips malformed lines)" if skip_flag else ""
                raise UserError(f"{path}:{number}: {err}{hint}") from None
            skipped += 1
    if not items:
        raise UserError(f"{path}: no {what}" + (f" ({skipped} malformed lines skipped)" if skipped else ""))
    return items, skipped


def record_line(path: str | os.PathLike, number: int, parse: Callable[[dict], T]) -> int:
    """The line of the file holding its `number`-th (1-based) record that `parse` accepts, as
    `read_jsonl_records` counted them (blank and skipped lines left out): for errors found after
    reading, e.g. a character the tokenizer cannot encode."""
    accepted = 0
    for line_number, line in _jsonl_lines(path):
        try:
            parse(_json_object(line))
        except BadLine:
            continue
        accepted += 1
        if accepted == number:
            return line_number
    raise ValueError(f"{path} has fewer than {number} records")


def conversation_line(path: str | os.PathLike, number: int) -> int:
    """The line of a conversations file holding its `number`-th conversation."""
    return record_line(path, number, _conversation)


def prompt_line(path: str | os.PathLike, number: int) -> int:
    """The line of a prompts file holding its `number`-th prompt."""
    return record_line(path, number, _prompt)


def read_jsonl_conversations(path: str | os.PathLike, skip_malformed: bool = False,
                             skip_flag: str = "") -> tuple[list[list[dict]], int]:
    """Conversations of a JSONL file and the number of malformed lines skipped.

    Each non-blank line is `{"prompt": str, "response": str}` (optionally `"system": str`), read as
    [system?, user, assistant], or `{"messages": [{"role": ..., "content": ...}, ...]}`. A malformed
    line raises UserError("<path>:<line>: <what is wrong>" and `skip_flag`, as `read_jsonl_records`),
    or is skipped and counted when `skip_malformed` is set."""
    return read_jsonl_records(path, _conversation, "conversations", skip_malformed, skip_flag)


def read_prompts_jsonl(path: str | os.PathLike) -> list[str]:
    """The "prompt" of each line of a JSONL file (`{"prompt": str}` per line), for batch generation."""
    return read_jsonl_records(path, _prompt, "prompts")[0]


def _prompt(record: dict) -> str:
    return _text_field(record, "prompt")


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


def _jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line; a line that is not UTF-8 is a UserError."""
    path = epath.Path(path)
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
        raise BadLine(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise BadLine(f"expected a JSON object, got {type(value).__name__}")
    return value


def _text_field(record: dict, key: str) -> str:
    """`record[key]`, which must be a string that is not blank."""
    value = record.get(key)
    if not isinstance(value, str):
        raise BadLine(f'"{key}" must be a string, got {type(value).__name__}')
    if not value.strip():
        raise BadLine(f'"{key}" is empty')
    return value


def _conversation(record: dict) -> list[dict]:
    has_pair = "prompt" in record and "response" in record
    if has_pair and "messages" in record:
        raise BadLine('has both "prompt"/"response" and "messages"; use one form')
    if has_pair:
        return _prompt_response(record)
    if "messages" in record:
        return _messages(record["messages"])
    raise BadLine(f'expected "prompt" and "response", or "messages" (found keys: {sorted(record)})')


def _prompt_response(record: dict) -> list[dict]:
    messages = [{"role": "user", "content": _text_field(record, "prompt")},
                {"role": "assistant", "content": _text_field(record, "response")}]
    if "system" in record:
        if not isinstance(record["system"], str):
            raise BadLine(f'"system" must be a string, got {type(record["system"]).__name__}')
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def _messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadLine('"messages" must be a non-empty list')
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BadLine(f'message {i} must be an object with string "role" and "content"')
        if message["role"] not in ROLES:
            raise BadLine(f"message {i} has unknown role {message['role']!r} (use one of: {', '.join(ROLES)})")
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise BadLine("no assistant message")
    if next((role for role in roles if role != "system"), None) != "user":
        raise BadLine("the first message after any system messages must be from the user")
    return [{"role": message["role"], "content": message["content"]} for message in messages]
