"""The synthetic task world: the embedded default dataset, generated from a seed.

A family of small tasks whose answers a program can check: adding two numbers, reversing,
sorting and capitalising short words. From one generator come
- the pretraining corpus (`corpus`): the tasks' facts written as plain sentences;
- instructions (`Problem.instruction` / `Problem.answer`) for supervised fine-tuning;
- `gold_score(instruction, response)`: the checker behind the gold reward.

A problem is held out for evaluation by a hash of its canonical key, so no held-out problem
ever appears in the corpus or in training instructions, whatever the seed.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

TASKS = ("add", "reverse", "sort", "upper")
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
    "add": "what is {0} plus {1}?",
    "reverse": "reverse the word {0}",
    "sort": "sort the letters of {0}",
    "upper": "write {0} in capitals",
}


def solve(task: str, args: tuple) -> str:
    if task == "add":
        return str(int(args[0]) + int(args[1]))
    word = args[0]
    return {"reverse": word[::-1], "sort": "".join(sorted(word)), "upper": word.upper()}[task]


_INSTRUCTION_PATTERNS = {
    "add": re.compile(r"what is (\d+) plus (\d+)\?"),
    "reverse": re.compile(r"reverse the word ([a-z]+)"),
    "sort": re.compile(r"sort the letters of ([a-z]+)"),
    "upper": re.compile(r"write ([a-z]+) in capitals"),
}

# Plain-text facts for the corpus, some phrased like the instructions (so the corpus spells every
# character an instruction uses) but never in the chat template: answering in it is SFT's job.
_STATEMENTS = {
    "add": ("{0} plus {1} is {answer}.", "the sum of {0} and {1} is {answer}.", "{0}+{1}={answer}",
            "what is {0} plus {1}? {answer}."),
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


def chat(problem: Problem) -> list[dict]:
    """The problem as an SFT conversation: the instruction and its answer."""
    return [{"role": "user", "content": problem.instruction}, {"role": "assistant", "content": problem.answer}]


def random_problem(rng: np.random.Generator) -> Problem:
    task = TASKS[rng.integers(len(TASKS))]
    if task == "add":
        return Problem(task, tuple(str(x) for x in rng.integers(0, 100, size=2)))
    length = int(rng.integers(3, 7))
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
