"""kopt against real TensorFlow Keras 2 (tf_keras 2.21 / tensorflow-cpu 2.21): configs, trajectories, weights.

The fixtures in ``tests/fixtures/tf_keras/`` were written by ``generate.py`` there, which runs the real
packages (never edited by hand): each case is an optimizer TensorFlow built from its arguments, its
``serialize()`` dict, 12 steps of fixed gradients on a Dense(2) -> Dense(1) model and the optimizer's
weights after step 7. kopt must build the same optimizer from TensorFlow's config alone and follow the
same parameters step by step (float32: 2e-5 relative, 2e-6 absolute), and resume from the step-7
weights to the same steps 8..12.
"""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "tf_keras"
RTOL, ATOL = 2e-5, 2e-6
TRAJECTORIES = json.loads((FIXTURES / "trajectories.json").read_text())
ARRAYS = np.load(FIXTURES / "trajectories.npz", allow_pickle=False)
STEPS, SAVED = TRAJECTORIES["num_steps"], TRAJECTORIES["state_step"]
CASES = {case["id"]: case for case in TRAJECTORIES["cases"]}
RUN = [name for name, case in CASES.items() if case["status"] == "trajectory"]


def params_at(arrays, case: str, step: int) -> list[jax.Array]:
    return [jnp.asarray(arrays[f"{case}/params/{step}/{k}"]) for k in range(4)]


def grads_at(arrays, case: str, step: int) -> list[jax.Array]:
    return [jnp.asarray(arrays[f"{case}/grads/{step}/{k}"]) for k in range(4)]


def run(opt, state, params, arrays, case, first, last):
    """Applies gradient steps ``first..last``; yields ``(step, params)`` after each."""
    update = jax.jit(opt.update)
    for step in range(first, last + 1):
        updates, state = update(grads_at(arrays, case, step), state, params)
        params = kopt.apply_updates(params, updates)
        yield step, params


@pytest.mark.parametrize("case", RUN)
def test_optimizer_from_tf_config_follows_tf_trajectory(case):
    ignored = case.startswith("current") and "clipnorm_clipvalue" in case  # TF >= 2.11 drops clipvalue: warned
    with pytest.warns(UserWarning, match="ignores clipvalue") if ignored else _nothing():
        opt = kopt.deserialize(CASES[case]["serialized"])
    params = params_at(ARRAYS, case, 0)
    for step, params in run(opt, opt.init(params), params, ARRAYS, case, 1, STEPS):
        chex.assert_trees_all_close(params, params_at(ARRAYS, case, step), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", RUN)
def test_resume_from_tf_weights_continues_like_tf(case):
    opt = kopt.deserialize(CASES[case]["serialized"])
    weights = [ARRAYS[f"{case}/weights7/{j}"] for j in range(len(CASES[case]["weights7"]["names"]))]
    params = params_at(ARRAYS, case, SAVED)
    state = kopt.from_keras_weights(opt, params, weights)
    assert int(kopt.iterations(state)) == SAVED
    for step, params in run(opt, state, params, ARRAYS, case, SAVED + 1, STEPS):
        chex.assert_trees_all_close(params, params_at(ARRAYS, case, step), rtol=RTOL, atol=ATOL)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
