"""Muon: ``kopt.orthogonalize_by_newton_schulz`` against a NumPy transcription of Keras 3's iteration (float32,
float64) and against what the iteration is (a map of each singular value; the polar factor when it converges),
and ``kopt.keras.Muon`` against Keras 3's ``Muon`` built from its ``serialize()`` dict alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.stepping import arrays, assert_follows_rule

KERAS_ABC = (3.4445, -4.7750, 2.0315)  # Keras 3's muon_a, muon_b, muon_c
SHAPES = [(3, 5), (6, 2), (2, 4, 3)]  # wide, tall (transposed first), a batch of tall matrices
STEPS = 5


def swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def numpy_newton_schulz(g, steps, abc=KERAS_ABC, epsilon=1e-7, rms_rate=None):
    """Keras 3's ``zeropower_via_newtonschulz5`` and ``lr_adjust`` (on the last two axes), in ``g``'s dtype."""
    a, b, c = abc
    tall = g.shape[-2] > g.shape[-1]
    x = swap(g) if tall else g
    x = x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) + epsilon)
    for _ in range(steps):
        gram = x @ swap(x)
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = swap(x) if tall else x
    return x if rms_rate is None else x * np.sqrt(max(g.shape[-2:])) * rms_rate


def numpy_muon_rule(params, grads, lr, momentum, nesterov, **newton_schulz):
    """Muon's matrix step as Keras 3 writes it: ``m <- m + (g + m*(momentum - 1))``, the (look-ahead) momentum
    orthogonalised, ``p <- p - lr * update``."""
    m = [np.zeros_like(p) for p in params]
    trajectory = []
    for step in grads:
        for k, g in enumerate(step):
            m[k] = m[k] + (g + m[k] * (momentum - 1))
            direction = g + momentum * m[k] if nesterov else m[k]
            params[k] = params[k] - lr * numpy_newton_schulz(direction, **newton_schulz)
        trajectory.append([p.copy() for p in params])
    return trajectory


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [True, False])
def test_newton_schulz_with_momentum_is_keras_rule(dtype, nesterov):
    with jax.enable_x64(dtype == np.float64):
        params = arrays(0, SHAPES, dtype=dtype)
        grads = arrays(1, SHAPES, STEPS, dtype=dtype)
        expected = numpy_muon_rule(
            [p.copy() for p in params], grads, 0.1, 0.9, nesterov, steps=5, abc=KERAS_ABC, rms_rate=0.3
        )
        opt = kopt.chain(
            kopt.trace(0.9, nesterov=nesterov),
            kopt.orthogonalize_by_newton_schulz(5, KERAS_ABC, rms_rate=0.3),
            kopt.scale_by_learning_rate(0.1),
        )
        assert_follows_rule(opt, params, grads, expected)


def singular_values(x) -> np.ndarray:
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def scalar_map(s: np.ndarray, steps: int, abc=KERAS_ABC) -> np.ndarray:
    """What the iteration does to each singular value: ``s <- a*s + b*s**3 + c*s**5``, ``steps`` times."""
    a, b, c = abc
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def test_each_singular_value_goes_through_the_scalar_map_into_the_band():
    """``X = U S V^T`` gives ``U p(S) V^T``: the singular values of the result are those of ``G / ||G||_F``
    through the quintic, wide, tall and batched alike. With many steps each settles in the band the quintic's
    iteration keeps ``(0, 1]`` in (its range after settling, found by iterating it on a grid)."""
    band = scalar_map(np.linspace(1e-3, 1.0, 4001), 60)[None]
    band = scalar_map(band, 1).min(), scalar_map(band, 1).max()  # one more step: the band is invariant
    with jax.enable_x64(True):
        grads = arrays(2, [(4, 7), (9, 3), (2, 5, 4)], dtype=np.float64)
        for steps in (5, 60):
            opt = kopt.orthogonalize_by_newton_schulz(steps, rms_rate=None, epsilon=0.0)
            grads_jax = [jnp.asarray(g) for g in grads]
            updates, _ = opt.update(grads_jax, opt.init(grads_jax))  # float64 params: float64 coefficients
            for g, u in zip(grads, updates, strict=True):
                s = np.linalg.svd(g, compute_uv=False)
                expected = scalar_map(s / np.linalg.norm(g, axis=(-2, -1))[..., None], steps)
                np.testing.assert_allclose(
                    np.sort(np.linalg.svd(np.asarray(u), compute_uv=False)), np.sort(expected), rtol=1e-10
                )
                if steps == 60:
                    assert band[0] - 1e-9 <= expected.min() and expected.max() <= band[1] + 1e-9
    assert 0.5 < band[0] < 1 < band[1] < 1.5  # a band around 1, not 1: the price of five steps


def test_convergent_coefficients_give_the_polar_factor():
    """With the cubic ``(1.5, -0.5, 0)`` (convergent for singular values in ``(0, sqrt 3)``) the iteration
    reaches ``U V^T`` of ``G = U S V^T``; ``rms_rate`` scales it by ``rms_rate * sqrt(max(rows, columns))``."""
    g = np.random.default_rng(3).normal(size=(5, 3))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    with jax.enable_x64(True):
        opt = kopt.orthogonalize_by_newton_schulz(60, (1.5, -0.5, 0.0), rms_rate=0.2)
        updates, _ = opt.update(jnp.asarray(g), opt.init(jnp.asarray(g)))
    np.testing.assert_allclose(np.asarray(updates), u @ vt * 0.2 * np.sqrt(5), atol=1e-9)
