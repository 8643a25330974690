"""Adafactor: ``kopt.scale_by_adafactor`` against a NumPy transcription of Keras' rule (1-, 2- and 3-dimensional
params, float32 and float64), and ``kopt.tf_keras.Adafactor`` against real TensorFlow (live when tf_keras is
installed), built from its ``serialize()`` dict alone. Keras 3's is checked in tests/test_keras3_configs.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.stepping import arrays, assert_follows_live, assert_follows_rule

SHAPES = [(4,), (3, 4), (2, 3, 4)]
STEPS = 6


def numpy_adafactor(params, grads, lr, decay, eps_1, eps_2, clip):
    def rms(x):
        return np.sqrt(np.mean(x**2))

    r = [np.zeros(p.shape[:-1]) if p.ndim >= 2 else None for p in params]
    c = [np.zeros(p.shape[:-2] + p.shape[-1:]) if p.ndim >= 2 else None for p in params]
    v = [np.zeros(p.shape) for p in params]
    p = [x.astype(np.float64) for x in params]
    trajectory = []
    for t, step in enumerate(grads, start=1):
        for k, g in enumerate(step):
            rho = min(lr, 1 / np.sqrt(t))
            alpha = max(eps_2, rms(p[k])) * rho
            s = g.astype(np.float64) ** 2 + eps_1
            b = 1 - t**decay
            if p[k].ndim >= 2:
                r[k] = b * r[k] + (1 - b) * s.mean(axis=-1)
                c[k] = b * c[k] + (1 - b) * s.mean(axis=-2)
                v[k] = (r[k] / r[k].mean(axis=-1, keepdims=True))[..., None] * c[k][..., None, :]
            else:
                v[k] = b * v[k] + (1 - b) * s
            u = g / np.sqrt(v[k])
            u = u / max(1.0, rms(u) / clip)
            p[k] = p[k] - alpha * u
        trajectory.append([x.copy() for x in p])
    return trajectory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_by_adafactor_is_the_rule(dtype):
    with jax.enable_x64(dtype == np.float64):
        params, grads = arrays(0, SHAPES, dtype=dtype), arrays(1, SHAPES, STEPS, dtype)
        expected = numpy_adafactor(params, grads, 0.05, -0.8, 1e-30, 1e-3, 0.5)
        opt = kopt.scale_by_adafactor(0.05, clip_threshold=0.5)
        assert [jnp.shape(leaf) for leaf in kopt.get_slot(opt.init(params), "r")] == [(), (3,), (2, 3)]
        assert_follows_rule(opt, params, grads, expected)


def test_adafactor_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="Adafactor has no legacy TensorFlow optimizer"):
        kopt.tf_keras.Adafactor(is_legacy_optimizer=True)
    with pytest.raises(ValueError, match="packed"):
        kopt.tf_keras.Adafactor(packed=True)  # its moments are per variable (factored)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"clip_threshold": 0.5, "beta_2_decay": -0.5},
        {"global_clipnorm": 0.5},
        {"learning_rate": "schedule"},
        {"weight_decay": 0.1},
    ],
    ids=["defaults", "clip, decay", "global_clipnorm", "schedule", "weight_decay"],
)
def test_tf_keras_adafactor_follows_tensorflow(kwargs):
    tf_keras = pytest.importorskip("tf_keras")
    import tensorflow as tf

    kwargs = dict(kwargs)
    rate = 0.05
    if kwargs.pop("learning_rate", None) == "schedule":
        rate = tf_keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
    tf_opt = tf_keras.optimizers.Adafactor(rate, **kwargs)
    opt = kopt.deserialize(json.loads(json.dumps(tf_keras.optimizers.serialize(tf_opt))))
    assert (opt.class_name, opt.flavor) == ("Adafactor", "tf_keras")
    variables = [tf.Variable(p) for p in arrays(2, SHAPES)]

    def live_step(g):
        tf_opt.apply_gradients(zip([tf.constant(x) for x in g], variables, strict=True))
        return [v.numpy() for v in variables]

    assert_follows_live(opt, arrays(2, SHAPES), arrays(3, SHAPES, STEPS), live_step)
