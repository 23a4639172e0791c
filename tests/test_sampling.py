"""Generation with the KV cache vs plain greedy decoding; logit filters on hand examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cases, init, random_tokens, tiny_model

from genai_jax.config import UserError
from genai_jax.evaluation import left_pad
from genai_jax.model import GPT
from genai_jax.sampling import check_length, filter_logits, generate, sample_token

# Probabilities in a shuffled order: sorted, they are 0.5, 0.3, 0.15, 0.05.
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model():
    cfg = tiny_model(positions="rope")
    return cfg, init(cfg, seed=3)


def greedy_by_full_forward(cfg, params, prompt: np.ndarray, steps: int) -> list[int]:
    """Greedy decoding of one unpadded prompt, a full forward pass per token (no cache). Rows are
    right-padded to the context length (causal attention: padding after a position changes nothing
    before it), so the forward pass compiles once."""
    forward = jax.jit(GPT(cfg).apply)
    tokens = list(prompt)
    for _ in range(steps):
        row = np.zeros((1, cfg.context_len), np.int32)
        row[0, : len(tokens)] = tokens
        tokens.append(int(jnp.argmax(forward(params, row)[0, len(tokens) - 1])))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("sampling", cases("temperature0", temperature0=dict(temperature=0.0),
                                           top_k1=dict(temperature=1.0, top_k=1)))
def test_greedy_generation_matches_full_forward_loop(model, sampling):
    cfg, params = model
    prompts = [random_tokens(7, seed=1), random_tokens(3, seed=2)]
    batch, mask = left_pad(prompts, max(map(len, prompts)), pad_id=0)
    generated = generate(params, batch, mask, jax.random.PRNGKey(0), cfg=cfg, max_new_tokens=NEW_TOKENS, **sampling)
    assert generated.shape == (2, NEW_TOKENS)
    for row, prompt in enumerate(prompts):
        assert list(np.asarray(generated[row])) == greedy_by_full_forward(cfg, params, prompt, NEW_TOKENS)


def test_top_p_keeps_the_smallest_set_reaching_p():
    def kept(top_k, top_p):
        return set(np.flatnonzero(np.isfinite(filter_logits(LOGITS, top_k, top_p)[0])))

    assert kept(0, 1.0) == {0, 1, 2, 3}
    assert kept(0, 0.4) == {1}  # 0.5 alone reaches 0.4
    assert kept(0, 0.7) == {1, 3}  # 0.5 + 0.3
    assert kept(0, 0.85) == {0, 1, 3}  # 0.5 + 0.3 + 0.15
    assert kept(2, 1.0) == {1, 3}
    assert kept(3, 0.7) == {1, 3}
    np.testing.assert_allclose(filter_logits(LOGITS, 0, 0.7)[0, [1, 3]], LOGITS[0, [1, 3]])


def test_sampling_draws_only_kept_tokens_in_proportion():
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draw = jax.vmap(lambda key: sample_token(LOGITS, key, jnp.float32(1.0), 0, jnp.float32(0.7))[0])
    counts = np.bincount(np.asarray(draw(keys)), minlength=4)
    assert counts[0] == counts[2] == 0
    assert counts[1] / counts.sum() == pytest.approx(0.5 / 0.8, abs=0.03)


def test_prompt_plus_new_tokens_beyond_context_is_a_user_error():
    cfg = tiny_model()
    check_length(cfg, 10, cfg.context_len - 10)
    with pytest.raises(UserError, match="context_len"):
        check_length(cfg, 10, cfg.context_len - 9)


def test_stop_id_ends_decoding_once_every_row_has_stopped(model):
    """With `stop_id`, each row's tokens and log-probabilities up to its first stop token are those
    of a run without it; once every row has stopped, the remaining slots hold the stop token."""
    cfg, params = model
    batch, mask = left_pad([random_tokens(5, seed=s) for s in range(3)], 5, pad_id=0)
    sampling = dict(cfg=cfg, max_new_tokens=16, temperature=1.0, with_logprobs=True)
    for seed in range(20):  # a random model has no end token: find a key under which one token is in every row
        key = jax.random.PRNGKey(seed)
        tokens, logprobs = (np.asarray(x) for x in generate(params, batch, mask, key, **sampling))
        first = {v: max(list(row).index(v) if v in row else 99 for row in tokens) for v in np.unique(tokens)}
        stop_id = int(min(first, key=first.get))
        last_stop = first[stop_id]
        if last_stop < 14:
            break
    assert last_stop < 14
    stopped_tokens, stopped_logprobs = (np.asarray(x) for x in generate(
        params, batch, mask, key, stop_ids=(stop_id,), **sampling))
    for row in range(len(tokens)):
        end = list(tokens[row]).index(stop_id) + 1
        np.testing.assert_array_equal(stopped_tokens[row, :end], tokens[row, :end])
        np.testing.assert_allclose(stopped_logprobs[row, :end], logprobs[row, :end], rtol=1e-5, atol=1e-6)
    assert (stopped_tokens[:, last_stop + 1:] == stop_id).all()
    assert (stopped_logprobs[:, last_stop + 1:] == 0).all()
    assert (tokens[:, last_stop + 1:] != stop_id).any()  # without stop_id, decoding went on


def test_each_row_stops_at_the_first_of_several_stop_ids(model):
    """`stop_ids` of two tokens (as a chat model's <|im_end|> and <|endoftext|>): a row's tokens up
    to the first of either are those of a run without stopping, and decoding ends once every row
    has emitted one of them."""
    cfg, params = model
    batch, mask = left_pad([random_tokens(5, seed=s) for s in range(4)], 5, pad_id=0)
    sampling = dict(cfg=cfg, max_new_tokens=16, temperature=1.0)
    key = jax.random.PRNGKey(1)
    tokens = np.asarray(generate(params, batch, mask, key, **sampling))
    stops = tuple(int(t) for t in (tokens[0, 2], tokens[1, 3]))  # two tokens the rows really emit
    stopped = np.asarray(generate(params, batch, mask, key, stop_ids=stops, **sampling))
    ends = [next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in tokens]
    for row, end in enumerate(ends):
        np.testing.assert_array_equal(stopped[row, :end], tokens[row, :end])
    assert ends[0] <= 3 and ends[1] <= 4
    if max(ends) < 16:  # every row stopped: the slots after the last stop hold stops[0]
        assert (stopped[:, max(ends):] == stops[0]).all()
