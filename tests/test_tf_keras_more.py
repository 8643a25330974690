"""kopt against real tf_keras 2.21 for Ftrl (both generations), Adafactor, Lion and the loss-scale optimizers.

Section C of ``tests/fixtures/tf_keras/`` (``more_trajectories.*``, ``more_models.*``, written by
``generate.py`` there from the real packages): kopt builds each optimizer from TensorFlow's ``serialize()`` dict
alone and follows its 12 steps, resumes from its weights after step 7 (``kopt.from_keras_weights``) and from its
saved model file (``kopt.load_keras_optimizer``) to the same steps 8..12; the loss-scale cases' gradients hold an
inf (step 3) and a NaN (step 9), which both TensorFlow and kopt skip while halving the scale.
Float32: 2e-5 relative, 2e-6 absolute, as in ``test_tf_keras.py``.
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
TRAJECTORIES = json.loads((FIXTURES / "more_trajectories.json").read_text())
ARRAYS = np.load(FIXTURES / "more_trajectories.npz", allow_pickle=False)
MODELS = json.loads((FIXTURES / "more_models.json").read_text())
MODEL_ARRAYS = np.load(FIXTURES / "more_models.npz", allow_pickle=False)
STEPS, SAVED = TRAJECTORIES["num_steps"], TRAJECTORIES["state_step"]
SHAPES = [tuple(shape) for shape in TRAJECTORIES["param_shapes"]]
CASES = {case["id"]: case for case in TRAJECTORIES["cases"]}
MODEL_CASES = {case["id"]: case for case in MODELS["cases"]}
LOSS_SCALED = [name for name, case in CASES.items() if "loss_scale" in case]


def unpacked(row: np.ndarray) -> list[jax.Array]:
    """One row of a packed (steps, 11) array: the 4 parameters (or gradients) in their shapes."""
    sizes = np.cumsum([int(np.prod(shape)) for shape in SHAPES])[:-1]
    return [jnp.asarray(part.reshape(shape)) for part, shape in zip(np.split(row, sizes), SHAPES, strict=True)]


def run(opt, state, params, grads: np.ndarray, first: int, last: int):
    """Applies gradient steps ``first..last`` (rows ``first - 1..`` of ``grads``); yields ``(step, params, state)``."""
    update = jax.jit(opt.update)
    for step in range(first, last + 1):
        updates, state = update(unpacked(grads[step - 1]), state, params)
        params = kopt.apply_updates(params, updates)
        yield step, params, state


def weights7(arrays, case: str, count: int) -> list[np.ndarray]:
    return [arrays[f"{case}/weights7/{j}"] for j in range(count)]


def test_the_fixtures_cover_the_new_optimizers():
    classes = {(case["class_path"], case["legacy"]) for case in CASES.values()}
    assert {name.rsplit(".", 1)[1] for name, _ in classes} == {
        "Ftrl",
        "Adafactor",
        "Lion",
        "LossScaleOptimizer",
        "LossScaleOptimizerV3",
    }
    assert ("tf_keras.optimizers.legacy.Ftrl", True) in classes and ("tf_keras.optimizers.Ftrl", False) in classes
    assert all(case["status"] == "trajectory" for case in CASES.values())
    assert {CASES[name]["tf_class"].rsplit(".", 1)[1] for name in LOSS_SCALED} == {
        "LossScaleOptimizer",
        "LossScaleOptimizerV3",
    }


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_from_tf_config_follows_tf_trajectory(case):
    opt = kopt.deserialize(CASES[case]["serialized"])
    expected, grads = ARRAYS[f"{case}/params"], ARRAYS[f"{case}/grads"]
    params = unpacked(expected[0])
    for step, new, state in run(opt, opt.init(params), params, grads, 1, STEPS):
        chex.assert_trees_all_close(new, unpacked(expected[step]), rtol=RTOL, atol=ATOL)
        if case in LOSS_SCALED:  # the same skipped steps and the same scale as TensorFlow's
            assert float(kopt.get_slot(state, "loss_scale")) == CASES[case]["loss_scale"][step - 1], step
            assert int(kopt.get_slot(state, "good_steps")) == CASES[case]["dynamic_counter"][step - 1], step
    assert int(kopt.iterations(state)) == CASES[case]["iterations_final"]


@pytest.mark.parametrize("case", list(CASES))
def test_resume_from_tf_weights_continues_like_tf(case):
    info = CASES[case]
    opt = kopt.deserialize(info["serialized"])
    expected, grads = ARRAYS[f"{case}/params"], ARRAYS[f"{case}/grads"]
    scale = {"loss_scale": info["loss_scale7"], "good_steps": info["dynamic_counter7"]} if case in LOSS_SCALED else {}
    params = unpacked(expected[SAVED])
    state = kopt.from_keras_weights(opt, params, weights7(ARRAYS, case, len(info["weights7"]["names"])), **scale)
    assert int(kopt.iterations(state)) == SAVED
    for step, new, _ in run(opt, state, params, grads, SAVED + 1, STEPS):
        chex.assert_trees_all_close(new, unpacked(expected[step]), rtol=RTOL, atol=ATOL)


FILES = [(case["id"], fmt) for case in MODELS["cases"] for fmt in case["files"]]


@pytest.mark.parametrize(("case", "fmt"), FILES, ids=[f"{case}.{fmt}" for case, fmt in FILES])
def test_load_keras_optimizer_from_a_saved_model_continues_like_tf(case, fmt):
    pytest.importorskip("h5py")
    info = MODEL_CASES[case]["files"][fmt]
    assert info["reload"]["tf_reload_matches"]  # TensorFlow's own reload is the reference
    expected = MODEL_ARRAYS[f"{case}/params"]  # rows: step 0, 7, 8..12
    params = unpacked(expected[1])
    opt, state = kopt.load_keras_optimizer(FIXTURES / info["file"], params)
    assert opt.class_name == MODEL_CASES[case]["serialized"]["class_name"]
    assert int(kopt.iterations(state)) == SAVED
    if "loss_scale_after_load" in info["reload"]:  # the scale is not in the file: it restarts, as in TensorFlow
        assert float(kopt.get_slot(state, "loss_scale")) == info["reload"]["loss_scale_after_load"]
    reloaded = MODEL_ARRAYS[f"{case}/reload/{fmt}/params"]  # rows: step 8..12
    grads = MODEL_ARRAYS[f"{case}/grads"]
    for step, new, _ in run(opt, state, params, grads, SAVED + 1, STEPS):
        chex.assert_trees_all_close(new, unpacked(reloaded[step - SAVED - 1]), rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(new, unpacked(expected[step - SAVED + 1]), rtol=RTOL, atol=ATOL)
