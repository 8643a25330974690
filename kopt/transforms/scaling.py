"""The step as a whole: the learning rate, the loss-scale factor, weight decay and the trust ratio.

Also the rate of the current step read from a :func:`scale_by_learning_rate` state, for the rules that
hold the learning rate themselves (:mod:`kopt.transforms.rate_holding`) and for :func:`weight_decay_first`,
Keras' weight decay around any rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, accepted_extra_args, expects
from kopt.groups import Labels, _merge, _resolve, masked
from kopt.packing import refuse_packed
from kopt.schedules import Schedule, constant_schedule
from kopt.state import current_hyperparams, init_hyperparams
from kopt.transforms._common import HyperParams, _checked, _increment, _step_number, _zero_count
from kopt.tree import abs_sq, map_arrays, needs_params
from kopt.validation import check_hyperparam

# --------------------------------------------------------------------------- learning rate


class ScaleByLearningRateState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    hyperparams: HyperParams


def scale_by_learning_rate(lr: float | Schedule | Callable[[jax.Array], jax.Array]) -> GradientTransformation:
    """``g <- -lr_i * g``: the learning rate, with the sign of a descent step.

    ``lr`` is a number (constant), a :class:`~kopt.Schedule` (its numbers live
    in the state: ``set_hyperparams(state, lr=...)`` sets the schedule's base
    value, i.e. rescales it), or any function ``step -> lr`` (whose numbers
    are then fixed at trace time). The state also reports ``current_lr``, the
    rate of the latest step (before the first step: the rate it will use).
    ``i`` is the number of steps taken before this one.

    Example:
        >>> import kopt
        >>> sgd = kopt.chain(kopt.scale_by_learning_rate(kopt.cosine_decay(0.1, 1000)))
    """
    if isinstance(lr, Schedule):
        schedule = lr
    elif callable(lr):
        schedule = Schedule(lambda step: lr(step), {})
    else:
        schedule = constant_schedule(lr)

    def learning_rate(count, hyperparams):
        values = {name: value for name, value in hyperparams.items() if name != "current_lr"}
        current = hyperparams["current_lr"]
        return jnp.asarray(schedule.fn(count, **values)).astype(current.dtype).reshape(current.shape)

    def init(params):
        hyperparams = init_hyperparams({**schedule.hyperparams, "current_lr": 0.0}, params)
        count = _zero_count()
        return ScaleByLearningRateState(count, {**hyperparams, "current_lr": learning_rate(count, hyperparams)})

    @expects(ScaleByLearningRateState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hyperparams = current_hyperparams(state.hyperparams, schedule.hyperparams)
        lr = learning_rate(state.count, hyperparams)
        step = -lr  # once a step, not once a leaf
        (updates,) = map_arrays(lambda g: (step * g,), updates)
        return updates, ScaleByLearningRateState(_increment(state.count), {**hyperparams, "current_lr": lr})

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- rules that read the params


def _rate_now(rate: GradientTransformation, state: ScaleByLearningRateState) -> tuple[jax.Array, jax.Array, Any]:
    """``(lr_i, t, next state)`` of a rule that holds its learning rate as :func:`scale_by_learning_rate`
    does: that transform applied to a 1 gives ``-lr_i``; ``t`` is the step number (from 1)."""
    dtype = state.hyperparams["current_lr"].dtype
    minus_lr, next_state = rate.update(jnp.ones((), dtype), state)
    return -minus_lr, _step_number(state.count, dtype), next_state


def _decayed(params, weight_decay, lr):
    """Keras' weight decay, applied to the variables before a rule that reads them: ``p - p * wd * lr``."""
    return jax.tree.map(lambda p: p - p * (weight_decay * lr).astype(p.dtype), params)


def _through_decay(updates, decayed, params):
    """A rule's updates of the ``decayed`` params, as updates of the params: the decay's step added."""
    return jax.tree.map(lambda u, d, p: (u + (d - p)).astype(u.dtype), updates, decayed, params)


# --------------------------------------------------------------------------- loss scale


class UnscaleLossState(NamedTuple):
    hyperparams: HyperParams


def unscale_loss(loss_scale_factor: float) -> GradientTransformation:
    """``g <- g / loss_scale_factor``: gradients of a loss multiplied by ``loss_scale_factor`` (to keep float16
    gradients from underflowing) brought back to the loss's own scale, as Keras 3's ``loss_scale_factor`` does.

    Put it first in a chain (before clipping), and multiply the loss by the
    same factor before differentiating it. The factor is held in the state
    (``loss_scale_factor``).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.chain(kopt.unscale_loss(1024.0), kopt.scale_by_learning_rate(0.1))
        >>> updates, _ = opt.update(jnp.array([2048.0]), opt.init(jnp.zeros(1)))
        >>> updates.tolist()
        [-0.20000000298023224]
    """
    values = _checked(loss_scale_factor=loss_scale_factor)

    def init(params):
        return UnscaleLossState(init_hyperparams(values, params))

    @expects(UnscaleLossState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        (updates,) = map_arrays(lambda g: (g / hp["loss_scale_factor"],), updates)
        return updates, UnscaleLossState(hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- weight decay


class AddDecayedWeightsState(NamedTuple):
    hyperparams: HyperParams


def _add_decayed_weights(rate: float) -> GradientTransformation:
    values = {"weight_decay": check_hyperparam("weight_decay", rate)}

    def init(params):
        return AddDecayedWeightsState(init_hyperparams(values, params))

    @expects(AddDecayedWeightsState)
    def update(updates, state, params=None, **extra_args):
        del extra_args
        needs_params(params, "add_decayed_weights")
        hp = current_hyperparams(state.hyperparams, values)
        weight_decay = hp["weight_decay"]
        updates, _ = map_arrays(lambda g, p: (weight_decay * p + g, p), updates, params)
        return updates, AddDecayedWeightsState(hp)

    return GradientTransformation(init, update)


def add_decayed_weights(rate: float, mask: Labels | None = None) -> GradientTransformation:
    """Decoupled weight decay: ``g <- g + weight_decay * p``.

    Placed before :func:`scale_by_learning_rate`, the step gains
    ``-lr_i * weight_decay * p`` (as in AdamW). ``rate`` is held in the state
    as ``weight_decay``. ``mask`` (a pytree of bools or a function of params,
    see :func:`~kopt.masked`) limits the decay to some leaves, e.g. not biases.

    Example:
        >>> import kopt
        >>> decay = kopt.add_decayed_weights(1e-4, mask=lambda p: {k: k != "b" for k in p})
    """
    transform = _add_decayed_weights(rate)
    return transform if mask is None else masked(transform, mask)


class WeightDecayFirstState(NamedTuple):
    inner_state: Any  # the rule's, which holds the learning rate
    hyperparams: HyperParams


def _rate_state(state: Any) -> ScaleByLearningRateState:
    """The one :func:`scale_by_learning_rate` state inside a rule's state."""
    found = [
        node
        for node in jax.tree.leaves(state, is_leaf=lambda node: isinstance(node, ScaleByLearningRateState))
        if isinstance(node, ScaleByLearningRateState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"weight_decay_first: rule(learning_rate) must hold its rate in exactly one scale_by_learning_rate "
            f"state (its own or a chain member's), found {len(found)}"
        )
    return found[0]


def weight_decay_first(
    rule: Callable[[Any], GradientTransformation],
    learning_rate: float | Schedule | Callable[[jax.Array], jax.Array],
    weight_decay: float,
    mask: Labels = None,
) -> GradientTransformation:
    """Keras' weight decay: each variable is decayed, ``p' = p - lr_i * weight_decay * p``, before the rule
    ``rule(learning_rate)`` reads it and steps from ``p'``.

    The update is ``(p' - p) + rule's update at p'``: the decay is a step of its
    own, outside any momentum the rule keeps (Keras' SGD and RMSprop velocities
    never see it), and a rule that reads the params (LAMB's trust ratio) reads
    the decayed ones. ``lr_i`` is the rule's rate of this step (``i`` the steps
    taken before it, schedules included), so the rule must hold it in one
    :func:`scale_by_learning_rate` state, its own or a chain member's. Where the
    rule reads no params and keeps no momentum, :func:`add_decayed_weights`
    before the learning rate is the same step. ``weight_decay`` is held in the
    state; ``mask`` (a pytree of bools or a function of params, see
    :func:`~kopt.masked`) limits the decay to some leaves and refuses the packed
    layout. Needs the params.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.transforms.weight_decay_first(
        ...     lambda lr: kopt.chain(kopt.scale_by_learning_rate(lr), kopt.trace(0.9)), 0.1, 0.5)
        >>> params = jnp.array([2.0])
        >>> updates, state = opt.update(jnp.array([1.0]), opt.init(params), params)
        >>> round(float(updates[0]), 6)  # -0.1 * 0.5 * 2 (the decay) - 0.1 * 1 (the velocity)
        -0.2
        >>> round(float(kopt.get_slot(state, "velocity")[0]), 6)  # no decay in it
        -0.1
    """
    inner = rule(learning_rate)
    rate = scale_by_learning_rate(learning_rate)
    values = _checked(weight_decay=weight_decay)
    keep = accepted_extra_args(inner.update)

    def init(params):
        return WeightDecayFirstState(inner.init(params), init_hyperparams(values, params))

    @expects(WeightDecayFirstState)
    def update(updates, state, params=None, **extra_args):
        needs_params(params, "weight_decay_first")
        if mask is not None:
            refuse_packed("weight_decay_first(mask=...)", params)
        hp = current_hyperparams(state.hyperparams, values)
        lr, _, _ = _rate_now(rate, _rate_state(state.inner_state))  # the rule's rate of this step, untouched
        decayed = _decayed(params, hp["weight_decay"], lr)
        if mask is not None:
            decayed = _merge(_resolve(mask, params, "weight_decay_first"), {True: decayed}, params)
        updates, inner_state = inner.update(updates, state.inner_state, decayed, **keep(extra_args))
        return _through_decay(updates, decayed, params), WeightDecayFirstState(inner_state, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- trust ratio (LAMB)


class ScaleByTrustRatioState(NamedTuple):
    """No state: the ratio is read from the params and the updates of each step."""


def _trust_ratio_array(u, p):
    params_norm, updates_norm = jnp.sqrt(jnp.sum(abs_sq(p))), jnp.sqrt(jnp.sum(abs_sq(u)))
    ratio = jnp.where((params_norm > 0) & (updates_norm > 0), params_norm / updates_norm, 1.0)
    return u * ratio, p


def scale_by_trust_ratio() -> GradientTransformation:
    """LAMB's layer-wise trust ratio: each param array's update is scaled by ``||p|| / ||u||``.

    Norms are Euclidean over the whole array; the ratio is 1 where either norm
    is 0 (a param at zero, a zero update), as Keras 3's Lamb has it. Its math
    is per array, so it refuses the packed layout: give ``packed=False``. Needs
    the params.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.scale_by_trust_ratio()
        >>> updates, _ = opt.update(jnp.array([0.0, 0.1]), opt.init(None), jnp.array([3.0, 4.0]))
        >>> updates.tolist()  # ||p|| = 5, ||u|| = 0.1: scaled by 50
        [0.0, 5.0]
    """

    def init(params):
        del params
        return ScaleByTrustRatioState()

    @expects(ScaleByTrustRatioState)
    def update(updates, state, params=None, **extra_args):
        del extra_args
        refuse_packed("scale_by_trust_ratio", updates)
        needs_params(params, "scale_by_trust_ratio")
        updates, _ = map_arrays(_trust_ratio_array, updates, params)
        return updates, state

    return GradientTransformation(init, update)
