"""Lion: ``kopt.scale_by_lion`` against a NumPy transcription of the rule, and ``kopt.tf_keras.Lion`` against
real TensorFlow (tf_keras >= 2.13, live when installed): built from its ``serialize()`` dict, stepped with the
same gradients, resumed from its variables. Keras 3's Lion is checked in tests/test_keras3_configs.py."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt

SHAPES = [(3, 2), (2,), (2, 1), (1,)]  # a Dense(2) -> Dense(1) model's kernels and biases
STEPS, HANDOVER = 6, 3


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
        state, current = opt.init(params), [jnp.asarray(p) for p in params]
        for step, g in enumerate(grads):
            updates, state = opt.update([jnp.asarray(x) for x in g], state, current)
            current = kopt.apply_updates(current, updates)
            assert all(leaf.dtype == dtype for leaf in current)
            tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == np.float32 else {"rtol": 1e-14, "atol": 1e-15}
            chex.assert_trees_all_close(current, expected[step], **tolerance)
        # m is beta_2's average of the gradients, as kept by the rule
        m = [np.zeros(s, dtype) for s in SHAPES]
        for g in grads:
            m = [0.95 * a + 0.05 * b for a, b in zip(m, g, strict=True)]
        chex.assert_trees_all_close(kopt.get_slot(state, "m"), m, **tolerance)


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

    rng = np.random.default_rng(1)
    initial = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = gradients(2)
    variables = [tf.Variable(p) for p in initial]
    params, state = [jnp.asarray(p) for p in initial], opt.init([jnp.asarray(p) for p in initial])
    update = jax.jit(opt.update)
    resumed = None
    for step, g in enumerate(grads, start=1):
        tf_opt.apply_gradients(zip([tf.constant(x) for x in g], variables, strict=True))
        updates, state = update([jnp.asarray(x) for x in g], state, params)
        params = kopt.apply_updates(params, updates)
        if resumed is not None:  # kopt from TensorFlow's variables after the handover step
            r_params, r_state = resumed
            r_updates, r_state = update([jnp.asarray(x) for x in g], r_state, r_params)
            resumed = (kopt.apply_updates(r_params, r_updates), r_state)
        expected = [v.numpy() for v in variables]
        chex.assert_trees_all_close(params, expected, rtol=2e-5, atol=2e-6)
        if resumed is not None:
            chex.assert_trees_all_close(resumed[0], expected, rtol=2e-5, atol=2e-6)
        if step == HANDOVER:
            weights = [v.numpy() for v in tf_opt.variables]
            tf_params = [jnp.asarray(v.numpy()) for v in variables]
            resumed = (tf_params, kopt.from_keras_weights(opt, tf_params, weights))
            assert int(kopt.iterations(resumed[1])) == HANDOVER
