"""SFT conversation readers: JSONL prompt/response and messages files, prompts files, TFDS dolly."""

import json

import pytest

from genai_jax.config import UserError
from genai_jax.data import conversations
from genai_jax.data.conversations import (
    dolly_conversations,
    dolly_record_to_conversation,
    read_jsonl_conversations,
    read_prompts_jsonl,
)
from genai_jax.data.preferences import preference_line, read_preferences_jsonl

GOOD = json.dumps({"prompt": "hi", "response": "hello"})
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"}]


def write(tmp_path, *lines: str | bytes):
    """file.jsonl holding `lines`, each followed by a newline."""
    path = tmp_path / "file.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_both_formats_parse_to_messages(tmp_path):
    path = write(tmp_path, GOOD, json.dumps({"messages": MESSAGES}))
    convs, skipped = read_jsonl_conversations(path)
    assert skipped == 0
    assert convs == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], MESSAGES]


def test_prompt_format_with_system(tmp_path):
    path = write(tmp_path, json.dumps({"system": "be kind", "prompt": "hi", "response": "hello"}))
    [conv], _ = read_jsonl_conversations(str(path))
    assert [(m["role"], m["content"]) for m in conv] == [("system", "be kind"), ("user", "hi"), ("assistant", "hello")]


def test_messages_keep_only_role_and_content(tmp_path):
    messages = [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo"}]
    [conv], _ = read_jsonl_conversations(write(tmp_path, json.dumps({"messages": messages})))
    assert conv == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write(tmp_path, "", GOOD, "   ", "\t", GOOD, "", "[1]")
    with pytest.raises(UserError, match=r"file\.jsonl:7: expected a JSON object, got list"):
        read_jsonl_conversations(path)
    convs, skipped = read_jsonl_conversations(write(tmp_path, "", GOOD, "  ", GOOD, ""))
    assert (len(convs), skipped) == (2, 0)


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_bytes(f"{GOOD}\r\n\r\n{GOOD}\r\n{{\r\n".encode())
    with pytest.raises(UserError, match=r"file\.jsonl:4: not valid JSON"):
        read_jsonl_conversations(path)


MALFORMED = {
    "not JSON": ('{"prompt": "hi",', r"not valid JSON \(.+ at column \d+\)"),
    "not an object": ('"just a string"', r"expected a JSON object, got str"),
    "no known keys": ('{"question": "hi", "answer": "yo"}', r'expected "prompt" and "response", or "messages"'),
    "prompt only": ('{"prompt": "hi"}', r'expected "prompt" and "response"'),
    "both forms": ('{"prompt": "a", "response": "b", "messages": []}',
                   r'has both "prompt"/"response" and "messages"; use one form'),
    "prompt not str": ('{"prompt": 3, "response": "yo"}', r'"prompt" must be a string, got int'),
    "response not str": ('{"prompt": "hi", "response": null}', r'"response" must be a string, got NoneType'),
    "system not str": ('{"system": ["x"], "prompt": "hi", "response": "yo"}', r'"system" must be a string'),
    "empty prompt": ('{"prompt": "  ", "response": "yo"}', r'"prompt" is empty'),
    "empty response": ('{"prompt": "hi", "response": ""}', r'"response" is empty'),
    "messages not list": ('{"messages": {"role": "user"}}', r'"messages" must be a non-empty list'),
    "messages empty": ('{"messages": []}', r'"messages" must be a non-empty list'),
    "message not object": ('{"messages": ["hi"]}', r'message 0 must be an object with string "role" and "content"'),
    "content not str": ('{"messages": [{"role": "user", "content": 1}]}', r'message 0 must be an object'),
    "role missing": ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', r"message 1 must be"),
    "unknown role": ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
                     r"message 1 has unknown role 'bot' \(use one of: system, user, assistant\)"),
    "no assistant": ('{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}',
                     r"no assistant message"),
    "assistant first": ('{"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}',
                        r"the first message after any system messages must be from the user"),
}


@pytest.mark.parametrize("line, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, GOOD, "", line, GOOD)
    with pytest.raises(UserError, match=rf"file\.jsonl:3: {message}"):
        read_jsonl_conversations(path)


def test_skip_malformed_counts_and_keeps_the_good(tmp_path):
    bad = [line for line, _ in MALFORMED.values()]
    path = write(tmp_path, bad[0], GOOD, *bad[1:], json.dumps({"messages": MESSAGES}))
    convs, skipped = read_jsonl_conversations(path, skip_malformed=True)
    assert skipped == len(MALFORMED)
    assert convs[1] == MESSAGES and convs[0][0]["content"] == "hi" and len(convs) == 2


def test_empty_or_blank_file(tmp_path):
    for content in ("", "\n  \n\n"):
        path = tmp_path / "file.jsonl"
        path.write_text(content)
        with pytest.raises(UserError, match=r"file\.jsonl: no conversations$"):
            read_jsonl_conversations(path)


def test_every_line_skipped_is_no_conversations(tmp_path):
    with pytest.raises(UserError, match=r"file\.jsonl: no conversations \(2 malformed lines skipped\)"):
        read_jsonl_conversations(write(tmp_path, "nope", "[]"), skip_malformed=True)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"missing\.jsonl: no such file"):
        read_jsonl_conversations(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match=r"missing\.jsonl: no such file"):
        read_prompts_jsonl(tmp_path / "missing.jsonl")


def test_non_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path, GOOD, b'{"prompt": "caf\xe9", "response": "x"}')
    for skip in (False, True):
        with pytest.raises(UserError, match=r"file\.jsonl:2: not UTF-8 text \(invalid byte at column 16\)"):
            read_jsonl_conversations(path, skip_malformed=skip)


def test_read_prompts(tmp_path):
    path = write(tmp_path, json.dumps({"prompt": "the reverse of"}), "", json.dumps({"prompt": "ünïcode", "x": 1}))
    assert read_prompts_jsonl(path) == ["the reverse of", "ünïcode"]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 5}', r'"prompt" must be a string, got int'),
    ('{"text": "hi"}', r'"prompt" must be a string, got NoneType'),
    ('{"prompt": ""}', r'"prompt" is empty'),
    ("prompt", r"not valid JSON"),
])
def test_read_prompts_errors(tmp_path, line, message):
    with pytest.raises(UserError, match=rf"file\.jsonl:3: {message}"):
        read_prompts_jsonl(write(tmp_path, json.dumps({"prompt": "ok"}), "  ", line))


def test_read_prompts_empty_file(tmp_path):
    with pytest.raises(UserError, match=r"file\.jsonl: no prompts"):
        read_prompts_jsonl(write(tmp_path, ""))


def test_dolly_record_joins_instruction_and_context():
    record = {"instruction": b"Summarise this.", "context": "Caf\u00e9s sell coffee.".encode(),
              "response": b"Coffee.", "category": b"summarization"}
    assert dolly_record_to_conversation(record) == [
        {"role": "user", "content": "Summarise this.\n\nCaf\u00e9s sell coffee."},
        {"role": "assistant", "content": "Coffee."},
    ]


@pytest.mark.parametrize("context", [b"", "", b"  \n"])
def test_dolly_record_without_context(context):
    record = {"instruction": "Name a colour.", "context": context, "response": "Blue.", "category": "open_qa"}
    assert dolly_record_to_conversation(record)[0] == {"role": "user", "content": "Name a colour."}


def test_dolly_under_tfds_mock_data():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=5):
        convs = dolly_conversations("train")
        record = tfds.data_source("databricks_dolly", split="train")[2]
    assert len(convs) == 5
    assert all([m["role"] for m in conv] == ["user", "assistant"] for conv in convs)
    assert convs[2] == dolly_record_to_conversation(record)
    assert all(isinstance(m["content"], str) and m["content"] for conv in convs for m in conv)


def test_dolly_missing_dataset_is_user_error(monkeypatch):
    import tensorflow_datasets as tfds

    def unprepared(name, split):
        raise FileNotFoundError(f"{name} is not prepared")

    monkeypatch.setattr(tfds, "data_source", unprepared)
    with pytest.raises(UserError, match=r"tfds:databricks_dolly split 'train' could not be loaded: FileNotFoundError"):
        conversations.dolly_conversations()


def test_a_conversation_is_found_by_its_line_after_blank_and_skipped_lines(tmp_path):
    """The n-th conversation `read_jsonl_conversations` returned, back to its line of the file."""
    third = json.dumps({"prompt": "third", "response": "3"})
    path = write(tmp_path, GOOD, "", json.dumps({"prompt": ""}), "[1]", GOOD, "   ", third)
    convs, skipped = read_jsonl_conversations(path, skip_malformed=True)
    assert skipped == 2 and convs[2][0]["content"] == "third"
    assert [conversations.conversation_line(path, n) for n in (1, 2, 3)] == [1, 5, 7]


def test_a_preference_group_is_found_by_its_line(tmp_path):
    pair = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    ranked = json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]})
    path = write(tmp_path, "", ranked, pair, "", pair)
    groups, _ = read_preferences_jsonl(path, skip_malformed=True, max_responses=2)  # the ranked line is skipped
    assert len(groups) == 2
    assert [preference_line(path, n, max_responses=2) for n in (1, 2)] == [3, 5]
    assert preference_line(path, 1) == 2  # with room for three responses the ranked line counts
