"""FTRL: ``kopt.ftrl`` against a NumPy transcription of Keras' rule, and ``kopt.tf_keras.Ftrl`` against real
TensorFlow (legacy and TF >= 2.11 classes, live when tf_keras is installed): built from TensorFlow's
``serialize()`` dict alone, stepped with the same gradients, resumed from its weights. Keras 3's Ftrl is
checked in tests/test_keras3_configs.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.stepping import arrays, assert_follows_live, assert_follows_rule

SHAPES = [(3, 2), (2,)]
STEPS = 6


def numpy_ftrl(params, grads, lr, learning_rate_power, n0, l1, l2, shrinkage, beta):
    """Keras' FTRL step, array by array, in NumPy (float64 math)."""
    n = [np.full(p.shape, n0) for p in params]
    z = [np.zeros(p.shape) for p in params]
    p = [x.astype(np.float64) for x in params]
    trajectory = []
    for step in grads:
        for k, g in enumerate(step):
            new_n = n[k] + g.astype(np.float64) ** 2
            c = -learning_rate_power
            z[k] = z[k] + g + 2 * shrinkage * p[k] - (new_n**c - n[k] ** c) / lr * p[k]
            quadratic = new_n**c / lr + 2 * (l2 + beta / (2 * lr))
            p[k] = (np.clip(z[k], -l1, l1) - z[k]) / quadratic
            n[k] = new_n
        trajectory.append([x.copy() for x in p])
    return trajectory


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"learning_rate_power": -0.3, "l1": 1.0, "l2": 0.02, "l2_shrinkage": 0.03, "beta": 0.5}],
    ids=["defaults", "regularized"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ftrl_is_the_rule(dtype, kwargs):
    with jax.enable_x64(dtype == np.float64):
        params, grads = arrays(0, SHAPES, dtype=dtype), arrays(1, SHAPES, STEPS, dtype)
        arguments = {"learning_rate_power": -0.5, "l1": 0.0, "l2": 0.0, "l2_shrinkage": 0.0, "beta": 0.0, **kwargs}
        expected = numpy_ftrl(
            params,
            grads,
            0.1,
            arguments["learning_rate_power"],
            0.1,
            arguments["l1"],
            arguments["l2"],
            arguments["l2_shrinkage"],
            arguments["beta"],
        )
        current, state = assert_follows_rule(kopt.ftrl(0.1, **kwargs), params, grads, expected)
        assert int(kopt.iterations(state)) == STEPS
        if kwargs.get("l1"):
            assert any(np.any(np.asarray(leaf) == 0) for leaf in current)  # l1 has cut some coordinates to 0


def test_ftrl_learning_rate_is_a_hyperparameter():
    opt = kopt.ftrl(kopt.exponential_decay(0.1, 2, 0.5))
    params = {"w": jnp.ones(2)}
    state = kopt.set_hyperparams(opt.init(params), lr=0.2)
    _, state = opt.update(params, state, params)
    assert float(kopt.get_hyperparams(state)["current_lr"]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="ftrl needs the params"):
        opt.update(params, state)


def _schedule(tf_keras):
    return tf_keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)


TF_CASES = {
    "defaults": (None, {}),
    "regularized": (None, {"l1_regularization_strength": 0.02, "l2_regularization_strength": 0.03, "beta": 0.4}),
    "shrinkage, power -0.3": (None, {"l2_shrinkage_regularization_strength": 0.05, "learning_rate_power": -0.3}),
    "accumulator 0.5, clipnorm": (None, {"initial_accumulator_value": 0.5, "clipnorm": 0.5}),
    "global_clipnorm": (None, {"global_clipnorm": 0.5}),
    "clipvalue": (None, {"clipvalue": 0.3}),
    "schedule": (None, {"learning_rate": "schedule"}),
    "legacy decay": (True, {"decay": 0.1}),
    "use_ema": (False, {"use_ema": True, "ema_momentum": 0.8, "ema_overwrite_frequency": 2}),
    "weight_decay": (False, {"weight_decay": 0.05, "l2_shrinkage_regularization_strength": 0.02}),
}


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "current"])
@pytest.mark.parametrize("case", TF_CASES)
def test_tf_keras_ftrl_follows_tensorflow_and_resumes_from_its_weights(case, legacy):
    tf_keras = pytest.importorskip("tf_keras")
    import tensorflow as tf

    only, kwargs = TF_CASES[case]
    if only is not None and only != legacy:
        pytest.skip(f"{case}: {'legacy' if only else 'TF >= 2.11'} only")
    kwargs = dict(kwargs)
    rate = _schedule(tf_keras) if kwargs.pop("learning_rate", None) == "schedule" else 0.1
    tf_class = tf_keras.optimizers.legacy.Ftrl if legacy else tf_keras.optimizers.Ftrl
    tf_opt = tf_class(rate, **kwargs)
    opt = kopt.deserialize(json.loads(json.dumps(tf_keras.optimizers.serialize(tf_opt))))
    assert (opt.class_name, opt.flavor) == ("Ftrl", "tf_keras.legacy" if legacy else "tf_keras")

    variables = [tf.Variable(p) for p in arrays(2, SHAPES)]

    def live_step(g):
        tf_opt.apply_gradients(zip([tf.constant(x) for x in g], variables, strict=True))
        return [v.numpy() for v in variables]

    def live_weights():
        return [v.numpy() for v in (tf_opt.weights if legacy else tf_opt.variables)]

    assert_follows_live(
        opt, arrays(2, SHAPES), arrays(3, SHAPES, STEPS), live_step, handover=3, live_weights=live_weights
    )
