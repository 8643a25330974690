"""The seven Keras 2 optimizers, each a chain of kopt transformations.

Signatures and defaults are Keras 2.2.4's, plus ``clipnorm`` / ``clipvalue``
on every optimizer, ``learning_rate`` as a synonym of ``lr``, ``state_dtype``
(see :mod:`kopt.transforms`), ``packed`` (the default ``None`` packs the
small leaves of the params given to ``init`` into a few flat buffers and keeps
big or device-split leaves alone, see ``kopt.packed(auto=True)``: same numbers,
far faster on trees of many small leaves; ``True`` always packs; ``False``
keeps every slot leaf by leaf) and :func:`AdamW`. Each returns
an :class:`Optimizer`: the ``GradientTransformation`` of the chain, which also
remembers its Keras config for :func:`kopt.serialize`.

Every chain is: [clip_by_global_norm(clipnorm)], [clip_by_value(clipvalue)],
then the optimizer's transformations. For SGD the learning rate comes before
``trace`` so the velocity holds lr-scaled steps, as in Keras; elsewhere the
learning rate is the last factor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeGuard, TypeVar

import jax

from kopt import packing
from kopt.base import GradientTransformation, chain
from kopt.clipping import clip_by_global_norm, clip_by_value
from kopt.schedules import Schedule, inverse_time_decay
from kopt.transforms import (
    add_decayed_weights,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_nadam,
    scale_by_rms,
    trace,
)
from kopt.tree import rounded_once
from kopt.validation import check_clip_option, check_hyperparam, check_state_dtype, is_concrete

#: Keras 2.2.4's ``K.epsilon()``, the value ``epsilon=None`` resolves to.
EPSILON = 1e-7

LearningRate = float | Schedule | Callable[[jax.Array], jax.Array]


def with_options_doc(text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator that appends ``text`` to a constructor's docstring: the options a family of constructors
    shares (a Keras dialect's), written once and shown in each one's help and API page."""

    def documented(constructor: Callable[..., Any]) -> Callable[..., Any]:
        constructor.__doc__ = (constructor.__doc__ or "").rstrip() + "\n" + text
        return constructor

    return documented


class Optimizer(GradientTransformation):
    """A ``GradientTransformation`` made by a Keras-named constructor.

    It is the ``(init, update)`` pair of its chain and nothing else at run
    time; ``class_name``, ``config`` (the Keras ``get_config`` dict, with the
    values given to the constructor) and ``flavor`` serve :func:`kopt.serialize`.

    Like optax's ``GradientTransformation`` it is a pytree whose two children
    are ``init`` and ``update``; the label (``class_name``, ``config``,
    ``flavor``) is static data, kept by every tree utility (``jax.tree.map``,
    ``eqx.filter`` / ``eqx.partition`` / ``eqx.filter_jit``, ``flax.struct``
    fields), by ``_replace``, ``copy`` and pickling (``init`` and ``update``
    are closures: ``cloudpickle`` can write them, plain ``pickle`` cannot,
    as with optax).

    Example:
        >>> import jax, kopt
        >>> opt = jax.tree.map(lambda f: f, kopt.Adam(lr=0.1))
        >>> kopt.serialize(opt)["config"]["lr"]
        0.1
    """

    class_name: str
    config: dict[str, Any]
    flavor: str

    def __new__(
        cls, transform: GradientTransformation, class_name: str, config: dict[str, Any], flavor: str = "keras"
    ) -> Optimizer:
        self = super().__new__(cls, transform.init, transform.update)
        self.class_name = class_name
        self.config = config
        self.flavor = flavor
        return self

    def _replace(self, **changes: Any) -> Optimizer:
        return Optimizer(GradientTransformation(*self)._replace(**changes), self.class_name, self.config, self.flavor)

    def __reduce__(self) -> tuple:
        return Optimizer, (GradientTransformation(*self), self.class_name, self.config, self.flavor)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.config.items())
        namespace = {"keras": "kopt", "keras3": "kopt.keras"}.get(self.flavor, "kopt.tf_keras")
        return f"{namespace}.{self.class_name}({arguments})"


class _Label:
    """An optimizer's static label in its tree structure: hashable and comparable, as ``jit`` needs."""

    def __init__(self, class_name: str, config: dict[str, Any], flavor: str):
        self.class_name, self.config, self.flavor = class_name, config, flavor

    def __hash__(self) -> int:  # equal labels have equal keys: a hash of what stays hashable
        return hash((self.class_name, self.flavor, tuple(self.config)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Label) or (self.class_name, self.flavor) != (other.class_name, other.flavor):
            return False
        try:
            return bool(self.config == other.config)
        except Exception:  # arrays that cannot be compared to one bool (tracers): not provably equal
            return False


jax.tree_util.register_pytree_with_keys(
    Optimizer,
    lambda opt: (
        ((jax.tree_util.GetAttrKey("init"), opt.init), (jax.tree_util.GetAttrKey("update"), opt.update)),
        _Label(opt.class_name, opt.config, opt.flavor),
    ),
    lambda label, children: Optimizer(GradientTransformation(*children), label.class_name, label.config, label.flavor),
    flatten_func=lambda opt: ((opt.init, opt.update), _Label(opt.class_name, opt.config, opt.flavor)),
)


def _resolve_lr(lr: LearningRate | None, learning_rate: LearningRate | None, default: float) -> LearningRate:
    if lr is not None and learning_rate is not None:
        raise ValueError("give the learning rate as lr or as learning_rate, not both")
    value = learning_rate if lr is None else lr
    return default if value is None else value


def _decayed(lr: LearningRate, decay: float) -> Schedule | Callable:
    """Keras' ``decay`` as a schedule; a schedule given as ``lr`` already decides the decay."""
    if callable(lr):
        decay = check_hyperparam("decay", decay)
        if not is_concrete(decay) or decay != 0:
            raise ValueError("decay must be 0 when lr is a schedule (put the decay in the schedule)")
        return lr
    return inverse_time_decay(lr, decay)


_Clip = TypeVar("_Clip", float, jax.Array, float | jax.Array)


def switched_on(clip: _Clip | None) -> TypeGuard[_Clip]:
    """``None`` or ``0`` mean off, as in Keras; a traced value is on (see ``check_clip_option``)."""
    return clip is not None and (not is_concrete(clip) or bool(clip))


def _keras_optimizer(
    class_name: str,
    config: dict[str, Any],
    clipnorm: float | None,
    clipvalue: float | None,
    state_dtype: Any,
    packed: bool | None,
    *transforms: GradientTransformation,
) -> Optimizer:
    """Prepends Keras' gradient clipping to ``transforms``, packs the chain if asked, labels it.

    ``state_dtype`` (already given to the transforms) is added to the config
    when set, by name, so configs stay JSON; ``packed`` when not the default ``None``.
    """
    clipnorm = check_clip_option("clipnorm", clipnorm)
    clipvalue = check_clip_option("clipvalue", clipvalue)
    clipping = []
    if switched_on(clipnorm):
        clipping.append(clip_by_global_norm(clipnorm))
    if switched_on(clipvalue):
        clipping.append(clip_by_value(clipvalue))
    given = {name: value for name, value in (("clipnorm", clipnorm), ("clipvalue", clipvalue)) if value is not None}
    if state_dtype is not None:
        config = {**config, "state_dtype": check_state_dtype(state_dtype).name}
    transform = packing.as_asked(rounded_once(chain(*clipping, *transforms)), packed)
    if packed is not None:  # the default stays out of configs, which then read as Keras' own
        config = {**config, "packed": packed}
    return Optimizer(transform, class_name, {**given, **config})


def SGD(
    lr: LearningRate | None = None,
    momentum: float = 0.0,
    decay: float = 0.0,
    nesterov: bool = False,
    *,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    learning_rate: LearningRate | None = None,
    state_dtype: Any = None,
    packed: bool | None = None,
) -> Optimizer:
    """Stochastic gradient descent with momentum (Keras 2).

    ``v = momentum*m - lr_i*g``; ``m <- v``; ``p <- p + v``, or with Nesterov
    ``p <- p + momentum*v - lr_i*g``; ``lr_i = lr / (1 + decay*i)``.
    Defaults ``lr=0.01, momentum=0, decay=0, nesterov=False``.
    Chain: ``scale_by_learning_rate(inverse_time_decay(lr, decay))``,
    ``trace(momentum, nesterov)``.

    Example:
        >>> import kopt
        >>> opt = kopt.SGD(lr=0.01, decay=1e-6, momentum=0.9, nesterov=True)
    """
    lr = _resolve_lr(lr, learning_rate, 0.01)
    config = {"lr": lr, "momentum": momentum, "decay": decay, "nesterov": nesterov}
    return _keras_optimizer(
        "SGD",
        config,
        clipnorm,
        clipvalue,
        state_dtype,
        packed,
        scale_by_learning_rate(_decayed(lr, decay)),
        trace(momentum, nesterov, state_dtype),
    )


def RMSprop(
    lr: LearningRate | None = None,
    rho: float = 0.9,
    epsilon: float | None = None,
    decay: float = 0.0,
    *,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    learning_rate: LearningRate | None = None,
    state_dtype: Any = None,
    packed: bool | None = None,
) -> Optimizer:
    """RMSprop (Keras 2): ``a <- rho*a + (1-rho)*g**2``; ``p <- p - lr_i*g / (sqrt(a) + epsilon)``.

    Defaults ``lr=0.001, rho=0.9, epsilon=None (1e-7), decay=0``.
    Chain: ``scale_by_rms(rho, epsilon, state_dtype)``, ``scale_by_learning_rate(...)``.

    Example:
        >>> import kopt
        >>> opt = kopt.RMSprop(lr=1e-3, clipnorm=1.0)
    """
    lr = _resolve_lr(lr, learning_rate, 0.001)
    epsilon = EPSILON if epsilon is None else epsilon
    config = {"lr": lr, "rho": rho, "decay": decay, "epsilon": epsilon}
    return _keras_optimizer(
        "RMSprop",
        config,
        clipnorm,
        clipvalue,
        state_dtype,
        packed,
        scale_by_rms(rho, epsilon, state_dtype),
        scale_by_learning_rate(_decayed(lr, decay)),
    )


def Adagrad(
    lr: LearningRate | None = None,
    epsilon: float | None = None,
    decay: float = 0.0,
    *,
    initial_accumulator_value: float = 0.0,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    learning_rate: LearningRate | None = None,
    state_dtype: Any = None,
    packed: bool | None = None,
) -> Optimizer:
    """Adagrad (Keras 2): ``a <- a + g**2`` (from zero); ``p <- p - lr_i*g / (sqrt(a) + epsilon)``.

    Defaults ``lr=0.01, epsilon=None (1e-7), decay=0``; ``initial_accumulator_value=0``
    (Keras 2.2.4 starts ``a`` at zero; TensorFlow's Keras at 0.1, see :mod:`kopt.tf_keras`).
    Chain: ``scale_by_adagrad(epsilon, state_dtype, initial_accumulator_value)``,
    ``scale_by_learning_rate(...)``.

    Example:
        >>> import kopt
        >>> opt = kopt.Adagrad(lr=0.01, clipvalue=0.5)
    """
    lr = _resolve_lr(lr, learning_rate, 0.01)
    epsilon = EPSILON if epsilon is None else epsilon
    config = {"lr": lr, "decay": decay, "epsilon": epsilon}
    # a kopt extension: the config keeps Keras 2.2.4's keys otherwise
    if not is_concrete(initial_accumulator_value) or initial_accumulator_value != 0:
        config["initial_accumulator_value"] = initial_accumulator_value
    return _keras_optimizer(
        "Adagrad",
        config,
        clipnorm,
        clipvalue,
        state_dtype,
        packed,
        scale_by_adagrad(epsilon, state_dtype, initial_accumulator_value=initial_accumulator_value),
        scale_by_learning_rate(_decayed(lr, decay)),
    )


def Adadelta(
    lr: LearningRate | None = None,
    rho: float = 0.95,
    epsilon: float | None = None,
    decay: float = 0.0,
    *,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    learning_rate: LearningRate | None = None,
    state_dtype: Any = None,
    packed: bool | None = None,
) -> Optimizer:
    """Adadelta (Keras 2): ``p <- p - lr_i*u`` with ``u`` from :func:`~kopt.scale_by_adadelta`.

    Defaults ``lr=1.0, rho=0.95, epsilon=None (1e-7), decay=0``.
    Chain: ``scale_by_adadelta(rho, epsilon)``, ``scale_by_learning_rate(...)``.

    Example:
        >>> import kopt
        >>> opt = kopt.Adadelta()
    """
    lr = _resolve_lr(lr, learning_rate, 1.0)
    epsilon = EPSILON if epsilon is None else epsilon
    config = {"lr": lr, "rho": rho, "decay": decay, "epsilon": epsilon}
    return _keras_optimizer(
        "Adadelta",
        config,
        clipnorm,
        clipvalue,
        state_dtype,
        packed,
        scale_by_adadelta(rho, epsilon, state_dtype),
        scale_by_learning_rate(_decayed(lr, decay)),
    )


def Adam(
    lr: LearningRate | None = None,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float | None = None,
    decay: float = 0.0,
    amsgrad: bool = False,
    *,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    learning_rate: LearningRate | None = None,
    state_dtype: Any = None,
    packed: bool | None = None,
) -> Optimizer:
    """Adam (Keras 2), optionally AMSGrad.

    ``p <- p - lr_i * sqrt(1-beta_2**t)/(1-beta_1**t) * m / (sqrt(v) + epsilon)``
    (see :func:`~kopt.scale_by_adam`). Defaults ``lr=0.001, beta_1=0.9,
    beta_2=0.999, epsilon=None (1e-7), decay=0, amsgrad=False``.
    Chain: ``scale_by_adam(beta_1, beta_2, epsilon, amsgrad)``, ``scale_by_learning_rate(...)``.

    Example:
        >>> import kopt
        >>> opt = kopt.Adam(lr=1e-3, clipnorm=1.0)
    """
    lr = _resolve_lr(lr, learning_rate, 0.001)
    epsilon = EPSILON if epsilon is None else epsilon
    config = {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "decay": decay, "epsilon": epsilon, "amsgrad": amsgrad}
    return _keras_optimizer(
        "Adam",
        config,
        clipnorm,
        clipvalue,
        state_dtype,
        packed,
        scale_by_adam(beta_1, beta_2, epsilon, amsgrad, state_dtype),
        scale_by_learning_rate(_decayed(lr, decay)),
    )


def AdamW(
    lr: LearningRate | None = None,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float | None = None,
    decay: float = 0.0,
    amsgrad: bool = False,
    weight_decay: float = 0.004,
    *,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    learning_rate: LearningRate | None = None,
    state_dtype: Any = None,
    packed: bool | None = None,
) -> Optimizer:
    """Adam of the spec with decoupled weight decay (a kopt extension; Keras 2 has no AdamW).

    ``p <- p - lr_i * sqrt(1-beta_2**t)/(1-beta_1**t) * m / (sqrt(v) + epsilon)
    - lr_i * weight_decay * p`` with ``lr_i = lr / (1 + decay*i)`` (decayed,
    not bias-corrected) and ``p`` the params before the step. Every leaf is
    decayed; for masks compose ``add_decayed_weights(rate, mask)`` yourself.
    Defaults as :func:`Adam`, ``weight_decay=0.004``.
    Chain: ``scale_by_adam(...)``, ``add_decayed_weights(weight_decay)``,
    ``scale_by_learning_rate(...)``.

    Example:
        >>> import kopt
        >>> opt = kopt.AdamW(lr=1e-3, weight_decay=1e-2)
    """
    lr = _resolve_lr(lr, learning_rate, 0.001)
    epsilon = EPSILON if epsilon is None else epsilon
    config = {
        "lr": lr,
        "beta_1": beta_1,
        "beta_2": beta_2,
        "decay": decay,
        "epsilon": epsilon,
        "amsgrad": amsgrad,
        "weight_decay": weight_decay,
    }
    return _keras_optimizer(
        "AdamW",
        config,
        clipnorm,
        clipvalue,
        state_dtype,
        packed,
        scale_by_adam(beta_1, beta_2, epsilon, amsgrad, state_dtype),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(_decayed(lr, decay)),
    )


def Adamax(
    lr: LearningRate | None = None,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float | None = None,
    decay: float = 0.0,
    *,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    learning_rate: LearningRate | None = None,
    state_dtype: Any = None,
    packed: bool | None = None,
) -> Optimizer:
    """Adamax (Keras 2): ``p <- p - lr_i/(1-beta_1**t) * m / (u + epsilon)``, ``u <- max(beta_2*u, |g|)``.

    Defaults ``lr=0.002, beta_1=0.9, beta_2=0.999, epsilon=None (1e-7), decay=0``.
    Chain: ``scale_by_adamax(beta_1, beta_2, epsilon)``, ``scale_by_learning_rate(...)``.

    Example:
        >>> import kopt
        >>> opt = kopt.Adamax(lr=2e-3)
    """
    lr = _resolve_lr(lr, learning_rate, 0.002)
    epsilon = EPSILON if epsilon is None else epsilon
    config = {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "decay": decay, "epsilon": epsilon}
    return _keras_optimizer(
        "Adamax",
        config,
        clipnorm,
        clipvalue,
        state_dtype,
        packed,
        scale_by_adamax(beta_1, beta_2, epsilon, state_dtype),
        scale_by_learning_rate(_decayed(lr, decay)),
    )


def Nadam(
    lr: LearningRate | None = None,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float | None = None,
    schedule_decay: float = 0.004,
    *,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    learning_rate: LearningRate | None = None,
    state_dtype: Any = None,
    packed: bool | None = None,
) -> Optimizer:
    """Nadam (Keras 2): Adam with Nesterov momentum and a momentum schedule; no ``decay``.

    ``p <- p - lr * m_bar / (sqrt(v_hat) + epsilon)`` (see :func:`~kopt.scale_by_nadam`).
    Defaults ``lr=0.002, beta_1=0.9, beta_2=0.999, epsilon=None (1e-7),
    schedule_decay=0.004``. Chain: ``scale_by_nadam(...)``, ``scale_by_learning_rate(lr)``.

    Example:
        >>> import kopt
        >>> opt = kopt.Nadam(schedule_decay=0.004)
    """
    lr = _resolve_lr(lr, learning_rate, 0.002)
    epsilon = EPSILON if epsilon is None else epsilon
    config = {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon, "schedule_decay": schedule_decay}
    return _keras_optimizer(
        "Nadam",
        config,
        clipnorm,
        clipvalue,
        state_dtype,
        packed,
        scale_by_nadam(beta_1, beta_2, epsilon, schedule_decay, state_dtype),
        scale_by_learning_rate(lr),
    )
