"""Momentum: the velocity of SGD and RMSprop (:func:`trace`) and Lion's sign of interpolated momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from kopt.base import GradientTransformation, Updates, expects
from kopt.state import current_hyperparams, init_hyperparams
from kopt.transforms._common import HyperParams, _checked
from kopt.tree import map_arrays, zeros_slots
from kopt.validation import check_bool, check_state_dtype

# --------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    velocity: Updates
    hyperparams: HyperParams


def _trace_array(u, velocity, momentum, nesterov):
    velocity = momentum * velocity + u
    return (momentum * velocity + u if nesterov else velocity), velocity


def trace(momentum: float = 0.0, nesterov: bool = False, state_dtype: Any = None) -> GradientTransformation:
    """Momentum on incoming updates ``u`` (Keras 2 SGD, when placed after the learning rate).

    ``velocity <- momentum * velocity + u``; the output is ``velocity``, or with
    ``nesterov=True`` the look-ahead ``momentum * velocity + u`` (new velocity).
    Chained after :func:`scale_by_learning_rate`, the velocity holds
    lr-scaled steps exactly as Keras' SGD does, so a decaying ``lr`` is not
    applied to old velocity again. Default ``momentum=0``.

    Example:
        >>> import kopt
        >>> sgd = kopt.chain(kopt.scale_by_learning_rate(0.01), kopt.trace(0.9, nesterov=True))
    """
    values = _checked(momentum=momentum)
    state_dtype = check_state_dtype(state_dtype)
    nesterov = check_bool("nesterov", nesterov)

    def init(params):
        return TraceState(zeros_slots(params, state_dtype), init_hyperparams(values, params))

    @expects(TraceState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        momentum = hp["momentum"]
        updates, velocity = map_arrays(lambda u, vel: _trace_array(u, vel, momentum, nesterov), updates, state.velocity)
        return updates, TraceState(velocity, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- Lion


class ScaleByLionState(NamedTuple):
    m: Updates
    hyperparams: HyperParams


def _lion_array(g, m, beta_1, beta_2):
    direction = jnp.sign(beta_1 * m + (1 - beta_1) * g)
    return direction, beta_2 * m + (1 - beta_2) * g


def scale_by_lion(beta_1: float = 0.9, beta_2: float = 0.99, state_dtype: Any = None) -> GradientTransformation:
    """Lion's sign update (Keras 3, tf_keras >= 2.13): each coordinate moves by exactly one step size.

    Output ``sign(beta_1*m + (1-beta_1)*g)``; then ``m <- beta_2*m + (1-beta_2)*g``
    (the output mixes ``m`` with ``beta_1``, the kept momentum with ``beta_2``).
    No step count, no epsilon. Defaults ``0.9, 0.99``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> lion = kopt.chain(kopt.scale_by_lion(), kopt.scale_by_learning_rate(1e-4))
        >>> updates, state = lion.update(jnp.array([0.5, -2.0, 0.0]), lion.init(jnp.zeros(3)))
        >>> (updates / 1e-4).round(3).tolist()  # one step size each way; none for a zero gradient
        [-1.0, 1.0, -0.0]
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2)
    state_dtype = check_state_dtype(state_dtype)

    def init(params):
        return ScaleByLionState(zeros_slots(params, state_dtype), init_hyperparams(values, params))

    @expects(ScaleByLionState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        updates, m = map_arrays(lambda g, m: _lion_array(g, m, hp["beta_1"], hp["beta_2"]), updates, state.m)
        return updates, ScaleByLionState(m, hp)

    return GradientTransformation(init, update)
