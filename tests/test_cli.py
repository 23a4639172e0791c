"""The command line on bad input: one clear error line, exit code 2, nothing created or overwritten.
And `generate` on a trained run."""

import json
import math
import shutil
import statistics

import pytest
from conftest import assert_one_error, cli_flags, error_lines, run_cli, snapshot, tiny_run

from genai_jax import rundir


def pretrain(capsys, run_dir, *flags, cfg=None):
    """`genai-jax pretrain` with the tiny test config, in-process: (exit code, stdout, stderr)."""
    return run_cli(capsys, "pretrain", *cli_flags(cfg or tiny_run()), "--run-dir", run_dir, *flags)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "the file is empty"), (b" \n\n ", "the file is empty"), (b"text\x00\x01binary", "binary file")],
    ids=["empty", "blank", "binary"],
)
def test_bad_corpus_file_names_it_and_creates_no_run_dir(tmp_path, capsys, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    code, _, err = pretrain(capsys, tmp_path / "run", "--data.path", corpus)
    assert_one_error(code, err, str(corpus), message)
    assert not (tmp_path / "run").exists()


def test_bad_file_in_corpus_folder_is_named(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("some text\n" * 50)
    (folder / "bad.txt").write_bytes(b"\x00" * 10)
    code, _, err = pretrain(capsys, tmp_path / "run", "--data.path", folder)
    assert_one_error(code, err, str(folder / "bad.txt"))
    assert not (tmp_path / "run").exists()


def test_seq_len_beyond_context_len(tmp_path, capsys):
    code, _, err = pretrain(capsys, tmp_path / "run", "--data.seq-len", 33)
    assert_one_error(code, err, "data.seq_len=33", "context_len=32")
    assert not (tmp_path / "run").exists()


def test_unknown_preset(tmp_path, capsys):
    code, _, err = run_cli(capsys, "pretrain", "--preset", "no-such-preset", "--run-dir", tmp_path / "run")
    assert_one_error(code, err, "no-such-preset")
    assert not (tmp_path / "run").exists()


def test_unknown_flag_is_a_tyro_error(tmp_path, capsys):
    code, _, err = pretrain(capsys, tmp_path / "run", "--train.no-such-field", 3)
    assert code == 2
    assert "--train.no-such-field" in err
    assert not (tmp_path / "run").exists()


def test_unknown_command(capsys):
    code, _, err = run_cli(capsys, "pretrian")
    assert_one_error(code, err, "pretrian")


def test_relaunch_with_a_different_model_is_refused_untouched(tmp_path, capsys, trained_run):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    before = snapshot(run_dir)
    code, _, err = pretrain(capsys, run_dir, "--model.n-layer", 3)
    assert_one_error(code, err, "model.n_layer", str(run_dir))
    assert "train." not in error_lines(err)[0]
    assert snapshot(run_dir) == before


def test_non_empty_directory_without_config_is_refused_untouched(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    before = snapshot(run_dir)
    code, _, err = pretrain(capsys, run_dir)
    assert_one_error(code, err, str(run_dir), "config.json")
    assert snapshot(run_dir) == before


def test_relaunch_with_more_steps_resumes(tmp_path, capsys, trained_run):
    """Changing train settings is allowed: the run goes on from its last checkpoint."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    code, out, err = pretrain(capsys, run_dir, cfg=tiny_run(train={"max_steps": 6}))
    assert code == 0, err
    assert "pretrain finished" in out
    steps = [r["step"] for r in rundir.read_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("line", ['{"step": 2, "loss": 1.', '[1, 2]'], ids=["truncated", "not-a-record"])
def test_resume_with_a_broken_metrics_line_names_the_file_and_line(tmp_path, capsys, trained_run, line):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    metrics = run_dir / rundir.METRICS_FILE
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    before = snapshot(run_dir)
    code, _, err = pretrain(capsys, run_dir, cfg=tiny_run(train={"max_steps": 6}))
    assert_one_error(code, err, f"{metrics}:2")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("sampling", [["--temperature", "0"], []], ids=["greedy", "default"])
def test_generate_prints_prompt_and_new_characters(capsys, trained_run, sampling):
    prompt, new_tokens = "the sum of", 12
    code, out, err = run_cli(capsys, "generate", "--run", trained_run, "--prompt", prompt,
                             "--max-new-tokens", new_tokens, *sampling)
    assert code == 0, err
    assert out.startswith(prompt) and out.endswith("\n")
    assert len(out) == len(prompt) + new_tokens + 1, repr(out)


def test_generate_is_deterministic_per_seed(capsys, trained_run):
    def sample(seed):
        return run_cli(capsys, "generate", "--run", trained_run, "--prompt", "a", "--max-new-tokens", 10,
                       "--seed", seed)[1]

    assert sample(1) == sample(1)


def test_generate_beyond_context_is_refused(capsys, trained_run):
    code, out, err = run_cli(capsys, "generate", "--run", trained_run, "--prompt", "the sum of",
                             "--max-new-tokens", 23)
    assert_one_error(code, err, "context_len 32")
    assert out == ""


def test_generate_with_unknown_character_is_refused(capsys, trained_run):
    code, _, err = run_cli(capsys, "generate", "--run", trained_run, "--prompt", "Zebra \u2603")
    assert_one_error(code, err, "vocabulary")


def test_generate_without_a_run_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "--run", tmp_path)
    assert_one_error(code, err, str(tmp_path), "config.json")


def test_ppo_takes_its_runs_as_policy_and_reward_flags():
    from genai_jax import cli

    cfg, _ = cli.parse_stage(["--preset", "tiny", "--policy", "runs/sft", "--reward", "gold"], "ppo")
    assert (cfg.ppo.policy, cfg.ppo.reward) == ("runs/sft", "gold")
    cfg, _ = cli.parse_stage(["--preset", "tiny", "--ppo.policy", "runs/sft"], "ppo")
    assert (cfg.ppo.policy, cfg.ppo.reward) == ("runs/sft", "")


TASK_REWARD = '''
def has_letter(prompts, responses):
    return [float("e" in r) for r in responses]
def wrong_count(prompts, responses):
    return [1.0]
'''


def test_eval_on_a_users_task_scores_greedy_and_sampled_answers_with_intervals(tmp_path, capsys, monkeypatch,
                                                                              trained_run):
    """`eval --prompts --reward python:...`: every answer scored by the user's function, each mode's
    mean with its 95% t interval over the prompts (checked by hand: mean +- t(0.975, n-1) sd / sqrt(n)),
    greedy answers the same as `generate --prompts` gives; bad input is one line."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (tmp_path / "task.py").write_text(TASK_REWARD)
    monkeypatch.chdir(tmp_path)  # MODULE is imported from the working directory
    prompts = ["reverse abc", "count tree", "sort cab", "upper fox", "reverse yes", "count be"]  # context 32
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    code, out, err = run_cli(capsys, "eval", "--run", run, "--prompts", tmp_path / "p.jsonl", "--reward",
                             "python:task:has_letter", "--max-new-tokens", 8, "--out", tmp_path / "answers.jsonl")
    assert code == 0, err
    summary = json.loads((run / "eval.json").read_text())
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == prompts and summary["prompts"] == len(prompts)
    t_975_df5 = 2.5705818366  # Student's t, 5 degrees of freedom
    for mode in ("greedy", "sampled"):
        scores = [a[mode]["score"] for a in answers]
        assert scores == [float("e" in a[mode]["response"]) for a in answers]
        mean, half = statistics.fmean(scores), t_975_df5 * statistics.stdev(scores) / math.sqrt(len(scores))
        assert summary[mode]["mean"] == pytest.approx(mean)
        assert summary[mode]["ci95"] == pytest.approx([mean - half, mean + half])
        assert f"{mode} (temperature" in out
    code, _, err = run_cli(capsys, "generate", "--run", run, "--prompts", tmp_path / "p.jsonl", "--max-new-tokens", 8,
                           "--temperature", 0, "--out", tmp_path / "greedy.jsonl")
    assert code == 0, err
    generated = [json.loads(line)["response"] for line in (tmp_path / "greedy.jsonl").read_text().splitlines()]
    assert generated == [a["greedy"]["response"] for a in answers]
    for flags, needle in [(["--reward", "python:task:has_letter"], "needs both --prompts"),
                          (["--prompts", tmp_path / "p.jsonl", "--reward", "python:task:wrong_count"],
                           "returned 1 score(s)"),
                          (["--prompts", tmp_path / "p.jsonl", "--reward", run], "is not a reward model run")]:
        assert_one_error(*run_cli(capsys, "eval", "--run", run, *flags)[::2], needle)
