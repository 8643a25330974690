"""Lion: ``kopt.scale_by_lion`` against a NumPy transcription of the rule, and ``kopt.tf_keras.Lion`` against
real TensorFlow (tf_keras >= 2.13, live when installed): built from its ``serialize()`` dict, stepped with the
same gradients, resumed from its variables. Keras 3's Lion is checked in tests/test_keras3_configs.py."""

import json

import chex
import jax
import numpy as np
import pytest

import kopt
from tests.stepping import arrays, assert_follows_live, assert_follows_rule, rule_tolerance

SHAPES = [(3, 2), (2,), (2, 1), (1,)]  # a Dense(2) -> Dense(1) model's kernels and biases
STEPS = 6


def gradients(seed: int, dtype=np.float32) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    # Some coordinates zero, so sign(0) = 0 is exercised; the rest large enough for the clips to act.
    grads = [[(rng.normal(size=s) * rng.integers(0, 2, size=s)).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return grads


def numpy_lion(params, grads, lr, beta_1, beta_2):
    """The rule as Keras writes it, per array, in NumPy."""
    m = [np.zeros_like(p) for p in params]
    trajectory = []
    for step in grads:
        for k, g in enumerate(step):
            params[k] = params[k] - lr * np.sign(beta_1 * m[k] + (1 - beta_1) * g)
            m[k] = beta_2 * m[k] + (1 - beta_2) * g
        trajectory.append([p.copy() for p in params])
    return trajectory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_by_lion_is_the_rule(dtype):
    with jax.enable_x64(dtype == np.float64):
        params = [np.full(s, 0.5, dtype) for s in SHAPES]
        grads = gradients(0, dtype)
        expected = numpy_lion([p.copy() for p in params], grads, 0.01, 0.8, 0.95)
        opt = kopt.chain(kopt.scale_by_lion(0.8, 0.95), kopt.scale_by_learning_rate(0.01))
        _, state = assert_follows_rule(opt, params, grads, expected)
        # m is beta_2's average of the gradients, as kept by the rule
        m = [np.zeros(s, dtype) for s in SHAPES]
        for g in grads:
            m = [0.95 * a + 0.05 * b for a, b in zip(m, g, strict=True)]
        chex.assert_trees_all_close(kopt.get_slot(state, "m"), m, **rule_tolerance(dtype))


def test_tf_keras_lion_has_no_legacy_class():
    with pytest.raises(ValueError, match="Lion has no legacy TensorFlow optimizer"):
        kopt.tf_keras.Lion(is_legacy_optimizer=True)


TF_OPTIONS = {
    "defaults": {},
    "weight_decay": {"weight_decay": 0.05},
    "clipnorm": {"clipnorm": 0.5},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "clipvalue": {"clipvalue": 0.3},
    "schedule": {"schedule": True},
}


@pytest.mark.parametrize("option", TF_OPTIONS)
def test_tf_keras_lion_follows_tensorflow_and_resumes_from_its_variables(option):
    tf_keras = pytest.importorskip("tf_keras")
    import tensorflow as tf

    kwargs = dict(TF_OPTIONS[option])
    rate = 0.01
    if kwargs.pop("schedule", False):
        rate = tf_keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
    tf_opt = tf_keras.optimizers.Lion(rate, beta_1=0.8, beta_2=0.95, **kwargs)
    opt = kopt.deserialize(json.loads(json.dumps(tf_keras.optimizers.serialize(tf_opt))))
    assert opt.class_name == "Lion" and opt.flavor == "tf_keras"

    variables = [tf.Variable(p) for p in arrays(1, SHAPES)]

    def live_step(g):
        tf_opt.apply_gradients(zip([tf.constant(x) for x in g], variables, strict=True))
        return [v.numpy() for v in variables]

    def live_weights():
        return [v.numpy() for v in tf_opt.variables]

    assert_follows_live(opt, arrays(1, SHAPES), gradients(2), live_step, handover=3, live_weights=live_weights)
