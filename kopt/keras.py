"""Keras 3's optimizers (``keras.optimizers``, keras >= 3): Keras 3's signatures, defaults and numbers.

``kopt.keras.Adam(...)`` is to ``keras.optimizers.Adam(...)`` what
``kopt.tf_keras.Adam(...)`` is to ``tf_keras.optimizers.Adam(...)``: the same
arguments, the same defaults, the same trajectory, as a kopt
``GradientTransformation``. A Keras 3 config (``keras.optimizers.serialize``)
builds these through :func:`kopt.deserialize`, and :func:`kopt.serialize`
writes the Keras 3 dict back (``keras.optimizers.deserialize`` reads it).

The update rules are those of TensorFlow's optimizers since 2.11 (the same
transforms as :mod:`kopt.tf_keras`), and the options every Keras 3 optimizer
takes are applied around the rule in Keras 3's order:

* ``loss_scale_factor``: the gradients are divided by it first
  (:func:`kopt.unscale_loss`);
* ``gradient_accumulation_steps``: the mean of that many calls' gradients is
  applied every that many calls, and nothing in between (:func:`kopt.accumulate`;
  Keras 3 counts ``iterations`` in applied steps);
* ``clipnorm`` (each variable on its own norm), ``global_clipnorm``,
  ``clipvalue``: at most one of them, as Keras 3 requires;
* ``weight_decay``: ``p <- p - lr_t * weight_decay * p`` before the rule;
* ``use_ema``: the moving average (``ema_momentum``) of the variables from the
  first step's, which every ``ema_overwrite_frequency`` steps replaces them
  (:func:`kopt.ema_overwrite` with ``from_first_step=True``; Keras assigns the
  average to the model's variables, kopt's update carries them there).

``learning_rate`` is a number, a Keras schedule config
(``keras.optimizers.schedules.serialize``) or a kopt schedule. ``name``
(default: the class name in snake case, as Keras 3 names it) is kept in the
config and nothing else. ``packed`` is kopt's state layout (as in
:func:`kopt.Adam`: ``None`` packs small leaves into flat buffers, ``False``
keeps every slot leaf by leaf); it is written into the config only when given.

Where Keras 3 differs from tf_keras: ``Lion``'s default learning rate (0.001,
tf_keras 0.0001), the EMA's start (the first step's variables, tf_keras: from the
initial ones), two clip options at once (refused, tf_keras ignores
``clipvalue``), ``Lamb``, ``ScheduleFreeAdamW``, ``LossScaleOptimizer`` taking
scaled gradients, ``MultiOptimizer``, and ``Muon`` (:func:`kopt.orthogonalize_by_newton_schulz` for the weight
matrices, AdamW for the rest, split by :func:`muon_labels`).

    >>> import kopt
    >>> opt = kopt.keras.Lion(weight_decay=0.1)                 # == keras.optimizers.Lion(weight_decay=0.1)
    >>> opt.config["name"], opt.config["learning_rate"]
    ('lion', 0.001)
    >>> kopt.serialize(opt)["module"]
    'keras.optimizers'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt import tf_keras
from kopt.averaging import ema_overwrite
from kopt.base import GradientTransformation, chain, expects
from kopt.file_safety import shorten
from kopt.groups import partition
from kopt.optimizers import Optimizer, with_options_doc
from kopt.orthogonal import orthogonalize_by_newton_schulz
from kopt.state import current_hyperparams, init_hyperparams
from kopt.transforms import add_decayed_weights, scale_by_adam, trace, unscale_loss
from kopt.tree import map_arrays, needs_params
from kopt.validation import check_bool, check_count, check_hyperparam
from kopt.wrappers import accumulate, dynamic_loss_scale

__all__ = [
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "Nadam",
    "Ftrl",
    "Adafactor",
    "Lion",
    "Lamb",
    "ScheduleFreeAdamW",
    "LossScaleOptimizer",
    "OptimizerMap",
    "MultiOptimizer",
    "Muon",
    "muon_labels",
    "MuonAdamShareState",
]

#: The flavor of the optimizers built here (``Optimizer.flavor``, ``kopt.serialize(..., flavor=)``).
FLAVOR = "keras3"
#: The ``module`` Keras 3's ``serialize`` writes.
MODULE = "keras.optimizers"

#: The options every Keras 3 optimizer takes, in the order of its ``get_config``, with Keras 3's defaults.
COMMON: dict[str, Any] = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}

_OPTIONS_DOC = """
    Options of every Keras 3 optimizer (keyword only): ``weight_decay=None``,
    ``clipnorm=None``, ``global_clipnorm=None``, ``clipvalue=None`` (at most one
    clip), ``use_ema=False``, ``ema_momentum=0.99``,
    ``ema_overwrite_frequency=None``, ``loss_scale_factor=None``,
    ``gradient_accumulation_steps=None``, ``name=None``; ``exclude_from_weight_decay=None``
    (what Keras 3's method ``exclude_from_weight_decay(var_names=...)`` does: a leaf whose name, the last
    part of its :func:`kopt.keras_variable_path`, any of these patterns is found in is not decayed; never
    written into the config); kopt's ``packed=None``.
    See :mod:`kopt.keras` for what each does and where."""


_documented = with_options_doc(_OPTIONS_DOC)


def keras_name(class_name: str) -> str:
    """Keras 3's default optimizer name: the class name in snake case (``AdamW`` -> ``adam_w``)."""
    words = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", words).lower()


def _optimizer(class_name: str, rule: Callable[..., Optimizer], arguments: dict[str, Any]) -> Optimizer:
    """The Keras 3 optimizer ``class_name`` from its constructor's ``arguments``: ``rule`` (a
    :mod:`kopt.tf_keras` constructor, TF >= 2.11) takes the class's own arguments, the clipping and the weight
    decay; the loss-scale factor, the accumulation and the EMA go around it, in Keras 3's order."""
    name, packed = arguments.pop("name"), arguments.pop("packed")
    exclude = arguments.pop("exclude_from_weight_decay", None)
    common = {key: arguments.pop(key) for key in COMMON if key in arguments}
    own = arguments
    clips = [key for key in ("clipnorm", "clipvalue", "global_clipnorm") if common.get(key) is not None]
    if len(clips) > 1:
        raise ValueError(f"{class_name}: give at most one of clipnorm, clipvalue and global_clipnorm, got {clips}")
    # Keras 3 searches the patterns in the variable's own name (the last part of its path)
    extra = {} if exclude is None else {"exclude_from_weight_decay": exclude, "variable_names": "keras3"}
    ruled = {key: common[key] for key in ("weight_decay", "clipnorm", "global_clipnorm", "clipvalue") if key in common}
    steps = common.get("gradient_accumulation_steps")
    steps = None if steps is None else check_count("gradient_accumulation_steps", steps)
    rate = own["learning_rate"]
    if steps is not None and not isinstance(rate, (int, float)):
        rate = _at_calls(tf_keras.learning_rate_schedule(rate), steps)
    base = rule(**{**own, "learning_rate": rate}, **ruled, **extra, is_legacy_optimizer=False, packed=packed)
    members: list[GradientTransformation] = []
    if common.get("loss_scale_factor") is not None:
        members.append(unscale_loss(common["loss_scale_factor"]))
    members.append(base if steps is None else accumulate(base, steps))
    if check_bool("use_ema", common.get("use_ema", False)):
        momentum = check_hyperparam("ema_momentum", common.get("ema_momentum", 0.99))
        every = common.get("ema_overwrite_frequency")
        every = None if every is None or every == 0 else check_count("ema_overwrite_frequency", every)
        members.append(ema_overwrite(momentum, every, from_first_step=True))
    transform = members[0] if len(members) == 1 else chain(*members)
    config = {"name": keras_name(class_name) if name is None else name, "learning_rate": own.pop("learning_rate")}
    config.update({key: common.get(key, default) for key, default in COMMON.items()}, **own)
    if packed is not None:  # kopt's option, written only when given
        config["packed"] = packed
    return Optimizer(transform, class_name, config, FLAVOR)


def _at_calls(schedule: Callable[[jax.Array], jax.Array], every: int) -> Callable[[jax.Array], jax.Array]:
    """``schedule`` read as Keras 3 reads it under gradient accumulation: at the count of calls, ``every`` a
    step, the last of them (step ``k``, counted from 0, is taken on call ``k * every + every - 1``)."""
    return lambda count: schedule(count * every + every - 1)


# --------------------------------------------------------------------------- the optimizers
# Each signature is Keras 3's (3.15); `locals()` at the first line is exactly the arguments.


@_documented
def SGD(
    learning_rate: Any = 0.01,
    momentum: float = 0.0,
    nesterov: bool = False,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's SGD: ``v <- momentum*v - lr*g``; ``p <- p + v`` (Nesterov: ``p + momentum*v - lr*g``);
    without momentum ``p <- p - lr*g``. Rule: :func:`kopt.tf_keras.SGD`.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.SGD(0.1, momentum=0.9, nesterov=True)
    """
    return _optimizer("SGD", tf_keras.SGD, locals())


@_documented
def RMSprop(
    learning_rate: Any = 0.001,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's RMSprop: ``a <- rho*a + (1-rho)*g**2``; ``p <- p - lr * g / sqrt(a + epsilon)``, through a
    velocity when ``momentum > 0``, ``a - mean_g**2`` when ``centered``. Rule: :func:`kopt.tf_keras.RMSprop`.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.RMSprop(momentum=0.9, centered=True)
    """
    return _optimizer("RMSprop", tf_keras.RMSprop, locals())


@_documented
def Adagrad(
    learning_rate: Any = 0.001,
    initial_accumulator_value: float = 0.1,
    epsilon: float = 1e-7,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Adagrad: ``a <- a + g**2`` from ``initial_accumulator_value``; ``p <- p - lr*g/sqrt(a + eps)``.
    Rule: :func:`kopt.tf_keras.Adagrad`.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Adagrad(0.1)
    """
    return _optimizer("Adagrad", tf_keras.Adagrad, locals())


@_documented
def Adadelta(
    learning_rate: Any = 0.001,
    rho: float = 0.95,
    epsilon: float = 1e-7,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Adadelta: Keras 2.2.4's rule (:func:`kopt.scale_by_adadelta`) times ``learning_rate``.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Adadelta(1.0)
    """
    return _optimizer("Adadelta", tf_keras.Adadelta, locals())


@_documented
def Adam(
    learning_rate: Any = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Adam: Keras 2.2.4's rule (:func:`kopt.scale_by_adam`; epsilon meets the uncorrected ``v``).

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Adam(1e-3, global_clipnorm=1.0)
    """
    return _optimizer("Adam", tf_keras.Adam, locals())


@_documented
def AdamW(
    learning_rate: Any = 0.001,
    weight_decay: float = 0.004,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    *,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's AdamW: :func:`Adam` with ``p <- p - lr * weight_decay * p`` first (default 0.004).

    Example:
        >>> import kopt
        >>> opt = kopt.keras.AdamW(1e-3, weight_decay=0.01)
    """
    return _optimizer("AdamW", tf_keras.AdamW, locals())


@_documented
def Adamax(
    learning_rate: Any = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Adamax: Adam with the infinity norm (:func:`kopt.scale_by_adamax`).

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Adamax(0.002)
    """
    return _optimizer("Adamax", tf_keras.Adamax, locals())


@_documented
def Nadam(
    learning_rate: Any = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Nadam: Adam with Nesterov momentum and the momentum schedule ``beta_1*(1 - 0.5*0.96**t)``
    (:func:`kopt.scale_by_nadam`, ``schedule_decay=1``... as TF >= 2.11).

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Nadam(0.002)
    """
    return _optimizer("Nadam", tf_keras.Nadam, locals())


@_documented
def Ftrl(
    learning_rate: Any = 0.001,
    learning_rate_power: float = -0.5,
    initial_accumulator_value: float = 0.1,
    l1_regularization_strength: float = 0.0,
    l2_regularization_strength: float = 0.0,
    l2_shrinkage_regularization_strength: float = 0.0,
    beta: float = 0.0,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's FTRL-Proximal (:func:`kopt.ftrl`, the learning rate inside the rule): the variable is set from
    its accumulated squared gradients and linear term, with L1, L2, L2 shrinkage and ``beta``.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Ftrl(0.05, l1_regularization_strength=0.001)
    """
    return _optimizer("Ftrl", tf_keras.Ftrl, locals())


@_documented
def Adafactor(
    learning_rate: Any = 0.001,
    beta_2_decay: float = -0.8,
    epsilon_1: float = 1e-30,
    epsilon_2: float = 1e-3,
    clip_threshold: float = 1.0,
    relative_step: bool = True,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Adafactor (:func:`kopt.scale_by_adafactor`): a factored second moment, a relative step size
    ``min(lr, 1/sqrt(t))`` scaled by the variable's RMS, and update clipping at ``clip_threshold``.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Adafactor(0.01)
    """
    return _optimizer("Adafactor", tf_keras.Adafactor, locals())


@_documented
def Lion(
    learning_rate: Any = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Lion: ``p <- p - lr * sign(beta_1*m + (1-beta_1)*g)``, then ``m <- beta_2*m + (1-beta_2)*g``
    (:func:`kopt.scale_by_lion`). Default ``learning_rate=0.001`` (tf_keras: 0.0001).

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Lion(3e-4, weight_decay=0.1)
    """
    return _optimizer("Lion", tf_keras.Lion, locals())


@_documented
def Lamb(
    learning_rate: Any = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Lamb: Adam's moments with ``epsilon`` on the corrected root
    (``scale_by_adam(corrected_epsilon=True)``), scaled per variable by the trust ratio ``||p|| / ||u||``
    (:func:`kopt.scale_by_trust_ratio`), then by the learning rate. Leaves keep their own state.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.Lamb(0.01)
    """
    return _optimizer("Lamb", tf_keras._lamb, locals())


@_documented
def ScheduleFreeAdamW(
    learning_rate: Any = 0.0025,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-8,
    warmup_steps: int = 0,
    *,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's ScheduleFreeAdamW (:func:`kopt.schedule_free_adam`, the learning rate inside): Adam steps on
    the base sequence ``z``, the variables follow an average of it, with a linear warm-up of
    ``warmup_steps``.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.ScheduleFreeAdamW(warmup_steps=100)
    """
    return _optimizer("ScheduleFreeAdamW", tf_keras._schedule_free_adamw, locals())


# --------------------------------------------------------------------------- wrapping optimizers


def LossScaleOptimizer(
    inner_optimizer: Optimizer,
    initial_scale: float = 32768.0,
    dynamic_growth_steps: int = 2000,
    name: str | None = None,
) -> Optimizer:
    """Keras 3's dynamic loss scaling around ``inner_optimizer`` (:func:`kopt.dynamic_loss_scale`).

    Its update takes the gradients of the loss times ``kopt.get_slot(state, "loss_scale")`` and divides
    them by the scale; a step with a NaN or an Inf is skipped (the inner state and its step count stay)
    and halves the scale; ``dynamic_growth_steps`` finite steps in a row double it. Defaults
    ``initial_scale=2**15, dynamic_growth_steps=2000``.

    Example:
        >>> import kopt
        >>> opt = kopt.keras.LossScaleOptimizer(kopt.keras.Adam())
        >>> kopt.serialize(opt)["config"]["inner_optimizer"]["class_name"]
        'Adam'
    """
    if not isinstance(inner_optimizer, Optimizer) or inner_optimizer.flavor != FLAVOR:
        raise ValueError(
            "LossScaleOptimizer's inner_optimizer must be a Keras 3 optimizer (kopt.keras.X), got "
            f"{type(inner_optimizer).__name__}"
        )
    growth = check_count("dynamic_growth_steps", dynamic_growth_steps)
    transform = dynamic_loss_scale(inner_optimizer, initial_scale, growth, unscale=True, min_scale=0.0)
    config = {
        "name": keras_name("LossScaleOptimizer") if name is None else name,
        "inner_optimizer": _keras_dict(inner_optimizer),
        "initial_scale": initial_scale,
        "dynamic_growth_steps": dynamic_growth_steps,
    }
    return Optimizer(transform, "LossScaleOptimizer", config, FLAVOR)


def _keras_dict(opt: Optimizer) -> dict[str, Any]:
    """A member's Keras 3 ``serialize()`` dict, as a wrapper's config holds it."""
    return {"module": MODULE, "class_name": opt.class_name, "config": dict(opt.config), "registered_name": None}


class OptimizerMap(NamedTuple):
    """Which optimizer updates which variable (Keras 3's ``OptimizerMap``), for :func:`MultiOptimizer`.

    ``optimizer_map`` maps a Keras variable path (:func:`kopt.keras_variable_path`: ``{"dense": {"kernel":
    w}}`` is ``"dense/kernel"``) or a regular expression that fully matches it to an optimizer; every other
    variable goes to ``default_optimizer``. A path equal to a key wins over patterns; a path matching two
    patterns is an error.
    """

    default_optimizer: Optimizer
    optimizer_map: Mapping[str, Optimizer] = {}


def MultiOptimizer(
    optimizer_map: OptimizerMap, loss_scale_factor: float | None = None, name: str | None = None
) -> Optimizer:
    """Keras 3's MultiOptimizer: each param is updated by the optimizer its Keras variable path selects in
    ``optimizer_map`` (:class:`OptimizerMap`), with :func:`kopt.partition`. ``loss_scale_factor`` divides
    every gradient first and replaces the members' own (as Keras 3 sets it on each).

    Patterns are at most 256 characters, and a quantified group holding a quantifier is refused (it could
    take exponential time to match: configs come from files).

    Example:
        >>> import kopt
        >>> opt = kopt.keras.MultiOptimizer(
        ...     kopt.keras.OptimizerMap(kopt.keras.Adam(), {"head/.*": kopt.keras.SGD(0.1)}))
    """
    from kopt.keras_io.configs import check_pattern, keras_variable_path  # serialization routes configs here

    patterns = dict(optimizer_map.optimizer_map)
    for pattern in patterns:
        check_pattern(pattern, "MultiOptimizer pattern")
    members = [optimizer_map.default_optimizer, *patterns.values()]
    for member in members:
        if not isinstance(member, Optimizer) or member.flavor != FLAVOR or member.class_name in _WRAPPERS:
            raise ValueError(f"a MultiOptimizer member must be a Keras 3 optimizer (kopt.keras.X), not {member!r}")
    names = list(patterns)

    def label(path: Any) -> int:
        key = keras_variable_path(path)
        if key in patterns:
            return names.index(key) + 1
        found = [index + 1 for index, pattern in enumerate(names) if re.fullmatch(pattern, key)]
        if len(found) > 1:
            raise ValueError(f"MultiOptimizer: param {key!r} matches several patterns: {[names[i - 1] for i in found]}")
        return found[0] if found else 0

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: label(path), params)

    transform: GradientTransformation = partition(dict(enumerate(members)), labels)
    if loss_scale_factor is not None:
        transform = chain(unscale_loss(loss_scale_factor), transform)
    config = {
        "optimizer_map": {
            "module": MODULE,
            "class_name": "OptimizerMap",
            "config": {
                "default_optimizer": _keras_dict(optimizer_map.default_optimizer),
                "optimizer_map": {pattern: _keras_dict(member) for pattern, member in patterns.items()},
            },
            "registered_name": None,
        },
        "loss_scale_factor": loss_scale_factor,
        "name": keras_name("MultiOptimizer") if name is None else name,
    }
    return Optimizer(transform, "MultiOptimizer", config, FLAVOR)


_WRAPPERS = ("LossScaleOptimizer", "MultiOptimizer")

#: Keras 3's optimizers by class name (what a Keras 3 config may name).
_CLASSES = (SGD, RMSprop, Adagrad, Adadelta, Adam, AdamW, Adamax, Nadam, Ftrl, Adafactor, Lion, Lamb, ScheduleFreeAdamW)
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {f.__name__: f for f in _CLASSES}


# --------------------------------------------------------------------------- Muon


class MuonAdamShareState(NamedTuple):
    """``adam_lr_ratio`` and (unless off) ``adam_weight_decay``, Keras 3's config names."""

    hyperparams: dict[str, jax.Array]


def _adam_share(
    adam_lr_ratio: float, adam_weight_decay: float | None, decays: Callable[[Any], Any] | None = None
) -> GradientTransformation:
    """Muon's AdamW leaves, before the shared learning rate: ``u <- adam_lr_ratio * u + adam_weight_decay * p``.
    Keras 3 steps them at ``adam_lr_ratio`` times the rate but decays them at the rate itself. ``decays``:
    a function of the params giving ``False`` for the leaves excluded from the decay."""
    values = {"adam_lr_ratio": check_hyperparam("adam_lr_ratio", adam_lr_ratio)}
    if adam_weight_decay is not None:  # None: Keras 3 skips the decay
        values["adam_weight_decay"] = check_hyperparam("adam_weight_decay", adam_weight_decay)

    def init(params):
        return MuonAdamShareState(init_hyperparams(values, params))

    @expects(MuonAdamShareState)
    def update(updates, state, params=None, **extra_args):
        del extra_args
        hp = current_hyperparams(state.hyperparams, values)
        if "adam_weight_decay" not in values:
            (updates,) = map_arrays(lambda u: (hp["adam_lr_ratio"] * u,), updates)
            return updates, MuonAdamShareState(hp)
        needs_params(params, "Muon(adam_weight_decay=...)")
        share = (hp["adam_lr_ratio"], hp["adam_weight_decay"])
        if decays is None:
            updates, _ = map_arrays(lambda u, p: (share[0] * u + share[1] * p, p), updates, params)
        else:  # leaf by leaf (Muon keeps its leaves apart): the excluded ones are only scaled
            keep = decays(params)
            updates = jax.tree.map(
                lambda u, p, k: share[0] * u + share[1] * p if k else share[0] * u, updates, params, keep
            )
        return updates, MuonAdamShareState(hp)

    return GradientTransformation(init, update)


def muon_labels(exclude_layers: Sequence[str] = (), exclude_embeddings: bool = True) -> Callable[[Any], Any]:
    """Keras 3 Muon's choice, as a function ``params -> labels`` for :func:`kopt.partition`: ``"muon"`` for a
    leaf of exactly 2 dimensions whose Keras variable path (:func:`kopt.keras_variable_path`, keys joined by
    ``/``) contains no ``"embedding"`` (any case; only with ``exclude_embeddings``) and in which no pattern of
    ``exclude_layers`` is found (``re.search``, case-sensitive); ``"adamw"`` for every other leaf.

    Keras' embedding rule is a substring test on the path, and so is kopt's: Keras' ``Embedding`` layers hold
    ``<layer>/embeddings`` and Flax's ``nn.Embed`` an ``embedding`` leaf, so both are caught whatever the layer
    is called; an embedding table stored under another name (Equinox's ``Embedding.weight`` in a field
    ``embed``) is not: name it ``embedding...`` or give its path in ``exclude_layers``.

    Example:
        >>> import jax, jax.numpy as jnp, kopt
        >>> params = {"embedding": {"embeddings": jnp.zeros((9, 4))}, "dense": {"kernel": jnp.zeros((4, 4)),
        ...           "bias": jnp.zeros(4)}, "head": {"kernel": jnp.zeros((4, 9))}}
        >>> kopt.keras.muon_labels(exclude_layers=["head"])(params)
        {'dense': {'bias': 'adamw', 'kernel': 'muon'}, 'embedding': {'embeddings': 'adamw'},
         'head': {'kernel': 'adamw'}}
    """
    from kopt.keras_io.configs import check_pattern, keras_variable_path  # serialization routes configs here

    if isinstance(exclude_layers, str) or not isinstance(exclude_layers, Sequence):
        raise ValueError(f"exclude_layers must be a list of patterns, got {shorten(exclude_layers)}")
    patterns = [re.compile(check_pattern(pattern, "Muon exclude_layers pattern")) for pattern in exclude_layers]
    exclude_embeddings = check_bool("exclude_embeddings", exclude_embeddings)

    def label(path: Any, leaf: Any) -> str:
        key = keras_variable_path(path)
        if jnp.ndim(leaf) != 2 or (exclude_embeddings and "embedding" in key.lower()):
            return "adamw"
        return "adamw" if any(pattern.search(key) for pattern in patterns) else "muon"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def _muon_rule(
    learning_rate: Any,
    adam_beta_1: float,
    adam_beta_2: float,
    adam_weight_decay: float | None,
    epsilon: float,
    exclude_layers: Sequence[str],
    exclude_embeddings: bool,
    muon_a: float,
    muon_b: float,
    muon_c: float,
    adam_lr_ratio: float,
    momentum: float,
    ns_steps: int,
    nesterov: bool,
    rms_rate: float | None,
    weight_decay: float | None = None,
    packed: bool | None = None,
    exclude_from_weight_decay: Sequence[str] | None = None,
    variable_names: str = "keras3",
    **options: Any,
) -> Optimizer:
    """Muon's rule in :func:`kopt.tf_keras`'s form: clipping, the two groups, the learning rate shared."""
    decays = tf_keras._excluded_from_decay(exclude_from_weight_decay, variable_names)
    if packed:
        raise ValueError("Muon(packed=True): its matrix step and its groups work leaf by leaf; it cannot be packed")
    matrices = [
        trace(momentum, check_bool("nesterov", nesterov)),
        orthogonalize_by_newton_schulz(ns_steps, (muon_a, muon_b, muon_c), rms_rate=rms_rate),
    ]
    if weight_decay is not None:  # Keras 3 decays the Muon variables at the rate, before the step
        matrices.append(add_decayed_weights(weight_decay, mask=decays))
    others = chain(
        scale_by_adam(adam_beta_1, adam_beta_2, epsilon), _adam_share(adam_lr_ratio, adam_weight_decay, decays)
    )
    groups = partition({"muon": chain(*matrices), "adamw": others}, muon_labels(exclude_layers, exclude_embeddings))
    learning_rate, options = tf_keras._options("Muon", learning_rate, {**options, "is_legacy_optimizer": False})
    # The weight decay is inside the groups (each its own), so the shared chain is given none.
    options = {**options, "weight_decay": None, "packed": False}
    return tf_keras._optimizer("Muon", {"learning_rate": learning_rate}, options, [groups], per_leaf=True)


def Muon(
    learning_rate: Any = 0.001,
    adam_beta_1: float = 0.9,
    adam_beta_2: float = 0.999,
    adam_weight_decay: float | None = 0.004,
    epsilon: float = 1e-7,
    weight_decay: float | None = 0.004,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    use_ema: bool = False,
    ema_momentum: float = 0.99,
    ema_overwrite_frequency: int | None = None,
    loss_scale_factor: float | None = None,
    gradient_accumulation_steps: int | None = None,
    name: str | None = None,
    exclude_layers: Sequence[str] | None = None,
    exclude_embeddings: bool = True,
    muon_a: float = 3.4445,
    muon_b: float = -4.7750,
    muon_c: float = 2.0315,
    adam_lr_ratio: float = 1,
    momentum: float = 0.95,
    ns_steps: int = 5,
    nesterov: bool = True,
    rms_rate: float | None = 0.2,
    *,
    exclude_from_weight_decay: Sequence[str] | None = None,
    packed: bool | None = None,
) -> Optimizer:
    """Keras 3's Muon: orthogonalised momentum for the weight matrices, AdamW for everything else.

    Leaves are split by :func:`muon_labels` (Keras' rule on the Keras variable path: 2-D, not an
    ``embedding`` with ``exclude_embeddings``, no ``exclude_layers`` pattern found in it). With ``lr_i`` the
    rate of step ``t = i + 1``, a Muon leaf ``p`` (``rows x columns``) takes::

        m <- momentum*m + g;   G = g + momentum*m  (nesterov)  or  m
        p <- p - lr_i*weight_decay*p - lr_i * rms_rate*sqrt(max(rows, columns)) * NS(G)

    (``NS``: :func:`kopt.orthogonalize_by_newton_schulz`, ``ns_steps`` iterations of the quintic
    ``(muon_a, muon_b, muon_c)``), and every other leaf Keras' Adam step at ``adam_lr_ratio`` of the rate,
    decayed at the full rate::

        p <- p - lr_i*adam_weight_decay*p - lr_i*adam_lr_ratio * c_t * m / (sqrt(v) + epsilon)

    with Adam's ``m``, ``v`` (``adam_beta_1``, ``adam_beta_2``) and ``c_t = sqrt(1 - beta_2**t) / (1 - beta_1**t)``.
    A ``None`` decay is off; ``rms_rate=None`` leaves ``NS(G)`` unscaled; ``exclude_from_weight_decay`` turns both
    decays off for the leaves it names (as for every Keras 3 optimizer, see :mod:`kopt.keras`). Clipping,
    ``loss_scale_factor``, accumulation and the EMA are every Keras 3 optimizer's (see :mod:`kopt.keras`).
    Leaves keep their own state (the matrix step is per leaf): ``packed=True`` is refused, ``None`` (the
    default) and ``False`` keep them apart. Patterns are checked as :func:`MultiOptimizer`'s (they may come
    from a file). Defaults are Keras 3.15's.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.keras.Muon(0.02, exclude_layers=["head"])
        >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}, "head": {"kernel": jnp.ones((3, 2))}}
        >>> state = opt.init(params)
        >>> sorted(kopt.get_hyperparams(state))  # each once: set_hyperparams(state, muon_a=...) reaches it
        ['adam_lr_ratio', 'adam_weight_decay', 'beta_1', 'beta_2', 'current_lr', 'decay', 'epsilon', 'lr',
         'momentum', 'muon_a', 'muon_b', 'muon_c', 'ns_epsilon', 'rms_rate', 'weight_decay']
    """
    arguments = dict(locals())
    arguments["exclude_layers"] = [] if exclude_layers is None else exclude_layers  # as Keras 3's config has it
    return _optimizer("Muon", _muon_rule, arguments)


OPTIMIZERS["Muon"] = Muon  # defined after the table: a Keras 3 config naming Muon builds it too
