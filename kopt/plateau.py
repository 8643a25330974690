"""Reduce on plateau: Keras' ``ReduceLROnPlateau`` callback as a transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, Params, Updates, expects
from kopt.state import current_hyperparams, init_hyperparams
from kopt.tree import hyperparam_dtype, map_arrays
from kopt.validation import check_count, check_hyperparam


class ReduceOnPlateauState(NamedTuple):
    scale: jax.Array  # the factor applied to the updates
    best: jax.Array  # lowest monitored value seen
    wait: jax.Array  # steps since the last improvement
    cooldown_counter: jax.Array
    hyperparams: dict[str, jax.Array]


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    min_delta: float = 1e-4,
    cooldown: int = 0,
    min_scale: float = 0.0,
) -> GradientTransformation:
    """Scales updates by ``factor`` when a monitored value stops improving.

    Pass the value to every update: ``opt.update(grads, state, params, value=loss)``
    (``kopt.chain`` forwards it). Per call, as Keras' ``ReduceLROnPlateau``
    (mode ``min``) per epoch: a cooldown in progress counts down and clears
    ``wait``; ``value < best - min_delta`` is an improvement (``best <- value``,
    ``wait <- 0``); otherwise, outside cooldown, ``wait`` grows and on reaching
    ``patience``, if ``scale > min_scale``, ``scale <- max(scale * factor,
    min_scale)``, ``wait <- 0`` and the cooldown restarts at ``cooldown``. The
    new scale applies to this call's updates. A NaN value never improves.
    Defaults ``factor=0.1, patience=10, min_delta=1e-4, cooldown=0,
    min_scale=0``; all five are hyperparameters in the state.

    Example:
        >>> import kopt
        >>> opt = kopt.chain(kopt.Adam(), kopt.reduce_on_plateau(factor=0.5, patience=5))
    """
    floats = {
        "factor": check_hyperparam("factor", factor),
        "min_delta": check_hyperparam("min_delta", min_delta),
        "min_scale": check_hyperparam("min_scale", min_scale),
    }
    counts = {
        "patience": check_count("patience", patience, minimum=0),
        "cooldown": check_count("cooldown", cooldown, minimum=0),
    }

    def init(params: Params) -> ReduceOnPlateauState:
        dtype = hyperparam_dtype(params)
        hyperparams = init_hyperparams(floats, params) | {k: jnp.asarray(v, jnp.int32) for k, v in counts.items()}
        # Separate buffers for the counters: a donated state must not hold one buffer twice.
        wait, cooldown_counter = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
        return ReduceOnPlateauState(
            jnp.ones((), dtype), jnp.asarray(jnp.inf, dtype), wait, cooldown_counter, hyperparams
        )

    @expects(ReduceOnPlateauState)
    def update(
        updates: Updates,
        state: ReduceOnPlateauState,
        params: Params | None = None,
        *,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[Updates, ReduceOnPlateauState]:
        del params, extra_args
        if value is None:
            raise ValueError("reduce_on_plateau needs the monitored value: update(updates, state, params, value=loss)")
        hp = current_hyperparams(state.hyperparams, {**floats, **counts})
        value = jnp.asarray(value, state.best.dtype)
        in_cooldown = state.cooldown_counter > 0
        cooldown_counter = jnp.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
        wait = jnp.where(in_cooldown, 0, state.wait)
        improved = value < state.best - hp["min_delta"]
        best = jnp.where(improved, value, state.best)
        waiting = ~improved & (cooldown_counter <= 0)  # Keras re-reads the cooldown after counting it down
        wait = jnp.where(improved, 0, jnp.where(waiting, wait + 1, wait))
        reduce = waiting & (wait >= hp["patience"]) & (state.scale > hp["min_scale"])
        scale = jnp.where(reduce, jnp.maximum(state.scale * hp["factor"], hp["min_scale"]), state.scale)
        new_state = ReduceOnPlateauState(
            scale,
            best,
            jnp.where(reduce, 0, wait),
            jnp.where(reduce, hp["cooldown"], cooldown_counter),
            hp,
        )
        (updates,) = map_arrays(lambda g: (scale * g,), updates)
        return updates, new_state

    return GradientTransformation(init, update)
