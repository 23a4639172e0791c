"""What a world reward model can and cannot check: its accuracy per task and per kind of error.

    python experiments/reward_errors.py --run runs/pipeline/reward [--problems 1000]

For held-out problems it scores the answer against a near miss made by one kind of edit
(a character substituted, dropped or inserted, two neighbours swapped) and prints, per task and
edit, how often the answer scores higher. Drops and inserts change the length, which a reward
model can check without reading the characters; substitutions and swaps keep the length, so
only a model that compares the response with the prompt, character by character, tells them
from the answer. Chance is 50%.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import tyro

from genai_jax import reward, runs
from genai_jax.data import world


@dataclass(frozen=True)
class Args:
    run: str
    """A finished reward model run (world data)."""
    problems: int = 1000
    """Held-out problems to draw (each gives one pair per edit that can change its answer)."""
    seed: int = 0


def pairs(problems: list[world.Problem], seed: int) -> list[tuple[world.Problem, str, str]]:
    """(problem, edit, near miss) for every edit that can change each problem's answer."""
    rng = np.random.default_rng(seed)
    found = []
    for problem in problems:
        for edit in world.NEAR_MISS_EDITS:
            try:
                found.append((problem, edit, world.near_miss(problem.answer, rng, edits=(edit,))))
            except ValueError:  # a drop or swap in a one-character answer or a repeated letter
                continue
    return found


def main(args: Args) -> None:
    cfg, tokenizer, params = runs.load_trained(args.run)
    found = pairs(world.problems(args.seed + 1, args.problems, held_out=True), args.seed)
    prompts = [world.chat(problem)[:1] for problem, _, _ in found]
    answer_scores = reward.raw_scores(cfg, params, tokenizer, prompts, [problem.answer for problem, _, _ in found])
    miss_scores = reward.raw_scores(cfg, params, tokenizer, prompts, [miss for _, _, miss in found])
    right = defaultdict(list)
    for (problem, edit, _), answer_score, miss_score in zip(found, answer_scores, miss_scores):
        for task in (problem.task, "all"):
            right[task, edit].append(answer_score > miss_score)
    tasks = [*world.TASKS, "all"]
    print(f"answer scored above its near miss, % ({args.run}, {len(found)} held-out pairs)")
    print(f"{'edit':<12}" + "".join(f"{task:>9}" for task in tasks))
    for edit in world.NEAR_MISS_EDITS:
        cells = [f"{100 * np.mean(right[task, edit]):9.1f}" if right[task, edit] else f"{'-':>9}" for task in tasks]
        print(f"{edit:<12}" + "".join(cells))


if __name__ == "__main__":
    main(tyro.cli(Args))
