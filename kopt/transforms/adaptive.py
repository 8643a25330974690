"""The adaptive rules of the Keras 2 optimizers: RMSprop, Adagrad, Adadelta, Adam (AMSGrad), Adamax, Nadam."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, Updates, expects
from kopt.state import current_hyperparams, init_hyperparams
from kopt.transforms._common import HyperParams, _checked, _increment, _step_number, _zero_count
from kopt.tree import abs_sq, hyperparam_dtype, map_arrays, zeros_slots
from kopt.validation import check_bool, check_hyperparam, check_state_dtype

# --------------------------------------------------------------------------- RMSprop, Adagrad


class ScaleByRmsState(NamedTuple):
    accumulator: Updates
    mean_grad: Updates | None
    hyperparams: HyperParams


def _root(x, epsilon, epsilon_in_sqrt):
    """``sqrt(x + epsilon)`` or ``sqrt(x) + epsilon``: where epsilon sits is where the Keras versions differ."""
    return jnp.sqrt(epsilon + x) if epsilon_in_sqrt else epsilon + jnp.sqrt(x)


def _rms_array(g, accumulator, mean_grad, rho, epsilon, epsilon_in_sqrt):
    accumulator = rho * accumulator + (1 - rho) * abs_sq(g)
    second_moment = accumulator
    if mean_grad is not None:
        mean_grad = rho * mean_grad + (1 - rho) * g
        second_moment = accumulator - abs_sq(mean_grad)
    return g / _root(second_moment, epsilon, epsilon_in_sqrt), accumulator, mean_grad


def scale_by_rms(
    rho: float = 0.9,
    epsilon: float = 1e-7,
    state_dtype: Any = None,
    *,
    centered: bool = False,
    epsilon_in_sqrt: bool = False,
) -> GradientTransformation:
    """RMSprop's scaling (Keras 2): ``a <- rho*a + (1-rho)*g**2``; ``g <- g / (sqrt(a) + epsilon)``.

    ``a`` starts at zero; the new ``a`` (including this gradient) is used, and
    ``epsilon`` is added outside the square root. Defaults ``rho=0.9``,
    ``epsilon=1e-7``.

    Two options of TensorFlow's RMSprop (off by default, Keras 2.2.4 has neither):
    ``centered=True`` also keeps ``mean_grad <- rho*mean_grad + (1-rho)*g`` and
    divides by ``sqrt(a - mean_grad**2)`` (a variance, not a raw second moment);
    ``epsilon_in_sqrt=True`` divides by ``sqrt(a + epsilon)`` instead, as TF's
    RMSprop with momentum and TF >= 2.11's RMSprop do.

    Example:
        >>> import kopt
        >>> rmsprop = kopt.chain(kopt.scale_by_rms(0.9), kopt.scale_by_learning_rate(1e-3))
    """
    values = _checked(rho=rho, epsilon=epsilon)
    state_dtype = check_state_dtype(state_dtype)
    centered = check_bool("centered", centered)
    epsilon_in_sqrt = check_bool("epsilon_in_sqrt", epsilon_in_sqrt)

    def init(params):
        mean_grad = zeros_slots(params, state_dtype) if centered else None
        accumulator = zeros_slots(params, state_dtype, real=True)
        return ScaleByRmsState(accumulator, mean_grad, init_hyperparams(values, params))

    @expects(ScaleByRmsState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        rho, epsilon = hp["rho"], hp["epsilon"]
        updates, accumulator, mean_grad = map_arrays(
            lambda g, a, mg: _rms_array(g, a, mg, rho, epsilon, epsilon_in_sqrt),
            updates,
            state.accumulator,
            state.mean_grad,
        )
        return updates, ScaleByRmsState(accumulator, mean_grad, hp)

    return GradientTransformation(init, update)


class ScaleByAdagradState(NamedTuple):
    accumulator: Updates
    hyperparams: HyperParams


def _adagrad_array(g, accumulator, epsilon, epsilon_in_sqrt):
    accumulator = accumulator + abs_sq(g)
    return g / _root(accumulator, epsilon, epsilon_in_sqrt), accumulator


def scale_by_adagrad(
    epsilon: float = 1e-7,
    state_dtype: Any = None,
    *,
    initial_accumulator_value: float = 0.0,
    epsilon_in_sqrt: bool = False,
) -> GradientTransformation:
    """Adagrad's scaling (Keras 2): ``a <- a + g**2``; ``g <- g / (sqrt(a) + epsilon)``.

    ``a`` starts at ``initial_accumulator_value``: 0 by default, as in Keras
    2.2.4 (TensorFlow's Keras and optax start at 0.1). ``epsilon_in_sqrt=True``
    divides by ``sqrt(a + epsilon)``, as TF >= 2.11's Adagrad does. Default
    ``epsilon=1e-7``.

    Example:
        >>> import kopt
        >>> adagrad = kopt.chain(kopt.scale_by_adagrad(), kopt.scale_by_learning_rate(0.01))
    """
    values = _checked(epsilon=epsilon)
    initial = check_hyperparam("initial_accumulator_value", initial_accumulator_value)
    state_dtype = check_state_dtype(state_dtype)
    epsilon_in_sqrt = check_bool("epsilon_in_sqrt", epsilon_in_sqrt)

    def init(params):
        accumulator = jax.tree.map(lambda zeros: zeros + initial, zeros_slots(params, state_dtype, real=True))
        return ScaleByAdagradState(accumulator, init_hyperparams(values, params))

    @expects(ScaleByAdagradState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        epsilon = hp["epsilon"]
        updates, accumulator = map_arrays(
            lambda g, a: _adagrad_array(g, a, epsilon, epsilon_in_sqrt), updates, state.accumulator
        )
        return updates, ScaleByAdagradState(accumulator, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- Adadelta


class ScaleByAdadeltaState(NamedTuple):
    accumulator: Updates
    delta_accumulator: Updates
    hyperparams: HyperParams


def _adadelta_array(g, accumulator, delta_accumulator, rho, one_minus_rho, epsilon):
    accumulator = rho * accumulator + one_minus_rho * abs_sq(g)
    step = g * jnp.sqrt(delta_accumulator + epsilon) / jnp.sqrt(accumulator + epsilon)
    delta_accumulator = rho * delta_accumulator + one_minus_rho * abs_sq(step)
    return step, accumulator, delta_accumulator


def scale_by_adadelta(rho: float = 0.95, epsilon: float = 1e-7, state_dtype: Any = None) -> GradientTransformation:
    """Adadelta's scaling (Keras 2), without the learning rate.

    ``a <- rho*a + (1-rho)*g**2``; ``u = g * sqrt(d + epsilon) / sqrt(a + epsilon)``
    (new ``a``, old ``d``); ``d <- rho*d + (1-rho)*u**2``; output ``u``.
    ``epsilon`` is inside both roots; ``d`` holds steps without the learning
    rate. Defaults ``rho=0.95``, ``epsilon=1e-7``.

    Example:
        >>> import kopt
        >>> adadelta = kopt.chain(kopt.scale_by_adadelta(), kopt.scale_by_learning_rate(1.0))
    """
    values = _checked(rho=rho, epsilon=epsilon)
    state_dtype = check_state_dtype(state_dtype)

    def init(params):
        return ScaleByAdadeltaState(
            zeros_slots(params, state_dtype, real=True),
            zeros_slots(params, state_dtype, real=True),
            init_hyperparams(values, params),
        )

    @expects(ScaleByAdadeltaState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        rho, epsilon = hp["rho"], hp["epsilon"]
        # Keras keeps Adadelta's rho as a Python number, so its 1 - rho is formed in
        # double precision before rounding; while rho is the constructor's value, use that.
        one_minus_rho = jnp.where(
            rho == jnp.asarray(values["rho"], rho.dtype), jnp.asarray(1 - values["rho"], rho.dtype), 1 - rho
        )
        updates, accumulator, delta_accumulator = map_arrays(
            lambda g, a, d: _adadelta_array(g, a, d, rho, one_minus_rho, epsilon),
            updates,
            state.accumulator,
            state.delta_accumulator,
        )
        return updates, ScaleByAdadeltaState(accumulator, delta_accumulator, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- Adam, Adamax


class ScaleByAdamState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    m: Updates
    v: Updates
    vhat: Updates | None
    hyperparams: HyperParams


def _adam_array(g, m, v, vhat, betas, epsilon, corrections, corrected_epsilon):
    beta_1, one_minus_beta_1, beta_2, one_minus_beta_2 = betas
    m = beta_1 * m + one_minus_beta_1 * g
    v = beta_2 * v + one_minus_beta_2 * abs_sq(g)
    if vhat is not None:
        vhat = jnp.maximum(vhat, v)
    second = v if vhat is None else vhat
    if corrected_epsilon:  # epsilon meets the corrected root (Keras 3's Lamb, optax's adam)
        first_correction, second_correction = corrections
        return (m / first_correction) / (jnp.sqrt(second / second_correction) + epsilon), m, v, vhat
    (bias_correction,) = corrections
    return bias_correction * (m / (epsilon + jnp.sqrt(second))), m, v, vhat


def scale_by_adam(
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    state_dtype: Any = None,
    corrected_epsilon: bool = False,
) -> GradientTransformation:
    """Adam's scaling (Keras 2), bias correction folded into the step size.

    ``m <- beta_1*m + (1-beta_1)*g``; ``v <- beta_2*v + (1-beta_2)*g**2``;
    output ``c_t * m / (sqrt(v) + epsilon)`` with
    ``c_t = sqrt(1 - beta_2**t) / (1 - beta_1**t)``. ``m`` and ``v`` are stored
    uncorrected and ``epsilon`` meets the uncorrected ``sqrt(v)``, so this is
    *not* optax's ``scale_by_adam`` with the same ``epsilon``. With
    ``corrected_epsilon=True`` (Keras 3's Lamb, and optax's form) the output is
    ``(m / (1 - beta_1**t)) / (sqrt(v / (1 - beta_2**t)) + epsilon)``. With
    ``amsgrad=True``, ``vhat <- max(vhat, v)`` replaces ``v`` in the
    denominator (``v`` keeps its EMA). Defaults ``0.9, 0.999, 1e-7, False, None, False``.

    Example:
        >>> import kopt
        >>> adam = kopt.chain(kopt.scale_by_adam(amsgrad=True), kopt.scale_by_learning_rate(1e-3))
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    state_dtype = check_state_dtype(state_dtype)
    amsgrad = check_bool("amsgrad", amsgrad)
    corrected_epsilon = check_bool("corrected_epsilon", corrected_epsilon)

    def init(params):
        vhat = zeros_slots(params, state_dtype, real=True) if amsgrad else None
        return ScaleByAdamState(
            _zero_count(),
            zeros_slots(params, state_dtype),
            zeros_slots(params, state_dtype, real=True),
            vhat,
            init_hyperparams(values, params),
        )

    @expects(ScaleByAdamState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        beta_1, beta_2, epsilon = hp["beta_1"], hp["beta_2"], hp["epsilon"]
        t = _step_number(state.count, beta_1.dtype)
        corrections: tuple[jax.Array, ...] = (1 - beta_1**t, 1 - beta_2**t)
        if not corrected_epsilon:  # one scalar, folded into the step size
            corrections = (jnp.sqrt(corrections[1]) / corrections[0],)
        # 1 - beta formed once a step, not once a leaf: a smaller program for XLA's passes (same numbers)
        betas = (beta_1, 1 - beta_1, beta_2, 1 - beta_2)
        updates, m, v, vhat = map_arrays(
            lambda g, m, v, vhat: _adam_array(g, m, v, vhat, betas, epsilon, corrections, corrected_epsilon),
            updates,
            state.m,
            state.v,
            state.vhat,
        )
        return updates, ScaleByAdamState(_increment(state.count), m, v, vhat, hp)

    return GradientTransformation(init, update)


class ScaleByAdamaxState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    m: Updates
    u: Updates
    hyperparams: HyperParams


def _adamax_array(g, m, u, beta_1, beta_2, epsilon, bias_correction):
    m = beta_1 * m + (1 - beta_1) * g
    u = jnp.maximum(beta_2 * u, jnp.abs(g))
    return bias_correction * (m / (epsilon + u)), m, u


def scale_by_adamax(
    beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, state_dtype: Any = None
) -> GradientTransformation:
    """Adamax's scaling (Keras 2): Adam with an infinity norm.

    ``m <- beta_1*m + (1-beta_1)*g``; ``u <- max(beta_2*u, |g|)``; output
    ``c_t * m / (u + epsilon)`` with ``c_t = 1 / (1 - beta_1**t)``. ``epsilon``
    is added to ``u`` and ``beta_2`` enters no correction. Defaults
    ``0.9, 0.999, 1e-7``.

    Example:
        >>> import kopt
        >>> adamax = kopt.chain(kopt.scale_by_adamax(), kopt.scale_by_learning_rate(2e-3))
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    state_dtype = check_state_dtype(state_dtype)

    def init(params):
        return ScaleByAdamaxState(
            _zero_count(),
            zeros_slots(params, state_dtype),
            zeros_slots(params, state_dtype, real=True),
            init_hyperparams(values, params),
        )

    @expects(ScaleByAdamaxState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        beta_1, beta_2, epsilon = hp["beta_1"], hp["beta_2"], hp["epsilon"]
        bias_correction = 1 / (1 - beta_1 ** _step_number(state.count, beta_1.dtype))
        updates, m, u = map_arrays(
            lambda g, m, u: _adamax_array(g, m, u, beta_1, beta_2, epsilon, bias_correction),
            updates,
            state.m,
            state.u,
        )
        return updates, ScaleByAdamaxState(_increment(state.count), m, u, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- Nadam


class ScaleByNadamState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    m: Updates
    v: Updates
    m_schedule: jax.Array
    hyperparams: HyperParams


class _NadamScalars(NamedTuple):
    mu_t: jax.Array
    mu_next: jax.Array
    m_schedule_new: jax.Array
    m_schedule_next: jax.Array
    v_correction: jax.Array


def _nadam_array(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    beta_1: jax.Array,
    beta_2: jax.Array,
    epsilon: jax.Array,
    s: _NadamScalars,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    g_hat = g / (1 - s.m_schedule_new)
    m = beta_1 * m + (1 - beta_1) * g
    m_hat = m / (1 - s.m_schedule_next)
    v = beta_2 * v + (1 - beta_2) * abs_sq(g)
    v_hat = v / s.v_correction
    m_bar = (1 - s.mu_t) * g_hat + s.mu_next * m_hat
    return m_bar / (jnp.sqrt(v_hat) + epsilon), m, v


def scale_by_nadam(
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    schedule_decay: float = 0.004,
    state_dtype: Any = None,
) -> GradientTransformation:
    """Nadam's scaling (Keras 2), with its momentum schedule.

    ``mu_t = beta_1 * (1 - 0.5 * 0.96**(t * schedule_decay))``, ``M`` the running
    product ``mu_1 ... mu_t`` (state ``m_schedule``, starts at 1)::

        g_hat = g / (1 - M*mu_t)
        m <- beta_1*m + (1-beta_1)*g;     m_hat = m / (1 - M*mu_t*mu_{t+1})
        v <- beta_2*v + (1-beta_2)*g**2;  v_hat = v / (1 - beta_2**t)
        output ((1-mu_t)*g_hat + mu_{t+1}*m_hat) / (sqrt(v_hat) + epsilon)

    ``epsilon`` meets the bias-corrected ``v`` here (unlike Adam). Defaults
    ``0.9, 0.999, 1e-7, 0.004``.

    Example:
        >>> import kopt
        >>> nadam = kopt.chain(kopt.scale_by_nadam(), kopt.scale_by_learning_rate(2e-3))
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, schedule_decay=schedule_decay)
    state_dtype = check_state_dtype(state_dtype)

    def init(params):
        m_schedule = jnp.ones((), hyperparam_dtype(params))
        return ScaleByNadamState(
            _zero_count(),
            zeros_slots(params, state_dtype),
            zeros_slots(params, state_dtype, real=True),
            m_schedule,
            init_hyperparams(values, params),
        )

    @expects(ScaleByNadamState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        beta_1, beta_2, epsilon = hp["beta_1"], hp["beta_2"], hp["epsilon"]
        t = _step_number(state.count, beta_1.dtype)
        base = jnp.asarray(0.96, beta_1.dtype)
        mu_t = beta_1 * (1 - 0.5 * base ** (t * hp["schedule_decay"]))
        mu_next = beta_1 * (1 - 0.5 * base ** ((t + 1) * hp["schedule_decay"]))
        m_schedule_new = state.m_schedule * mu_t
        scalars = _NadamScalars(mu_t, mu_next, m_schedule_new, m_schedule_new * mu_next, 1 - beta_2**t)
        updates, m, v = map_arrays(
            lambda g, m, v: _nadam_array(g, m, v, beta_1, beta_2, epsilon, scalars), updates, state.m, state.v
        )
        return updates, ScaleByNadamState(_increment(state.count), m, v, m_schedule_new, hp)

    return GradientTransformation(init, update)
