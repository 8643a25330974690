"""What every transformation module shares: the step counter and hyperparameter checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kopt.validation import check_hyperparam

HyperParams = dict[str, jax.Array]


def _zero_count() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def _increment(count: jax.Array) -> jax.Array:
    # Saturate instead of wrapping to a negative step after 2**31 - 1 steps.
    return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def _step_number(count: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
    """``t = float(i) + 1`` in the hyperparameters' dtype, as Keras forms it."""
    return count.astype(dtype) + 1


def _checked(**values: float) -> dict[str, float]:
    return {name: check_hyperparam(name, value) for name, value in values.items()}
