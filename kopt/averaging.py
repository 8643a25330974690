"""Averaging params over time: Lookahead and an exponential moving average of params."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, OptState, Params, Updates, accepted_extra_args, expects
from kopt.state import current_hyperparams, init_hyperparams
from kopt.tree import map_arrays, slot_dtype
from kopt.validation import check_count, check_hyperparam


def _needs_params(params: Params | None, who: str) -> None:
    if params is None:
        raise ValueError(f"{who} needs the params: call update(updates, state, params)")


def _copy_params(params: Params) -> Params:
    # A real copy: a state sharing the params' buffers could not be donated with them.
    return jax.tree.map(lambda p: jnp.array(p, slot_dtype(jnp.result_type(p)), copy=True), params)


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
    def update(updates: Updates, state: LookaheadState, params: Params | None = None, **extra_args):
        _needs_params(params, "lookahead")
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
    def update(updates: Updates, state: EmaParamsState, params: Params | None = None, **extra_args):
        del extra_args
        _needs_params(params, "ema_params")
        hp = current_hyperparams(state.hyperparams, values)
        decay = hp["ema_decay"]
        updates, _, ema = map_arrays(
            lambda u, p, ema: (u, p, decay * ema + (1 - decay) * (p + u)), updates, params, state.ema
        )
        return updates, EmaParamsState(ema, hp)

    return GradientTransformation(init, update)
