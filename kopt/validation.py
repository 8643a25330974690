"""Argument checks shared by every constructor and by ``set_hyperparams``.

Each hyperparameter name has one allowed range, kept in :data:`RANGES`; a value
outside it is a ``ValueError`` naming the argument, the range and the value.
Nothing is clamped. A traced value (inside ``jit``, e.g. from
``optax.inject_hyperparams``) is checked for shape and dtype only: its value is
not known until it runs.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np


class Range(NamedTuple):
    """An interval of allowed values; ``str`` gives it as the error messages show it."""

    low: float
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = True

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"
        left, right = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"

    def __contains__(self, value: Any) -> bool:  # a real number; Any as tuple.__contains__ takes any object
        above = self.low <= value if self.low_inclusive else self.low < value
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below


NON_NEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_inclusive=False)
UNIT_INTERVAL = Range(0.0, 1.0, high_inclusive=False)

#: The allowed range of every numeric hyperparameter kopt knows, by name.
RANGES: dict[str, Range] = {
    "lr": NON_NEGATIVE,
    "decay": NON_NEGATIVE,
    "momentum": NON_NEGATIVE,
    "rho": UNIT_INTERVAL,
    "beta_1": UNIT_INTERVAL,
    "beta_2": UNIT_INTERVAL,
    "epsilon": NON_NEGATIVE,
    "schedule_decay": NON_NEGATIVE,
    "initial_accumulator_value": NON_NEGATIVE,
    "max_norm": POSITIVE,
    "max_delta": POSITIVE,
    # schedules
    "decay_rate": POSITIVE,
    "end_lr": NON_NEGATIVE,
    "init_lr": NON_NEGATIVE,
    "power": NON_NEGATIVE,
    "alpha": Range(0.0, 1.0),
    "m_mul": NON_NEGATIVE,
    "scale": NON_NEGATIVE,
    # training-loop transforms
    "weight_decay": NON_NEGATIVE,
    "factor": Range(0.0, 1.0, low_inclusive=False, high_inclusive=False),
    "min_delta": NON_NEGATIVE,
    "min_scale": NON_NEGATIVE,
    "slow_step_size": Range(0.0, 1.0, low_inclusive=False),
    "ema_decay": Range(0.0, 1.0, high_inclusive=False),
    "ema_momentum": Range(0.0, 1.0),
    "loss_scale_factor": Range(0.0, low_inclusive=False),
    "initial_scale": Range(0.0, low_inclusive=False),
    "patience": NON_NEGATIVE,
    "cooldown": NON_NEGATIVE,
}


def range_of(name: str) -> Range | None:
    """The range of ``name``; ``lr_1`` (a joined schedule's ``lr``) has the range of ``lr``."""
    if name in RANGES:
        return RANGES[name]
    base, _, suffix = name.rpartition("_")
    return RANGES.get(base) if suffix.isdigit() else None


def is_concrete(value: Any) -> bool:
    """Whether ``value`` is known now (not a tracer inside ``jit``)."""
    return not isinstance(value, jax.core.Tracer)


# The checks below return a Python number for a Python number, and for anything else (a NumPy or JAX
# scalar) a Python number when it is concrete or the traced array itself inside ``jit``: the overloads
# say so, so that a constructor's ``float`` argument stays a ``float`` for the type checker.
@overload
def as_real(name: str, value: float) -> float: ...
@overload
def as_real(name: str, value: Any) -> float | jax.Array: ...
def as_real(name: str, value: Any) -> float | jax.Array:
    """``value`` as a finite Python float, or a ``ValueError`` naming ``name``.

    A traced scalar (a hyperparameter inside ``jit``, as ``optax.inject_hyperparams``
    passes them) is checked for its shape and dtype only and returned as it is.
    """
    if type(value) in (float, int):  # the common case, without NumPy's overhead (configs hold thousands)
        try:
            result = float(value)
        except OverflowError:
            raise ValueError(f"{name} must be finite, got an integer of {value.bit_length()} bits") from None
        if not math.isfinite(result):
            raise ValueError(f"{name} must be finite, got {result}")
        return result
    # A flag, so that value is not narrowed to numbers.Real, which NumPy's stubs do not take.
    real_like = isinstance(value, (numbers.Real, np.ndarray, jax.Array))
    if isinstance(value, (bool, np.bool_)) or not real_like:
        raise ValueError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}")
    dtype = value.dtype if isinstance(value, (np.ndarray, jax.Array)) else np.asarray(value).dtype
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not is_concrete(value):
        return value
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


@overload
def check_hyperparam(name: str, value: float) -> float: ...
@overload
def check_hyperparam(name: str, value: Any) -> float | jax.Array: ...
def check_hyperparam(name: str, value: Any) -> float | jax.Array:
    """Checks ``value`` against the range of hyperparameter ``name``; returns it as a Python float.

    A traced value (see :func:`kopt.state.current_hyperparams`) is checked for
    shape and dtype only, its value being unknown until it runs, and returned
    as it is.
    """
    result = as_real(name, value)
    if not is_concrete(result):
        return result
    allowed = range_of(name)
    if allowed is not None and result not in allowed:
        raise ValueError(f"{name} must be {allowed}, got {result}")
    return result


@overload
def check_count(name: str, value: int, *, minimum: int = 1) -> int: ...
@overload
def check_count(name: str, value: Any, *, minimum: int = 1) -> int | jax.Array: ...
def check_count(name: str, value: Any, *, minimum: int = 1) -> int | jax.Array:
    """An integer number of steps, ``>= minimum``; a traced integer scalar is returned as it is."""
    if isinstance(value, jax.Array) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
        if not is_concrete(value):
            return value
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


@overload
def check_state_dtype(value: None) -> None: ...
@overload
def check_state_dtype(value: Any) -> np.dtype: ...
def check_state_dtype(value: Any) -> np.dtype | None:
    """``state_dtype``: ``None`` (each slot follows its param) or a floating dtype."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"state_dtype must be None or a floating dtype, got {value!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"state_dtype must be None or a floating dtype (e.g. 'bfloat16', 'float32'), got {dtype}")
    return dtype


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@overload
def check_clip_option(name: str, value: float) -> float: ...
@overload
def check_clip_option(name: str, value: None) -> None: ...
@overload
def check_clip_option(name: str, value: Any) -> float | jax.Array | None: ...
def check_clip_option(name: str, value: Any) -> float | jax.Array | None:
    """A Keras ``clipnorm``/``clipvalue`` option: ``None`` or ``0`` mean off, else ``> 0``.

    A traced value (``optax.inject_hyperparams`` under ``jit``) switches the clip on;
    it must then be ``> 0`` when it runs, as it cannot be checked here.
    """
    if value is None:
        return None
    result = as_real(name, value)
    if not is_concrete(result):  # traced: on, whatever its value turns out to be
        return result
    if result < 0:
        raise ValueError(f"{name} must be None (off), 0 (off) or > 0, got {result}")
    return result
