"""Learning-rate schedules whose numbers live in the optimizer state.

A :class:`Schedule` is a function ``fn(step, **hyperparams) -> lr`` together
with the initial values of its float hyperparameters (``lr`` is always the
schedule's base value: the constant, the initial or the peak learning rate).
:func:`~kopt.scale_by_learning_rate` stores them as arrays in its state and
calls ``fn`` with them every step, so ``kopt.set_hyperparams(state, lr=...)``
rescales a schedule inside a jitted train step without recompiling it; the
learning rate of the latest step is reported as ``current_lr``. Step counts,
boundaries and flags are fixed Python values. Calling a schedule directly,
``schedule(step)``, evaluates it at its initial values.

``step`` is the number of updates done before the one being scaled (0 first).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kopt.file_safety import shorten
from kopt.validation import as_real, check_bool, check_count, check_hyperparam, is_concrete


class Schedule(NamedTuple):
    """``fn(step, **hyperparams) -> lr`` plus the initial ``hyperparams``.

    ``config`` records how one of kopt's schedule functions made it (its name
    and arguments), which is what :func:`to_config` writes; a schedule built
    by hand from a function has none and cannot be written.
    """

    fn: Callable[..., jax.Array]
    hyperparams: Mapping[str, float]
    config: Mapping[str, Any] | None = None

    def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
        values = {name: jnp.asarray(value) for name, value in self.hyperparams.items()}
        return self.fn(jnp.asarray(step), **values)


def _checked(**values: float) -> dict[str, float]:
    return {name: check_hyperparam(name, value) for name, value in values.items()}


def _made_by(name: str, fn: Callable[..., jax.Array], hyperparams: dict[str, float], **fixed: Any) -> Schedule:
    """A schedule that remembers it was made by ``name`` from ``hyperparams`` and the ``fixed`` arguments."""
    return Schedule(fn, hyperparams, {"class_name": name, "config": {**hyperparams, **fixed}})


def _boundaries(boundaries: Sequence[int], minimum: int) -> list[int]:
    result = [check_count("boundaries", b, minimum=minimum) for b in boundaries]
    if any(b >= c for b, c in itertools.pairwise(result)):
        raise ValueError(f"boundaries must be strictly increasing, got {shorten(result)}")
    return result


def _float_step(step: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.asarray(step).astype(jnp.result_type(like))


def constant_schedule(lr: float) -> Schedule:
    """``lr_i = lr``.

    Example:
        >>> import kopt
        >>> float(kopt.constant_schedule(0.5)(7))
        0.5
    """

    def constant(step: jax.Array, lr: jax.Array) -> jax.Array:
        del step
        return lr

    return _made_by("constant_schedule", constant, _checked(lr=lr))


def inverse_time_decay(lr: float, decay: float, decay_steps: int = 1, staircase: bool = False) -> Schedule:
    """Keras 2's ``decay``: ``lr_i = lr * (1 / (1 + decay * i / decay_steps))``.

    The first step uses ``lr`` itself. ``lr`` and ``decay`` are hyperparameters
    in the state; as in Keras, ``lr`` reads back as the undecayed value.
    ``decay_steps`` and ``staircase`` (``floor`` of ``i / decay_steps``) are
    those of TensorFlow's ``InverseTimeDecay``; the defaults give Keras 2's rule.

    Example:
        >>> import kopt
        >>> schedule = kopt.inverse_time_decay(0.1, decay=1.0)
        >>> [round(float(schedule(i)), 4) for i in range(3)]
        [0.1, 0.05, 0.0333]
    """
    decay_steps = check_count("decay_steps", decay_steps)
    staircase = check_bool("staircase", staircase)

    def inverse_time(step: jax.Array, lr: jax.Array, decay: jax.Array) -> jax.Array:
        progress = _float_step(step, decay) / decay_steps
        progress = jnp.floor(progress) if staircase else progress
        # Keras forms the reciprocal first and then multiplies; float32 bits depend on it.
        return lr * (1.0 / (1.0 + decay * progress))

    return _made_by(
        "inverse_time_decay", inverse_time, _checked(lr=lr, decay=decay), decay_steps=decay_steps, staircase=staircase
    )


def exponential_decay(lr: float, decay_steps: int, decay_rate: float, staircase: bool = False) -> Schedule:
    """``lr_i = lr * decay_rate ** (i / decay_steps)`` (``floor`` of the exponent if ``staircase``).

    Example:
        >>> import kopt
        >>> schedule = kopt.exponential_decay(1.0, decay_steps=10, decay_rate=0.5, staircase=True)
        >>> [float(schedule(i)) for i in (0, 9, 10, 25)]
        [1.0, 1.0, 0.5, 0.25]
    """
    decay_steps = check_count("decay_steps", decay_steps)
    staircase = check_bool("staircase", staircase)

    def exponential(step: jax.Array, lr: jax.Array, decay_rate: jax.Array) -> jax.Array:
        exponent = _float_step(step, lr) / decay_steps
        return lr * decay_rate ** (jnp.floor(exponent) if staircase else exponent)

    hyperparams = _checked(lr=lr, decay_rate=decay_rate)
    return _made_by("exponential_decay", exponential, hyperparams, decay_steps=decay_steps, staircase=staircase)


def piecewise_constant(lr: float, boundaries: Sequence[int], scales: Sequence[float]) -> Schedule:
    """``lr`` times the product of ``scales[j]`` over the ``boundaries[j] <= i``.

    Example:
        >>> import kopt
        >>> schedule = kopt.piecewise_constant(0.1, boundaries=[10, 20], scales=[0.5, 0.1])
        >>> [round(float(schedule(i)), 4) for i in (0, 10, 20)]
        [0.1, 0.05, 0.005]
    """
    boundaries = _boundaries(boundaries, minimum=0)
    scales = [check_hyperparam("scale", s) for s in scales]
    if len(boundaries) != len(scales):
        raise ValueError(f"boundaries and scales must have the same length, got {len(boundaries)} and {len(scales)}")

    def piecewise(step: jax.Array, lr: jax.Array) -> jax.Array:
        factor = jnp.ones_like(lr)
        for boundary, scale in zip(boundaries, scales, strict=True):
            factor = jnp.where(step >= boundary, factor * scale, factor)
        return lr * factor

    return _made_by("piecewise_constant", piecewise, _checked(lr=lr), boundaries=boundaries, scales=scales)


def polynomial_decay(lr: float, end_lr: float, decay_steps: int, power: float = 1.0, cycle: bool = False) -> Schedule:
    """``lr_i = (lr - end_lr) * (1 - min(i, decay_steps) / decay_steps) ** power + end_lr``.

    With ``cycle=True`` (TensorFlow's ``PolynomialDecay(cycle=True)``) the decay
    does not stop at ``decay_steps``: it runs over ``decay_steps * ceil(i / decay_steps)``
    steps instead (``decay_steps`` at ``i = 0``), jumping back up at each multiple.

    Example:
        >>> import kopt
        >>> schedule = kopt.polynomial_decay(1.0, end_lr=0.0, decay_steps=4)
        >>> [float(schedule(i)) for i in (0, 2, 4, 8)]
        [1.0, 0.5, 0.0, 0.0]
    """
    decay_steps = check_count("decay_steps", decay_steps)
    cycle = check_bool("cycle", cycle)

    def polynomial(step: jax.Array, lr: jax.Array, end_lr: jax.Array, power: jax.Array) -> jax.Array:
        i = _float_step(step, lr)
        if cycle:
            length = decay_steps * jnp.where(i == 0, 1, jnp.ceil(i / decay_steps))
            remaining = 1 - i / length
        else:
            remaining = 1 - jnp.minimum(i, decay_steps) / decay_steps
        return (lr - end_lr) * remaining**power + end_lr

    hyperparams = _checked(lr=lr, end_lr=end_lr, power=power)
    return _made_by("polynomial_decay", polynomial, hyperparams, decay_steps=decay_steps, cycle=cycle)


def cosine_decay(
    lr: float,
    decay_steps: int,
    alpha: float = 0.0,
    *,
    restarts: bool = False,
    t_mul: float = 1.0,
    m_mul: float = 1.0,
    scale_floor: bool = True,
) -> Schedule:
    """Cosine annealing from ``lr`` to ``alpha * lr`` over ``decay_steps``, optionally restarting.

    Within a period of length ``T`` at position ``s``:
    ``lr_i = peak * ((1 - alpha) * (1 + cos(pi * s / T)) / 2 + alpha)``. Without
    restarts there is one period and the rate stays at ``alpha * lr`` after it.
    With ``restarts=True`` (SGDR), period ``k`` lasts ``decay_steps * t_mul**k``
    steps and peaks at ``lr * m_mul**k``; its floor is ``alpha * lr * m_mul**k``,
    or ``alpha * lr`` in every period with ``scale_floor=False`` (TensorFlow's
    ``CosineDecayRestarts``: ``lr * ((1 - alpha) * m_mul**k * shape + alpha)``).

    Example:
        >>> import kopt
        >>> schedule = kopt.cosine_decay(1.0, decay_steps=4, restarts=True)
        >>> [round(float(schedule(i)), 3) for i in (0, 2, 4, 6)]
        [1.0, 0.5, 1.0, 0.5]
    """
    decay_steps = check_count("decay_steps", decay_steps)
    restarts = check_bool("restarts", restarts)
    scale_floor = check_bool("scale_floor", scale_floor)
    t_mul = as_real("t_mul", t_mul)
    if t_mul <= 0:
        raise ValueError(f"t_mul must be > 0, got {t_mul}")

    def cosine(step: jax.Array, lr: jax.Array, alpha: jax.Array, m_mul: jax.Array) -> jax.Array:
        i = _float_step(step, lr)
        length: int | jax.Array
        if not restarts:
            period, position, length = jnp.zeros_like(i), jnp.minimum(i, decay_steps), decay_steps
        elif t_mul == 1.0:
            period = jnp.floor(i / decay_steps)
            position, length = i - period * decay_steps, decay_steps
        else:
            period = jnp.floor(jnp.log1p(i / decay_steps * (t_mul - 1)) / math.log(t_mul))
            start = decay_steps * (1 - t_mul**period) / (1 - t_mul)
            position, length = i - start, decay_steps * t_mul**period
        shape = 0.5 * (1 + jnp.cos(jnp.pi * position / length))
        if scale_floor:
            return lr * m_mul**period * ((1 - alpha) * shape + alpha)
        return lr * ((1 - alpha) * m_mul**period * shape + alpha)

    hyperparams = _checked(lr=lr, alpha=alpha, m_mul=m_mul)
    fixed = {"decay_steps": decay_steps, "restarts": restarts, "t_mul": t_mul, "scale_floor": scale_floor}
    return _made_by("cosine_decay", cosine, hyperparams, **fixed)


def linear_warmup(lr: float, warmup_steps: int, init_lr: float = 0.0) -> Schedule:
    """Linear from ``init_lr`` at step 0 to ``lr`` at ``warmup_steps``, then constant ``lr``.

    Example:
        >>> import kopt
        >>> schedule = kopt.linear_warmup(1.0, warmup_steps=4)
        >>> [float(schedule(i)) for i in (0, 1, 4, 9)]
        [0.0, 0.25, 1.0, 1.0]
    """
    warmup_steps = check_count("warmup_steps", warmup_steps)

    def warmup(step: jax.Array, lr: jax.Array, init_lr: jax.Array) -> jax.Array:
        fraction = jnp.minimum(_float_step(step, lr), warmup_steps) / warmup_steps
        return init_lr + (lr - init_lr) * fraction

    return _made_by("linear_warmup", warmup, _checked(lr=lr, init_lr=init_lr), warmup_steps=warmup_steps)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs ``schedules[k]`` from ``boundaries[k-1]`` on, restarting its step count there.

    The hyperparameters of ``schedules[k]`` get the suffix ``_k`` (``lr_0``,
    ``lr_1``, ...), so each part can be changed on its own.

    Example:
        >>> import kopt
        >>> schedule = kopt.join_schedules(
        ...     [kopt.linear_warmup(1.0, 2), kopt.cosine_decay(1.0, 4)], boundaries=[2])
        >>> [round(float(schedule(i)), 3) for i in (0, 1, 2, 4, 6)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    schedules = list(schedules)
    boundaries = _boundaries(boundaries, minimum=1)
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"join_schedules needs len(schedules) - 1 boundaries, got {len(boundaries)}")
    for index, schedule in enumerate(schedules):
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedules[{index}] must be a kopt.Schedule, got {type(schedule).__name__}")
    starts = [0, *boundaries]
    names = [{f"{name}_{k}": name for name in s.hyperparams} for k, s in enumerate(schedules)]

    def joined(step: jax.Array, **hyperparams: jax.Array) -> jax.Array:
        values = [
            s.fn(step - start, **{name: hyperparams[key] for key, name in keys.items()})
            for s, start, keys in zip(schedules, starts, names, strict=True)
        ]
        result = values[0]
        for boundary, value in zip(boundaries, values[1:], strict=True):
            result = jnp.where(step >= boundary, value, result)
        return result

    merged = {key: s.hyperparams[name] for s, keys in zip(schedules, names, strict=True) for key, name in keys.items()}
    return Schedule(
        joined, merged, {"class_name": "join_schedules", "config": {"schedules": schedules, "boundaries": boundaries}}
    )


#: kopt's schedule functions, by the name their configs give.
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    f.__name__: f
    for f in (
        constant_schedule,
        inverse_time_decay,
        exponential_decay,
        piecewise_constant,
        polynomial_decay,
        cosine_decay,
        linear_warmup,
        join_schedules,
    )
}


def is_config(value: Any) -> bool:
    """Whether ``value`` is a kopt schedule's config (``{"class_name": <a kopt schedule>, ...}``)."""
    return isinstance(value, Mapping) and value.get("class_name") in SCHEDULES


def _plain(name: str, value: Any) -> Any:
    """``value`` (a number, bool, array scalar or list of them) as JSON data; a traced one cannot be written."""
    if isinstance(value, (list, tuple)):
        return [_plain(name, v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if not is_concrete(value):
        raise ValueError(f"{name} is traced (inside jit): a config needs its value, write it outside jit")
    return int(value) if np.issubdtype(np.asarray(value).dtype, np.integer) else float(value)


def to_config(schedule: Schedule, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"class_name": ..., "config": {...}}``: ``schedule`` as plain JSON data, read back by :func:`from_config`.

    ``values`` (e.g. ``kopt.get_hyperparams(state)``) replace the initial
    values of the schedule's hyperparameters, so a schedule rescaled with
    ``set_hyperparams`` is written as it now is. A joined schedule holds the
    configs of its parts. A schedule built by hand from a function has no
    config: a ``ValueError`` (configs never hold code).

    Example:
        >>> import kopt
        >>> kopt.serialize(kopt.linear_warmup(0.1, warmup_steps=100))  # calls to_config
        {'class_name': 'linear_warmup', 'config': {'lr': 0.1, 'init_lr': 0.0, 'warmup_steps': 100}}
    """
    if not isinstance(schedule, Schedule) or schedule.config is None:
        raise ValueError(
            f"{schedule!r} is not made by one of kopt's schedule functions ({', '.join(SCHEDULES)}), so it cannot "
            "be written as a config (configs hold numbers, never code)"
        )
    values = {name: (values or {}).get(name, initial) for name, initial in schedule.hyperparams.items()}
    class_name, arguments = schedule.config["class_name"], dict(schedule.config["config"])
    if class_name == "join_schedules":
        parts = arguments["schedules"]
        arguments["schedules"] = [
            to_config(part, {name: values[f"{name}_{k}"] for name in part.hyperparams}) for k, part in enumerate(parts)
        ]
        arguments["boundaries"] = list(arguments["boundaries"])
    else:
        arguments = {name: _plain(name, values.get(name, value)) for name, value in arguments.items()}
    return {"class_name": class_name, "config": arguments}


def from_config(config: Mapping[str, Any]) -> Schedule:
    """The schedule a :func:`to_config` dict describes; an unknown name or argument is a ``ValueError``.

    Example:
        >>> import kopt
        >>> config = {"class_name": "cosine_decay", "config": {"lr": 1.0, "decay_steps": 4}}
        >>> round(float(kopt.deserialize(config)(2)), 3)  # calls from_config
        0.5
    """
    class_name = config.get("class_name") if isinstance(config, Mapping) else None
    arguments = config.get("config") if isinstance(config, Mapping) else None
    if class_name not in SCHEDULES or not isinstance(arguments, Mapping) or set(config) != {"class_name", "config"}:
        raise ValueError(
            f"{shorten(config)} is not a kopt schedule config: expected {{'class_name': one of {', '.join(SCHEDULES)}, "
            "'config': {...}}"
        )
    constructor = SCHEDULES[class_name]
    allowed = list(inspect.signature(constructor).parameters)
    unknown = [key for key in arguments if key not in allowed]
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(map(repr, unknown))} for {class_name}; allowed: {allowed}")
    if class_name == "join_schedules":
        arguments = {**arguments, "schedules": [from_config(part) for part in arguments.get("schedules", ())]}
    try:
        return constructor(**arguments)
    except TypeError as error:  # a missing argument
        raise ValueError(f"{class_name}: {error}") from None
