"""kopt against recorded Keras 3 numbers, without Keras installed.

The fixtures in ``tests/fixtures/keras3/`` were written by ``generate.py`` there, which runs the real Keras 3.15.1
(JAX backend, CPU, float32); see its README. Here:

* **A** (``trajectories``): every Keras 3 optimizer class with each common option: ``kopt.deserialize`` of the
  recorded ``keras.optimizers.serialize(opt)`` dict alone, stepped with the recorded gradients from the recorded
  initial values (a nested dict per Keras path, ``{"dense": {"kernel": ..}}``), follows Keras' variables at every
  step within ``2e-6 + 2e-5 |keras|``.
* **B** (``variables``): the same for 8 steps of the optimizer-variable cases (use_ema, gradient accumulation,
  LossScaleOptimizer with a skipped non-finite step); and resuming from Keras 3's ``opt.variables`` after step 4.
* **C** (``models``): the optimizer config read from each saved ``.keras`` zip follows the 6 ``train_on_batch``
  steps; and ``kopt.load_keras_optimizer`` on the file continues the last 3.

What kopt does not do yet is in :data:`NOT_YET`: those cases are strict xfails that must raise ``ValueError``, so
they turn into failures once kopt supports them (then delete the entry).
"""

from __future__ import annotations

import copy
import json
import pathlib
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.stepping import LIVE

EAGER = False
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "keras3"
TRAJECTORIES = json.loads((FIXTURES / "trajectories.json").read_text())
VARIABLES = json.loads((FIXTURES / "variables.json").read_text())
MODELS = json.loads((FIXTURES / "models.json").read_text())

#: Cases kopt refuses today (a ValueError naming what it cannot do), by section and case id: strict xfails.
NOT_YET: dict[str, str] = {}


_UNTRACKED = (
    "Keras 3.15.1's LossScaleOptimizer.variables leaves out variables its inner {0} creates outside add_variable "
    "({1}): "
)
#: Where the recorded Keras numbers are not what kopt should do, or kopt's reader expects what Keras does not
#: write: strict xfails that must fail with the given exception (they turn into failures once that changes).
KERAS_QUIRKS: dict[str, tuple[type[Exception], str]] = {
    "B/Nadam_loss_scale": (
        AssertionError,
        _UNTRACKED.format("Nadam", "u_product")
        + "its stateless_apply (the JAX trainer's path) never advances u_product, so Keras' steps 2.. are not Nadam's",
    ),
    "B-resume/Nadam_loss_scale": (
        AssertionError,
        _UNTRACKED.format("Nadam", "u_product")
        + "kopt resumes the Nadam the saved step count implies (its u_product replayed); Keras goes on with a "
        "u_product that never advanced",
    ),
}


def params_for(section: str, case_id: str):
    """The pytest param of a case: a strict xfail when it is in NOT_YET (ValueError) or KERAS_QUIRKS."""
    key = f"{section}/{case_id}"
    marks = []
    if key in NOT_YET:
        marks.append(pytest.mark.xfail(raises=ValueError, strict=True, reason=NOT_YET[key]))
    elif key in KERAS_QUIRKS:
        error, reason = KERAS_QUIRKS[key]
        marks.append(pytest.mark.xfail(raises=error, strict=True, reason=reason))
    return pytest.param(case_id, id=case_id, marks=marks)


def nested(flat: dict[str, np.ndarray]) -> dict:
    """{"dense/kernel": a} -> {"dense": {"kernel": a}}: its kopt.keras_variable_path is the Keras path."""
    tree: dict = {}
    for path, array in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(array)
    return tree


def follow(opt, start: dict, grads: list[dict], expected: list[dict], *, compiled: bool = False):
    """Steps ``opt`` from ``start`` with ``grads``; the params must match ``expected`` after every step.

    Op by op (``jax.disable_jit``) unless ``compiled``: for 8 steps on these tiny shapes XLA's compile of each
    case's update (0.15-0.55 s on CPU) costs far more than dispatching its operations one by one; the
    ``_base`` cases are also run through one ``jax.jit``-compiled update (test_keras3_trajectory_compiled)."""
    if not compiled:
        with jax.disable_jit():
            return follow(opt, start, grads, expected, compiled=True)
    params = nested(start)
    assert [kopt.keras_variable_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]] == list(start)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t, (g, want) in enumerate(zip(grads, expected, strict=True), start=1):
        updates, state = update(nested(g), state, params)
        params = kopt.apply_updates(params, updates)
        try:
            chex.assert_trees_all_close(params, nested(want), **LIVE)
        except AssertionError as error:
            raise AssertionError(f"after step {t}: {error}") from None
    return params, state


# ---------------------------------------------------------------------------------------------------------------
# A. trajectories

A_ARRAYS = np.load(FIXTURES / "trajectories.npz", allow_pickle=False)
A_PATHS = [v["path"] for v in TRAJECTORIES["variables"]]
A_CASES = {case["id"]: case for case in TRAJECTORIES["cases"]}
A_INIT = {p: A_ARRAYS[f"init/{p}"] for p in A_PATHS}
A_GRADS = [{p: A_ARRAYS[f"grads/{p}"][s] for p in A_PATHS} for s in range(TRAJECTORIES["num_steps"])]


def with_exclusion(config: dict, var_names: list[str]) -> dict:
    """The Keras config with ``exclude_from_weight_decay=var_names`` as one more constructor keyword (Keras keeps
    ``opt.exclude_from_weight_decay(var_names=...)`` out of its config)."""
    config = copy.deepcopy(config)
    config["config"]["exclude_from_weight_decay"] = list(var_names)
    return config


@pytest.mark.parametrize("case_id", [params_for("A", c) for c in A_CASES])
def test_keras3_trajectory(case_id, compiled=False):
    case = A_CASES[case_id]
    config = case["config"]
    if case["exclude_from_weight_decay"]:
        config = with_exclusion(config, case["exclude_from_weight_decay"]["var_names"])
    opt = kopt.deserialize(config)
    arrays = {p: A_ARRAYS[f"{case_id}/params/{p}"] for p in A_PATHS}
    expected = [{p: a[s] for p, a in arrays.items()} for s in range(1, TRAJECTORIES["num_steps"] + 1)]
    follow(opt, A_INIT, A_GRADS, expected, compiled=compiled)


@pytest.mark.parametrize("case_id", [params_for("A", c) for c in A_CASES if c.endswith("_base")])
def test_keras3_trajectory_compiled(case_id):
    test_keras3_trajectory(case_id, compiled=True)


def test_keras3_trajectory_fixture_is_complete():
    """Every Keras 3 class and every option the generator promises is recorded, with the 7 variables."""
    classes = {case["class_name"] for case in A_CASES.values()}
    assert classes == set(TRAJECTORIES["base_kwargs"])
    assert len(classes) == 14  # 15 with Adam's amsgrad, a case of Adam
    assert {case["option"] for case in A_CASES.values()} >= {"defaults", "base", *TRAJECTORIES["options"]}
    assert sorted(A_PATHS, key=lambda p: p.split("/")) == A_PATHS
    for case in A_CASES.values():
        assert case["config"]["class_name"] == case["class_name"]


# ---------------------------------------------------------------------------------------------------------------
# B. optimizer variables

B_ARRAYS = np.load(FIXTURES / "variables.npz", allow_pickle=False)
B_PATHS = [v["path"] for v in VARIABLES["variables"]]
B_CASES = {case["id"]: case for case in VARIABLES["cases"]}


def b_inputs(case_id: str) -> tuple[dict, list[dict], list[dict]]:
    case = B_CASES[case_id]
    steps = VARIABLES["num_steps"]
    params = {p: B_ARRAYS[f"{case_id}/params/{p}"] for p in B_PATHS}
    grads = [{p: B_ARRAYS[f"{case['grads_key']}/{p}"][s] for p in B_PATHS} for s in range(steps)]
    expected = [{p: a[s] for p, a in params.items()} for s in range(steps + 1)]
    return expected[0], grads, expected[1:]


@pytest.mark.parametrize("case_id", [params_for("B", c) for c in B_CASES])
def test_keras3_variables_case_trajectory(case_id):
    start, grads, expected = b_inputs(case_id)
    follow(kopt.deserialize(B_CASES[case_id]["config"]), start, grads, expected)


@pytest.mark.parametrize("case_id", [params_for("B-resume", c) for c in B_CASES])
def test_keras3_variables_resume(case_id):
    """kopt restarted from Keras 3's opt.variables after step 4 goes on as Keras did (steps 5..8)."""
    case = B_CASES[case_id]
    _, grads, expected = b_inputs(case_id)
    k = VARIABLES["state_step"]
    opt = kopt.deserialize(case["config"])
    weights = [B_ARRAYS[f"{case_id}/variables/{j}"] for j in range(len(case["variables"]))]
    params = nested(expected[k - 1])
    state = kopt.from_keras_weights(opt, params, weights)
    with jax.disable_jit():
        for g, want in zip(grads[k:], expected[k:], strict=True):
            updates, state = opt.update(nested(g), state, params)
            params = kopt.apply_updates(params, updates)
            chex.assert_trees_all_close(params, nested(want), **LIVE)


# ---------------------------------------------------------------------------------------------------------------
# C. saved .keras files

C_ARRAYS = np.load(FIXTURES / "models.npz", allow_pickle=False)
C_CASES = {case["id"]: case for case in MODELS["cases"]}


def c_steps(case_id: str) -> tuple[list[str], list[dict], list[dict]]:
    """Keras paths of the model's trainable variables, per-step gradients (1..6), params (0..6)."""
    paths = [v["path"] for v in C_CASES[case_id]["trainable_variables"]]
    total = MODELS["train_before_save"] + MODELS["train_after_save"]
    grads = [{p: C_ARRAYS[f"{case_id}/grads/{s}/{j}"] for j, p in enumerate(paths)} for s in range(1, total + 1)]
    params = [{p: C_ARRAYS[f"{case_id}/params/{s}/{j}"] for j, p in enumerate(paths)} for s in range(total + 1)]
    return paths, grads, params


def sorted_paths(flat: dict) -> dict:
    return dict(sorted(flat.items(), key=lambda item: item[0].split("/")))


@pytest.mark.parametrize("case_id", list(C_CASES))
def test_keras3_saved_config_follows_train_on_batch(case_id):
    """The optimizer config inside the .keras zip (config.json's compile_config), read with zipfile alone, builds a
    kopt optimizer that follows the 6 train_on_batch steps Keras took."""
    case = C_CASES[case_id]
    with zipfile.ZipFile(FIXTURES / case["file"]) as archive:
        config = json.loads(archive.read("config.json"))["compile_config"]["optimizer"]
    assert config == case["contents"]["optimizer_config"]
    _, grads, params = c_steps(case_id)
    follow(kopt.deserialize(config), sorted_paths(params[0]), [sorted_paths(g) for g in grads], params[1:])


@pytest.mark.parametrize("case_id", [params_for("C-resume", c) for c in C_CASES])
def test_keras3_saved_file_resumes(case_id):
    """kopt.load_keras_optimizer on the .keras file (saved after step 3) continues steps 4..6 as Keras did."""
    case = C_CASES[case_id]
    paths, grads, params = c_steps(case_id)
    k = MODELS["train_before_save"]
    start = [jnp.asarray(params[k][p]) for p in paths]  # model.trainable_variables order
    opt, state = kopt.load_keras_optimizer(FIXTURES / case["file"], start)
    current = start
    with jax.disable_jit():
        for g, want in zip(grads[k:], params[k + 1 :], strict=True):
            updates, state = opt.update([jnp.asarray(g[p]) for p in paths], state, current)
            current = kopt.apply_updates(current, updates)
            chex.assert_trees_all_close(current, [want[p] for p in paths], **LIVE)


def test_keras3_saved_files_are_small_and_hold_the_optimizer():
    for case in C_CASES.values():
        path = FIXTURES / case["file"]
        assert path.stat().st_size < 50_000
        with zipfile.ZipFile(path) as archive:
            assert {"config.json", "metadata.json", "model.weights.h5"} <= set(archive.namelist())
        stored = [d["path"] for d in case["contents"]["weights_h5_datasets"]]
        assert sum(p.startswith("optimizer/vars/") for p in stored) == len(case["optimizer_variables"])
