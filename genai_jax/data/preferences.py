"""Preference data for reward modelling and DPO: a prompt and K >= 2 ranked candidate answers.

A local JSONL file holds one group per line, as a `{"prompt", "chosen", "rejected"}` pair
(optionally `"margin"`), a K-way `{"prompt", "responses", "ranking"}`, or an HH-RLHF style
`{"chosen", "rejected"}` pair of whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts whose
shared earlier turns are the prompt. An empty answer is a valid (bad) answer; an empty prompt is
not. Bad lines are a UserError naming `path:line`, as in `conversations`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import partial

from genai_jax.data.conversations import BadLine, _text_field, read_jsonl_records, record_line


@dataclass(frozen=True)
class PreferenceGroup:
    prompt: tuple[dict, ...]
    """Messages before the answers (system/user/assistant turns); the last one is from the user."""
    responses: tuple[str, ...]
    """K >= 2 candidate assistant answers."""
    ranking: tuple[int, ...]
    """Indices into `responses`, best first: a permutation of range(K)."""
    margin: float = 0.0
    """Margin for the Bradley-Terry loss (pairs only)."""

    def __post_init__(self):
        if not self.prompt or self.prompt[-1].get("role") != "user":
            raise ValueError("a preference prompt must be non-empty and end with a user message")
        if len(self.responses) < 2:
            raise ValueError(f"a preference group needs at least 2 responses, got {len(self.responses)}")
        if sorted(self.ranking) != list(range(len(self.responses))):
            raise ValueError(f"ranking {list(self.ranking)} is not a permutation of range({len(self.responses)})")
        if self.margin and len(self.responses) != 2:
            raise ValueError("a margin is only for pairs (K = 2)")


def pairs(group: PreferenceGroup) -> list[tuple[int, int]]:
    """All K(K-1)/2 (better, worse) response index pairs implied by the ranking, best pairs first."""
    ranking = group.ranking
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def read_preferences_jsonl(path: str | os.PathLike, skip_malformed: bool = False,
                           max_responses: int = 8, skip_flag: str = "") -> tuple[list[PreferenceGroup], int]:
    """Preference groups of a JSONL file and the number of malformed lines skipped.

    Each non-blank line is one of
      `{"prompt": str, "chosen": str, "rejected": str, "margin"?: number}`: K = 2, ranking (0, 1);
      `{"prompt": str, "responses": [str, ...], "ranking": [int, ...]}`: ranking lists response
          indices best first;
      `{"chosen": str, "rejected": str, "margin"?: number}` (HH-RLHF): two whole transcripts of
          "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns that agree on every turn before their
          final Assistant turn; those shared turns are the prompt, the final turns the responses.
    A "prompt" string is the single user message of the prompt. A malformed line raises
    UserError("<path>:<line>: <what is wrong>" and `skip_flag`, as `read_jsonl_records`), or is
    skipped and counted when `skip_malformed` is set; a group with more than `max_responses`
    responses is malformed."""
    if max_responses < 2:
        raise ValueError(f"max_responses must be at least 2, got {max_responses}")
    return read_jsonl_records(path, partial(_group, max_responses=max_responses), "preference pairs", skip_malformed,
                              skip_flag)


def preference_line(path: str | os.PathLike, number: int, max_responses: int = 8) -> int:
    """The line of a preferences file holding its `number`-th group."""
    return record_line(path, number, partial(_group, max_responses=max_responses))


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict]:
    """"\\n\\nHuman: hi\\n\\nAssistant: hello" -> [{"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"}], each content stripped. A turn starts at
    "\\n\\nHuman:" or "\\n\\nAssistant:" (or at "Human:" opening the text). Raises ValueError when
    there is text before the first turn, no turn, a first turn that is not Human's, or an empty turn
    other than a final Assistant turn (an empty answer is a valid, bad, answer: HH-RLHF has some)."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first turn: {_preview(parts[0])}")
    if len(parts) == 1:
        raise ValueError('no "\\n\\nHuman:" / "\\n\\nAssistant:" turns')
    messages = []
    turns = list(zip(parts[1::2], parts[2::2]))
    for i, (speaker, content) in enumerate(turns):
        if not content.strip() and not (speaker == "Assistant" and i == len(turns) - 1):
            raise ValueError(f"turn {i} ({speaker}) is empty")
        messages.append({"role": _HH_ROLES[speaker], "content": content.strip()})
    if messages[0]["role"] != "user":
        raise ValueError("the first turn must be from the Human")
    return messages


def _preview(text: str, limit: int = 30) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _group(record: dict, max_responses: int) -> PreferenceGroup:
    has_pair = "chosen" in record or "rejected" in record
    has_ranked = "responses" in record or "ranking" in record
    if has_pair and has_ranked:
        raise BadLine('has both "chosen"/"rejected" and "responses"/"ranking"; use one form')
    if has_ranked:
        return _ranked(record, max_responses)
    if has_pair:
        return _pair(record) if "prompt" in record else _hh_pair(record)
    raise BadLine('unknown format: expected "prompt" with "chosen" and "rejected", "prompt" with '
                   f'"responses" and "ranking", or HH-RLHF "chosen" and "rejected" (found keys: {sorted(record)})')


def _pair(record: dict) -> PreferenceGroup:
    prompt = _text_field(record, "prompt")
    chosen, rejected = _response_field(record, "chosen"), _response_field(record, "rejected")
    if chosen.strip() == rejected.strip():
        raise BadLine('"chosen" and "rejected" are identical')
    return PreferenceGroup(({"role": "user", "content": prompt},), (chosen, rejected), (0, 1), _margin(record))


def _hh_pair(record: dict) -> PreferenceGroup:
    chosen, rejected = (_hh_transcript(record, key) for key in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1]:
        turn = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                    min(len(chosen), len(rejected)) - 1)
        raise BadLine(f'"chosen" and "rejected" differ before their final Assistant turn (at turn {turn}); '
                       "they share no prompt")
    if chosen[-1] == rejected[-1]:
        raise BadLine('"chosen" and "rejected" are identical')
    return PreferenceGroup(tuple(chosen[:-1]), (chosen[-1]["content"], rejected[-1]["content"]), (0, 1),
                           _margin(record))


def _hh_transcript(record: dict, key: str) -> list[dict]:
    text = _text_field(record, key)
    try:
        messages = parse_hh_transcript(text)
    except ValueError as err:
        raise BadLine(f'"{key}" is not a Human/Assistant transcript: {err}') from None
    if messages[-1]["role"] != "assistant":
        raise BadLine(f'"{key}" does not end with an Assistant turn')
    if messages[-2]["role"] != "user":  # the parser puts a Human turn first, so there is a turn before
        raise BadLine(f'"{key}": the turn before the final Assistant turn must be from the Human')
    return messages


def _ranked(record: dict, max_responses: int) -> PreferenceGroup:
    if "margin" in record:
        raise BadLine('"margin" is only for "chosen"/"rejected" pairs')
    prompt = _text_field(record, "prompt")
    responses = record.get("responses")
    if not isinstance(responses, list):
        raise BadLine(f'"responses" must be a list of strings, got {type(responses).__name__}')
    if len(responses) < 2:
        raise BadLine(f'"responses" must hold at least 2 responses, got {len(responses)}')
    if len(responses) > max_responses:
        raise BadLine(f'"responses" holds {len(responses)} responses, more than max_responses={max_responses}')
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise BadLine(f"response {i} must be a string, got {type(response).__name__}")
        if response.strip() in seen:
            raise BadLine(f"responses {seen[response.strip()]} and {i} are identical")
        seen[response.strip()] = i
    ranking = record.get("ranking")
    if not (isinstance(ranking, list) and all(type(r) is int for r in ranking)):
        raise BadLine(f'"ranking" must be a list of integers, got {_describe(ranking)}')
    if sorted(ranking) != list(range(len(responses))):
        raise BadLine(f'"ranking" must be a permutation of 0..{len(responses) - 1} (each response index once), '
                       f"got {ranking}")
    return PreferenceGroup(({"role": "user", "content": prompt},), tuple(responses), tuple(ranking))


def _response_field(record: dict, key: str) -> str:
    """`record[key]`, which must be a string; an empty answer is a valid (bad) answer."""
    value = record.get(key)
    if not isinstance(value, str):
        raise BadLine(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _describe(value: object) -> str:
    if isinstance(value, list):
        return f"a list holding {type(next(v for v in value if type(v) is not int)).__name__}"
    return type(value).__name__


def _margin(record: dict) -> float:
    if "margin" not in record:
        return 0.0
    margin = record["margin"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise BadLine(f'"margin" must be a number, got {type(margin).__name__}')
    if not math.isfinite(margin):
        raise BadLine(f'"margin" must be finite, got {margin}')
    return float(margin)

