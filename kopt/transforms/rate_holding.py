"""The rules that hold the learning rate inside and read the params: Adafactor, schedule-free AdamW, FTRL.

Nothing that rescales the update may follow them in a chain. Keras' weight decay for them (the variable
decayed at the step's rate before the rule reads it) is :func:`kopt.weight_decay_first` around the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, Updates, expects
from kopt.packing import refuse_packed
from kopt.schedules import Schedule
from kopt.state import current_hyperparams, init_hyperparams
from kopt.transforms._common import HyperParams, _checked
from kopt.transforms.scaling import (
    ScaleByLearningRateState,
    _rate_now,
    scale_by_learning_rate,
)
from kopt.tree import TreeDef, abs_sq, map_arrays, needs_params, zeros_slots
from kopt.validation import check_hyperparam, check_state_dtype

# --------------------------------------------------------------------------- Adafactor


class ScaleByAdafactorState(NamedTuple):
    inner_state: ScaleByLearningRateState  # the learning rate's: step count, lr, current_lr
    r: Updates  # row means of the second moment (shape[:-1]); a 0 placeholder below 2 dimensions
    c: Updates  # column means (shape[:-2] + shape[-1:]); a 0 placeholder below 2 dimensions
    v: Updates  # the second moment, shaped like the param
    hyperparams: HyperParams


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(abs_sq(x)))


def _adafactor_array(g, p, r, c, v, lr, t, hp):
    # in the moments' precision, complex values staying complex (v is real: it holds |g|^2)
    g, p = g.astype(jnp.promote_types(v.dtype, g.dtype)), p.astype(jnp.promote_types(v.dtype, p.dtype))
    rho = jnp.minimum(lr, 1 / jnp.sqrt(t))
    alpha = jnp.maximum(hp["epsilon_2"], _rms(p)) * rho
    regulated = abs_sq(g) + hp["epsilon_1"]
    beta_2 = 1 - t ** hp["beta_2_decay"]
    if jnp.ndim(p) >= 2:  # factored: the outer product of row and column means stands for v
        r = beta_2 * r + (1 - beta_2) * jnp.mean(regulated, axis=-1)
        c = beta_2 * c + (1 - beta_2) * jnp.mean(regulated, axis=-2)
        v = (r / jnp.mean(r, axis=-1, keepdims=True))[..., None] * c[..., None, :]
    else:
        v = beta_2 * v + (1 - beta_2) * regulated
    u = g / jnp.sqrt(v)
    u = u / jnp.maximum(1, _rms(u) / hp["clip_threshold"])
    return -alpha * u, r, c, v


def scale_by_adafactor(
    learning_rate: float | Schedule | Callable[[jax.Array], jax.Array] = 0.001,
    beta_2_decay: float = -0.8,
    epsilon_1: float = 1e-30,
    epsilon_2: float = 1e-3,
    clip_threshold: float = 1.0,
    state_dtype: Any = None,
) -> GradientTransformation:
    """Adafactor (Shazeer & Stern 2018) as Keras has it (Keras 3 and tf_keras): a factored second moment,
    a relative step size and update clipping. The learning rate is inside: chain nothing that rescales after.

    At step ``t`` (from 1), per param array ``p`` with ``s = g**2 + epsilon_1``
    and ``b = 1 - t**beta_2_decay``: for 2 or more dimensions the row and
    column means ``r <- b*r + (1-b)*mean(s, -1)``, ``c <- b*c + (1-b)*mean(s, -2)``
    give ``v = r / mean(r) (outer) c``; below 2 dimensions ``v <- b*v + (1-b)*s``.
    Then ``u = g / sqrt(v)``, clipped to ``u / max(1, rms(u) / clip_threshold)``,
    and the update is ``-max(epsilon_2, rms(p)) * min(lr_i, 1/sqrt(t)) * u``
    (Keras' ``relative_step`` changes nothing beyond that ``min``). Its math is
    per array: it refuses the packed layout. Needs the params. Defaults
    ``0.001, -0.8, 1e-30, 1e-3, 1.0, None``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.scale_by_adafactor(0.01)
        >>> params = jnp.ones((2, 3))
        >>> updates, state = opt.update(jnp.full((2, 3), 5.0), opt.init(params), params)
        >>> sorted({round(float(u), 6) for u in updates.ravel()})  # rms(p) = 1, lr 0.01, direction 1 each
        [-0.01]
    """
    values = _checked(
        beta_2_decay=beta_2_decay,
        epsilon_1=epsilon_1,
        epsilon_2=epsilon_2,
        clip_threshold=clip_threshold,
    )
    state_dtype = check_state_dtype(state_dtype)
    rate = scale_by_learning_rate(learning_rate)

    def init(params):
        v = zeros_slots(params, state_dtype, real=True)

        def factor(slot, keep):
            return None if slot is None else jnp.zeros(keep(slot.shape) if slot.ndim >= 2 else (), slot.dtype)

        r = jax.tree.map(lambda slot: factor(slot, lambda shape: shape[:-1]), v)
        c = jax.tree.map(lambda slot: factor(slot, lambda shape: shape[:-2] + shape[-1:]), v)
        return ScaleByAdafactorState(rate.init(params), r, c, v, init_hyperparams(values, params))

    @expects(ScaleByAdafactorState)
    def update(updates, state, params=None, **extra_args):
        del extra_args
        refuse_packed("scale_by_adafactor", updates)
        needs_params(params, "scale_by_adafactor")
        hp = current_hyperparams(state.hyperparams, values)
        lr, t, rate_state = _rate_now(rate, state.inner_state)
        treedef: TreeDef
        leaves, treedef = jax.tree.flatten(updates)
        slots = [treedef.flatten_up_to(tree) for tree in (params, state.r, state.c, state.v)]
        results = [_adafactor_array(g, p, r, c, v, lr, t, hp) for g, p, r, c, v in zip(leaves, *slots, strict=True)]
        new_updates = treedef.unflatten([u.astype(g.dtype) for (u, *_), g in zip(results, leaves, strict=True)])
        r, c, v = (treedef.unflatten([result[k] for result in results]) for k in (1, 2, 3))
        return new_updates, ScaleByAdafactorState(rate_state, r, c, v, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- schedule-free AdamW


class ScheduleFreeAdamState(NamedTuple):
    inner_state: ScaleByLearningRateState  # the learning rate's: step count, lr, current_lr
    z: Updates  # the SGD-like sequence, from the initial params (Keras 3's "momentum")
    v: Updates  # the second moment (Keras 3's "velocity")
    hyperparams: HyperParams


def _schedule_free_array(g, p, z, v, lr, t, beta_1, beta_2, epsilon):
    v = v + (abs_sq(g) - v) * (1 - beta_2)
    z_old, z = z, z - lr * g / (jnp.sqrt(v / (1 - beta_2**t)) + epsilon)
    x_old = (p - (1 - beta_1) * z_old) / beta_1  # the average, recovered from the params y and z
    x = (1 - 1 / t) * x_old + z / t
    return (1 - beta_1) * z + beta_1 * x - p, p, z, v


def schedule_free_adam(
    learning_rate: float | Schedule | Callable[[jax.Array], jax.Array] = 0.0025,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-8,
    warmup_steps: int = 0,
    state_dtype: Any = None,
) -> GradientTransformation:
    """Schedule-free Adam (Defazio et al. 2024) as Keras 3's ``ScheduleFreeAdamW`` has it; the params are the
    interpolation ``y`` the gradients are taken at, the learning rate is inside.

    At step ``t`` (from 1), with ``lr_t = lr_i * min(t / warmup_steps, 1)``
    (no warm-up when ``warmup_steps=0``), ``z`` starting at the params and ``v``
    at 0::

        v <- v + (g**2 - v) * (1 - beta_2)
        z' = z - lr_t * g / (sqrt(v / (1 - beta_2**t)) + epsilon)
        x  = (y - (1 - beta_1) * z) / beta_1                # the average so far
        x' = (1 - 1/t) * x + z' / t
        y' = (1 - beta_1) * z' + beta_1 * x'                # the new params

    The update is ``y' - y``. Evaluate at ``x`` (``(y - (1 - beta_1) * z) / beta_1``)
    for the schedule-free average. Needs the params. Keras' weight decay
    (``y <- y - y * weight_decay * lr_i``, the rate before its warm-up) is
    :func:`kopt.weight_decay_first` around it. Defaults ``0.0025, 0.9, 0.999, 1e-8, 0, None``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.schedule_free_adam(0.1)
        >>> params = jnp.array([1.0])
        >>> updates, state = opt.update(jnp.array([0.5]), opt.init(params), params)
        >>> round(float(params[0] + updates[0]), 4)  # at t = 1 the average and y jump to z, which moved by lr
        0.9
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    warmup_steps = int(check_hyperparam("warmup_steps", warmup_steps))
    state_dtype = check_state_dtype(state_dtype)
    rate = scale_by_learning_rate(learning_rate)

    def init(params):
        zeros = zeros_slots(params, state_dtype)
        z = jax.tree.map(lambda zero, p: (zero + p).astype(zero.dtype), zeros, params)
        return ScheduleFreeAdamState(
            rate.init(params), z, zeros_slots(params, state_dtype, real=True), init_hyperparams(values, params)
        )

    @expects(ScheduleFreeAdamState)
    def update(updates, state, params=None, **extra_args):
        del extra_args
        needs_params(params, "schedule_free_adam")
        hp = current_hyperparams(state.hyperparams, values)
        lr, t, rate_state = _rate_now(rate, state.inner_state)
        warmed = lr * (jnp.minimum(t / warmup_steps, 1.0) if warmup_steps > 0 else 1.0)
        coefficients = (warmed, t, hp["beta_1"], hp["beta_2"], hp["epsilon"])
        updates, _, z, v = map_arrays(
            lambda g, p, z, v: _schedule_free_array(g, p, z, v, *coefficients), updates, params, state.z, state.v
        )
        return updates, ScheduleFreeAdamState(rate_state, z, v, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- FTRL


class FtrlState(NamedTuple):
    inner_state: ScaleByLearningRateState  # the learning rate's: step count, lr, current_lr
    accumulator: Updates
    linear: Updates
    hyperparams: HyperParams


def _ftrl_array(g, p, accumulator, linear, lr, power, l1, l2, shrinkage, beta):
    new_accumulator = accumulator + abs_sq(g)
    # `linear` is FTRL's z: the gradients with the params' proximal correction, as Keras keeps it.
    linear = linear + (g + 2 * shrinkage * p) - (new_accumulator**-power - accumulator**-power) / lr * p
    quadratic = new_accumulator**-power / lr + 2 * l2 + beta / lr
    new_p = (jnp.clip(linear, -l1, l1) - linear) / quadratic
    return new_p - p, p, new_accumulator, linear


def ftrl(
    learning_rate: float | Schedule | Callable[[jax.Array], jax.Array] = 0.001,
    learning_rate_power: float = -0.5,
    initial_accumulator_value: float = 0.1,
    l1: float = 0.0,
    l2: float = 0.0,
    l2_shrinkage: float = 0.0,
    beta: float = 0.0,
    state_dtype: Any = None,
) -> GradientTransformation:
    """FTRL-Proximal (McMahan et al. 2013) as Keras has it (tf_keras' ``Ftrl``, both generations, and Keras 3's).

    With ``n`` the accumulator (from ``initial_accumulator_value``), ``z`` the
    linear term (from 0), ``lr = lr_i`` and ``c = -learning_rate_power``::

        n' = n + g**2
        z <- z + g + 2*l2_shrinkage*p - (n'**c - n**c) / lr * p
        p <- (clip(z, -l1, l1) - z) / (n'**c / lr + 2*l2 + beta / lr)

    The update is that new ``p`` minus the old one, so the learning rate is
    inside (a number or a :class:`~kopt.Schedule`, held in the state as
    :func:`scale_by_learning_rate` holds it): chain clipping before it, and
    nothing that rescales its output after it. Needs the params. Defaults
    ``0.001, -0.5, 0.1, 0, 0, 0, 0, None``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.ftrl(0.1, l1=0.01)
        >>> params = jnp.array([0.5, -0.5])
        >>> updates, state = opt.update(jnp.array([1.0, 0.001]), opt.init(params), params)
        >>> [round(float(x), 4) for x in params + updates]  # the small gradient's coordinate: cut to 0 by l1
        [0.2529, 0.0]
    """
    values = _checked(
        learning_rate_power=learning_rate_power,
        l1=l1,
        l2=l2,
        l2_shrinkage=l2_shrinkage,
        beta=beta,
    )
    initial = check_hyperparam("initial_accumulator_value", initial_accumulator_value)
    state_dtype = check_state_dtype(state_dtype)
    rate = scale_by_learning_rate(learning_rate)

    def init(params):
        accumulator = jax.tree.map(lambda z: z + initial, zeros_slots(params, state_dtype, real=True))
        return FtrlState(
            rate.init(params), accumulator, zeros_slots(params, state_dtype), init_hyperparams(values, params)
        )

    @expects(FtrlState)
    def update(updates, state, params=None, **extra_args):
        del extra_args
        needs_params(params, "ftrl")
        hp = current_hyperparams(state.hyperparams, values)
        lr, _, rate_state = _rate_now(rate, state.inner_state)
        coefficients = (lr, hp["learning_rate_power"], hp["l1"], hp["l2"], hp["l2_shrinkage"], hp["beta"])
        updates, _, accumulator, linear = map_arrays(
            lambda g, p, n, z: _ftrl_array(g, p, n, z, *coefficients), updates, params, state.accumulator, state.linear
        )
        return updates, FtrlState(rate_state, accumulator, linear, hp)

    return GradientTransformation(init, update)
