"""Wrappers that decide *whether* an inner transformation steps: non-finite guard, dynamic loss scale,
accumulation.

Both run under ``jit`` without Python control flow on traced values: the inner
update is computed and kept or discarded with ``jnp.where``, so its state's
shapes and dtypes never change.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, OptState, Params, Updates, accepted_extra_args, expects
from kopt.state import iterations, set_slot
from kopt.tree import all_finite, cast_like, map_arrays, select, zeros_slots
from kopt.validation import check_bool, check_count, check_hyperparam


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
    def update(
        updates: Updates, state: SkipNonfiniteState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, SkipNonfiniteState]:
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


def _held(inner_state: OptState, counted: bool) -> OptState:
    """``inner_state`` kept through a step ``inner`` did not take; with ``counted``, its step counters still
    advance (Keras counts such a step for the learning rate's schedule and the bias corrections)."""
    return set_slot(inner_state, "count", iterations(inner_state) + 1) if counted else inner_state


class DynamicLossScaleState(NamedTuple):
    inner_state: OptState
    loss_scale: jax.Array  # what to multiply the next step's loss by (float32)
    good_steps: jax.Array  # finite steps since the scale last changed


def dynamic_loss_scale(
    inner: GradientTransformation,
    initial_scale: float = 2.0**15,
    growth_steps: int | None = 2000,
    *,
    unscale: bool = True,
    min_scale: float = 0.0,
    count_skipped: bool = False,
) -> GradientTransformation:
    """Dynamic loss scaling for float16 training: a step with a NaN or an Inf in its gradients is skipped
    and halves the scale; ``growth_steps`` finite steps in a row double it.

    Multiply the loss by ``kopt.get_slot(state, "loss_scale")`` before
    differentiating it. With ``unscale=True`` (Keras 3's ``LossScaleOptimizer``)
    ``update`` takes those scaled gradients and divides them by the scale
    before ``inner`` sees them; with ``unscale=False`` (tf_keras', whose
    ``apply_gradients`` takes gradients already unscaled) they go to ``inner``
    as given. A skipped step returns zero updates and leaves ``inner``'s state
    as it was, its step count too, unless ``count_skipped=True`` (tf_keras:
    the skipped step still counts, for the learning rate's schedule and the
    bias corrections). The scale never falls below ``min_scale`` (tf_keras: 1,
    Keras 3: 0) and keeps its value when doubling it would overflow.
    ``growth_steps=None`` holds the scale fixed and skips nothing (tf_keras'
    ``dynamic=False``). Defaults ``2**15, 2000, True, 0, False``.

    Example:
        >>> import jax, jax.numpy as jnp, kopt
        >>> opt = kopt.dynamic_loss_scale(kopt.SGD(lr=0.1), initial_scale=2.0**15)
        >>> params = jnp.ones(2, jnp.float16)
        >>> state = opt.init(params)
        >>> def scaled_loss(p, scale):
        ...     return (scale * jnp.sum(p**2)).astype(jnp.float16)
        >>> grads = jax.grad(scaled_loss)(params, kopt.get_slot(state, "loss_scale"))  # 2**16 overflows float16
        >>> updates, state = opt.update(grads, state, params)
        >>> updates.tolist(), float(kopt.get_slot(state, "loss_scale"))  # skipped, scale halved
        ([0.0, 0.0], 16384.0)
        >>> grads = jax.grad(scaled_loss)(params, kopt.get_slot(state, "loss_scale"))
        >>> updates, state = opt.update(grads, state, params)
        >>> updates.tolist()  # -lr * 2p, unscaled (in float16)
        [-0.199951171875, -0.199951171875]
    """
    initial_scale = float(check_hyperparam("initial_scale", initial_scale))
    if growth_steps is not None:
        growth_steps = check_count("growth_steps", growth_steps)
    unscale = check_bool("unscale", unscale)
    count_skipped = check_bool("count_skipped", count_skipped)
    min_scale = float(check_hyperparam("min_scale", min_scale))
    keep = accepted_extra_args(inner.update)

    def init(params: Params) -> DynamicLossScaleState:
        return DynamicLossScaleState(
            inner.init(params), jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32)
        )

    @expects(DynamicLossScaleState)
    def update(
        updates: Updates, state: DynamicLossScaleState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, DynamicLossScaleState]:
        scale = state.loss_scale
        if unscale:
            updates = jax.tree.map(lambda g: (g / scale.astype(g.dtype)).astype(g.dtype), updates)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **keep(extra_args))
        if growth_steps is None:
            return new_updates, DynamicLossScaleState(new_inner, scale, state.good_steps)
        finite = all_finite(updates)
        grow = finite & (state.good_steps + 1 >= growth_steps)
        doubled = scale * 2
        grown = jnp.where(jnp.isfinite(doubled), doubled, scale)
        new_scale = jnp.where(finite, jnp.where(grow, grown, scale), jnp.maximum(scale * 0.5, min_scale))
        zeros = jax.tree.map(jnp.zeros_like, new_updates)
        return select(finite, new_updates, zeros), DynamicLossScaleState(
            select(finite, new_inner, _held(state.inner_state, count_skipped)),
            new_scale.astype(scale.dtype),
            jnp.where(finite & ~grow, state.good_steps + 1, 0).astype(jnp.int32),
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
    control flow on traced values. This is Keras 3's
    ``gradient_accumulation_steps`` (its ``iterations`` count the updates).

    Example:
        >>> import kopt
        >>> opt = kopt.accumulate(kopt.Adam(), every_k=4)
    """
    every_k = check_count("every_k", every_k)
    keep = accepted_extra_args(inner.update)

    def init(params: Params) -> AccumulateState:
        return AccumulateState(inner.init(params), zeros_slots(params), jnp.zeros((), jnp.int32))

    @expects(AccumulateState)
    def update(
        updates: Updates, state: AccumulateState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, AccumulateState]:
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
