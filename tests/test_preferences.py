"""Preference data readers: chosen/rejected pairs, K-way rankings, HH-RLHF transcripts; pairs()."""

import json
from dataclasses import FrozenInstanceError

import pytest

from genai_jax.config import UserError
from genai_jax.data.preferences import PreferenceGroup, pairs, parse_hh_transcript, read_preferences_jsonl

PAIR = json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
USER = ({"role": "user", "content": "2+2?"},)


def write(tmp_path, *lines: str | bytes):
    """file.jsonl holding `lines`, each followed by a newline."""
    path = tmp_path / "file.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def test_pair_format(tmp_path):
    [group], skipped = read_preferences_jsonl(write(tmp_path, PAIR))
    assert skipped == 0
    assert group == PreferenceGroup(prompt=USER, responses=("4", "5"), ranking=(0, 1), margin=0.0)


def test_pair_format_with_margin(tmp_path):
    path = write(tmp_path, json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "five", "margin": 2}),
                 json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 0.5}))
    groups, _ = read_preferences_jsonl(str(path))
    assert [g.margin for g in groups] == [2.0, 0.5]
    assert isinstance(groups[0].margin, float)
    assert groups[0].responses == ("4", "five") and groups[0].ranking == (0, 1)


def test_ranked_format(tmp_path):
    line = json.dumps({"prompt": "Name a prime.", "responses": ["4", "7", "9"], "ranking": [1, 2, 0]})
    [group], _ = read_preferences_jsonl(write(tmp_path, line))
    assert group.prompt == ({"role": "user", "content": "Name a prime."},)
    assert group.responses == ("4", "7", "9")
    assert group.ranking == (1, 2, 0)
    assert group.margin == 0.0
    assert group.responses[group.ranking[0]] == "7"


def test_hh_single_turn(tmp_path):
    chosen = hh(("Human", "What is 2+2?"), ("Assistant", "It is 4."))
    rejected = hh(("Human", "What is 2+2?"), ("Assistant", "It is 5."))
    [group], _ = read_preferences_jsonl(write(tmp_path, json.dumps({"chosen": chosen, "rejected": rejected})))
    assert group.prompt == ({"role": "user", "content": "What is 2+2?"},)
    assert group.responses == ("It is 4.", "It is 5.")
    assert group.ranking == (0, 1) and group.margin == 0.0


def test_hh_multi_turn_shared_turns_become_the_prompt(tmp_path):
    shared = [("Human", "Hi there.\nI have a question."), ("Assistant", " Sure, ask away. "), ("Human", "What is 2+2?")]
    record = {"chosen": hh(*shared, ("Assistant", "4, of course.\n\nAnything else?")),
              "rejected": hh(*shared, ("Assistant", "Twenty-two.")), "margin": 1.5}
    [group], _ = read_preferences_jsonl(write(tmp_path, json.dumps(record)))
    assert group.prompt == ({"role": "user", "content": "Hi there.\nI have a question."},
                            {"role": "assistant", "content": "Sure, ask away."},
                            {"role": "user", "content": "What is 2+2?"})
    # a blank line inside a turn that is not followed by a speaker stays part of the turn
    assert group.responses == ("4, of course.\n\nAnything else?", "Twenty-two.")
    assert group.ranking == (0, 1) and group.margin == 1.5


def test_all_formats_in_one_file_with_blank_lines(tmp_path):
    ranked = json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]})
    hh_line = json.dumps({"chosen": hh(("Human", "q"), ("Assistant", "a")),
                          "rejected": hh(("Human", "q"), ("Assistant", "b"))})
    groups, skipped = read_preferences_jsonl(write(tmp_path, "", PAIR, "  ", ranked, hh_line, ""))
    assert skipped == 0
    assert [g.responses for g in groups] == [("4", "5"), ("a", "b"), ("a", "b")]
    assert [g.ranking for g in groups] == [(0, 1), (1, 0), (0, 1)]


def test_an_empty_answer_is_a_valid_bad_answer(tmp_path):
    """HH-RLHF's harmless-base test file has pairs whose last Assistant turn is empty: they load."""
    lines = [json.dumps({"chosen": hh(T, ("Assistant", "")), "rejected": hh(T, ("Assistant", "no"))}),
             json.dumps({"chosen": hh(T, A), "rejected": hh(T, ("Assistant", "  "))}),
             json.dumps({"prompt": "q", "chosen": "a", "rejected": ""}),
             json.dumps({"prompt": "q", "responses": ["a", "", "c"], "ranking": [0, 2, 1]})]
    groups, skipped = read_preferences_jsonl(write(tmp_path, *lines))
    question = ({"role": "user", "content": "q"},)
    assert skipped == 0
    assert groups == [PreferenceGroup(question, ("", "no"), (0, 1)), PreferenceGroup(question, ("a", ""), (0, 1)),
                      PreferenceGroup(question, ("a", ""), (0, 1)), PreferenceGroup(question, ("a", "", "c"), (0, 2, 1))]


def test_parse_hh_transcript():
    assert parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert parse_hh_transcript("Human:  hi \n\nAssistant:\nhello\n\n\nHuman: bye\n") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}]
    # "Human:" that does not open the text or follow a blank line is content
    assert parse_hh_transcript("\n\nHuman: say Human: x\nAssistant: y") == [
        {"role": "user", "content": "say Human: x\nAssistant: y"}]


@pytest.mark.parametrize("text, message", [
    ("", r'no "\\n\\nHuman:" / "\\n\\nAssistant:" turns'),
    ("hello there", "text before the first turn"),
    ("oops\n\nHuman: hi\n\nAssistant: yo", "text before the first turn: 'oops'"),
    ("\n\nAssistant: hello\n\nHuman: hi", "the first turn must be from the Human"),
    ("\n\nHuman: hi\n\nAssistant:   \n\nHuman: x", r"turn 1 \(Assistant\) is empty"),
    ("\n\nHuman:\n\nAssistant: yo", r"turn 0 \(Human\) is empty"),
])
def test_parse_hh_transcript_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_hh_transcript(text)


@pytest.mark.parametrize("ranking, expected", [
    ((0, 1), [(0, 1)]),
    ((1, 0), [(1, 0)]),
    ((2, 0, 1), [(2, 0), (2, 1), (0, 1)]),
    ((3, 1, 0, 2), [(3, 1), (3, 0), (3, 2), (1, 0), (1, 2), (0, 2)]),
])
def test_pairs(ranking, expected):
    k = len(ranking)
    group = PreferenceGroup(USER, tuple(f"r{i}" for i in range(k)), ranking)
    result = pairs(group)
    assert result == expected
    assert len(result) == k * (k - 1) // 2 == len(set(result))
    position = {index: rank for rank, index in enumerate(ranking)}
    assert all(position[better] < position[worse] for better, worse in result)


def test_pairs_from_a_read_group(tmp_path):
    line = json.dumps({"prompt": "p", "responses": ["bad", "best", "ok", "worst"], "ranking": [1, 2, 0, 3]})
    [group], _ = read_preferences_jsonl(write(tmp_path, line))
    named = [(group.responses[a], group.responses[b]) for a, b in pairs(group)]
    assert named == [("best", "ok"), ("best", "bad"), ("best", "worst"), ("ok", "bad"), ("ok", "worst"),
                     ("bad", "worst")]


def test_group_is_frozen_and_checked():
    group = PreferenceGroup(USER, ("a", "b"), (0, 1))
    with pytest.raises(FrozenInstanceError):
        group.ranking = (1, 0)
    with pytest.raises(ValueError, match="not a permutation"):
        PreferenceGroup(USER, ("a", "b"), (0, 0))
    with pytest.raises(ValueError, match="at least 2 responses"):
        PreferenceGroup(USER, ("a",), (0,))
    with pytest.raises(ValueError, match="end with a user message"):
        PreferenceGroup(USER + ({"role": "assistant", "content": "x"},), ("a", "b"), (0, 1))
    with pytest.raises(ValueError, match="only for pairs"):
        PreferenceGroup(USER, ("a", "b", "c"), (0, 1, 2), margin=1.0)


T = ("Human", "q")
A = ("Assistant", "a")
MALFORMED = {
    "not JSON": ('{"prompt": "hi",', r"not valid JSON \(.+ at column \d+\)"),
    "not an object": ('["a", "b"]', r"expected a JSON object, got list"),
    "unknown format": ('{"question": "q", "answer": "a"}', r'unknown format: expected .* \(found keys: '),
    "prompt only": ('{"prompt": "q"}', r"unknown format"),
    "both forms": ('{"prompt": "q", "chosen": "a", "rejected": "b", "responses": ["a", "b"], "ranking": [0, 1]}',
                   r'has both "chosen"/"rejected" and "responses"/"ranking"; use one form'),
    # pairs
    "prompt not str": ('{"prompt": ["q"], "chosen": "a", "rejected": "b"}', r'"prompt" must be a string, got list'),
    "chosen not str": ('{"prompt": "q", "chosen": 1, "rejected": "b"}', r'"chosen" must be a string, got int'),
    "rejected missing": ('{"prompt": "q", "chosen": "a"}', r'"rejected" must be a string, got NoneType'),
    "empty prompt": ('{"prompt": " ", "chosen": "a", "rejected": "b"}', r'"prompt" is empty'),
    "empty pair": ('{"prompt": "q", "chosen": "", "rejected": " "}', r'"chosen" and "rejected" are identical'),
    "hh empty middle turn": (json.dumps({"chosen": hh(T, ("Assistant", " "), T, A), "rejected": hh(T, ("Assistant", " "), T, ("Assistant", "b"))}),
                             r'"chosen" is not a Human/Assistant transcript: turn 1 \(Assistant\) is empty'),
    "identical pair": ('{"prompt": "q", "chosen": "same", "rejected": "same "}',
                       r'"chosen" and "rejected" are identical'),
    "margin not number": ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1"}',
                          r'"margin" must be a number, got str'),
    "margin bool": ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": true}',
                    r'"margin" must be a number, got bool'),
    "margin not finite": ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}',
                          r'"margin" must be finite, got nan'),
    # K-way
    "responses not list": ('{"prompt": "q", "responses": "a", "ranking": [0]}',
                           r'"responses" must be a list of strings, got str'),
    "one response": ('{"prompt": "q", "responses": ["a"], "ranking": [0]}',
                     r'"responses" must hold at least 2 responses, got 1'),
    "too many responses": (json.dumps({"prompt": "q", "responses": list("abcdefghi"), "ranking": list(range(9))}),
                           r'"responses" holds 9 responses, more than max_responses=8'),
    "response not str": ('{"prompt": "q", "responses": ["a", 2], "ranking": [0, 1]}',
                         r"response 1 must be a string, got int"),
    "duplicate responses": ('{"prompt": "q", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}',
                            r"responses 0 and 2 are identical"),
    "ranking missing": ('{"prompt": "q", "responses": ["a", "b"]}',
                        r'"ranking" must be a list of integers, got NoneType'),
    "ranking of str": ('{"prompt": "q", "responses": ["a", "b"], "ranking": ["0", "1"]}',
                       r'"ranking" must be a list of integers, got a list holding str'),
    "ranking of bool": ('{"prompt": "q", "responses": ["a", "b"], "ranking": [true, false]}',
                        r'"ranking" must be a list of integers, got a list holding bool'),
    "ranking of float": ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0.0, 1.0]}',
                         r'"ranking" must be a list of integers, got a list holding float'),
    "ranking repeats": ('{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}',
                        r'"ranking" must be a permutation of 0\.\.2 \(each response index once\), got \[0, 0, 1\]'),
    "ranking short": ('{"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0]}',
                      r'"ranking" must be a permutation of 0\.\.2'),
    "ranking out of range": ('{"prompt": "q", "responses": ["a", "b"], "ranking": [1, 2]}',
                             r'"ranking" must be a permutation of 0\.\.1'),
    "margin on K-way": ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1], "margin": 1}',
                        r'"margin" is only for "chosen"/"rejected" pairs'),
    # HH-RLHF
    "hh not a transcript": (json.dumps({"chosen": "just text", "rejected": hh(T, A)}),
                            r'"chosen" is not a Human/Assistant transcript: text before the first turn'),
    "hh assistant first": (json.dumps({"chosen": hh(T, A), "rejected": hh(A, T, A)}),
                           r'"rejected" is not a Human/Assistant transcript: the first turn must be from the Human'),
    "hh ends with human": (json.dumps({"chosen": hh(T, A, T), "rejected": hh(T, A)}),
                           r'"chosen" does not end with an Assistant turn'),
    "hh two assistant turns at end": (json.dumps({"chosen": hh(T, A, ("Assistant", "b")), "rejected": hh(T, A)}),
                                      r'"chosen": the turn before the final Assistant turn must be from the Human'),
    "hh different prompts": (json.dumps({"chosen": hh(T, ("Assistant", "x"), T, A),
                                         "rejected": hh(T, ("Assistant", "y"), T, ("Assistant", "b"))}),
                             r'"chosen" and "rejected" differ before their final Assistant turn \(at turn 1\); '
                             r"they share no prompt"),
    "hh different lengths": (json.dumps({"chosen": hh(T, A, T, A), "rejected": hh(T, ("Assistant", "b"))}),
                             r'"chosen" and "rejected" differ before their final Assistant turn \(at turn 1\)'),
    "hh identical": (json.dumps({"chosen": hh(T, A), "rejected": hh(T, ("Assistant", " a"))}),
                     r'"chosen" and "rejected" are identical'),
    "hh rejected missing": (json.dumps({"chosen": hh(T, A)}), r'"rejected" must be a string, got NoneType'),
    "hh empty": (json.dumps({"chosen": "", "rejected": hh(T, A)}), r'"chosen" is empty'),
}


@pytest.mark.parametrize("line, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, PAIR, "", line, PAIR)
    with pytest.raises(UserError, match=rf"file\.jsonl:3: {message}"):
        read_preferences_jsonl(path)


def test_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, "", PAIR, "   ", "\t", PAIR, "", "[1]")
    with pytest.raises(UserError, match=r"file\.jsonl:7: expected a JSON object, got list"):
        read_preferences_jsonl(path)


def test_max_responses(tmp_path):
    line = json.dumps({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 1, 0]})
    with pytest.raises(UserError, match=r"file\.jsonl:2: .*3 responses, more than max_responses=2"):
        read_preferences_jsonl(write(tmp_path, PAIR, line), max_responses=2)
    groups, _ = read_preferences_jsonl(write(tmp_path, PAIR, line), max_responses=3)
    assert [len(g.responses) for g in groups] == [2, 3]
    with pytest.raises(ValueError, match="max_responses must be at least 2"):
        read_preferences_jsonl(write(tmp_path, PAIR), max_responses=1)


def test_skip_malformed_counts_and_keeps_the_good(tmp_path):
    bad = [line for line, _ in MALFORMED.values()]
    ranked = json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]})
    path = write(tmp_path, bad[0], PAIR, *bad[1:], "", ranked)
    groups, skipped = read_preferences_jsonl(path, skip_malformed=True)
    assert skipped == len(MALFORMED)
    assert groups == [PreferenceGroup(USER, ("4", "5"), (0, 1)),
                      PreferenceGroup(({"role": "user", "content": "p"},), ("a", "b", "c"), (2, 0, 1))]


def hh_marker_typo(shared: str) -> dict:
    """An HH-RLHF line as 5 of the harmless-base test file's are: a "Human:" marker without its
    blank line, inside an Assistant turn, so two Assistant turns end each transcript."""
    typo = hh(("Human", "Who performs in drag?"), ("Assistant", f"Drag queens and drag kings.  Human: {shared}"))
    return {"chosen": typo + hh(("Assistant", "They dress up.")), "rejected": typo + hh(("Assistant", "No idea."))}


def test_hh_marker_typo_names_the_flag_that_skips_it(tmp_path):
    path = write(tmp_path, json.dumps(hh_marker_typo("Then how do they perform?")), PAIR)
    message = (r'file\.jsonl:1: "chosen": the turn before the final Assistant turn must be from the Human '
               r"\(--data\.skip-malformed skips malformed lines\)$")
    with pytest.raises(UserError, match=message):
        read_preferences_jsonl(path, skip_flag="--data.skip-malformed")
    with pytest.raises(UserError, match=r'Human$'):  # a reader without the flag names none
        read_preferences_jsonl(path)
    assert read_preferences_jsonl(path, skip_malformed=True, skip_flag="--data.skip-malformed") == (
        [PreferenceGroup(USER, ("4", "5"), (0, 1))], 1)


def test_empty_or_blank_file(tmp_path):
    for content in ("", "\n  \n\n"):
        path = tmp_path / "file.jsonl"
        path.write_text(content)
        with pytest.raises(UserError, match=r"file\.jsonl: no preference pairs$"):
            read_preferences_jsonl(path)


def test_every_line_skipped_is_no_preference_pairs(tmp_path):
    with pytest.raises(UserError, match=r"file\.jsonl: no preference pairs \(2 malformed lines skipped\)"):
        read_preferences_jsonl(write(tmp_path, "nope", PAIR.replace('"5"', '"4"')), skip_malformed=True)


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(UserError, match=r"missing\.jsonl: no such file"):
        read_preferences_jsonl(tmp_path / "missing.jsonl")
    path = write(tmp_path, PAIR, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}')
    for skip in (False, True):
        with pytest.raises(UserError, match=r"file\.jsonl:2: not UTF-8 text"):
            read_preferences_jsonl(path, skip_malformed=skip)
