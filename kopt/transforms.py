"""The scaling transformations the Keras 2 optimizers are built from.

Each transformation is one concept: its update rule for one array is a small
module-level function (``_adam_array``, ...), lifted to pytrees by
:func:`kopt.tree.map_arrays`; the scalars shared by all leaves (bias
corrections, schedules) are computed once per step. All numeric
hyperparameters are arrays in the state (see :mod:`kopt.state`); structural
options (``nesterov``, ``amsgrad``) are Python values. A hyperparameter given
as a JAX array (``optax.inject_hyperparams`` passes them so, traced under
``jit``) is read from the argument at every update instead, see
:func:`kopt.state.current_hyperparams`.

Every transformation with per-parameter slots takes ``state_dtype=None``:
``None`` gives each slot its parameter's dtype, but at least float32 (so
bfloat16 params train with float32 state); a floating dtype such as
``"bfloat16"`` stores every slot in it (the math still runs in float32), which
halves the state of float32 params.

Symbols: ``g`` a gradient (or incoming update) leaf, ``i`` the number of steps
taken before this one, ``t = i + 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, Updates, accepted_extra_args, expects
from kopt.groups import Labels, _merge, _resolve, masked
from kopt.packing import refuse_packed
from kopt.schedules import Schedule, constant_schedule
from kopt.state import current_hyperparams, init_hyperparams
from kopt.tree import TreeDef, abs_sq, hyperparam_dtype, map_arrays, needs_params, zeros_slots
from kopt.validation import check_bool, check_hyperparam, check_state_dtype

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
        (updates,) = map_arrays(lambda g: (-lr * g,), updates)
        return updates, ScaleByLearningRateState(_increment(state.count), {**hyperparams, "current_lr": lr})

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- momentum


class TraceState(NamedTuple):
    velocity: Updates
    hyperparams: HyperParams


def _trace_array(u, velocity, momentum, nesterov):
    velocity = momentum * velocity + u
    return (momentum * velocity + u if nesterov else velocity), velocity


def trace(momentum: float = 0.0, nesterov: bool = False, state_dtype: Any = None) -> GradientTransformation:
    """Momentum on incoming updates ``u`` (Keras 2 SGD, when placed after the learning rate).

    ``velocity <- momentum * velocity + u``; the output is ``velocity``, or with
    ``nesterov=True`` the look-ahead ``momentum * velocity + u`` (new velocity).
    Chained after :func:`scale_by_learning_rate`, the velocity holds
    lr-scaled steps exactly as Keras' SGD does, so a decaying ``lr`` is not
    applied to old velocity again. Default ``momentum=0``.

    Example:
        >>> import kopt
        >>> sgd = kopt.chain(kopt.scale_by_learning_rate(0.01), kopt.trace(0.9, nesterov=True))
    """
    values = _checked(momentum=momentum)
    state_dtype = check_state_dtype(state_dtype)
    nesterov = check_bool("nesterov", nesterov)

    def init(params):
        return TraceState(zeros_slots(params, state_dtype), init_hyperparams(values, params))

    @expects(TraceState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        momentum = hp["momentum"]
        updates, velocity = map_arrays(lambda u, vel: _trace_array(u, vel, momentum, nesterov), updates, state.velocity)
        return updates, TraceState(velocity, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- RMSprop, Adagrad


class ScaleByRmsState(NamedTuple):
    accumulator: Updates
    mean_grad: Updates | None
    hyperparams: HyperParams


def _root(x, epsilon, epsilon_in_sqrt):
    """``sqrt(x + epsilon)`` or ``sqrt(x) + epsilon``: where epsilon sits is where the Keras versions differ."""
    return jnp.sqrt(x + epsilon) if epsilon_in_sqrt else jnp.sqrt(x) + epsilon


def _rms_array(g, accumulator, mean_grad, rho, epsilon, epsilon_in_sqrt):
    accumulator = rho * accumulator + (1 - rho) * abs_sq(g)
    second_moment = accumulator
    if mean_grad is not None:
        mean_grad = rho * mean_grad + (1 - rho) * g
        second_moment = accumulator - abs_sq(mean_grad)
    return g / _root(second_moment, epsilon, epsilon_in_sqrt), accumulator, mean_grad


def scale_by_rms(
    rho: float = 0.9,
    epsilon: float = 1e-7,
    state_dtype: Any = None,
    *,
    centered: bool = False,
    epsilon_in_sqrt: bool = False,
) -> GradientTransformation:
    """RMSprop's scaling (Keras 2): ``a <- rho*a + (1-rho)*g**2``; ``g <- g / (sqrt(a) + epsilon)``.

    ``a`` starts at zero; the new ``a`` (including this gradient) is used, and
    ``epsilon`` is added outside the square root. Defaults ``rho=0.9``,
    ``epsilon=1e-7``.

    Two options of TensorFlow's RMSprop (off by default, Keras 2.2.4 has neither):
    ``centered=True`` also keeps ``mean_grad <- rho*mean_grad + (1-rho)*g`` and
    divides by ``sqrt(a - mean_grad**2)`` (a variance, not a raw second moment);
    ``epsilon_in_sqrt=True`` divides by ``sqrt(a + epsilon)`` instead, as TF's
    RMSprop with momentum and TF >= 2.11's RMSprop do.

    Example:
        >>> import kopt
        >>> rmsprop = kopt.chain(kopt.scale_by_rms(0.9), kopt.scale_by_learning_rate(1e-3))
    """
    values = _checked(rho=rho, epsilon=epsilon)
    state_dtype = check_state_dtype(state_dtype)
    centered = check_bool("centered", centered)
    epsilon_in_sqrt = check_bool("epsilon_in_sqrt", epsilon_in_sqrt)

    def init(params):
        mean_grad = zeros_slots(params, state_dtype) if centered else None
        accumulator = zeros_slots(params, state_dtype, real=True)
        return ScaleByRmsState(accumulator, mean_grad, init_hyperparams(values, params))

    @expects(ScaleByRmsState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        rho, epsilon = hp["rho"], hp["epsilon"]
        updates, accumulator, mean_grad = map_arrays(
            lambda g, a, mg: _rms_array(g, a, mg, rho, epsilon, epsilon_in_sqrt),
            updates,
            state.accumulator,
            state.mean_grad,
        )
        return updates, ScaleByRmsState(accumulator, mean_grad, hp)

    return GradientTransformation(init, update)


class ScaleByAdagradState(NamedTuple):
    accumulator: Updates
    hyperparams: HyperParams


def _adagrad_array(g, accumulator, epsilon, epsilon_in_sqrt):
    accumulator = accumulator + abs_sq(g)
    return g / _root(accumulator, epsilon, epsilon_in_sqrt), accumulator


def scale_by_adagrad(
    epsilon: float = 1e-7,
    state_dtype: Any = None,
    *,
    initial_accumulator_value: float = 0.0,
    epsilon_in_sqrt: bool = False,
) -> GradientTransformation:
    """Adagrad's scaling (Keras 2): ``a <- a + g**2``; ``g <- g / (sqrt(a) + epsilon)``.

    ``a`` starts at ``initial_accumulator_value``: 0 by default, as in Keras
    2.2.4 (TensorFlow's Keras and optax start at 0.1). ``epsilon_in_sqrt=True``
    divides by ``sqrt(a + epsilon)``, as TF >= 2.11's Adagrad does. Default
    ``epsilon=1e-7``.

    Example:
        >>> import kopt
        >>> adagrad = kopt.chain(kopt.scale_by_adagrad(), kopt.scale_by_learning_rate(0.01))
    """
    values = _checked(epsilon=epsilon)
    initial = check_hyperparam("initial_accumulator_value", initial_accumulator_value)
    state_dtype = check_state_dtype(state_dtype)
    epsilon_in_sqrt = check_bool("epsilon_in_sqrt", epsilon_in_sqrt)

    def init(params):
        accumulator = jax.tree.map(lambda zeros: zeros + initial, zeros_slots(params, state_dtype, real=True))
        return ScaleByAdagradState(accumulator, init_hyperparams(values, params))

    @expects(ScaleByAdagradState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        epsilon = hp["epsilon"]
        updates, accumulator = map_arrays(
            lambda g, a: _adagrad_array(g, a, epsilon, epsilon_in_sqrt), updates, state.accumulator
        )
        return updates, ScaleByAdagradState(accumulator, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- Adadelta


class ScaleByAdadeltaState(NamedTuple):
    accumulator: Updates
    delta_accumulator: Updates
    hyperparams: HyperParams


def _adadelta_array(g, accumulator, delta_accumulator, rho, one_minus_rho, epsilon):
    accumulator = rho * accumulator + one_minus_rho * abs_sq(g)
    step = g * jnp.sqrt(delta_accumulator + epsilon) / jnp.sqrt(accumulator + epsilon)
    delta_accumulator = rho * delta_accumulator + one_minus_rho * abs_sq(step)
    return step, accumulator, delta_accumulator


def scale_by_adadelta(rho: float = 0.95, epsilon: float = 1e-7, state_dtype: Any = None) -> GradientTransformation:
    """Adadelta's scaling (Keras 2), without the learning rate.

    ``a <- rho*a + (1-rho)*g**2``; ``u = g * sqrt(d + epsilon) / sqrt(a + epsilon)``
    (new ``a``, old ``d``); ``d <- rho*d + (1-rho)*u**2``; output ``u``.
    ``epsilon`` is inside both roots; ``d`` holds steps without the learning
    rate. Defaults ``rho=0.95``, ``epsilon=1e-7``.

    Example:
        >>> import kopt
        >>> adadelta = kopt.chain(kopt.scale_by_adadelta(), kopt.scale_by_learning_rate(1.0))
    """
    values = _checked(rho=rho, epsilon=epsilon)
    state_dtype = check_state_dtype(state_dtype)

    def init(params):
        return ScaleByAdadeltaState(
            zeros_slots(params, state_dtype, real=True),
            zeros_slots(params, state_dtype, real=True),
            init_hyperparams(values, params),
        )

    @expects(ScaleByAdadeltaState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        rho, epsilon = hp["rho"], hp["epsilon"]
        # Keras keeps Adadelta's rho as a Python number, so its 1 - rho is formed in
        # double precision before rounding; while rho is the constructor's value, use that.
        one_minus_rho = jnp.where(
            rho == jnp.asarray(values["rho"], rho.dtype), jnp.asarray(1 - values["rho"], rho.dtype), 1 - rho
        )
        updates, accumulator, delta_accumulator = map_arrays(
            lambda g, a, d: _adadelta_array(g, a, d, rho, one_minus_rho, epsilon),
            updates,
            state.accumulator,
            state.delta_accumulator,
        )
        return updates, ScaleByAdadeltaState(accumulator, delta_accumulator, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- Adam, Adamax


class ScaleByAdamState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    m: Updates
    v: Updates
    vhat: Updates | None
    hyperparams: HyperParams


def _adam_array(g, m, v, vhat, beta_1, beta_2, epsilon, corrections, corrected_epsilon):
    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * abs_sq(g)
    if vhat is not None:
        vhat = jnp.maximum(vhat, v)
    second = v if vhat is None else vhat
    if corrected_epsilon:  # epsilon meets the corrected root (Keras 3's Lamb, optax's adam)
        first_correction, second_correction = corrections
        return (m / first_correction) / (jnp.sqrt(second / second_correction) + epsilon), m, v, vhat
    (bias_correction,) = corrections
    return bias_correction * m / (jnp.sqrt(second) + epsilon), m, v, vhat


def scale_by_adam(
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    state_dtype: Any = None,
    corrected_epsilon: bool = False,
) -> GradientTransformation:
    """Adam's scaling (Keras 2), bias correction folded into the step size.

    ``m <- beta_1*m + (1-beta_1)*g``; ``v <- beta_2*v + (1-beta_2)*g**2``;
    output ``c_t * m / (sqrt(v) + epsilon)`` with
    ``c_t = sqrt(1 - beta_2**t) / (1 - beta_1**t)``. ``m`` and ``v`` are stored
    uncorrected and ``epsilon`` meets the uncorrected ``sqrt(v)``, so this is
    *not* optax's ``scale_by_adam`` with the same ``epsilon``. With
    ``corrected_epsilon=True`` (Keras 3's Lamb, and optax's form) the output is
    ``(m / (1 - beta_1**t)) / (sqrt(v / (1 - beta_2**t)) + epsilon)``. With
    ``amsgrad=True``, ``vhat <- max(vhat, v)`` replaces ``v`` in the
    denominator (``v`` keeps its EMA). Defaults ``0.9, 0.999, 1e-7, False, None, False``.

    Example:
        >>> import kopt
        >>> adam = kopt.chain(kopt.scale_by_adam(amsgrad=True), kopt.scale_by_learning_rate(1e-3))
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    state_dtype = check_state_dtype(state_dtype)
    amsgrad = check_bool("amsgrad", amsgrad)
    corrected_epsilon = check_bool("corrected_epsilon", corrected_epsilon)

    def init(params):
        vhat = zeros_slots(params, state_dtype, real=True) if amsgrad else None
        return ScaleByAdamState(
            _zero_count(),
            zeros_slots(params, state_dtype),
            zeros_slots(params, state_dtype, real=True),
            vhat,
            init_hyperparams(values, params),
        )

    @expects(ScaleByAdamState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        beta_1, beta_2, epsilon = hp["beta_1"], hp["beta_2"], hp["epsilon"]
        t = _step_number(state.count, beta_1.dtype)
        corrections: tuple[jax.Array, ...] = (1 - beta_1**t, 1 - beta_2**t)
        if not corrected_epsilon:  # one scalar, folded into the step size
            corrections = (jnp.sqrt(corrections[1]) / corrections[0],)
        updates, m, v, vhat = map_arrays(
            lambda g, m, v, vhat: _adam_array(g, m, v, vhat, beta_1, beta_2, epsilon, corrections, corrected_epsilon),
            updates,
            state.m,
            state.v,
            state.vhat,
        )
        return updates, ScaleByAdamState(_increment(state.count), m, v, vhat, hp)

    return GradientTransformation(init, update)


class ScaleByAdamaxState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    m: Updates
    u: Updates
    hyperparams: HyperParams


def _adamax_array(g, m, u, beta_1, beta_2, epsilon, bias_correction):
    m = beta_1 * m + (1 - beta_1) * g
    u = jnp.maximum(beta_2 * u, jnp.abs(g))
    return bias_correction * m / (u + epsilon), m, u


def scale_by_adamax(
    beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, state_dtype: Any = None
) -> GradientTransformation:
    """Adamax's scaling (Keras 2): Adam with an infinity norm.

    ``m <- beta_1*m + (1-beta_1)*g``; ``u <- max(beta_2*u, |g|)``; output
    ``c_t * m / (u + epsilon)`` with ``c_t = 1 / (1 - beta_1**t)``. ``epsilon``
    is added to ``u`` and ``beta_2`` enters no correction. Defaults
    ``0.9, 0.999, 1e-7``.

    Example:
        >>> import kopt
        >>> adamax = kopt.chain(kopt.scale_by_adamax(), kopt.scale_by_learning_rate(2e-3))
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    state_dtype = check_state_dtype(state_dtype)

    def init(params):
        return ScaleByAdamaxState(
            _zero_count(),
            zeros_slots(params, state_dtype),
            zeros_slots(params, state_dtype, real=True),
            init_hyperparams(values, params),
        )

    @expects(ScaleByAdamaxState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        beta_1, beta_2, epsilon = hp["beta_1"], hp["beta_2"], hp["epsilon"]
        bias_correction = 1 / (1 - beta_1 ** _step_number(state.count, beta_1.dtype))
        updates, m, u = map_arrays(
            lambda g, m, u: _adamax_array(g, m, u, beta_1, beta_2, epsilon, bias_correction),
            updates,
            state.m,
            state.u,
        )
        return updates, ScaleByAdamaxState(_increment(state.count), m, u, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- Lion


class ScaleByLionState(NamedTuple):
    m: Updates
    hyperparams: HyperParams


def _lion_array(g, m, beta_1, beta_2):
    direction = jnp.sign(beta_1 * m + (1 - beta_1) * g)
    return direction, beta_2 * m + (1 - beta_2) * g


def scale_by_lion(beta_1: float = 0.9, beta_2: float = 0.99, state_dtype: Any = None) -> GradientTransformation:
    """Lion's sign update (Keras 3, tf_keras >= 2.13): each coordinate moves by exactly one step size.

    Output ``sign(beta_1*m + (1-beta_1)*g)``; then ``m <- beta_2*m + (1-beta_2)*g``
    (the output mixes ``m`` with ``beta_1``, the kept momentum with ``beta_2``).
    No step count, no epsilon. Defaults ``0.9, 0.99``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> lion = kopt.chain(kopt.scale_by_lion(), kopt.scale_by_learning_rate(1e-4))
        >>> updates, state = lion.update(jnp.array([0.5, -2.0, 0.0]), lion.init(jnp.zeros(3)))
        >>> (updates / 1e-4).round(3).tolist()  # one step size each way; none for a zero gradient
        [-1.0, 1.0, -0.0]
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2)
    state_dtype = check_state_dtype(state_dtype)

    def init(params):
        return ScaleByLionState(zeros_slots(params, state_dtype), init_hyperparams(values, params))

    @expects(ScaleByLionState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        updates, m = map_arrays(lambda g, m: _lion_array(g, m, hp["beta_1"], hp["beta_2"]), updates, state.m)
        return updates, ScaleByLionState(m, hp)

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
    weight_decay: float = 0.0,
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
    per array: it refuses the packed layout. Needs the params. ``weight_decay``
    is Keras': ``p <- p - p * weight_decay * lr_i`` before the rule reads ``p``.
    Defaults ``0.001, -0.8, 1e-30, 1e-3, 1.0, None, 0``.

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
        weight_decay=weight_decay,
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
        decayed = _decayed(params, hp["weight_decay"], lr)
        treedef: TreeDef
        leaves, treedef = jax.tree.flatten(updates)
        slots = [treedef.flatten_up_to(tree) for tree in (decayed, state.r, state.c, state.v)]
        results = [_adafactor_array(g, p, r, c, v, lr, t, hp) for g, p, r, c, v in zip(leaves, *slots, strict=True)]
        new_updates = treedef.unflatten([u.astype(g.dtype) for (u, *_), g in zip(results, leaves, strict=True)])
        new_updates = _through_decay(new_updates, decayed, params)
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
    weight_decay: float = 0.0,
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
    for the schedule-free average. Needs the params. ``weight_decay`` is
    Keras': ``y <- y - y * weight_decay * lr_i`` (no warm-up) before the rule
    reads ``y``. Defaults ``0.0025, 0.9, 0.999, 1e-8, 0, None, 0``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.schedule_free_adam(0.1)
        >>> params = jnp.array([1.0])
        >>> updates, state = opt.update(jnp.array([0.5]), opt.init(params), params)
        >>> round(float(params[0] + updates[0]), 4)  # at t = 1 the average and y jump to z, which moved by lr
        0.9
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, weight_decay=weight_decay)
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
        decayed = _decayed(params, hp["weight_decay"], lr)  # Keras decays with the rate before its warm-up
        updates, _, z, v = map_arrays(
            lambda g, p, z, v: _schedule_free_array(g, p, z, v, *coefficients), updates, decayed, state.z, state.v
        )
        updates = _through_decay(updates, decayed, params)
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
    weight_decay: float = 0.0,
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
    nothing that rescales its output after it. Needs the params.
    ``weight_decay`` is Keras': ``p <- p - p * weight_decay * lr_i`` before the
    rule reads ``p``. Defaults ``0.001, -0.5, 0.1, 0, 0, 0, 0, None, 0``.

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
        weight_decay=weight_decay,
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
        decayed = _decayed(params, hp["weight_decay"], lr)
        updates, _, accumulator, linear = map_arrays(
            lambda g, p, n, z: _ftrl_array(g, p, n, z, *coefficients), updates, decayed, state.accumulator, state.linear
        )
        updates = _through_decay(updates, decayed, params)
        return updates, FtrlState(rate_state, accumulator, linear, hp)

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- Nadam


class ScaleByNadamState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
    m: Updates
    v: Updates
    m_schedule: jax.Array
    hyperparams: HyperParams


class _NadamScalars(NamedTuple):
    mu_t: jax.Array
    mu_next: jax.Array
    m_schedule_new: jax.Array
    m_schedule_next: jax.Array
    v_correction: jax.Array


def _nadam_array(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    beta_1: jax.Array,
    beta_2: jax.Array,
    epsilon: jax.Array,
    s: _NadamScalars,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    g_hat = g / (1 - s.m_schedule_new)
    m = beta_1 * m + (1 - beta_1) * g
    m_hat = m / (1 - s.m_schedule_next)
    v = beta_2 * v + (1 - beta_2) * abs_sq(g)
    v_hat = v / s.v_correction
    m_bar = (1 - s.mu_t) * g_hat + s.mu_next * m_hat
    return m_bar / (jnp.sqrt(v_hat) + epsilon), m, v


def scale_by_nadam(
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    schedule_decay: float = 0.004,
    state_dtype: Any = None,
) -> GradientTransformation:
    """Nadam's scaling (Keras 2), with its momentum schedule.

    ``mu_t = beta_1 * (1 - 0.5 * 0.96**(t * schedule_decay))``, ``M`` the running
    product ``mu_1 ... mu_t`` (state ``m_schedule``, starts at 1)::

        g_hat = g / (1 - M*mu_t)
        m <- beta_1*m + (1-beta_1)*g;     m_hat = m / (1 - M*mu_t*mu_{t+1})
        v <- beta_2*v + (1-beta_2)*g**2;  v_hat = v / (1 - beta_2**t)
        output ((1-mu_t)*g_hat + mu_{t+1}*m_hat) / (sqrt(v_hat) + epsilon)

    ``epsilon`` meets the bias-corrected ``v`` here (unlike Adam). Defaults
    ``0.9, 0.999, 1e-7, 0.004``.

    Example:
        >>> import kopt
        >>> nadam = kopt.chain(kopt.scale_by_nadam(), kopt.scale_by_learning_rate(2e-3))
    """
    values = _checked(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, schedule_decay=schedule_decay)
    state_dtype = check_state_dtype(state_dtype)

    def init(params):
        m_schedule = jnp.ones((), hyperparam_dtype(params))
        return ScaleByNadamState(
            _zero_count(),
            zeros_slots(params, state_dtype),
            zeros_slots(params, state_dtype, real=True),
            m_schedule,
            init_hyperparams(values, params),
        )

    @expects(ScaleByNadamState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        beta_1, beta_2, epsilon = hp["beta_1"], hp["beta_2"], hp["epsilon"]
        t = _step_number(state.count, beta_1.dtype)
        base = jnp.asarray(0.96, beta_1.dtype)
        mu_t = beta_1 * (1 - 0.5 * base ** (t * hp["schedule_decay"]))
        mu_next = beta_1 * (1 - 0.5 * base ** ((t + 1) * hp["schedule_decay"]))
        m_schedule_new = state.m_schedule * mu_t
        scalars = _NadamScalars(mu_t, mu_next, m_schedule_new, m_schedule_new * mu_next, 1 - beta_2**t)
        updates, m, v = map_arrays(
            lambda g, m, v: _nadam_array(g, m, v, beta_1, beta_2, epsilon, scalars), updates, state.m, state.v
        )
        return updates, ScaleByNadamState(_increment(state.count), m, v, m_schedule_new, hp)

    return GradientTransformation(init, update)


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
        updates, _ = map_arrays(lambda g, p: (g + weight_decay * p, p), updates, params)
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
