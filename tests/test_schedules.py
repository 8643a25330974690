"""Schedules against their formulas (Python math), and as ``lr`` of optimizers in a jitted step."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt

STEPS = range(0, 40, 3)


def cosine_reference(i, lr, steps, alpha=0.0, t_mul=1.0, m_mul=1.0, restarts=False):
    """Walks the periods one by one (an independent way to find the period and position)."""
    if not restarts:
        position, length, peak = min(i, steps), steps, lr
    else:
        start, length, peak = 0, steps, lr
        while i >= start + length:
            start, length, peak = start + length, length * t_mul, peak * m_mul
        position = i - start
    return peak * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * position / length)) + alpha)


CASES = [
    ("constant", kopt.constant_schedule(0.3), lambda i: 0.3),
    ("inverse_time", kopt.inverse_time_decay(0.1, 0.5), lambda i: 0.1 / (1 + 0.5 * i)),
    ("exponential", kopt.exponential_decay(0.1, 10, 0.5), lambda i: 0.1 * 0.5 ** (i / 10)),
    ("exponential_staircase", kopt.exponential_decay(0.1, 10, 0.5, staircase=True), lambda i: 0.1 * 0.5 ** (i // 10)),
    (
        "piecewise",
        kopt.piecewise_constant(0.1, [5, 20], [0.5, 0.2]),
        lambda i: 0.1 * (0.5 if i >= 5 else 1) * (0.2 if i >= 20 else 1),
    ),
    (
        "polynomial",
        kopt.polynomial_decay(0.1, 0.01, 30, power=2.0),
        lambda i: (0.1 - 0.01) * (1 - min(i, 30) / 30) ** 2 + 0.01,
    ),
    ("cosine", kopt.cosine_decay(0.1, 25, alpha=0.1), lambda i: cosine_reference(i, 0.1, 25, alpha=0.1)),
    (
        "cosine_restarts",
        kopt.cosine_decay(0.1, 7, restarts=True),
        lambda i: cosine_reference(i, 0.1, 7, restarts=True),
    ),
    (
        "cosine_restarts_t_mul_m_mul",
        kopt.cosine_decay(0.1, 4, restarts=True, t_mul=2.0, m_mul=0.5),
        lambda i: cosine_reference(i, 0.1, 4, t_mul=2.0, m_mul=0.5, restarts=True),
    ),
    ("warmup", kopt.linear_warmup(0.1, 8, init_lr=0.01), lambda i: 0.01 + (0.1 - 0.01) * min(i, 8) / 8),
    (
        "join_warmup_cosine",
        kopt.join_schedules([kopt.linear_warmup(0.1, 6), kopt.cosine_decay(0.1, 20)], [6]),
        lambda i: 0.1 * i / 6 if i < 6 else cosine_reference(i - 6, 0.1, 20),
    ),
]


@pytest.mark.parametrize("name,schedule,formula", CASES, ids=[c[0] for c in CASES])
def test_schedule_matches_formula_with_and_without_jit(name, schedule, formula):
    expected = np.array([formula(i) for i in STEPS])
    eager = np.array([float(schedule(i)) for i in STEPS])
    jitted = np.array(jax.jit(jax.vmap(schedule))(jnp.asarray(list(STEPS))))
    np.testing.assert_allclose(eager, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(jitted, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name,schedule,formula", CASES, ids=[c[0] for c in CASES])
def test_schedule_as_lr_of_sgd_gives_its_trajectory_and_current_lr(name, schedule, formula):
    opt = kopt.SGD(lr=schedule)
    step = jax.jit(opt.update)
    params, state = jnp.zeros(2), opt.init(jnp.zeros(2))
    expected = 0.0
    for i in range(12):
        updates, state = step(jnp.ones(2), state, params)
        params = kopt.apply_updates(params, updates)
        expected -= formula(i)
        assert float(kopt.get_hyperparams(state)["current_lr"]) == pytest.approx(formula(i), rel=1e-5, abs=1e-9)
    np.testing.assert_allclose(params, [expected, expected], rtol=1e-5)


def test_set_lr_rescales_a_schedule_without_recompiling():
    opt = kopt.Adam(lr=kopt.cosine_decay(0.1, 20))
    traces = []

    def step(params, state):
        traces.append(1)
        return opt.update(jnp.ones(1), state, params)[1]

    step = jax.jit(step)
    state = opt.init(jnp.zeros(1))
    for _ in range(3):
        state = step(jnp.zeros(1), state)
    state = kopt.set_hyperparams(state, lr=0.02)
    state = step(jnp.zeros(1), state)
    assert len(traces) == 1
    # The 4th step (i = 3) uses the schedule's shape with base 0.02 instead of 0.1.
    assert float(kopt.get_hyperparams(state)["current_lr"]) == pytest.approx(cosine_reference(3, 0.02, 20), rel=1e-5)


def test_joined_schedules_expose_each_part():
    opt = kopt.SGD(lr=kopt.join_schedules([kopt.linear_warmup(0.1, 2), kopt.exponential_decay(0.1, 5, 0.5)], [2]))
    state = opt.init(jnp.zeros(1))
    assert {"lr_0", "init_lr_0", "lr_1", "decay_rate_1"} <= set(kopt.get_hyperparams(state))
    state = kopt.set_hyperparams(state, lr_1=0.4)
    for _ in range(4):
        _, state = opt.update(jnp.ones(1), state)
    assert float(kopt.get_hyperparams(state)["current_lr"]) == pytest.approx(0.4 * 0.5 ** (1 / 5), rel=1e-6)


def test_current_lr_is_read_only_and_plain_functions_are_reported():
    opt = kopt.SGD(lr=lambda step: 0.1 / (1.0 + step))
    state = opt.init(jnp.zeros(1))
    for _ in range(3):
        _, state = opt.update(jnp.ones(1), state)
    assert float(kopt.get_hyperparams(state)["current_lr"]) == pytest.approx(0.1 / 3, rel=1e-6)
    with pytest.raises(ValueError, match="current_lr cannot be set"):
        kopt.set_hyperparams(state, current_lr=0.5)
    with pytest.raises(ValueError, match=r"no hyperparameter named 'lr'.*current_lr"):
        kopt.set_hyperparams(state, lr=0.5)  # a plain function has no base value to rescale


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: kopt.exponential_decay(0.1, 0, 0.5), r"decay_steps must be an integer >= 1"),
        (lambda: kopt.exponential_decay(0.1, 10, -0.5), r"decay_rate must be > 0"),
        (lambda: kopt.piecewise_constant(0.1, [5, 3], [0.5, 0.5]), r"boundaries must be strictly increasing"),
        (lambda: kopt.piecewise_constant(0.1, [5], [0.5, 0.5]), r"same length"),
        (lambda: kopt.polynomial_decay(0.1, -1.0, 10), r"end_lr must be >= 0"),
        (lambda: kopt.cosine_decay(0.1, 10, alpha=1.5), r"alpha must be in \[0, 1\]"),
        (lambda: kopt.cosine_decay(0.1, 10, restarts=True, t_mul=0.0), r"t_mul must be > 0"),
        (lambda: kopt.linear_warmup(0.1, 2.5), r"warmup_steps must be an integer"),
        (lambda: kopt.join_schedules([kopt.constant_schedule(0.1)], [3]), r"len\(schedules\) - 1 boundaries"),
        (lambda: kopt.join_schedules([kopt.constant_schedule(0.1), lambda s: s], [3]), r"schedules\[1\] must be"),
    ],
)
def test_schedule_validation(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_state_shapes_are_stable_with_schedules():
    opt = kopt.Nadam(lr=kopt.cosine_decay(0.01, 10, restarts=True))
    state = opt.init(jnp.zeros(3))
    _, new = opt.update(jnp.ones(3), state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
