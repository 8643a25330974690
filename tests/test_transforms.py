"""Hand-computed values: the clipping transforms and one (or two) steps of each optimizer.

Expected numbers come from the formulas of the specification evaluated with
Python floats, not from kopt.
"""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import kopt

RTOL = 1e-6  # float32 results against float64 hand arithmetic


def run_steps(opt, params, grads_sequence):
    state = opt.init(params)
    for grads in grads_sequence:
        updates, state = opt.update(grads, state, params)
        params = kopt.apply_updates(params, updates)
    return params


def one_step(opt, p=1.0, g=0.5):
    return float(run_steps(opt, jnp.asarray(p), [jnp.asarray(g)]))


# ----------------------------------------------------------------------------- clipping


def test_clip_by_value():
    clip = kopt.clip_by_value(0.5)
    out, _ = clip.update({"a": jnp.array([-2.0, 0.1, 3.0]), "b": jnp.array(-0.25)}, clip.init(None))
    chex.assert_trees_all_close(out, {"a": jnp.array([-0.5, 0.1, 0.5]), "b": jnp.array(-0.25)})


def test_clip_by_global_norm_scales_whole_tree():
    clip = kopt.clip_by_global_norm(1.0)
    out, _ = clip.update({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}, clip.init(None))
    chex.assert_trees_all_close(out, {"a": jnp.array([0.6]), "b": jnp.array([[0.8]])}, rtol=RTOL)


@pytest.mark.parametrize("max_norm", [5.0, 6.0])
def test_clip_by_global_norm_at_or_below_threshold_is_identity(max_norm):
    # N == 5 exactly: Keras clips with factor max_norm / N == 1, i.e. no change.
    grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    clip = kopt.clip_by_global_norm(max_norm)
    out, _ = clip.update(grads, clip.init(None))
    chex.assert_trees_all_equal(out, grads)


def test_clip_by_global_norm_zero_gradient_stays_zero():
    clip = kopt.clip_by_global_norm(1.0)
    out, _ = clip.update({"a": jnp.zeros(3), "b": jnp.zeros(())}, clip.init(None))
    chex.assert_trees_all_equal(out, {"a": jnp.zeros(3), "b": jnp.zeros(())})


def test_clip_by_norm_is_per_leaf():
    clip = kopt.clip_by_norm(1.0)
    out, _ = clip.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}, clip.init(None))
    chex.assert_trees_all_close(out, {"a": jnp.array([0.6, 0.8]), "b": jnp.array([0.5])}, rtol=RTOL)


def test_keras_clips_norm_before_value():
    # Norm first: N = sqrt(9.01); g = [3, 0.1] * (1/N) = [0.99944, 0.03331]; then clamp to 0.5.
    # (Value first would give [0.5, 0.1] and no norm clipping.)
    n = math.sqrt(3.0**2 + 0.1**2)
    opt = kopt.SGD(lr=1.0, clipnorm=1.0, clipvalue=0.5)
    out = run_steps(opt, {"a": jnp.zeros(1), "b": jnp.zeros(1)}, [{"a": jnp.array([3.0]), "b": jnp.array([0.1])}])
    chex.assert_trees_all_close(out, {"a": jnp.array([-0.5]), "b": jnp.array([-0.1 / n])}, rtol=RTOL)


# ----------------------------------------------------------------------------- one step each


def nadam_first_step(lr=0.002, b1=0.9, b2=0.999, eps=1e-7, sd=0.004, p=1.0, g=0.5):
    mu1 = b1 * (1 - 0.5 * 0.96 ** (1 * sd))
    mu2 = b1 * (1 - 0.5 * 0.96 ** (2 * sd))
    g_hat = g / (1 - mu1)
    m_hat = (1 - b1) * g / (1 - mu1 * mu2)
    v_hat = (1 - b2) * g * g / (1 - b2)
    m_bar = (1 - mu1) * g_hat + mu2 * m_hat
    return p - lr * m_bar / (math.sqrt(v_hat) + eps)


ONE_STEP = [
    ("sgd", kopt.SGD(lr=0.1), 1.0 - 0.1 * 0.5),
    ("sgd_momentum", kopt.SGD(lr=0.1, momentum=0.9), 1.0 - 0.1 * 0.5),
    ("sgd_nesterov", kopt.SGD(lr=0.1, momentum=0.9, nesterov=True), 1.0 + 0.9 * (-0.05) - 0.05),
    ("rmsprop", kopt.RMSprop(), 1.0 - 0.001 * 0.5 / (math.sqrt(0.1 * 0.25) + 1e-7)),
    ("adagrad", kopt.Adagrad(), 1.0 - 0.01 * 0.5 / (0.5 + 1e-7)),
    ("adadelta", kopt.Adadelta(), 1.0 - 0.5 * math.sqrt(1e-7) / math.sqrt(0.05 * 0.25 + 1e-7)),
    (
        "adam",
        kopt.Adam(),
        1.0 - 0.001 * (math.sqrt(1 - 0.999) / (1 - 0.9)) * 0.05 / (math.sqrt(0.001 * 0.25) + 1e-7),
    ),
    (
        "adam_amsgrad",
        kopt.Adam(amsgrad=True),
        1.0 - 0.001 * (math.sqrt(1 - 0.999) / (1 - 0.9)) * 0.05 / (math.sqrt(0.001 * 0.25) + 1e-7),
    ),
    ("adamax", kopt.Adamax(), 1.0 - (0.002 / (1 - 0.9)) * 0.05 / (0.5 + 1e-7)),
    ("nadam", kopt.Nadam(), nadam_first_step()),
]


@pytest.mark.parametrize("name,opt,expected", ONE_STEP, ids=[case[0] for case in ONE_STEP])
def test_one_step_by_hand(name, opt, expected):
    assert one_step(opt) == pytest.approx(expected, rel=RTOL)


def test_nadam_first_momentum_coefficient():
    # The spec's figure: with the defaults mu_1 ~= 0.45007.
    assert pytest.approx(0.45007, abs=1e-5) == 0.9 * (1 - 0.5 * 0.96**0.004)
    # So Nadam's first step is about 1.06 * lr, not Adam's ~lr (measured from p = 0 for precision).
    assert one_step(kopt.Nadam(), p=0.0) == pytest.approx(nadam_first_step(p=0.0), rel=RTOL)
    assert -nadam_first_step(p=0.0) / 0.002 == pytest.approx(1.0565, abs=1e-3)


def test_sgd_momentum_with_decay_two_steps():
    # Velocity holds lr-scaled steps; the second step uses lr / (1 + decay) and the
    # old velocity is not rescaled.
    lr, decay, momentum, g1, g2 = 0.1, 0.5, 0.9, 0.5, -0.25
    v1 = -lr * g1
    v2 = momentum * v1 - lr / (1 + decay) * g2
    out = run_steps(
        kopt.SGD(lr=lr, momentum=momentum, decay=decay), jnp.asarray(1.0), [jnp.asarray(g1), jnp.asarray(g2)]
    )
    assert float(out) == pytest.approx(1.0 + v1 + v2, rel=RTOL)


def test_adam_effective_epsilon_differs_from_textbook():
    # Keras: eps meets sqrt of the *uncorrected* v. With g tiny, the first step is
    # lr * c * (1-b1) g / ((1-b2)^0.5 |g| + eps), far from the textbook ~lr.
    g = 1e-9
    c = math.sqrt(1 - 0.999) / (1 - 0.9)
    expected = -0.001 * c * (0.1 * g) / (math.sqrt(0.001) * g + 1e-7)
    moved = one_step(kopt.Adam(), p=0.0, g=g)
    assert moved == pytest.approx(expected, rel=1e-5)
    assert abs(moved) < 0.001 / 10


def test_adagrad_starts_from_zero_accumulator():
    # optax/TF start at 0.1; Keras at 0: the first step is lr * g / (|g| + eps) ~= lr.
    assert one_step(kopt.Adagrad(lr=0.01), p=0.0, g=0.01) == pytest.approx(-0.01 * 0.01 / (0.01 + 1e-7), rel=RTOL)


def test_updates_of_zero_size_leaves():
    opt = kopt.Adam()
    params = {"empty": jnp.zeros((0, 3)), "w": jnp.ones(2)}
    out = run_steps(opt, params, [{"empty": jnp.zeros((0, 3)), "w": jnp.ones(2)}])
    chex.assert_shape(out["empty"], (0, 3))
    np.testing.assert_allclose(out["w"], 1.0 - 0.001, rtol=1e-5)
