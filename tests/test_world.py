"""The synthetic task world: the gold checker and the held-out split."""

import re

import numpy as np
import pytest

from genai_jax.data import world

COUNT = world.Problem("count", ("stone",))
REVERSE = world.Problem("reverse", ("stone",))

# Every statement template, parsed back into its problem (more specific templates first).
_STATEMENT = re.compile(
    r"(?P<count_a>[a-z]+) has \d+ letters\."
    r"|there are \d+ letters in (?P<count_b>[a-z]+)\."
    r"|how many letters are in (?P<count_c>[a-z]+)\? \d+\."
    r"|reverse the word (?P<reverse_c>[a-z]+) and you get [a-z]+\."
    r"|sort the letters of (?P<sort_c>[a-z]+) to get [a-z]+\."
    r"|write (?P<upper_c>[a-z]+) in capitals: [A-Z]+\."
    r"|the reverse of (?P<reverse_a>[a-z]+) is [a-z]+\."
    r"|(?P<reverse_b>[a-z]+) reversed is [a-z]+\."
    r"|the letters of (?P<sort_a>[a-z]+) in order are [a-z]+\."
    r"|(?P<sort_b>[a-z]+) sorted is [a-z]+\."
    r"|(?P<upper_a>[a-z]+) written in capitals is [A-Z]+\."
    r"|(?P<upper_b>[a-z]+) in capitals is [A-Z]+\."
)


def parse_corpus(text: str) -> list[tuple[world.Problem, str]]:
    """(problem, statement) for every statement of the corpus; fails on anything unparsed."""
    found = []
    for doc in text.splitlines():
        position = 0
        while position < len(doc):
            match = _STATEMENT.match(doc, position)
            assert match, f"unparsed corpus text: {doc[position:]!r}"
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            task = next(iter(groups)).split("_")[0]
            found.append((world.Problem(task, tuple(groups.values())), match.group(0)))
            position = match.end() + 1  # the space between statements
    return found


@pytest.mark.parametrize("problem", [COUNT, REVERSE, world.Problem("sort", ("pear",)), world.Problem("upper", ("ok",))],
                         ids=lambda problem: problem.task)
def test_gold_score_is_one_for_the_answer_and_less_otherwise(problem):
    assert world.gold_score(problem.instruction, problem.answer) == 1.0
    assert world.gold_score(problem.instruction, f"  {problem.answer}\n") == 1.0
    for wrong in ["", "x", problem.answer + "x", problem.answer[:-1], problem.answer[::-1] + "?"]:
        score = world.gold_score(problem.instruction, wrong)
        assert 0.0 <= score < 1.0, wrong


def test_gold_score_partial_credit_by_position():
    assert world.gold_score(COUNT.instruction, "5") == 1.0
    assert world.gold_score(COUNT.instruction, "4") == 0.0
    assert world.gold_score(COUNT.instruction, "54") == pytest.approx(0.25)  # right digit, one too many
    assert world.gold_score(REVERSE.instruction, "enost") == pytest.approx(0.5 * 3 / 5)
    assert world.gold_score(REVERSE.instruction, "enots") == 1.0
    assert world.gold_score(REVERSE.instruction, "enotsxxxxx") == pytest.approx(0.5 * 5 / 10)


def test_gold_score_rejects_foreign_instructions():
    with pytest.raises(ValueError):
        world.gold_score("tell me a joke", "no")


def test_instructions_parse_back_to_their_problem():
    for problem in world.problems(seed=0, count=50) + world.problems(seed=0, count=50, held_out=True):
        assert world.parse_instruction(problem.instruction) == problem


def test_training_problems_are_never_held_out():
    train = world.problems(seed=3, count=500)
    held_out = world.problems(seed=3, count=100, held_out=True)
    assert not any(p.held_out for p in train)
    assert all(p.held_out for p in held_out)
    assert not {p.key for p in train} & {p.key for p in held_out}


def renderings(problem: world.Problem) -> set[str]:
    """Every way the corpus can state `problem`."""
    return {t.format(*problem.args, answer=problem.answer) for t in world._STATEMENTS[problem.task]}


def test_corpus_states_true_facts_of_training_problems_only():
    num_docs = 300
    statements = parse_corpus(world.corpus(seed=0, num_docs=num_docs))
    assert len(statements) == 4 * num_docs
    for problem, statement in statements:
        assert not problem.held_out, statement
        assert statement in renderings(problem), statement

    # No held-out problem of any task is stated.
    corpus_statements = {statement for _, statement in statements}
    held_out = world.problems(seed=0, count=1200, held_out=True)
    assert {p.task for p in held_out} == set(world.TASKS)
    for problem in held_out:
        assert not renderings(problem) & corpus_statements, problem


def test_demonstrations_err_at_the_configured_rate_with_near_misses():
    problems = world.problems(seed=4, count=2000)
    chats = world.demonstrations(problems, error_rate=0.3, seed=1)
    answers = [chat[1]["content"] for chat in chats]
    wrong = [a != p.answer for p, a in zip(problems, answers)]
    assert abs(sum(wrong) / len(wrong) - 0.3) < 0.03
    assert all(chat[0]["content"] == p.instruction for p, chat in zip(problems, chats))
    for p, answer in zip(problems, answers):
        assert abs(len(answer) - len(p.answer)) <= 1 and answer  # a near miss, never empty
    assert [c[1]["content"] for c in world.demonstrations(problems, 0.0, seed=1)] == [p.answer for p in problems]


def edit_kind(answer: str, miss: str) -> str:
    """Which single edit turns `answer` into `miss`, found independently of `near_miss`."""
    if len(miss) == len(answer) - 1 and any(answer[:i] + answer[i + 1:] == miss for i in range(len(answer))):
        return "drop"
    if len(miss) == len(answer) + 1 and any(miss[:i] + miss[i + 1:] == answer for i in range(len(miss))):
        return "insert"
    diffs = [i for i, (a, b) in enumerate(zip(answer, miss)) if a != b]
    if len(miss) == len(answer) and len(diffs) == 1:
        return "substitute"
    if len(diffs) == 2 and diffs[1] == diffs[0] + 1 and miss[diffs[0]] == answer[diffs[1]] \
            and miss[diffs[1]] == answer[diffs[0]]:
        return "swap"
    return "other"


@pytest.mark.parametrize("edit", world.NEAR_MISS_EDITS)
def test_near_miss_makes_only_the_edits_asked_for(edit):
    rng = np.random.default_rng(0)
    for problem in world.problems(seed=2, count=300):
        if edit in ("drop", "swap") and len(set(problem.answer)) == 1:
            continue  # a one-character count, or a word of one repeated letter
        miss = world.near_miss(problem.answer, rng, edits=(edit,))
        assert miss != problem.answer and edit_kind(problem.answer, miss) == edit, (problem.answer, miss)


def test_near_miss_refuses_an_edit_that_cannot_change_the_answer():
    with pytest.raises(ValueError, match="swap"):
        world.near_miss("aa", np.random.default_rng(0), edits=("swap",))
    with pytest.raises(ValueError, match="drop"):
        world.near_miss("7", np.random.default_rng(0), edits=("drop",))
