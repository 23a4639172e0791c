"""Rewards that are code: a user's `python:MODULE:FUNCTION`, which the RL stage trains against and
`genai-jax eval --reward` measures with. Free of JAX: texts in, checked numbers out.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

import numpy as np

from genai_jax.config import UserError

CODE_REWARD = "python:"
"""The prefix of a reward naming a user's function, python:MODULE:FUNCTION."""


def load_reward_function(spec: str) -> Callable:
    """The user's `FUNCTION(prompts: list[str], responses: list[str]) -> list[float]` that
    `python:MODULE:FUNCTION` names, MODULE imported as Python would from the working directory."""
    module_name, _, function_name = spec.removeprefix(CODE_REWARD).partition(":")
    if not module_name or not function_name:
        raise UserError(f"--reward {spec}: expected python:MODULE:FUNCTION")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # whatever the module raises on import
        raise UserError(f"--reward {spec}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--reward {spec}: {module_name} has no function {function_name}")
    return function


def checked_scores(function: Callable, spec: str, prompts: list[str], responses: list[str]) -> np.ndarray:
    """`function(prompts, responses)` as float32 [N], refused in one line unless it is one finite
    number per response."""
    try:
        scores = np.asarray(function(prompts, responses), np.float64)
    except Exception as err:  # whatever the function raises, or values that are not numbers
        raise UserError(f"--reward {spec} failed: {type(err).__name__}: {err}") from None
    if scores.shape != (len(responses),):
        raise UserError(f"--reward {spec} returned {scores.size} score(s) of shape {scores.shape} for "
                        f"{len(responses)} responses; it must return one number per response")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise UserError(f"--reward {spec} returned {scores[bad[0]]} for response {bad[0]} "
                        f"({responses[bad[0]]!r}); scores must be finite")
    return scores.astype(np.float32)
