"""The synthetic task world: the gold checker and the held-out split."""

import re

import pytest

from genai_jax.data import world

ADD = world.Problem("add", ("12", "30"))
REVERSE = world.Problem("reverse", ("stone",))

# Every statement template, parsed back into its problem (more specific templates first).
_STATEMENT = re.compile(
    r"the sum of (?P<add_a>\d+) and (?P<add_b>\d+) is \d+\."
    r"|(?P<add_c>\d+) plus (?P<add_d>\d+) is \d+\."
    r"|(?P<add_e>\d+)\+(?P<add_f>\d+)=\d+"
    r"|what is (?P<add_g>\d+) plus (?P<add_h>\d+)\? \d+\."
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


@pytest.mark.parametrize("problem", [ADD, REVERSE, world.Problem("sort", ("pear",)), world.Problem("upper", ("ok",))],
                         ids=lambda problem: problem.task)
def test_gold_score_is_one_for_the_answer_and_less_otherwise(problem):
    assert world.gold_score(problem.instruction, problem.answer) == 1.0
    assert world.gold_score(problem.instruction, f"  {problem.answer}\n") == 1.0
    for wrong in ["", "x", problem.answer + "x", problem.answer[:-1], problem.answer[::-1] + "?"]:
        score = world.gold_score(problem.instruction, wrong)
        assert 0.0 <= score < 1.0, wrong


def test_gold_score_partial_credit_by_position():
    assert world.gold_score(ADD.instruction, "42") == 1.0
    assert world.gold_score(ADD.instruction, "43") == pytest.approx(0.25)
    assert world.gold_score(ADD.instruction, "24") == 0.0
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

    # No held-out statement appears: all held-out additions, and held-out problems of every task.
    corpus_statements = {statement for _, statement in statements}
    additions = [world.Problem("add", (str(a), str(b))) for a in range(100) for b in range(100)]
    held_out = [p for p in additions if p.held_out] + world.problems(seed=0, count=300, held_out=True)
    assert len(held_out) > 1000
    for problem in held_out:
        assert not renderings(problem) & corpus_statements, problem
