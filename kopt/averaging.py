"""Averaging params over time: Lookahead, an exponential moving average of params, and Keras' ``use_ema``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, OptState, Params, Updates, accepted_extra_args, expects
from kopt.state import current_hyperparams, init_hyperparams
from kopt.tree import map_arrays, needs_params, slot_dtype
from kopt.validation import check_bool, check_count, check_hyperparam


def _copy_params(params: Params) -> Params:
    # A real copy: a state sharing the params' buffers could not be donated with them.
    return jax.tree.map(lambda p: jnp.array(p, slot_dtype(jnp.result_type(p)), copy=True), params)


def _moving_average(momentum: jax.Array, average: jax.Array, new: jax.Array) -> jax.Array:
    return momentum * average + (1 - momentum) * new


class LookaheadState(NamedTuple):
    inner_state: OptState
    slow: Params  # the slow weights
    step_in_period: jax.Array  # steps since the last sync
    hyperparams: dict[str, jax.Array]


def lookahead(
    inner: GradientTransformation, sync_period: int = 6, slow_step_size: float = 0.5
) -> GradientTransformation:
    """Lookahead (Zhang et al. 2019): fast weights follow ``inner``; every ``sync_period`` steps
    ``slow <- slow + slow_step_size * (fast - slow)`` and the params are reset to ``slow``.

    On other steps the update is ``inner``'s. ``slow`` starts as a copy of the
    params (readable as ``kopt.get_slot(state, "slow")``). Defaults
    ``sync_period=6, slow_step_size=0.5``; ``slow_step_size`` is a
    hyperparameter in the state.

    Example:
        >>> import kopt
        >>> opt = kopt.lookahead(kopt.Adam(), sync_period=5, slow_step_size=0.5)
    """
    sync_period = check_count("sync_period", sync_period)
    values = {"slow_step_size": check_hyperparam("slow_step_size", slow_step_size)}
    keep = accepted_extra_args(inner.update)

    def init(params: Params) -> LookaheadState:
        return LookaheadState(
            inner.init(params), _copy_params(params), jnp.zeros((), jnp.int32), init_hyperparams(values, params)
        )

    @expects(LookaheadState)
    def update(
        updates: Updates, state: LookaheadState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, LookaheadState]:
        needs_params(params, "lookahead")
        updates, inner_state = inner.update(updates, state.inner_state, params, **keep(extra_args))
        sync = state.step_in_period + 1 == sync_period
        hp = current_hyperparams(state.hyperparams, values)
        alpha = hp["slow_step_size"]

        def leaf(u, p, slow):
            fast = p + u
            synced = slow + alpha * (fast - slow)
            return jnp.where(sync, synced - p, u), p, jnp.where(sync, synced, slow)

        updates, _, slow = map_arrays(leaf, updates, params, state.slow)
        return updates, LookaheadState(inner_state, slow, jnp.where(sync, 0, state.step_in_period + 1), hp)

    return GradientTransformation(init, update)


class EmaParamsState(NamedTuple):
    ema: Params
    hyperparams: dict[str, jax.Array]


def ema_params(decay: float = 0.999) -> GradientTransformation:
    """Keeps ``ema <- decay * ema + (1 - decay) * (p + u)``, the moving average of the new params.

    Updates pass through unchanged; put it last in a chain so it sees the
    final updates. ``ema`` starts as a copy of the params, is kept in the slot
    dtype (at least float32) and is read with ``kopt.get_slot(state, "ema")``
    (e.g. to evaluate with averaged weights). ``decay`` is held in the state
    as ``ema_decay``. Default ``0.999``.

    Example:
        >>> import kopt
        >>> opt = kopt.chain(kopt.Adam(), kopt.ema_params(0.99))
    """
    values = {"ema_decay": check_hyperparam("ema_decay", decay)}

    def init(params: Params) -> EmaParamsState:
        return EmaParamsState(_copy_params(params), init_hyperparams(values, params))

    @expects(EmaParamsState)
    def update(
        updates: Updates, state: EmaParamsState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, EmaParamsState]:
        del extra_args
        needs_params(params, "ema_params")
        hp = current_hyperparams(state.hyperparams, values)
        decay = hp["ema_decay"]
        updates, _, ema = map_arrays(
            lambda u, p, ema: (u, p, _moving_average(decay, ema, p + u)), updates, params, state.ema
        )
        return updates, EmaParamsState(ema, hp)

    return GradientTransformation(init, update)


class EmaOverwriteState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # steps taken (shadows tuple.count, as optax's states do)
    average: Params
    hyperparams: dict[str, jax.Array]


def ema_overwrite(
    momentum: float = 0.99, overwrite_every: int | None = None, *, from_first_step: bool = False
) -> GradientTransformation:
    """Keras' ``use_ema``: the moving average of the new params, which every ``overwrite_every`` steps replaces them.

    Each step ``average <- momentum * average + (1 - momentum) * (p + u)``;
    on step ``t`` (counted from 1) with ``t % overwrite_every == 0`` the update
    becomes ``average - p``, so the new params are the average (Keras assigns
    it to the variables); other steps pass ``u`` through. Put it last in a chain.
    ``average`` starts as a copy of the params (tf_keras' rule); with
    ``from_first_step=True`` (Keras 3's) the first step ignores it and takes
    the new params. ``overwrite_every=None`` never overwrites: the average is
    only kept (``kopt.get_slot(state, "average")``). ``momentum`` is held in the
    state as ``ema_momentum``. Defaults ``0.99, None, False``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.chain(kopt.scale_by_learning_rate(1.0), kopt.ema_overwrite(0.5, overwrite_every=2))
        >>> params, state = jnp.array([4.0]), opt.init(jnp.array([4.0]))
        >>> for _ in range(2):
        ...     updates, state = opt.update(jnp.array([1.0]), state, params)
        ...     params = params + updates
        >>> params.tolist()  # 4 -> 3 (average 3.5) -> 2, overwritten by the average 0.5 * 3.5 + 0.5 * 2
        [2.75]
    """
    values = {"ema_momentum": check_hyperparam("ema_momentum", momentum)}
    if overwrite_every is not None:
        overwrite_every = check_count("overwrite_every", overwrite_every)
    from_first_step = check_bool("from_first_step", from_first_step)

    def init(params: Params) -> EmaOverwriteState:
        return EmaOverwriteState(jnp.zeros((), jnp.int32), _copy_params(params), init_hyperparams(values, params))

    @expects(EmaOverwriteState)
    def update(
        updates: Updates, state: EmaOverwriteState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, EmaOverwriteState]:
        del extra_args
        needs_params(params, "ema_overwrite")
        hp = current_hyperparams(state.hyperparams, values)
        momentum = hp["ema_momentum"]
        if from_first_step:
            momentum = jnp.where(state.count == 0, jnp.zeros_like(momentum), momentum)
        overwrite = False if overwrite_every is None else (state.count + 1) % overwrite_every == 0

        def leaf(u, p, average):
            average = _moving_average(momentum, average, p + u)
            return jnp.where(overwrite, average - p, u), p, average

        updates, _, average = map_arrays(leaf, updates, params, state.average)
        return updates, EmaOverwriteState(state.count + 1, average, hp)

    return GradientTransformation(init, update)
