"""Keras' ``use_ema``: ``kopt.ema_overwrite`` against a NumPy transcription of both Kerases' rules, and
``kopt.tf_keras.X(use_ema=True)`` against real TensorFlow (live when tf_keras is installed): built from its
``serialize()`` dict, stepped with the same gradients, resumed from its variables (the averages included);
Keras 3's rule (the average starts at the first step) against Keras 3 itself."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.stepping import assert_follows_live, assert_follows_rule

SHAPES = [(3, 2), (2,)]
STEPS, HANDOVER = 7, 4
TOLERANCE = {"rtol": 2e-5, "atol": 2e-6}


def gradients(seed: int, dtype=np.float32) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]


def initial(seed: int, dtype=np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(dtype) for s in SHAPES]


def numpy_sgd_with_ema(params, grads, lr, momentum, every, from_first_step):
    """SGD, then Keras' moving average of the new variables and its overwrite, in NumPy."""
    average = [p.copy() for p in params]
    trajectory = []
    for t, step in enumerate(grads, start=1):
        params = [p - lr * g for p, g in zip(params, step, strict=True)]
        mu = 0.0 if from_first_step and t == 1 else momentum
        average = [mu * a + (1 - mu) * p for a, p in zip(average, params, strict=True)]
        if every and t % every == 0:
            params = [a.copy() for a in average]
        trajectory.append(params)
    return trajectory


@pytest.mark.parametrize("from_first_step", [False, True], ids=["tf_keras", "keras3"])
@pytest.mark.parametrize("every", [None, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ema_overwrite_is_the_rule(dtype, every, from_first_step):
    with jax.enable_x64(dtype == np.float64):
        params, grads = initial(0, dtype), gradients(1, dtype)
        expected = numpy_sgd_with_ema(params, grads, 0.1, 0.7, every, from_first_step)
        opt = kopt.chain(
            kopt.scale_by_learning_rate(0.1), kopt.ema_overwrite(0.7, every, from_first_step=from_first_step)
        )
        _, state = assert_follows_rule(opt, params, grads, expected)
        assert int(kopt.iterations(state)) == STEPS


def test_ema_overwrite_bad_input_is_named():
    with pytest.raises(ValueError, match="overwrite_every"):
        kopt.ema_overwrite(0.9, overwrite_every=0)
    with pytest.raises(ValueError, match="needs the params"):
        opt = kopt.ema_overwrite()
        opt.update(jnp.zeros(2), opt.init(jnp.zeros(2)))


TF_CASES = {
    "Adam amsgrad, every 3": ("Adam", {"learning_rate": 0.05, "amsgrad": True}, 3),
    "SGD nesterov, every 2": ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}, 2),
    "RMSprop momentum, kept only": ("RMSprop", {"learning_rate": 0.01, "momentum": 0.5}, None),
    "Adagrad clipnorm, every 3": ("Adagrad", {"learning_rate": 0.1, "clipnorm": 0.5}, 3),
    "Lion weight decay, every 3": ("Lion", {"learning_rate": 0.01, "weight_decay": 0.1}, 3),
}


@pytest.mark.parametrize("case", TF_CASES)
def test_tf_keras_use_ema_follows_tensorflow_and_resumes_from_its_variables(case):
    tf_keras = pytest.importorskip("tf_keras")
    import tensorflow as tf

    class_name, kwargs, every = TF_CASES[case]
    tf_class = getattr(tf_keras.optimizers, class_name)
    tf_opt = tf_class(**kwargs, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=every)
    opt = kopt.deserialize(json.loads(json.dumps(tf_keras.optimizers.serialize(tf_opt))))
    assert opt.config["use_ema"] and opt.config["ema_overwrite_frequency"] == every

    variables = [tf.Variable(p) for p in initial(2)]
    handed = {}

    def live_step(g):
        tf_opt.apply_gradients(zip([tf.constant(x) for x in g], variables, strict=True))
        return [v.numpy() for v in variables]

    def live_weights():
        handed["weights"] = [v.numpy() for v in tf_opt.variables]
        return handed["weights"]

    assert_follows_live(opt, initial(2), gradients(3), live_step, handover=HANDOVER, live_weights=live_weights)
    # TensorFlow's variables: iterations, the averages, then the slots
    state = kopt.from_keras_weights(opt, [jnp.asarray(p) for p in initial(2)], handed["weights"])
    chex.assert_trees_all_close(kopt.get_slot(state, "average"), handed["weights"][1:3], **TOLERANCE)


@pytest.mark.parametrize("every", [None, 3])
def test_keras3_use_ema_rule_follows_keras3(every):
    keras = pytest.importorskip("keras", reason="the keras3 extra is not installed")
    if not keras.__version__.startswith("3."):
        pytest.skip("Keras 3 is needed")
    start, grads = initial(4), gradients(5)
    k_opt = keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=every)
    variables = [keras.Variable(p) for p in start]
    k_opt.build(variables)
    opt = kopt.chain(
        kopt.tf_keras.Adam(0.05, is_legacy_optimizer=False), kopt.ema_overwrite(0.8, every, from_first_step=True)
    )
    params = [jnp.asarray(p) for p in start]
    state = opt.init(params)
    for g in grads:
        k_opt.apply([keras.ops.convert_to_tensor(x) for x in g], variables)
        updates, state = opt.update([jnp.asarray(x) for x in g], state, params)
        params = kopt.apply_updates(params, updates)
        chex.assert_trees_all_close(params, [np.asarray(v.value) for v in variables], **TOLERANCE)
    # A Keras 3 config with use_ema builds this rule (tests/test_keras3_configs.py steps it against Keras 3).
    built = kopt.deserialize(keras.optimizers.serialize(k_opt))
    assert built.flavor == "keras3" and kopt.get_slot(built.init(params), "average") is not None
