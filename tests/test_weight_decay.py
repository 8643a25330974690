"""Keras' weight decay where a rule keeps a momentum or reads the params, and ``exclude_from_weight_decay``.

Keras (tf_keras >= 2.11 and Keras 3) decays each variable, ``p <- p - lr_i * weight_decay * p`` at the step's
rate, before its update step: outside SGD's and RMSprop's velocity, and before Lamb's trust ratio reads the
norm. Checked against live tf_keras / Keras 3 (float32, every step within ``2e-6 + 2e-5 |keras|``) and
against a NumPy transcription (float32 and float64), in both of kopt's state layouts; the exclusion by
variable name in both Kerases' names (tf_keras ``dense/bias:0``, Keras 3 ``bias``), read off real layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.stepping import LIVE, arrays, assert_follows_live, assert_follows_rule

STEPS = 5
SHAPES = [(3, 2), (2,)]
DENSE = {"kernel": (3, 2), "bias": (2,)}  # a Dense(2) on 3 inputs


def numpy_sgd(params, grads, rates, weight_decay, momentum, nesterov):
    """TF >= 2.11's SGD: the decay at the step's rate, then the velocity (which never holds the decay)."""
    velocity = [np.zeros_like(p) for p in params]
    trajectory = []
    for lr, step in zip(rates, grads, strict=False):
        for k, g in enumerate(step):
            params[k] = params[k] - lr * weight_decay * params[k]
            velocity[k] = momentum * velocity[k] - lr * g
            params[k] = params[k] + (momentum * velocity[k] - lr * g if nesterov else velocity[k])
        trajectory.append([p.copy() for p in params])
    return trajectory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_decay_with_a_schedule_is_the_rule(dtype, nesterov):
    """The decay uses the rate of its own step (``lr_i``, ``i`` steps taken before it), as the velocity does."""
    with jax.enable_x64(dtype == np.float64):
        params, grads = arrays(0, SHAPES, dtype=dtype), arrays(1, SHAPES, STEPS, dtype=dtype)
        rates = [0.1 * 0.5 ** (i / 2) for i in range(STEPS)]
        expected = numpy_sgd([p.copy() for p in params], grads, rates, 0.3, 0.8, nesterov)
        opt = kopt.tf_keras.SGD(
            kopt.exponential_decay(0.1, 2, 0.5),
            momentum=0.8,
            nesterov=nesterov,
            weight_decay=0.3,
            is_legacy_optimizer=False,
        )
        _, state = assert_follows_rule(opt, params, grads, expected)
        assert int(kopt.iterations(state)) == STEPS


def live_tf_keras(optimizer, start):
    import tensorflow as tf

    variables = [tf.Variable(p) for p in start]

    def step(grads):
        optimizer.apply_gradients(zip([tf.constant(g) for g in grads], variables, strict=True))
        return [v.numpy() for v in variables]

    return step


@pytest.mark.parametrize(
    ("name", "arguments", "packed"),
    [
        ("SGD", {"learning_rate": 0.05, "momentum": 0.9}, None),
        ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}, False),
        ("RMSprop", {"learning_rate": 0.01, "momentum": 0.5, "centered": True}, None),
        ("RMSprop", {"learning_rate": "schedule", "momentum": 0.5}, False),
    ],
)
def test_momentum_decay_follows_tf_keras(name, arguments, packed):
    tf_keras = pytest.importorskip("tf_keras")
    arguments = dict(arguments, weight_decay=0.2)
    if arguments["learning_rate"] == "schedule":
        arguments["learning_rate"] = tf_keras.optimizers.schedules.ExponentialDecay(0.02, 2, 0.5)
    live = getattr(tf_keras.optimizers, name)(**arguments, jit_compile=False)
    if not isinstance(arguments["learning_rate"], float):  # kopt reads tf_keras' schedule config
        arguments["learning_rate"] = tf_keras.optimizers.schedules.serialize(arguments["learning_rate"])
    opt = getattr(kopt.tf_keras, name)(**arguments, is_legacy_optimizer=False, packed=packed)
    start, grads = arrays(2, SHAPES), arrays(3, SHAPES, STEPS)
    assert_follows_live(opt, start, grads, live_tf_keras(live, start))


def kopt_steps(opt, start, grads):
    """kopt's params after each step, for a dict tree (``stepped`` takes lists)."""
    params, state, update = jax.tree.map(jnp.asarray, start), opt.init(start), jax.jit(opt.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = kopt.apply_updates(params, updates)
        yield params


def dense_inputs(seed):
    start = {"dense": {k: v for k, v in zip(DENSE, arrays(seed, DENSE.values()), strict=True)}}
    grads = [{"dense": dict(zip(DENSE, g, strict=True))} for g in arrays(seed + 1, DENSE.values(), STEPS)]
    return start, grads


def test_exclusion_by_tf_keras_name_follows_tf_keras():
    """tf_keras' ``variable.name`` is the full path and ``:0``: ``^dense/bias:0$`` names its bias only."""
    tf_keras = pytest.importorskip("tf_keras")
    start, grads = dense_inputs(4)
    import tensorflow as tf

    layer = tf_keras.layers.Dense(2, name="dense")
    layer(tf.zeros((1, 3)))  # built when first called, as in a model: in its name scope
    for variable in layer.trainable_variables:
        variable.assign(start["dense"][variable.name[6:-2]])
    assert sorted(v.name for v in layer.trainable_variables) == ["dense/bias:0", "dense/kernel:0"]
    live = tf_keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.5, jit_compile=False)
    live.exclude_from_weight_decay(var_names=["^dense/bias:0$"])
    opt = kopt.tf_keras.SGD(
        0.1, momentum=0.9, weight_decay=0.5, is_legacy_optimizer=False, exclude_from_weight_decay=["^dense/bias:0$"]
    )
    for params, g in zip(kopt_steps(opt, start, grads), grads, strict=True):
        live.apply_gradients((g["dense"][v.name[6:-2]], v) for v in layer.trainable_variables)
        expected = {"dense": {v.name[6:-2]: v.numpy() for v in layer.trainable_variables}}
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **LIVE), params, expected)
    # Keras' get_config has no such key: the config is tf_keras' own, which tf_keras reads back
    back = tf_keras.optimizers.deserialize(kopt.serialize(opt), use_legacy_optimizer=False)
    assert back.get_config()["weight_decay"] == pytest.approx(0.5)


@pytest.mark.parametrize(("name", "arguments"), [("Lamb", {}), ("AdamW", {}), ("SGD", {"momentum": 0.9})])
def test_exclusion_by_keras3_name_follows_keras3(name, arguments):
    """Keras 3's ``variable.name`` is the last part (``bias``); Lamb's trust ratio reads the decayed norm."""
    keras = pytest.importorskip("keras")
    start, grads = dense_inputs(6)
    layer = keras.layers.Dense(2, name="dense")
    layer.build((None, 3))
    for variable in layer.trainable_variables:
        variable.assign(start["dense"][variable.name])
    assert sorted(v.name for v in layer.trainable_variables) == ["bias", "kernel"]
    live = getattr(keras.optimizers, name)(0.01, weight_decay=0.5, **arguments)
    live.exclude_from_weight_decay(var_names=["^bias$"])
    live.build(layer.trainable_variables)
    opt = getattr(kopt.keras, name)(0.01, weight_decay=0.5, exclude_from_weight_decay=["^bias$"], **arguments)
    assert "exclude_from_weight_decay" not in kopt.serialize(opt)["config"]  # Keras 3 would refuse the key
    for params, g in zip(kopt_steps(opt, start, grads), grads, strict=True):
        live.apply([g["dense"][v.name] for v in layer.trainable_variables], layer.trainable_variables)
        expected = {"dense": {v.name: np.asarray(v.value) for v in layer.trainable_variables}}
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **LIVE), params, expected)


def test_exclusion_names_the_bad_option():
    def sgd(**options):
        return kopt.tf_keras.SGD(momentum=0.9, weight_decay=0.1, is_legacy_optimizer=False, **options)

    with pytest.raises(ValueError, match=r"exclude_from_weight_decay pattern '\(a\+\)\+' refused"):
        sgd(exclude_from_weight_decay=["bias", "(a+)+"])
    with pytest.raises(ValueError, match=r"exclude_from_weight_decay pattern .* refused: at most 256"):
        sgd(exclude_from_weight_decay=["a" * 257])
    with pytest.raises(ValueError, match=r"exclude_from_weight_decay pattern .* is not a regular expression"):
        sgd(exclude_from_weight_decay=["(bias"])
    with pytest.raises(ValueError, match="exclude_from_weight_decay must be a list of patterns"):
        sgd(exclude_from_weight_decay="bias")  # Keras would take its characters as patterns
    with pytest.raises(ValueError, match="variable_names must be one of 'tf_keras', 'keras3'"):
        sgd(exclude_from_weight_decay=["bias"], variable_names="keras2")
    with pytest.raises(ValueError, match=r"exclude_from_weight_decay=\.\.\.\) decays some variables only"):
        sgd(exclude_from_weight_decay=["bias"], packed=True)
    with pytest.raises(TypeError, match=r"'exclude_from_weight_decay' \(of TF >= 2\.11"):
        kopt.tf_keras.SGD(exclude_from_weight_decay=["bias"])  # the legacy optimizers have no weight decay
