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
import re

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


def built(case: str) -> kopt.Optimizer:
    """kopt's optimizer from TensorFlow's serialize() dict alone."""
    ignored = case.startswith("current") and "clipnorm_clipvalue" in case  # TF >= 2.11 drops clipvalue: warned
    with pytest.warns(UserWarning, match="ignores clipvalue") if ignored else _Nothing():
        return kopt.deserialize(CASES[case]["serialized"])


@pytest.mark.parametrize("case", RUN)
def test_optimizer_from_tf_config_follows_tf_trajectory(case):
    opt = built(case)
    params = params_at(ARRAYS, case, 0)
    for step, new in run(opt, opt.init(params), params, ARRAYS, case, 1, STEPS):
        chex.assert_trees_all_close(new, params_at(ARRAYS, case, step), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", RUN)
def test_resume_from_tf_weights_continues_like_tf(case):
    opt = built(case)
    weights = [ARRAYS[f"{case}/weights7/{j}"] for j in range(len(CASES[case]["weights7"]["names"]))]
    params = params_at(ARRAYS, case, SAVED)
    state = kopt.from_keras_weights(opt, params, weights)
    assert int(kopt.iterations(state)) == SAVED
    for step, new in run(opt, state, params, ARRAYS, case, SAVED + 1, STEPS):
        chex.assert_trees_all_close(new, params_at(ARRAYS, case, step), rtol=RTOL, atol=ATOL)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- saved model files

MODELS = json.loads((FIXTURES / "models.json").read_text())
MODEL_ARRAYS = np.load(FIXTURES / "models.npz", allow_pickle=False)
FILES = [(case["id"], fmt) for case in MODELS["cases"] for fmt in ("h5", "keras")]


@pytest.mark.parametrize(("case", "fmt"), FILES, ids=[f"{case}.{fmt}" for case, fmt in FILES])
def test_load_keras_optimizer_from_a_saved_model_continues_like_tf(case, fmt):
    pytest.importorskip("h5py")
    info = next(c for c in MODELS["cases"] if c["id"] == case)["files"][fmt]
    params = params_at(MODEL_ARRAYS, case, SAVED)
    stateless = not info["contents"].get("optimizer_weights_in_file", info["contents"].get("optimizer_vars_in_file"))
    with pytest.warns(UserWarning, match="holds no optimizer state") if stateless else _Nothing():
        opt, state = kopt.load_keras_optimizer(FIXTURES / info["file"], params)
    # TensorFlow's own reload is the reference, except TF >= 2.11's Nadam, whose reload is broken (its momentum
    # product is not saved and is then multiplied once per variable): kopt continues the uninterrupted run.
    broken = case == "current_Nadam"
    assert info["reload"]["tf_reload_matches"] != broken or stateless
    expected = "params" if broken else f"reload/{fmt}/params"
    assert int(kopt.iterations(state)) == (0 if stateless else SAVED)
    for step, new in run(opt, state, params, MODEL_ARRAYS, case, SAVED + 1, STEPS):
        key = f"{case}/{expected}/{step}/{{k}}"
        chex.assert_trees_all_close(new, [MODEL_ARRAYS[key.format(k=k)] for k in range(4)], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- live: TensorFlow reads kopt back

LIVE = [
    (kopt.Adam(lr=0.01, clipnorm=1.0, decay=0.01), "tf_keras.legacy"),  # Keras 2.2.4 written as TF's legacy
    (kopt.Nadam(lr=0.01, schedule_decay=0.01), "tf_keras.legacy"),
    (kopt.tf_keras.RMSprop(0.01, momentum=0.5, centered=True, clipnorm=0.5), None),
    (kopt.tf_keras.Adagrad(0.1, decay=0.1, clipvalue=0.5), None),
    (kopt.tf_keras.AdamW(0.01, weight_decay=0.05, amsgrad=True), None),  # TF >= 2.11 (its Nadam cannot resume)
    (kopt.tf_keras.Lion(0.01, weight_decay=0.05, global_clipnorm=1.0), None),
    (kopt.tf_keras.Ftrl(0.1, l1_regularization_strength=0.01, clipvalue=0.5), None),  # legacy
    (kopt.tf_keras.Ftrl(0.1, l2_shrinkage_regularization_strength=0.02, is_legacy_optimizer=False), None),
    (
        kopt.tf_keras.SGD(
            0.05, momentum=0.5, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=2, is_legacy_optimizer=False
        ),
        None,
    ),
    (
        kopt.tf_keras.SGD(
            {
                "class_name": "ExponentialDecay",
                "config": {"initial_learning_rate": 0.1, "decay_steps": 3, "decay_rate": 0.5, "staircase": True},
            },
            momentum=0.9,
        ),
        None,
    ),
]


@pytest.mark.parametrize(("opt", "flavor"), LIVE, ids=[f"{opt.class_name}-{flavor}" for opt, flavor in LIVE])
def test_tensorflow_reads_kopt_config_and_weights_back(opt, flavor):
    """kopt writes a config and weights, real TensorFlow builds and continues from them: same numbers."""
    tf_keras = pytest.importorskip("tf_keras")
    import tensorflow as tf

    config = kopt.serialize(opt, flavor=flavor)
    tf_opt = tf_keras.optimizers.deserialize(json.loads(json.dumps(config)))
    if isinstance(tf_opt, str):  # tf_keras 2.21 deserializes its own Lion config to the string "Lion"
        tf_class = getattr(tf_keras.optimizers, config["class_name"])
        tf_opt = tf_class.from_config(json.loads(json.dumps(config["config"])))
    legacy = config["module"] == "keras.optimizers.legacy"
    assert isinstance(tf_opt, tf_keras.optimizers.legacy.Optimizer) == legacy
    case = RUN[0]
    params, state = params_at(ARRAYS, case, 0), opt.init(params_at(ARRAYS, case, 0))
    for step in range(1, 4):  # 3 kopt steps, then hand over to TensorFlow
        updates, state = opt.update(grads_at(ARRAYS, case, step), state, params)
        params = kopt.apply_updates(params, updates)
    variables = [tf.Variable(np.asarray(p)) for p in params]
    (tf_opt._create_all_weights if legacy else tf_opt.build)(variables)
    weights = kopt.to_keras_weights(opt, state, flavor="tf_keras.legacy" if legacy else "tf_keras")
    if legacy:
        tf_opt.set_weights(weights)
    else:
        for variable, value in zip(tf_opt.variables, weights, strict=True):
            variable.assign(value)
    for step, expected in run(opt, state, params, ARRAYS, case, 4, 8):
        grads = [tf.constant(np.asarray(g)) for g in grads_at(ARRAYS, case, step)]
        tf_opt.apply_gradients(zip(grads, variables, strict=True))
        chex.assert_trees_all_close([v.numpy() for v in variables], expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- configs and schedules


SCHEDULED = [name for name in RUN if "schedule_values" in CASES[name]]


@pytest.mark.parametrize("case", SCHEDULED)
def test_schedule_from_tf_config_equals_tf_schedule(case):
    learning_rate = CASES[case]["serialized"]["config"]["learning_rate"]
    schedule = kopt.tf_keras.schedule_from_config(learning_rate)
    values = [schedule(step) for step in range(STEPS + 1)]
    np.testing.assert_allclose(values, ARRAYS[f"{case}/schedule_values"], rtol=RTOL, atol=1e-9)


@pytest.mark.parametrize("case", [name for name in RUN if CASES[name]["legacy"]])
def test_legacy_config_round_trips_to_what_tensorflow_wrote(case):
    written = CASES[case]["serialized"]
    expected = json.loads(json.dumps(written))
    if case == "legacy_Nadam_schedule_decay":  # TF reads a Nadam's schedule decay back only as schedule_decay
        expected["config"]["schedule_decay"] = expected["config"].pop("decay")
    assert kopt.serialize(kopt.deserialize(written)) == expected


@pytest.mark.parametrize(
    "case", ["legacy_Adam_amsgrad", "current_RMSprop_centered_momentum", "current_Adagrad_default"]
)
def test_every_form_of_a_tf_config_is_read(case):
    """serialize() with and without module/registered_name, and {class_name, get_config()} as h5 files keep it."""
    written = CASES[case]["serialized"]
    forms = [written, {"class_name": written["class_name"], "config": CASES[case]["config"]}]
    forms.append({"class_name": "Custom>" + written["class_name"], "config": written["config"]})
    built = [kopt.deserialize(form) for form in forms]
    assert {opt.flavor for opt in built} == {"tf_keras.legacy" if CASES[case]["legacy"] else "tf_keras"}
    assert all(opt.config == built[0].config for opt in built)
    assert kopt.get(written).config == built[0].config


def test_tf_defaults_are_tensorflows():
    """The defaults that differ from Keras 2.2.4, as TensorFlow's own configs give them."""
    expected = {"Adagrad": (0.001, 0.1), "Adadelta": (0.001, None), "Adamax": (0.001, None), "Nadam": (0.001, None)}
    for class_name, (lr, accumulator) in expected.items():
        tf_config = CASES[f"legacy_{class_name}_default"]["config"]
        opt = getattr(kopt.tf_keras, class_name)()
        assert opt.config["learning_rate"] == tf_config["learning_rate"] == lr
        if accumulator is not None:
            assert opt.config["initial_accumulator_value"] == tf_config["initial_accumulator_value"] == accumulator
    assert kopt.tf_keras.Nadam().config["decay"] == CASES["legacy_Nadam_default"]["config"]["decay"] == 0.004


def test_config_keys_kopt_cannot_honour_are_named():
    assert kopt.deserialize(CASES["current_Adam_use_ema"]["serialized"]).config["use_ema"]  # honoured: test_ema.py
    with pytest.raises(ValueError, match=r"ema_momentum must be in \[0, 1\]"):
        kopt.tf_keras.Adam(use_ema=True, ema_momentum=1.5, is_legacy_optimizer=False)
    config = {"name": "Adam", "is_legacy_optimizer": True, "foo": 1, "weight_decay": 0.1}
    with pytest.raises(ValueError, match=r"cannot honour 'foo', 'weight_decay' \(of TF >= 2.11 optimizers\)"):
        kopt.deserialize({"class_name": "Adam", "config": config})
    with pytest.raises(TypeError, match=r"'decay' \(of the legacy optimizers\)"):
        kopt.tf_keras.Adam(decay=0.1, is_legacy_optimizer=False)
    with pytest.raises(ValueError, match="at most one of clipnorm"):
        kopt.tf_keras.SGD(clipnorm=1.0, global_clipnorm=1.0)
    with pytest.raises(
        ValueError, match=re.escape(CASES["legacy_Nadam_sched_ExponentialDecay"]["error"]["message"][:30])
    ):
        kopt.tf_keras.Nadam(
            {
                "class_name": "ExponentialDecay",
                "config": {"initial_learning_rate": 0.1, "decay_steps": 3, "decay_rate": 0.5},
            }
        )
    with pytest.raises(ValueError, match=r"MyWarmUp.* is not a TensorFlow schedule config kopt knows"):
        kopt.tf_keras.Adam({"class_name": "MyWarmUp", "config": {}})
    with pytest.raises(ValueError, match="cannot be written for TensorFlow"):
        kopt.serialize(kopt.Adam(clipnorm=1.0, clipvalue=0.5), flavor="tf_keras.legacy")
    with pytest.raises(ValueError, match=r"cannot be written as a 'keras' config"):
        kopt.serialize(kopt.tf_keras.Adam(), flavor="keras")


def test_load_keras_optimizer_names_what_differs(tmp_path):
    pytest.importorskip("h5py")
    path = FIXTURES / "models" / "legacy_Adam.h5"
    params = params_at(MODEL_ARRAYS, "legacy_Adam", SAVED)
    with pytest.raises(ValueError, match=r"legacy_Adam.h5: .*3 parameter arrays expects 7 weights.*got 9"):
        kopt.load_keras_optimizer(path, params[:3])  # one param short: the counts differ
    with pytest.raises(ValueError, match=r"weights\[1\] \(m for params\[0\]\) has shape \(3, 2\), expected \(2, 3\)"):
        kopt.load_keras_optimizer(path, [params[0].T, *params[1:]])
    import h5py

    renamed = tmp_path / "custom.h5"
    renamed.write_bytes(path.read_bytes())
    with h5py.File(renamed, "r+") as file:
        file.attrs["training_config"] = file.attrs["training_config"].replace('"Adam"', '"MyOptimizer"', 1)
    with pytest.raises(ValueError, match=r"custom\.h5: Unknown TensorFlow optimizer: 'MyOptimizer'"):
        kopt.load_keras_optimizer(renamed, params)
