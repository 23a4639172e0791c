"""Example builders for supervised fine-tuning: tokenized conversations -> fixed-shape LM rows.

A conversation of tokens t and loss mask m (from `tokenizer.encode_chat`) becomes the piece
inputs t[:-1], targets t[1:], weights m[1:]: the loss counts exactly the predictions of assistant
tokens. Pieces are padded one per row, or packed several per row with segment ids and positions
that restart per segment (the model never attends across segments), so packing changes nothing
but the number of rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from genai_jax.config import SEQ_LEN_FROM_DATA, DataConfig, UserError
from genai_jax.data import conversations, world
from genai_jax.distributed import say
from genai_jax.tokenizer import Tokenizer, encode_chat

# Held-out chats scored for the validation loss (the world's held-out side).
_WORLD_VAL_CHATS = 512


@dataclass
class RowStats:
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    """Dropped as too long (policy `drop`), or left with no assistant token after truncation."""
    rows: int = 0
    response_tokens: int = 0


def _pieces(encoded, seq_len: int, overlong: str, stats: RowStats):
    for tokens, mask in encoded:
        stats.conversations += 1
        if len(tokens) - 1 > seq_len:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            tokens, mask = tokens[: seq_len + 1], mask[: seq_len + 1]
        weights = mask[1:]
        if not weights.any():
            stats.dropped += 1
            continue
        stats.response_tokens += int(weights.sum())
        yield tokens[:-1], tokens[1:], weights


def build_rows(encoded, seq_len: int, pad_id: int, pack: bool = False, overlong: str = "truncate"):
    """(rows, stats): a dict of [N, seq_len] arrays (inputs, targets, weights, and with packing
    positions and segment_ids) from (tokens, loss_mask) pairs. `overlong` is the policy for
    conversations longer than seq_len + 1 tokens: "truncate" keeps their head, "drop" skips them."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong policy must be truncate or drop, not {overlong!r}")
    stats = RowStats()
    rows: list[list[tuple]] = []
    used = seq_len  # forces a new row for the first piece
    for piece in _pieces(encoded, seq_len, overlong, stats):
        if not pack or used + len(piece[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += len(piece[0])
    stats.rows = len(rows)
    arrays = {
        "inputs": np.full((len(rows), seq_len), pad_id, np.int32),
        "targets": np.full((len(rows), seq_len), pad_id, np.int32),
        "weights": np.zeros((len(rows), seq_len), np.float32),
    }
    if pack:
        arrays["positions"] = np.zeros((len(rows), seq_len), np.int32)
        arrays["segment_ids"] = np.zeros((len(rows), seq_len), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for segment, (inputs, targets, weights) in enumerate(row, start=1):
            span = slice(start, start + len(inputs))
            arrays["inputs"][r, span], arrays["targets"][r, span], arrays["weights"][r, span] = inputs, targets, weights
            if pack:
                arrays["positions"][r, span] = np.arange(len(inputs))
                arrays["segment_ids"][r, span] = segment
            start += len(inputs)
    return arrays, stats


def load_conversations(cfg: DataConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, validation) conversations of the configured source. The synthetic world validates
    on its held-out problems; other sources on their last `val_fraction` of conversations."""
    source = cfg.resolved_source
    if source == "world":
        train = world.demonstrations(world.problems(cfg.seed + 2, cfg.world_chats), cfg.demo_error, cfg.seed + 8)
        val = [world.chat(p) for p in world.problems(cfg.seed + 3, _WORLD_VAL_CHATS, held_out=True)]
        return train, val
    if source == "text":
        chats, skipped = conversations.read_jsonl_conversations(cfg.path, cfg.skip_malformed, "--data.skip-malformed")
        if skipped:
            say(f"{cfg.path}: skipped {skipped} malformed line(s)")
    elif source == "tfds:databricks_dolly":
        chats = conversations.dolly_conversations(cfg.tfds_split)
    else:
        raise UserError(f"data.source {source!r} has no conversations (use world, tfds:databricks_dolly or --data.path FILE.jsonl)")
    n_val = int(len(chats) * cfg.val_fraction)
    return chats[: len(chats) - n_val], chats[len(chats) - n_val :]


SEQ_LEN_BUCKET = 64


def fitted_seq_len(longest: int, limit: int) -> int:
    """A sequence length for examples of up to `longest` tokens: rounded up to a multiple of
    SEQ_LEN_BUCKET (runs on similar data share shapes), at most `limit` (the context length)."""
    return min(-(-longest // SEQ_LEN_BUCKET) * SEQ_LEN_BUCKET, limit)


def encode_rows(chats: list[list[dict]], tokenizer: Tokenizer, cfg: DataConfig, seq_len: int, first: int = 1,
                limit: int = 0):
    """(rows, stats as a dict) of conversations in the chat template, per the data config; a
    `seq_len` of SEQ_LEN_FROM_DATA (-1) is the longest conversation's (`fitted_seq_len`, at most
    `limit`), and stats' `seq_len` says which was used. Errors name the conversation by its file
    and line (data.path) or its number in the source, the first of `chats` being number `first`."""
    encoded = []
    for i, chat in enumerate(chats, start=first):
        try:
            encoded.append(encode_chat(tokenizer, chat))
        except UserError as err:
            where = (f"{cfg.path}:{conversations.conversation_line(cfg.path, i)}" if cfg.resolved_source == "text"
                     else f"conversation {i}")
            raise UserError(f"{where}: {err}") from None
    if seq_len == SEQ_LEN_FROM_DATA:
        seq_len = fitted_seq_len(max((len(tokens) - 1 for tokens, _ in encoded), default=1), limit)
    rows, stats = build_rows(encoded, seq_len, tokenizer.pad_id, pack=cfg.pack, overlong=cfg.overlong)
    if stats.rows == 0:
        raise UserError(f"no conversation has a response token within {seq_len} tokens")
    return rows, dataclasses.asdict(stats) | {"seq_len": seq_len}


def response_tokens(tokenizer: Tokenizer, prompt, response: str, seq_len: int) -> tuple[np.ndarray, int, bool]:
    """(tokens, answer, truncated): prompt + response in the chat template keeping the last seq_len
    tokens (a reward is read at the end), how many of them are the answer (its content and end of
    turn: an empty answer is its end of turn alone), and whether the start was cut."""
    tokens, mask = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}])
    answer = len(mask) - 1 - int(np.flatnonzero(mask == 0)[-1])  # the final run of learned tokens
    return tokens[-seq_len:], min(answer, seq_len), len(tokens) > seq_len


def longest_response(groups, tokenizer: Tokenizer) -> int:
    """The most tokens any response of preference `groups` takes after its prompt in the chat
    template (what `fitted_seq_len` sizes preference rows by)."""
    return max((len(encode_chat(tokenizer, [*group.prompt, {"role": "assistant", "content": response}])[0])
                for group in groups for response in group.responses), default=1)


def prompt_tail(tokenizer: Tokenizer, prompt, context_len: int, max_new_tokens: int) -> list[dict]:
    """The end of `prompt` whose generation prompt leaves `max_new_tokens` of `context_len` to
    answer, as the rows above keep the end of a conversation: from the earliest user turn that can
    stay, with the fewest characters cut from that turn's start. A tail that opens with the user
    suits templates that need the roles to alternate; a prompt that fits is kept whole."""
    room = context_len - max_new_tokens

    def excess(messages) -> int:
        return len(encode_chat(tokenizer, messages, generation_prompt=True)[0]) - room

    def cut(start: int, chars: int) -> list[dict]:
        return [{**prompt[start], "content": prompt[start]["content"][chars:]}, *prompt[start + 1 :]]

    for start in [0] + [i for i, message in enumerate(prompt) if i and message["role"] == "user"]:
        if excess(prompt[start:]) <= 0:
            return list(prompt[start:])
        low, high = 0, len(prompt[start]["content"])  # bisect the characters to cut
        if excess(cut(start, high)) > 0:
            continue
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if excess(cut(start, middle)) <= 0 else (middle + 1, high)
        return cut(start, high)
    raise UserError(f"model.context_len={context_len} leaves no room for a prompt and {max_new_tokens} new tokens")


def build_preference_rows(groups, tokenizer: Tokenizer, seq_len: int, overlong: str = "truncate", first: int = 1,
                          name: Callable[[int], str] = "preference group {}".format):
    """(rows, stats as a dict) for the reward model and DPO from `PreferenceGroup`s: tokens, mask
    and response [N, K, seq_len] (each response after its prompt in the chat template,
    right-padded; `response` marks the answer's tokens and its end of turn), rank and valid
    [N, K], weights and margin [N]; K is the most responses of any group. A sequence longer
    than seq_len keeps its last seq_len tokens ("truncate": the reward is read at the end) or
    drops its group ("drop"). Errors name the group `name(number)`, the first of `groups` being
    number `first`."""
    k = max(len(group.responses) for group in groups)
    n = len(groups)
    rows = {
        "tokens": np.full((n, k, seq_len), tokenizer.pad_id, np.int32),
        "mask": np.zeros((n, k, seq_len), np.int32),
        "response": np.zeros((n, k, seq_len), np.int32),
        "rank": np.full((n, k), k, np.int32),
        "valid": np.zeros((n, k), bool),
        "weights": np.zeros(n, np.float32),
        "margin": np.zeros(n, np.float32),
    }
    stats = {"groups": n, "pairs": 0, "truncated": 0, "dropped": 0}
    kept = 0
    for number, group in enumerate(groups, start=first):
        try:
            encoded = [response_tokens(tokenizer, group.prompt, response, seq_len) for response in group.responses]
        except UserError as err:
            raise UserError(f"{name(number)}: {err}") from None
        if any(truncated for _, _, truncated in encoded):
            if overlong == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
        for i, (tokens, answer, _) in enumerate(encoded):
            rows["tokens"][kept, i, : len(tokens)] = tokens
            rows["mask"][kept, i, : len(tokens)] = 1
            rows["response"][kept, i, len(tokens) - answer : len(tokens)] = 1
        rows["rank"][kept, list(group.ranking)] = np.arange(len(group.ranking))
        rows["valid"][kept, : len(group.responses)] = True
        rows["weights"][kept] = 1.0
        rows["margin"][kept] = group.margin
        stats["pairs"] += len(group.responses) * (len(group.responses) - 1) // 2
        kept += 1
    if kept == 0:
        raise UserError(f"no preference group fits in {seq_len} tokens")
    return {name: array[:kept] for name, array in rows.items()}, stats
