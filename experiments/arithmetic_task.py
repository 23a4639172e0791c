"""A verifiable task for a real chat model: arithmetic on two numbers asked as a short question,
with its checker as a reward function (`--reward python:arithmetic_task:score`, for `genai-jax
ppo` and `genai-jax eval`; run from this folder, or put it on PYTHONPATH).

    python experiments/arithmetic_task.py --out data/arithmetic     # train.jsonl, val.jsonl, test.jsonl

A problem belongs to one split whatever the seed (crc32 of its text: 10% test, 10% validation,
the rest train), so no test problem is ever a training prompt. A response is right when the last
number it writes is the answer (the model may explain first); the score is 1 or 0.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import zlib
from pathlib import Path

QUESTION = "What is {a} {op} {b}? Answer with the number."
_PARSE = re.compile(r"What is (\d+) ([+-]) (\d+)\?")
_NUMBER = re.compile(r"-?\d[\d,]*")
SPLITS = {"test": 0, "val": 1}
"""crc32(question) % 10 for the held-out splits; every other residue is train."""


def split_of(question: str) -> str:
    residue = zlib.crc32(question.encode()) % 10
    return next((name for name, r in SPLITS.items() if r == residue), "train")


def answer(question: str) -> int:
    match = _PARSE.search(question)
    if match is None:
        raise ValueError(f"not an arithmetic question: {question!r}")
    a, op, b = int(match[1]), match[2], int(match[3])
    return a + b if op == "+" else a - b


def questions(seed: int, count: int, split: str, ops: str = "+", digits: tuple[int, int] = (2, 2)) -> list[str]:
    """`count` distinct questions of `split`, drawn from `seed`: `ops` (+, -) on a number of
    digits[0] digits and one of digits[1]."""
    rng, found = random.Random(seed), {}
    bounds = [(10 ** (n - 1) if n > 1 else 0, 10**n - 1) for n in digits]
    for _ in range(100 * count):
        a, b = (rng.randint(low, high) for low, high in bounds)
        question = QUESTION.format(a=a, op=rng.choice(ops), b=b)
        if split_of(question) == split:
            found[question] = None
        if len(found) == count:
            return list(found)
    raise ValueError(f"found only {len(found)} distinct {split} questions of {ops!r} on {digits} digits, not {count}")


def last_number(response: str) -> int | None:
    numbers = _NUMBER.findall(response)
    return int(numbers[-1].replace(",", "")) if numbers else None


def score(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the last number of the response is the answer to the prompt's question."""
    return [float(last_number(response) == answer(prompt)) for prompt, response in zip(prompts, responses)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--held-out", type=int, default=200, help="questions in val.jsonl and in test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", default="+", help="operations to draw from: + and/or -")
    parser.add_argument("--digits", type=int, nargs=2, default=(2, 2), help="digits of the two numbers")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("val", args.held_out), ("test", args.held_out)):
        lines = [json.dumps({"prompt": question}) + "\n"
                 for question in questions(args.seed, count, split, args.ops, tuple(args.digits))]
        (out / f"{split}.jsonl").write_text("".join(lines))
        print(f"{out / split}.jsonl: {count} questions")


if __name__ == "__main__":
    main()
