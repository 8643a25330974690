"""Schedule-free Adam: ``kopt.schedule_free_adam`` against a NumPy transcription of Keras 3's
``ScheduleFreeAdamW`` rule (float32 and float64, with and without warm-up, on the default packed layout and
per leaf). Keras 3's optimizer itself, from its config, is checked in tests/test_keras3_configs.py."""

import jax
import numpy as np
import pytest

import kopt
from tests.stepping import arrays, assert_follows_rule

SHAPES = [(3, 2), (2,), (4,)]
STEPS = 6


def numpy_schedule_free(params, grads, lr, beta_1, beta_2, epsilon, warmup):
    y = [p.astype(np.float64) for p in params]
    z = [p.copy() for p in y]
    v = [np.zeros_like(p) for p in y]
    trajectory = []
    for t, step in enumerate(grads, start=1):
        lr_t = lr * min(t / warmup, 1.0) if warmup else lr
        for k, g in enumerate(step):
            v[k] = v[k] + (g**2 - v[k]) * (1 - beta_2)
            z_old = z[k]
            z[k] = z[k] - lr_t * g / (np.sqrt(v[k] / (1 - beta_2**t)) + epsilon)
            x_old = (y[k] - (1 - beta_1) * z_old) / beta_1
            x = (1 - 1 / t) * x_old + z[k] / t
            y[k] = (1 - beta_1) * z[k] + beta_1 * x
        trajectory.append([p.copy() for p in y])
    return trajectory


@pytest.mark.parametrize("packed", [None, False], ids=["default", "per leaf"])
@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_schedule_free_adam_is_the_rule(dtype, warmup, packed):
    with jax.enable_x64(dtype == np.float64):
        params, grads = arrays(0, SHAPES, dtype=dtype), arrays(1, SHAPES, STEPS, dtype)
        expected = numpy_schedule_free(params, grads, 0.05, 0.8, 0.99, 1e-8, warmup)
        opt = kopt.packing.as_asked(kopt.schedule_free_adam(0.05, 0.8, 0.99, 1e-8, warmup_steps=warmup), packed)
        _, state = assert_follows_rule(opt, params, grads, expected)
        assert int(kopt.iterations(state)) == STEPS
