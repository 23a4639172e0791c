"""The synthetic task world: the embedded default dataset, generated from a seed.

A family of small tasks whose answers a program can check: counting, reversing, sorting and
capitalising the letters of short words. From one generator come
- the pretraining corpus (`corpus`): the tasks' facts written as plain sentences;
- instructions (`Problem.instruction` / `Problem.answer`) for supervised fine-tuning, written by
  demonstrators who sometimes slip (`demonstration`): the headroom that preferences, which are
  easier to give than perfect answers, let RLHF recover;
- `gold_score(instruction, response)`: the checker behind the gold reward.

A problem is held out for evaluation by a hash of its canonical key, so no held-out problem
ever appears in the corpus or in training instructions, whatever the seed.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

TASKS = ("count", "reverse", "sort", "upper")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_HELD_OUT_MODULUS = 10


@dataclass(frozen=True)
class Problem:
    task: str
    args: tuple

    @property
    def key(self) -> str:
        return f"{self.task}:{':'.join(map(str, self.args))}"

    @property
    def held_out(self) -> bool:
        return zlib.crc32(self.key.encode()) % _HELD_OUT_MODULUS == 0

    @property
    def answer(self) -> str:
        return solve(self.task, self.args)

    @property
    def instruction(self) -> str:
        return _INSTRUCTIONS[self.task].format(*self.args)


_INSTRUCTIONS = {
    "count": "how many letters are in {0}?",
    "reverse": "reverse the word {0}",
    "sort": "sort the letters of {0}",
    "upper": "write {0} in capitals",
}


def solve(task: str, args: tuple) -> str:
    word = args[0]
    return {"count": str(len(word)), "reverse": word[::-1], "sort": "".join(sorted(word)),
            "upper": word.upper()}[task]


_INSTRUCTION_PATTERNS = {
    "count": re.compile(r"how many letters are in ([a-z]+)\?"),
    "reverse": re.compile(r"reverse the word ([a-z]+)"),
    "sort": re.compile(r"sort the letters of ([a-z]+)"),
    "upper": re.compile(r"write ([a-z]+) in capitals"),
}

# Plain-text facts for the corpus, some phrased like the instructions (so the corpus spells every
# character an instruction uses) but never in the chat template: answering in it is SFT's job.
_STATEMENTS = {
    "count": ("{0} has {answer} letters.", "there are {answer} letters in {0}.",
              "how many letters are in {0}? {answer}."),
    "reverse": ("{0} reversed is {answer}.", "the reverse of {0} is {answer}.",
                "reverse the word {0} and you get {answer}."),
    "sort": ("{0} sorted is {answer}.", "the letters of {0} in order are {answer}.",
             "sort the letters of {0} to get {answer}."),
    "upper": ("{0} in capitals is {answer}.", "{0} written in capitals is {answer}.",
              "write {0} in capitals: {answer}."),
}


def parse_instruction(instruction: str) -> Problem | None:
    """The problem an instruction states, or None if it is not one of the world's tasks."""
    for task, pattern in _INSTRUCTION_PATTERNS.items():
        match = pattern.fullmatch(instruction.strip())
        if match:
            return Problem(task, match.groups())
    return None


def gold_score(instruction: str, response: str) -> float:
    """1.0 for the exact answer; partial credit in [0, 0.5] for the share of answer characters
    right at their position (a longer or shorter response loses the positions it misses)."""
    problem = parse_instruction(instruction)
    if problem is None:
        raise ValueError(f"not an instruction of the task world: {instruction!r}")
    answer, response = problem.answer, response.strip()
    if response == answer:
        return 1.0
    matches = sum(a == b for a, b in zip(answer, response))
    return 0.5 * matches / max(len(answer), len(response), 1)


def chat(problem: Problem, answer: str | None = None) -> list[dict]:
    """The problem as an SFT conversation: the instruction and its answer (or `answer`)."""
    return [{"role": "user", "content": problem.instruction},
            {"role": "assistant", "content": problem.answer if answer is None else answer}]


NEAR_MISS_EDITS = ("substitute", "drop", "insert", "swap")


def near_miss(answer: str, rng: np.random.Generator, edits: tuple[str, ...] = NEAR_MISS_EDITS) -> str:
    """A near miss, never the answer itself: one character changed ("substitute"), dropped or
    inserted, or two neighbours swapped, in the answer's own alphabet; the edit is drawn from
    `edits`. ValueError when none of `edits` changes `answer` (a swap in "aa")."""
    alphabet = "0123456789" if answer.isdigit() else (_LETTERS.upper() if answer.isupper() else _LETTERS)
    for _ in range(1000):
        chars = list(answer)
        i = int(rng.integers(len(chars)))
        edit = edits[rng.integers(len(edits))]
        if edit == "substitute":
            chars[i] = alphabet[int(rng.integers(len(alphabet)))]
        elif edit == "drop" and len(chars) > 1:
            del chars[i]
        elif edit == "insert":
            chars.insert(i, alphabet[int(rng.integers(len(alphabet)))])
        elif edit == "swap" and len(chars) > 1:
            j = i + 1 if i + 1 < len(chars) else i - 1
            chars[i], chars[j] = chars[j], chars[i]
        candidate = "".join(chars)
        if candidate != answer:
            return candidate
    raise ValueError(f"no near miss of {answer!r} by {', '.join(edits)}")


def demonstrations(problems: list[Problem], error_rate: float, seed: int) -> list[list[dict]]:
    """SFT conversations as fallible demonstrators write them: each answer is a near miss with
    probability `error_rate`."""
    rng = np.random.default_rng(seed)
    return [chat(p, near_miss(p.answer, rng) if rng.random() < error_rate else None) for p in problems]


def random_problem(rng: np.random.Generator) -> Problem:
    task = TASKS[rng.integers(len(TASKS))]
    # Counted words run to 10 letters, so the corpus spells every digit.
    length = int(rng.integers(1, 11)) if task == "count" else int(rng.integers(3, 7))
    return Problem(task, ("".join(rng.choice(list(_LETTERS), size=length)),))


def problems(seed: int, count: int, held_out: bool = False) -> list[Problem]:
    """`count` problems from the training side (or the held-out side) of the split."""
    rng = np.random.default_rng(seed)
    found: list[Problem] = []
    while len(found) < count:
        problem = random_problem(rng)
        if problem.held_out == held_out:
            found.append(problem)
    return found


def statement(problem: Problem, rng: np.random.Generator) -> str:
    templates = _STATEMENTS[problem.task]
    template = templates[rng.integers(len(templates))]
    return template.format(*problem.args, answer=problem.answer)


def corpus(seed: int, num_docs: int, statements_per_doc: int = 4) -> str:
    """Pretraining text: one document per line, each a few facts of the world (training side only)."""
    rng = np.random.default_rng(seed)
    facts = iter(problems(seed + 1, num_docs * statements_per_doc))
    docs = [" ".join(statement(next(facts), rng) for _ in range(statements_per_doc)) for _ in range(num_docs)]
    return "\n".join(docs) + "\n"
