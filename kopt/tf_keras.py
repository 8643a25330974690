"""TensorFlow's Keras 2 optimizers: tf.keras 2.x and ``tf_keras``, with their signatures, defaults and numbers.

Most code that still says "Keras 2" runs TensorFlow's Keras, whose optimizers
share Keras 2.2.4's update rules but not all of its defaults and options. The
constructors here take TensorFlow's arguments and mean by each what TensorFlow
means, so a model ported from ``tf.keras`` follows the same trajectory. Each
is a chain of the same transforms as :mod:`kopt.optimizers`.

Two generations of TensorFlow optimizers exist, chosen by
``is_legacy_optimizer`` (the key TensorFlow writes in its configs):

* ``True`` (default): ``OptimizerV2``, i.e. ``tf.keras.optimizers.X`` up to TF
  2.10 and ``tf.keras.optimizers.legacy.X`` / ``tf_keras.optimizers.legacy.X``
  after it. Has ``decay`` (inverse-time learning-rate decay, as Keras 2.2.4).
* ``False``: the optimizers of TF >= 2.11 (``tf_keras.optimizers.X``). No
  ``decay``; ``weight_decay`` (decoupled: ``p <- p - lr_i * weight_decay * p``
  before the update step, outside any momentum, at the step's rate);
  epsilon inside the square root for RMSprop and Adagrad; Nadam's momentum
  schedule ``0.96**t`` (``schedule_decay = 1``).

  ``exclude_from_weight_decay`` (TF >= 2.11, a list of regular expressions) is
  a kopt constructor option doing what Keras' method
  ``optimizer.exclude_from_weight_decay(var_names=...)`` does: a param leaf
  whose variable name any pattern is found in (``re.search``) is not decayed.
  The name is read from the leaf's :func:`kopt.keras_variable_path` as
  ``variable_names`` says: ``"tf_keras"`` (default; tf_keras' ``variable.name``,
  the full path and ``:0``: ``{"dense": {"kernel": w}}`` is ``dense/kernel:0``)
  or ``"keras3"`` (Keras 3's, the last part: ``kernel``). Like Keras' method it
  is not in the config (``get_config`` has no such key): give it again to an
  optimizer built from a config. Patterns are bounded as MultiOptimizer's are;
  the masked leaves keep their slots apart (``packed=True`` is refused).

Where TensorFlow differs from Keras 2.2.4 (``kopt.Adam`` etc.):

=========================  =====================================  ==========================================
                           Keras 2.2.4 (``kopt.X``)               TensorFlow (``kopt.tf_keras.X``)
=========================  =====================================  ==========================================
``clipnorm``               one global norm over all leaves        each variable's own norm (``clip_by_norm``)
``global_clipnorm``        --                                     Keras 2.2.4's ``clipnorm``
clip order                 norm, then ``clipvalue``               legacy: ``clipvalue``, then the norm;
                                                                  TF >= 2.11: the norm clip *instead of*
                                                                  ``clipvalue`` (a warning says so)
Adagrad                    ``lr=0.01``, accumulator from 0        ``learning_rate=0.001``, from 0.1
Adadelta ``lr``            1.0                                    0.001
Adamax, Nadam ``lr``       0.002                                  0.001
Nadam ``decay``            refused                                its ``schedule_decay`` (0.004)
RMSprop                    --                                     ``momentum``, ``centered``
=========================  =====================================  ==========================================

``learning_rate`` is a number, a TensorFlow schedule config (``{"class_name":
"ExponentialDecay", "config": {...}}``, as ``get_config`` writes it; see
:func:`schedule_from_config`) or a kopt schedule. ``name`` is kept in the
config and nothing else. ``jit_compile`` changes nothing and is kept.
``use_ema=True`` (TF >= 2.11) ends the chain with :func:`kopt.ema_overwrite`:
the moving average (``ema_momentum``) of the new variables, which every
``ema_overwrite_frequency`` steps replaces them (TensorFlow assigns the
average to the model's weights; kopt's update carries them there).

Every constructor also takes kopt's ``packed`` (as ``kopt.Adam``): the default
``None`` packs the small leaves into flat buffers, ``False`` keeps every slot
leaf by leaf, ``True`` always packs. A ``clipnorm`` clips each variable on its
own norm, so such an optimizer keeps its leaves apart (``packed=True`` is refused).

    >>> import kopt
    >>> opt = kopt.tf_keras.Adagrad()                   # == tf_keras.optimizers.legacy.Adagrad()
    >>> opt.config["learning_rate"], opt.config["initial_accumulator_value"]
    (0.001, 0.1)
    >>> opt = kopt.deserialize({"class_name": "Adam", "config": {"name": "Adam", "learning_rate": 0.01,
    ...                         "decay": 0.0, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "amsgrad": False}})
    >>> opt.flavor
    'tf_keras.legacy'
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import jax

from kopt import packing, schedules
from kopt.averaging import ema_overwrite
from kopt.base import GradientTransformation, chain
from kopt.clipping import clip_by_global_norm, clip_by_norm, clip_by_value
from kopt.file_safety import shorten
from kopt.optimizers import LearningRate, Optimizer, switched_on, with_options_doc
from kopt.transforms import (
    add_decayed_weights,
    ftrl,
    scale_by_adadelta,
    scale_by_adafactor,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_nadam,
    scale_by_rms,
    scale_by_trust_ratio,
    schedule_free_adam,
    trace,
    weight_decay_first,
)
from kopt.tree import rounded_once
from kopt.validation import as_real, check_bool, check_clip_option, check_hyperparam, is_concrete

__all__ = [
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adam",
    "Adamax",
    "Nadam",
    "AdamW",
    "Lion",
    "Ftrl",
    "Adafactor",
    "schedule_from_config",
]

#: The flavors of optimizer configs: ``kopt.serialize(opt, flavor=...)``.
KERAS, LEGACY, CURRENT = "keras", "tf_keras.legacy", "tf_keras"
FLAVORS = (KERAS, LEGACY, CURRENT)
#: The ``module`` TensorFlow's ``serialize`` writes for each generation.
MODULES = {LEGACY: "keras.optimizers.legacy", CURRENT: "keras.optimizers"}

_COMMON = ("name", "clipnorm", "clipvalue", "global_clipnorm", "lr", "is_legacy_optimizer", "packed")
_LEGACY_ONLY = ("decay",)
_CURRENT_ONLY = (
    "weight_decay",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "jit_compile",
    "exclude_from_weight_decay",
    "variable_names",
)
#: The name each Keras gives the variable a param leaf holds (from its :func:`kopt.keras_variable_path`),
#: which ``exclude_from_weight_decay``'s patterns are searched in: tf_keras' ``variable.name`` is the full
#: path with the output index (``dense/kernel:0``), Keras 3's the last part (``kernel``).
VARIABLE_NAMES: dict[str, Callable[[str], str]] = {
    "tf_keras": lambda path: f"{path}:0",
    "keras3": lambda path: path.rsplit("/", 1)[-1],
}


# --------------------------------------------------------------------------- learning-rate schedules


def _steps(owner: str, key: str, value: Any) -> int:
    """TensorFlow accepts float step counts; kopt's schedules count whole steps."""
    number = as_real(f"{owner} {key}", value)
    if number != int(number) or number < 1:
        raise ValueError(f"{owner} {key} must be a whole number of steps >= 1, got {value!r}")
    return int(number)


def _exponential(c: Mapping[str, Any]) -> schedules.Schedule:
    steps = _steps("ExponentialDecay", "decay_steps", c["decay_steps"])
    return schedules.exponential_decay(c["initial_learning_rate"], steps, c["decay_rate"], c.get("staircase", False))


def _inverse_time(c: Mapping[str, Any]) -> schedules.Schedule:
    steps = _steps("InverseTimeDecay", "decay_steps", c["decay_steps"])
    return schedules.inverse_time_decay(c["initial_learning_rate"], c["decay_rate"], steps, c.get("staircase", False))


def _polynomial(c: Mapping[str, Any]) -> schedules.Schedule:
    steps = _steps("PolynomialDecay", "decay_steps", c["decay_steps"])
    return schedules.polynomial_decay(
        c["initial_learning_rate"],
        c.get("end_learning_rate", 0.0001),
        steps,
        c.get("power", 1.0),
        c.get("cycle", False),
    )


def _piecewise(c: Mapping[str, Any]) -> schedules.Schedule:
    # TensorFlow switches to values[j + 1] once step > boundaries[j]; kopt once step >= its boundary.
    boundaries, values = list(c["boundaries"]), [as_real("PiecewiseConstantDecay values", v) for v in c["values"]]
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"PiecewiseConstantDecay needs len(boundaries) + 1 values, got {len(values)} values")
    if any(previous == 0 and value != 0 for previous, value in itertools.pairwise(values)):
        raise ValueError(
            f"PiecewiseConstantDecay values {shorten(values)}: kopt scales its rate, so a 0 cannot rise again"
        )
    steps = [math.floor(as_real("PiecewiseConstantDecay boundaries", b)) + 1 for b in boundaries]
    scales = [value / previous if previous else 0.0 for previous, value in itertools.pairwise(values)]
    return schedules.piecewise_constant(values[0], steps, scales)


def _cosine(c: Mapping[str, Any]) -> schedules.Schedule:
    steps = _steps("CosineDecay", "decay_steps", c["decay_steps"])
    alpha, target = c.get("alpha", 0.0), c.get("warmup_target")
    if target is None:
        return schedules.cosine_decay(c["initial_learning_rate"], steps, alpha)
    decay = schedules.cosine_decay(target, steps, alpha)
    warmup_steps = c.get("warmup_steps", 0)
    if not warmup_steps:
        return decay
    warmup_steps = _steps("CosineDecay", "warmup_steps", warmup_steps)
    warmup = schedules.linear_warmup(target, warmup_steps, init_lr=c["initial_learning_rate"])
    return schedules.join_schedules([warmup, decay], [warmup_steps])


def _cosine_restarts(c: Mapping[str, Any]) -> schedules.Schedule:
    steps = _steps("CosineDecayRestarts", "first_decay_steps", c["first_decay_steps"])
    return schedules.cosine_decay(
        c["initial_learning_rate"],
        steps,
        c.get("alpha", 0.0),
        restarts=True,
        t_mul=c.get("t_mul", 2.0),
        m_mul=c.get("m_mul", 1.0),
        scale_floor=False,
    )


_SCHEDULES: dict[str, Callable[[Mapping[str, Any]], schedules.Schedule]] = {
    "ExponentialDecay": _exponential,
    "PiecewiseConstantDecay": _piecewise,
    "InverseTimeDecay": _inverse_time,
    "PolynomialDecay": _polynomial,
    "CosineDecay": _cosine,
    "CosineDecayRestarts": _cosine_restarts,
}


def schedule_from_config(config: Mapping[str, Any]) -> schedules.Schedule:
    """The kopt schedule of a TensorFlow ``LearningRateSchedule`` config, with TensorFlow's formula.

    ``config`` is what ``tf_keras.optimizers.schedules.serialize`` writes
    (``{"class_name": ..., "config": {...}}``, with or without ``module``):
    ``ExponentialDecay``, ``PiecewiseConstantDecay``, ``InverseTimeDecay``,
    ``PolynomialDecay`` (``cycle`` too), ``CosineDecay`` (with warm-up) and
    ``CosineDecayRestarts``; also a kopt schedule's own config. Any other class
    (a custom schedule is code) is a ``ValueError`` naming it.

    Example:
        >>> import kopt
        >>> schedule = kopt.tf_keras.schedule_from_config({"class_name": "ExponentialDecay", "config": {
        ...     "initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5, "staircase": True}})
        >>> [round(float(schedule(i)), 3) for i in (0, 10, 20)]
        [0.1, 0.05, 0.025]
    """
    class_name = config.get("class_name") if isinstance(config, Mapping) else None
    arguments = config.get("config") if isinstance(config, Mapping) else None
    if schedules.is_config(config):  # a kopt schedule, as kopt.serialize writes it
        return schedules.from_config(config)
    if class_name not in _SCHEDULES or not isinstance(arguments, Mapping):
        raise ValueError(
            f"learning_rate {shorten(config)} is not a TensorFlow schedule config kopt knows; "
            f"known: {', '.join(_SCHEDULES)}"
        )
    try:
        return _SCHEDULES[class_name](arguments)
    except KeyError as missing:
        raise ValueError(f"{class_name} config lacks {missing}: {shorten(dict(arguments))}") from None


# --------------------------------------------------------------------------- shared construction


def _unbound(options: dict[str, Any]) -> dict[str, Any]:
    """``**options`` as given: optax.inject_hyperparams re-binds the signature and passes them as one argument."""
    if set(options) == {"options"} and isinstance(options["options"], Mapping):
        return dict(options["options"])
    return options


def _options(class_name: str, learning_rate: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(learning_rate, options)``: TensorFlow's common keyword arguments checked, with their generation's
    defaults; the legacy ``lr`` spelling, if given, is the learning rate.
    """
    options = _unbound(options)
    lr = options.pop("lr", None)
    learning_rate = learning_rate if lr is None else lr
    if schedules.is_config(learning_rate):
        learning_rate = schedules.from_config(learning_rate)  # kopt's own: kept as a schedule, written with the state
    legacy = check_bool("is_legacy_optimizer", options.pop("is_legacy_optimizer", True))
    allowed = _COMMON + (_LEGACY_ONLY if legacy else _CURRENT_ONLY)
    unknown = [key for key in options if key not in allowed]
    if unknown:
        other = _CURRENT_ONLY if legacy else _LEGACY_ONLY
        reasons = [
            f"{key!r} (of {'TF >= 2.11' if legacy else 'the legacy'} optimizers)" if key in other else repr(key)
            for key in unknown
        ]
        raise TypeError(
            f"kopt.tf_keras.{class_name}(is_legacy_optimizer={legacy}) cannot honour {', '.join(reasons)}; "
            f"its keys are the class's own and {', '.join(allowed)}"
        )
    given = {key: options.get(key) for key in ("clipnorm", "global_clipnorm", "clipvalue")}
    for key, value in given.items():
        check_clip_option(key, value)
    if given["clipnorm"] is not None and given["global_clipnorm"] is not None:
        raise ValueError("give at most one of clipnorm (per variable) and global_clipnorm, as TensorFlow requires")
    if legacy:
        return learning_rate, {"is_legacy_optimizer": True, "name": class_name, "decay": 0.0, **options}
    if check_bool("use_ema", options.get("use_ema", False)):
        check_hyperparam("ema_momentum", options.get("ema_momentum", 0.99))
        every = options.get("ema_overwrite_frequency")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ValueError(f"ema_overwrite_frequency must be None or a whole number of steps >= 0, got {every!r}")
    defaults = {
        "name": class_name,
        "weight_decay": None,
        "clipnorm": None,
        "global_clipnorm": None,
        "clipvalue": None,
        "use_ema": False,
        "ema_momentum": 0.99,
        "ema_overwrite_frequency": None,
        "jit_compile": True,
    }
    return learning_rate, {**defaults, **options, "is_legacy_optimizer": False}


@overload
def learning_rate_schedule(learning_rate: float) -> float: ...
@overload
def learning_rate_schedule(learning_rate: Any) -> LearningRate: ...
def learning_rate_schedule(learning_rate: Any) -> LearningRate:
    """A learning rate as a function of the step count: a Keras schedule config built
    (:func:`schedule_from_config`), a kopt schedule or function as it is."""
    return schedule_from_config(learning_rate) if isinstance(learning_rate, Mapping) else learning_rate


def _schedule(learning_rate: Any, decay: float) -> LearningRate:
    """The rate ``scale_by_learning_rate`` gets: TF's legacy ``lr / (1 + decay * i)`` or a schedule."""
    learning_rate = learning_rate_schedule(learning_rate)
    if callable(learning_rate):
        if check_hyperparam("decay", decay) != 0:
            raise ValueError("decay with a learning-rate schedule is not supported: put the decay in the schedule")
        return learning_rate
    return schedules.inverse_time_decay(learning_rate, decay)


def _clipping(class_name: str, options: Mapping[str, Any]) -> list[GradientTransformation]:
    clipnorm, global_clipnorm = options.get("clipnorm"), options.get("global_clipnorm")
    clipvalue = options.get("clipvalue")
    norm = []
    if clipnorm:  # None or 0 mean off
        norm = [clip_by_norm(clipnorm)]
    elif global_clipnorm:
        norm = [clip_by_global_norm(global_clipnorm)]
    value = [clip_by_value(clipvalue)] if clipvalue else []
    if options["is_legacy_optimizer"]:
        return value + norm  # OptimizerV2 clips values first, then norms
    if norm and value:
        warnings.warn(
            f"{class_name}(clipvalue={clipvalue}) with a norm clip: TF >= 2.11 applies only the norm clip "
            "and ignores clipvalue; kopt does the same to give TensorFlow's numbers",
            UserWarning,
            stacklevel=4,
        )
        return norm
    return norm or value


def _excluded_from_decay(patterns: Any, variable_names: Any) -> Callable[[Any], Any] | None:
    """The mask of the leaves ``weight_decay`` decays, a function of the params: ``False`` where a pattern of
    ``exclude_from_weight_decay`` is found (``re.search``) in the Keras name of the leaf's variable (see
    :data:`VARIABLE_NAMES`), as Keras' ``optimizer.exclude_from_weight_decay(var_names=patterns)`` does;
    ``None`` (decay all) without patterns."""
    # Not at the top: kopt.keras_io.configs imports this module.
    from kopt.keras_io.configs import check_pattern, keras_variable_path

    if variable_names not in VARIABLE_NAMES:
        raise ValueError(
            f"variable_names must be one of {', '.join(map(repr, VARIABLE_NAMES))}, got {shorten(variable_names)}"
        )
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        # Keras would take a string's characters as the patterns: a list of one is what is meant
        raise ValueError(f"exclude_from_weight_decay must be a list of patterns (strings), got {shorten(patterns)}")
    searches = [re.compile(check_pattern(p, "exclude_from_weight_decay pattern")).search for p in patterns]
    if not searches:
        return None
    name = VARIABLE_NAMES[variable_names]

    def decayed(params: Any) -> Any:
        def keeps_decay(path: Any, _: Any) -> bool:
            variable = name(keras_variable_path(path))
            return not any(search(variable) for search in searches)

        return jax.tree_util.tree_map_with_path(keeps_decay, params)

    return decayed


def _optimizer(
    class_name: str,
    config: dict[str, Any],
    options: dict[str, Any],
    scaling: list[GradientTransformation],
    *,
    momentum: GradientTransformation | None = None,
    step: Callable[..., GradientTransformation] = scale_by_learning_rate,
    per_leaf: bool = False,
) -> Optimizer:
    """``[clipping], scaling, [weight decay], learning rate, [momentum]`` labelled with its TensorFlow config.

    ``momentum`` (SGD, RMSprop) comes after the learning rate so that its
    velocity holds lr-scaled steps, as TensorFlow's does. ``step`` makes the
    learning rate's transform from the rate (FTRL takes the rate inside its rule).
    ``per_leaf``: the scaling's math is per variable (Lamb's trust ratio), so leaves stay apart.

    ``weight_decay`` is Keras': ``p <- p - lr_i * weight_decay * p`` before the update step. Where the step
    neither reads the params nor keeps a momentum, :func:`kopt.add_decayed_weights` before the learning rate is
    that; otherwise (a velocity, which never sees the decay; Lamb's trust ratio, which reads the decayed
    norm; a rule that holds the rate, with some variables excluded) :func:`kopt.transforms.weight_decay_first`
    decays around the rule. ``exclude_from_weight_decay`` masks the decay by variable name (leaves stay apart).
    """
    legacy = options["is_legacy_optimizer"]
    packed = options.pop("packed", None)
    excluded = _excluded_from_decay(
        options.pop("exclude_from_weight_decay", None), options.pop("variable_names", "tf_keras")
    )
    rate = _schedule(config["learning_rate"], options.get("decay", 0.0) if legacy else 0.0)
    velocity = [momentum] if momentum else []
    traced_momentum = momentum is not None and not is_concrete(config["momentum"])

    def update_step(lr: LearningRate, decay: Sequence[GradientTransformation] = ()) -> list[GradientTransformation]:
        return [*scaling, *decay, step(lr), *velocity]

    def rule(lr: LearningRate) -> GradientTransformation:
        """Keras' update step after the decay, for weight_decay_first."""
        parts = update_step(lr)
        inner = chain(*parts)
        return _refusing_states_without_velocity(inner, len(parts)) if traced_momentum else inner

    weight_decay = options.get("weight_decay")
    if weight_decay is None or (is_concrete(weight_decay) and not weight_decay):  # off; a traced one is on
        core = update_step(rate)
    elif momentum is None and not per_leaf and step is scale_by_learning_rate:
        core = update_step(rate, [add_decayed_weights(weight_decay, mask=excluded)])
    else:
        core = [weight_decay_first(rule, rate, weight_decay, mask=excluded)]
    # use_ema: the moving average of the new variables, which every ema_overwrite_frequency steps (0: never)
    # replaces them; last, so that it sees the whole step.
    every = options.get("ema_overwrite_frequency") or None
    ema = [ema_overwrite(options["ema_momentum"], every)] if options.get("use_ema") else []
    members = [*_clipping(class_name, options), *core, *ema]
    transform = chain(*members)
    if traced_momentum and any(member is momentum for member in core):  # else rule's chain refuses
        transform = _refusing_states_without_velocity(transform, len(members))
    layout = packed
    per_variable = {
        "(...) scales each variable on its own": per_leaf,
        "(clipnorm=...) clips each variable on its own norm": switched_on(options.get("clipnorm")),
        "(exclude_from_weight_decay=...) decays some variables only": excluded is not None,
    }
    if any(per_variable.values()):  # math per variable (clipnorm, trust ratio, a mask): leaves apart
        if packed:
            what = next(what for what, on in per_variable.items() if on)
            raise ValueError(f"{class_name}{what}: it cannot be packed")
        layout = False
    transform = packing.as_asked(rounded_once(transform), layout)
    ordered = {"name": options.pop("name"), **{k: v for k, v in options.items() if k != "is_legacy_optimizer"}}
    if not legacy:
        ordered["is_legacy_optimizer"] = False
    if packed is not None:  # a kopt option (as kopt.Adam's), written only when not the default
        ordered["packed"] = packed
    return Optimizer(transform, class_name, {**ordered, **config}, LEGACY if legacy else CURRENT)


def _refusing_states_without_velocity(transform: GradientTransformation, members: int) -> GradientTransformation:
    """``transform`` (a chain of ``members``, the velocity one of them) whose update refuses a state made without it.

    With ``optax.inject_hyperparams`` the state may come from an eager ``init``
    that saw ``momentum=0`` (no velocity) while the jitted update sees a traced
    momentum (a velocity): a clear error instead of a chain-length mismatch.
    """

    def update(updates, state, params=None, **extra_args):
        if isinstance(state, tuple) and len(state) == members - 1:
            raise ValueError(
                "this state was made with momentum=0 (TensorFlow keeps no velocity then), but momentum is traced "
                "now, which keeps one: inject momentum > 0 only, or give it as a number "
                "(optax.inject_hyperparams(..., static_args=('momentum',)))"
            )
        return transform.update(updates, state, params, **extra_args)

    return GradientTransformation(transform.init, update)


def _keeps_velocity(momentum: Any) -> bool:
    """Whether TensorFlow keeps a velocity: ``momentum > 0``. A traced momentum (``optax.inject_hyperparams``)
    is on, as a traced ``clipnorm`` is: inject it only with a value > 0, or give it in ``static_args``."""
    momentum = check_hyperparam("momentum", momentum)
    return not is_concrete(momentum) or momentum > 0


# --------------------------------------------------------------------------- the optimizers

_OPTIONS_DOC = """
    Options of every TensorFlow optimizer (keyword only, ``**options``): ``is_legacy_optimizer=True``
    (the generation, see :mod:`kopt.tf_keras`), ``name``, ``clipnorm`` (each variable by its own norm),
    ``global_clipnorm``, ``clipvalue``; legacy only: ``decay=0`` (``lr / (1 + decay * i)``) and ``lr``
    (the old spelling of ``learning_rate``); TF >= 2.11 only: ``weight_decay=None`` (the variable decayed
    at the step's rate before the rule reads it), ``exclude_from_weight_decay=None`` with
    ``variable_names="tf_keras"`` (as Keras' method ``exclude_from_weight_decay(var_names=...)``, never in the
    config), ``use_ema=False``, ``ema_momentum=0.99``, ``ema_overwrite_frequency=None``,
    ``jit_compile=True`` (kept, changes nothing); kopt's ``packed=None`` (the state layout)."""

_documented = with_options_doc(_OPTIONS_DOC)


@_documented
def SGD(learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False, **options: Any) -> Optimizer:
    """TensorFlow's SGD: ``v <- momentum*v - lr_i*g``; ``p <- p + v`` (Nesterov: ``p + momentum*v - lr_i*g``).

    Without momentum (the default) ``p <- p - lr_i*g``; the legacy SGD then keeps no velocity.
    Defaults ``learning_rate=0.01, momentum=0, nesterov=False``.
    Chain: clipping, ``scale_by_learning_rate``, ``trace(momentum, nesterov)`` if ``momentum > 0``.
    ``weight_decay`` (TF >= 2.11) adds ``-lr_i * weight_decay * p``, which the velocity never holds
    (:func:`kopt.transforms.weight_decay_first` around the chain), as TensorFlow and Keras 3 do.

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.SGD(0.1, momentum=0.9, global_clipnorm=1.0)
    """
    learning_rate, options = _options("SGD", learning_rate, options)
    config = {"learning_rate": learning_rate, "momentum": momentum, "nesterov": nesterov}
    # The legacy SGD keeps no velocity without momentum; TF >= 2.11's always does (its `m`).
    keeps_velocity = not options["is_legacy_optimizer"] or _keeps_velocity(momentum)
    velocity = trace(momentum, nesterov) if keeps_velocity else None
    return _optimizer("SGD", config, options, [], momentum=velocity)


@_documented
def RMSprop(
    learning_rate: Any = 0.001,
    rho: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-7,
    centered: bool = False,
    **options: Any,
) -> Optimizer:
    """TensorFlow's RMSprop: ``a <- rho*a + (1-rho)*g**2``; ``p <- p - lr_i * g / sqrt(a) ...``.

    Legacy without momentum: ``g / (sqrt(a) + epsilon)`` (Keras 2.2.4's rule);
    with ``momentum > 0`` and in TF >= 2.11: ``g / sqrt(a + epsilon)``, and the
    step ``lr_i * g / ...`` goes through a velocity ``v <- momentum*v + step``.
    ``centered=True`` uses ``a - mean_grad**2``. Defaults ``learning_rate=0.001,
    rho=0.9, momentum=0, epsilon=1e-7, centered=False``. Note: TensorFlow's
    ``momentum`` weight is ``-velocity`` (it holds the positive step). ``weight_decay`` (TF >= 2.11) adds
    ``-lr_i * weight_decay * p`` outside the velocity, as TensorFlow and Keras 3 do.

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.RMSprop(momentum=0.9, centered=True)
    """
    learning_rate, options = _options("RMSprop", learning_rate, options)
    has_momentum = _keeps_velocity(momentum)
    in_sqrt = has_momentum or not options["is_legacy_optimizer"]
    config = {"learning_rate": learning_rate, "rho": rho, "momentum": momentum, "epsilon": epsilon}
    config["centered"] = centered
    scaling = scale_by_rms(rho, epsilon, centered=centered, epsilon_in_sqrt=in_sqrt)
    return _optimizer("RMSprop", config, options, [scaling], momentum=trace(momentum) if has_momentum else None)


@_documented
def Adagrad(
    learning_rate: Any = 0.001, initial_accumulator_value: float = 0.1, epsilon: float = 1e-7, **options: Any
) -> Optimizer:
    """TensorFlow's Adagrad: ``a <- a + g**2`` from ``initial_accumulator_value``; ``p <- p - lr_i*g/(sqrt(a)+eps)``.

    TF >= 2.11 divides by ``sqrt(a + epsilon)``. Defaults ``learning_rate=0.001,
    initial_accumulator_value=0.1, epsilon=1e-7`` (Keras 2.2.4: 0.01 and 0).

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.Adagrad(initial_accumulator_value=0.0)
    """
    learning_rate, options = _options("Adagrad", learning_rate, options)
    config = {"learning_rate": learning_rate, "initial_accumulator_value": initial_accumulator_value}
    config["epsilon"] = epsilon
    scaling = scale_by_adagrad(
        epsilon,
        initial_accumulator_value=initial_accumulator_value,
        epsilon_in_sqrt=not options["is_legacy_optimizer"],
    )
    return _optimizer("Adagrad", config, options, [scaling])


@_documented
def Adadelta(learning_rate: Any = 0.001, rho: float = 0.95, epsilon: float = 1e-7, **options: Any) -> Optimizer:
    """TensorFlow's Adadelta: Keras 2.2.4's rule (:func:`kopt.scale_by_adadelta`), default ``learning_rate=0.001``.

    Defaults ``learning_rate=0.001, rho=0.95, epsilon=1e-7`` (Keras 2.2.4: ``lr=1.0``).

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.Adadelta(learning_rate=1.0)
    """
    learning_rate, options = _options("Adadelta", learning_rate, options)
    config = {"learning_rate": learning_rate, "rho": rho, "epsilon": epsilon}
    return _optimizer("Adadelta", config, options, [scale_by_adadelta(rho, epsilon)])


@_documented
def Adam(
    learning_rate: Any = 0.001,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    **options: Any,
) -> Optimizer:
    """TensorFlow's Adam: Keras 2.2.4's rule (:func:`kopt.scale_by_adam`; epsilon meets the uncorrected ``v``).

    Defaults ``learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False``.

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.Adam(learning_rate=1e-3, global_clipnorm=1.0)
    """
    learning_rate, options = _options("Adam", learning_rate, options)
    config = {"learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon}
    config["amsgrad"] = amsgrad
    return _optimizer("Adam", config, options, [scale_by_adam(beta_1, beta_2, epsilon, amsgrad)])


@_documented
def AdamW(
    learning_rate: Any = 0.001,
    weight_decay: float = 0.004,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    amsgrad: bool = False,
    **options: Any,
) -> Optimizer:
    """TensorFlow's AdamW (TF >= 2.11 only): :func:`Adam` plus ``p <- p - lr * weight_decay * p``.

    Defaults ``learning_rate=0.001, weight_decay=0.004``, the rest as :func:`Adam`.

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.AdamW(weight_decay=0.01)
    """
    options = {**_current_only("AdamW", options), "weight_decay": weight_decay}
    learning_rate, options = _options("AdamW", learning_rate, options)
    config = {"learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon}
    config["amsgrad"] = amsgrad
    return _optimizer("AdamW", config, options, [scale_by_adam(beta_1, beta_2, epsilon, amsgrad)])


@_documented
def Adamax(
    learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **options: Any
) -> Optimizer:
    """TensorFlow's Adamax: Keras 2.2.4's rule (:func:`kopt.scale_by_adamax`), other defaults.

    Defaults ``learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7`` (Keras 2.2.4: ``lr=0.002``).

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.Adamax()
    """
    learning_rate, options = _options("Adamax", learning_rate, options)
    config = {"learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon}
    return _optimizer("Adamax", config, options, [scale_by_adamax(beta_1, beta_2, epsilon)])


@_documented
def Nadam(
    learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **options: Any
) -> Optimizer:
    """TensorFlow's Nadam: Keras 2.2.4's rule (:func:`kopt.scale_by_nadam`), no learning-rate decay.

    Legacy: ``decay`` (default 0.004; ``schedule_decay`` is accepted for it) is
    the momentum schedule's decay, not a learning-rate decay. TF >= 2.11 uses
    ``mu_t = beta_1 * (1 - 0.5 * 0.96**t)``, i.e. a schedule decay of 1.
    Defaults ``learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7``.

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.Nadam(decay=0.004)
    """
    options = _unbound(options)
    if "schedule_decay" in options:
        if "decay" in options:
            raise ValueError("give Nadam's schedule decay as decay or as schedule_decay, not both")
        options["decay"] = options.pop("schedule_decay")
    legacy = options.get("is_legacy_optimizer", True)
    learning_rate, options = _options(
        "Nadam", learning_rate, {"decay": 0.004, **options} if legacy is True else options
    )
    schedule_decay = options.pop("decay") if options["is_legacy_optimizer"] else 1.0
    config = {"learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon}
    if options["is_legacy_optimizer"]:
        config = {"learning_rate": learning_rate, "decay": schedule_decay, **config}
    if options["is_legacy_optimizer"] and (isinstance(learning_rate, Mapping) or callable(learning_rate)):
        raise ValueError(
            "The Nadam optimizer does not support learning-rate schedules as the learning rate "
            "(TensorFlow's legacy Nadam refuses them; TF >= 2.11's, is_legacy_optimizer=False, takes them)"
        )
    scaling = scale_by_nadam(beta_1, beta_2, epsilon, schedule_decay)
    return _optimizer("Nadam", config, options, [scaling])


def _current_only(class_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of an optimizer TensorFlow has only since 2.11 (no legacy class)."""
    options = _unbound(options)
    if options.get("is_legacy_optimizer", False):
        raise ValueError(f"{class_name} has no legacy TensorFlow optimizer: is_legacy_optimizer must be False")
    return {**options, "is_legacy_optimizer": False}


@_documented
def Lion(learning_rate: Any = 0.0001, beta_1: float = 0.9, beta_2: float = 0.99, **options: Any) -> Optimizer:
    """TensorFlow's Lion (tf_keras >= 2.13, no legacy class): ``p <- p - lr_i * sign(beta_1*m + (1-beta_1)*g)``,
    then ``m <- beta_2*m + (1-beta_2)*g`` (:func:`kopt.scale_by_lion`).

    Defaults ``learning_rate=0.0001, beta_1=0.9, beta_2=0.99`` (Keras 3's Lion: ``learning_rate=0.001``;
    its configs carry the value). ``weight_decay`` decays the variable before the step, as TensorFlow does.

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.Lion(learning_rate=3e-4, weight_decay=0.1)
    """
    learning_rate, options = _options("Lion", learning_rate, _current_only("Lion", options))
    config = {"learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2}
    return _optimizer("Lion", config, options, [scale_by_lion(beta_1, beta_2)])


@_documented
def Ftrl(
    learning_rate: Any = 0.001,
    learning_rate_power: float = -0.5,
    initial_accumulator_value: float = 0.1,
    l1_regularization_strength: float = 0.0,
    l2_regularization_strength: float = 0.0,
    l2_shrinkage_regularization_strength: float = 0.0,
    beta: float = 0.0,
    **options: Any,
) -> Optimizer:
    """TensorFlow's FTRL-Proximal (both generations; :func:`kopt.ftrl`): the rule sets each variable from its
    accumulated squared gradients ``n`` and linear term ``z``, with L1 (sparsity), L2, L2 shrinkage and ``beta``.

    Defaults ``learning_rate=0.001, learning_rate_power=-0.5, initial_accumulator_value=0.1``, the
    regularization strengths and ``beta`` 0. ``weight_decay`` decays the variable before the rule reads it,
    as TensorFlow does.

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.Ftrl(0.05, l1_regularization_strength=0.001, is_legacy_optimizer=False)
    """
    learning_rate, options = _options("Ftrl", learning_rate, options)
    config = {
        "learning_rate": learning_rate,
        "learning_rate_power": learning_rate_power,
        "initial_accumulator_value": initial_accumulator_value,
        "l1_regularization_strength": l1_regularization_strength,
        "l2_regularization_strength": l2_regularization_strength,
        "l2_shrinkage_regularization_strength": l2_shrinkage_regularization_strength,
        "beta": beta,
    }

    def step(rate: LearningRate) -> GradientTransformation:
        return ftrl(
            rate,
            learning_rate_power,
            initial_accumulator_value,
            l1_regularization_strength,
            l2_regularization_strength,
            l2_shrinkage_regularization_strength,
            beta,
        )

    return _optimizer("Ftrl", config, options, [], step=step)


@_documented
def Adafactor(
    learning_rate: Any = 0.001,
    beta_2_decay: float = -0.8,
    epsilon_1: float = 1e-30,
    epsilon_2: float = 1e-3,
    clip_threshold: float = 1.0,
    relative_step: bool = True,
    **options: Any,
) -> Optimizer:
    """TensorFlow's Adafactor (TF >= 2.11 only; Keras 3's is the same rule): :func:`kopt.scale_by_adafactor`,
    a factored second moment with a relative step size and update clipping, the learning rate inside.

    Defaults ``learning_rate=0.001, beta_2_decay=-0.8, epsilon_1=1e-30, epsilon_2=1e-3, clip_threshold=1.0,
    relative_step=True`` (kept in the config; it changes nothing in Keras' rule beyond the step size's
    ``min(lr, 1/sqrt(t))``, which applies anyway). Leaves stay apart (the rule is per variable);
    ``weight_decay`` decays the variable before the rule reads its RMS, as TensorFlow does. Its weights
    (``r`` and ``c`` exist only for variables of 2 or more dimensions) are not read or written yet.

    Example:
        >>> import kopt
        >>> opt = kopt.tf_keras.Adafactor(learning_rate=0.01)
    """
    learning_rate, options = _options("Adafactor", learning_rate, _current_only("Adafactor", options))
    config = {
        "learning_rate": learning_rate,
        "beta_2_decay": beta_2_decay,
        "epsilon_1": epsilon_1,
        "epsilon_2": epsilon_2,
        "clip_threshold": clip_threshold,
        "relative_step": check_bool("relative_step", relative_step),
    }

    def step(rate: LearningRate) -> GradientTransformation:
        return scale_by_adafactor(rate, beta_2_decay, epsilon_1, epsilon_2, clip_threshold)

    return _optimizer("Adafactor", config, options, [], step=step, per_leaf=True)


def _lamb(
    learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **options: Any
) -> Optimizer:
    """Keras 3's Lamb (tf_keras has none): Adam's moments with ``epsilon`` on the corrected root, scaled per
    variable by the trust ratio ``||p|| / ||u||`` (:func:`kopt.scale_by_trust_ratio`), then by the learning rate.
    Leaves stay apart. ``weight_decay`` decays the variable first (``p' = p - lr_i * weight_decay * p``), and the
    ratio reads the norm of ``p'``, as Keras 3 does (:func:`kopt.transforms.weight_decay_first`)."""
    learning_rate, options = _options("Lamb", learning_rate, _current_only("Lamb", options))
    config = {"learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon}
    scaling = [scale_by_adam(beta_1, beta_2, epsilon, corrected_epsilon=True), scale_by_trust_ratio()]
    return _optimizer("Lamb", config, options, scaling, per_leaf=True)


def _schedule_free_adamw(
    learning_rate: Any = 0.0025,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-8,
    warmup_steps: int = 0,
    **options: Any,
) -> Optimizer:
    """Keras 3's ScheduleFreeAdamW (tf_keras has none): :func:`kopt.schedule_free_adam`, the learning rate
    inside. ``weight_decay`` decays the variable before the rule reads it, as Keras does."""
    options = _current_only("ScheduleFreeAdamW", options)
    learning_rate, options = _options("ScheduleFreeAdamW", learning_rate, options)
    config = {"learning_rate": learning_rate, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon}
    config["warmup_steps"] = warmup_steps

    def step(rate: LearningRate) -> GradientTransformation:
        return schedule_free_adam(rate, beta_1, beta_2, epsilon, warmup_steps)

    return _optimizer("ScheduleFreeAdamW", config, options, [], step=step)


#: TensorFlow's optimizers by class name.
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    f.__name__: f for f in (SGD, RMSprop, Adagrad, Adadelta, Adam, Adamax, Nadam, AdamW, Lion, Ftrl, Adafactor)
}
