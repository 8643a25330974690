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
scaled gradients, and ``MultiOptimizer``.

    >>> import kopt
    >>> opt = kopt.keras.Lion(weight_decay=0.1)                 # == keras.optimizers.Lion(weight_decay=0.1)
    >>> opt.config["name"], opt.config["learning_rate"]
    ('lion', 0.001)
    >>> kopt.serialize(opt)["module"]
    'keras.optimizers'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from kopt import tf_keras
from kopt.averaging import ema_overwrite
from kopt.base import GradientTransformation, chain
from kopt.groups import partition
from kopt.optimizers import Optimizer
from kopt.transforms import unscale_loss
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
    ``gradient_accumulation_steps=None``, ``name=None``; kopt's ``packed=None``.
    See :mod:`kopt.keras` for what each does and where."""


def _documented(constructor: Callable[..., Optimizer]) -> Callable[..., Optimizer]:
    """Appends the shared options' documentation (one text for every constructor) to the docstring."""
    constructor.__doc__ = (constructor.__doc__ or "").rstrip() + "\n" + _OPTIONS_DOC
    return constructor


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
    extra = {} if exclude is None else {"exclude_from_weight_decay": exclude}
    ruled = {key: common[key] for key in ("weight_decay", "clipnorm", "global_clipnorm", "clipvalue") if key in common}
    base = rule(**own, **ruled, **extra, is_legacy_optimizer=False, packed=packed)
    members: list[GradientTransformation] = []
    if common.get("loss_scale_factor") is not None:
        members.append(unscale_loss(common["loss_scale_factor"]))
    steps = common.get("gradient_accumulation_steps")
    members.append(base if steps is None else accumulate(base, check_count("gradient_accumulation_steps", steps)))
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
    from kopt.serialization import check_pattern, keras_variable_path  # serialization routes configs here

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
