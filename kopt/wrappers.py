"""Wrappers that decide *whether* an inner transformation steps: non-finite guard, accumulation.

Both run under ``jit`` without Python control flow on traced values: the inner
update is computed and kept or discarded with ``jnp.where``, so its state's
shapes and dtypes never change.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, OptState, Params, Updates, accepted_extra_args, expects
from kopt.tree import all_finite, cast_like, map_arrays, select, zeros_slots
from kopt.validation import check_count


class SkipNonfiniteState(NamedTuple):
    inner_state: OptState
    skipped: jax.Array  # steps skipped so far
    consecutive: jax.Array  # skips in a row, reset by a finite step


def skip_nonfinite(inner: GradientTransformation, max_consecutive: int | None = None) -> GradientTransformation:
    """Skips a step whose gradients hold a NaN or an Inf.

    A skipped step returns zero updates (params unchanged) and leaves the inner
    state exactly as it was; ``skipped`` and ``consecutive`` in the state count
    the skips (``kopt.get_slot(state, "skipped")``). With ``max_consecutive=k``,
    after ``k`` skips in a row the next non-finite step is let through (the
    non-finite values reach the params and the inner state, so divergence
    shows) and ``consecutive`` restarts at 0. ``None`` skips forever.

    Example:
        >>> import kopt
        >>> opt = kopt.skip_nonfinite(kopt.Adam(), max_consecutive=10)
    """
    if max_consecutive is not None:
        max_consecutive = check_count("max_consecutive", max_consecutive, minimum=0)
    keep = accepted_extra_args(inner.update)

    def init(params: Params) -> SkipNonfiniteState:
        # Two separate buffers: a donated state must not hold one buffer twice.
        return SkipNonfiniteState(inner.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    @expects(SkipNonfiniteState)
    def update(updates: Updates, state: SkipNonfiniteState, params: Params | None = None, **extra_args):
        finite = all_finite(updates)
        step = finite if max_consecutive is None else finite | (state.consecutive >= max_consecutive)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **keep(extra_args))
        zeros = jax.tree.map(jnp.zeros_like, new_updates)
        skipped = ~step
        return select(step, new_updates, zeros), SkipNonfiniteState(
            select(step, new_inner, state.inner_state),
            state.skipped + skipped.astype(jnp.int32),
            jnp.where(skipped, state.consecutive + 1, 0),
        )

    return GradientTransformation(init, update)


class AccumulateState(NamedTuple):
    inner_state: OptState
    grad_sum: Updates
    micro_step: jax.Array  # calls since the last inner step, in [0, every_k)


def accumulate(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    """Averages ``every_k`` micro-batch gradients and steps ``inner`` once on their mean.

    Calls ``1 .. k-1`` of each cycle return zero updates and leave the inner
    state alone; call ``k`` gives ``inner``'s update for ``sum(g) / k``, which
    equals one step on the mean gradient of the ``k`` micro-batches. The sums
    are kept in the slot dtype (at least float32). ``inner`` is evaluated on
    every call (its result discarded in between), so the program has no
    control flow on traced values.

    Example:
        >>> import kopt
        >>> opt = kopt.accumulate(kopt.Adam(), every_k=4)
    """
    every_k = check_count("every_k", every_k)
    keep = accepted_extra_args(inner.update)

    def init(params: Params) -> AccumulateState:
        return AccumulateState(inner.init(params), zeros_slots(params), jnp.zeros((), jnp.int32))

    @expects(AccumulateState)
    def update(updates: Updates, state: AccumulateState, params: Params | None = None, **extra_args):
        ready = state.micro_step + 1 == every_k
        _, grad_sum = map_arrays(lambda g, total: (g, total + g), updates, state.grad_sum)
        (mean,) = map_arrays(lambda total: (total / every_k,), grad_sum)
        new_updates, new_inner = inner.update(mean, state.inner_state, params, **keep(extra_args))
        new_updates = cast_like(new_updates, updates)  # the mean is in the sums' dtype: back to the gradients'
        zeros = jax.tree.map(jnp.zeros_like, new_updates)
        return select(ready, new_updates, zeros), AccumulateState(
            select(ready, new_inner, state.inner_state),
            select(ready, jax.tree.map(jnp.zeros_like, grad_sum), grad_sum),
            jnp.where(ready, 0, state.micro_step + 1),
        )

    return GradientTransformation(init, update)
