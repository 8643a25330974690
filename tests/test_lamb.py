"""LAMB's pieces against NumPy transcriptions: ``kopt.scale_by_trust_ratio`` and ``kopt.scale_by_adam`` with
``corrected_epsilon=True``, chained as Keras 3's Lamb chains them (float32 and float64). Keras 3's Lamb itself,
built from its config, is checked against Keras 3 in tests/test_keras3_configs.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.stepping import assert_follows_rule

SHAPES = [(3, 2), (2,), (4,)]
STEPS = 5


def numpy_lamb(params, grads, lr, beta_1, beta_2, epsilon):
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    trajectory = []
    for t, step in enumerate(grads, start=1):
        for k, g in enumerate(step):
            m[k] = beta_1 * m[k] + (1 - beta_1) * g
            v[k] = beta_2 * v[k] + (1 - beta_2) * g**2
            update = (m[k] / (1 - beta_1**t)) / (np.sqrt(v[k] / (1 - beta_2**t)) + epsilon)
            w_norm, u_norm = np.linalg.norm(params[k]), np.linalg.norm(update)
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            params[k] = params[k] - lr * ratio * update
        trajectory.append([p.copy() for p in params])
    return trajectory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lamb_chain_is_the_rule(dtype):
    with jax.enable_x64(dtype == np.float64):
        rng = np.random.default_rng(0)
        params = [rng.normal(size=s).astype(dtype) for s in SHAPES]
        params[2][:] = 0  # a param at zero: ratio 1
        grads = [[rng.normal(size=s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
        expected = numpy_lamb([p.copy() for p in params], grads, 0.01, 0.8, 0.99, 1e-6)
        opt = kopt.chain(
            kopt.scale_by_adam(0.8, 0.99, 1e-6, corrected_epsilon=True),
            kopt.scale_by_trust_ratio(),
            kopt.scale_by_learning_rate(0.01),
        )
        assert_follows_rule(opt, params, grads, expected)


def test_trust_ratio_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="scale_by_trust_ratio works leaf by leaf"):
        opt = kopt.packed(kopt.scale_by_trust_ratio())
        params = {"a": jnp.ones(2), "b": jnp.ones(3)}
        opt.update(params, opt.init(params), params)
    with pytest.raises(ValueError, match="needs the params"):
        opt = kopt.scale_by_trust_ratio()
        opt.update(jnp.ones(2), opt.init(jnp.ones(2)))
