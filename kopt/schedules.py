"""Learning-rate schedules whose numbers live in the optimizer state.

A :class:`Schedule` is a function ``fn(step, **hyperparams) -> lr`` together
with the initial values of its hyperparameters. ``scale_by_learning_rate``
stores those values as arrays in its state and calls ``fn`` with them every
step, so ``kopt.set_hyperparams(state, lr=...)`` changes the schedule of a
jitted train step without recompiling it. Calling a schedule directly,
``schedule(step)``, evaluates it at its initial values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kopt.validation import check_hyperparam


class Schedule(NamedTuple):
    """``fn(step, **hyperparams) -> lr`` plus the initial ``hyperparams``."""

    fn: Callable[..., jax.Array]
    hyperparams: Mapping[str, float]

    def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
        values = {name: jnp.asarray(value) for name, value in self.hyperparams.items()}
        return self.fn(jnp.asarray(step), **values)


def _constant(step: jax.Array, lr: jax.Array) -> jax.Array:
    del step
    return lr


def constant_schedule(lr: float) -> Schedule:
    """``lr_i = lr`` at every step.

    Example:
        >>> import kopt
        >>> float(kopt.constant_schedule(0.1)(7))
        0.1...
    """
    return Schedule(_constant, {"lr": check_hyperparam("lr", lr)})


def _inverse_time(step: jax.Array, lr: jax.Array, decay: jax.Array) -> jax.Array:
    # Keras 2 forms the reciprocal first and then multiplies; the float32 bits
    # depend on that order.
    return lr * (1.0 / (1.0 + decay * step.astype(decay.dtype)))


def inverse_time_decay(lr: float, decay: float) -> Schedule:
    """Keras 2's ``decay``: ``lr_i = lr * (1 / (1 + decay * i))``.

    ``i`` is the number of steps taken before this one, so the first step uses
    ``lr`` itself. ``lr`` and ``decay`` are hyperparameters in the state.

    Example:
        >>> import kopt
        >>> schedule = kopt.inverse_time_decay(0.1, decay=1.0)
        >>> [round(float(schedule(i)), 4) for i in range(3)]
        [0.1, 0.05, 0.0333]
    """
    return Schedule(
        _inverse_time,
        {"lr": check_hyperparam("lr", lr), "decay": check_hyperparam("decay", decay)},
    )
