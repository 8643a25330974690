"""Optimizers by name and by config, as Keras 2's ``optimizers.get`` / ``serialize``.

A config is ``{"class_name": "Adam", "config": {...}}`` with the Keras 2
``get_config`` keys (``clipnorm`` / ``clipvalue`` only when they were given).
Configs hold plain numbers and bools, so they go through JSON unchanged, and
building an optimizer from one never runs code.

    >>> import kopt
    >>> config = kopt.serialize(kopt.Adam(lr=1e-3, clipnorm=1.0))
    >>> config["class_name"], sorted(config["config"])
    ('Adam', ['amsgrad', 'beta_1', 'beta_2', 'clipnorm', 'decay', 'epsilon', 'lr'])
    >>> opt = kopt.deserialize(config)
    >>> opt = kopt.get("adam")        # Keras defaults; any capitalisation
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np

from kopt import schedules, tf_keras
from kopt.base import GradientTransformation, OptState
from kopt.file_safety import MAX_DEPTH, MESSAGE_LIMIT, clip, shorten
from kopt.optimizers import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, Nadam, Optimizer, RMSprop
from kopt.state import get_hyperparams
from kopt.validation import check_bool, check_count
from kopt.wrappers import dynamic_loss_scale

#: The optimizers ``get``/``deserialize`` know, by lower-case name.
OPTIMIZERS = {c.__name__.lower(): c for c in (SGD, RMSprop, Adagrad, Adadelta, Adam, Adamax, Nadam, AdamW)}


def serialize(
    opt: Optimizer | schedules.Schedule, state: OptState | None = None, *, flavor: str | None = None
) -> dict[str, Any]:
    """The config of an optimizer built by kopt (or of a kopt schedule), in the format of ``flavor``.

    ``flavor`` (default: the optimizer's own, ``opt.flavor``) is ``"keras"``
    (Keras 2.2.4: ``{"class_name": ..., "config": {...}}``), ``"tf_keras.legacy"``
    or ``"tf_keras"`` (TensorFlow's ``serialize()`` dict, with ``module`` and
    ``registered_name``, which ``tf_keras.optimizers.deserialize`` reads back),
    or ``"keras3"`` (an optimizer built from a Keras 3 config: Keras 3's dict).
    A Keras 2.2.4 optimizer is written as a ``"tf_keras.legacy"`` config with
    the same meaning (``lr`` -> ``learning_rate``, ``clipnorm`` -> ``global_clipnorm``,
    Nadam's ``schedule_decay`` -> ``decay``); what TensorFlow cannot express
    (``clipnorm`` with ``clipvalue``: TensorFlow clips values first; kopt-only
    options) is a ``ValueError`` naming it.

    Without ``state`` the values are those given to the constructor (defaults
    resolved, e.g. ``epsilon=1e-07``). With ``state`` every hyperparameter is
    read from it, as Keras' ``get_config`` reads its variables: changes made
    by ``set_hyperparams`` show, in the state's float dtype (``lr=0.01`` held
    in float32 reads back as ``0.009999999776482582``).

    A kopt schedule as the learning rate is written as its own config
    (``{"class_name": "cosine_decay", "config": {...}}``, see
    :func:`kopt.schedules.to_config`), with ``state`` at the values the state
    holds; a schedule alone is written the same way. A plain Python function
    as the learning rate is a ``ValueError``: configs hold numbers, never code.

    Example:
        >>> import kopt
        >>> kopt.serialize(kopt.SGD(lr=kopt.linear_warmup(0.1, warmup_steps=100)))["config"]["lr"]
        {'class_name': 'linear_warmup', 'config': {'lr': 0.1, 'init_lr': 0.0, 'warmup_steps': 100}}
    """
    if isinstance(opt, schedules.Schedule):
        return schedules.to_config(opt, None if state is None else get_hyperparams(state))
    if not isinstance(opt, Optimizer):
        raise ValueError(
            f"serialize takes an optimizer built by kopt ({', '.join(c.__name__ for c in OPTIMIZERS.values())} "
            f"or kopt.get), got {type(opt).__name__}"
        )
    flavor = opt.flavor if flavor is None else flavor
    if flavor not in (*tf_keras.FLAVORS, KERAS3):
        raise ValueError(f"flavor must be one of {', '.join(map(repr, (*tf_keras.FLAVORS, KERAS3)))}, got {flavor!r}")
    config = dict(opt.config)
    held = None if state is None else get_hyperparams(state)
    # A schedule's own hyperparameters (its lr, decay, ...) are written inside its config, not as the optimizer's.
    in_schedules = {
        name for value in config.values() if isinstance(value, schedules.Schedule) for name in value.hyperparams
    }
    for key, value in config.items():
        if isinstance(value, schedules.Schedule) and value.config is not None:
            config[key] = schedules.to_config(value, held)
        elif callable(value):
            raise ValueError(
                f"cannot serialize {opt.class_name}: {key} is a plain function, not one of kopt's schedules "
                f"({', '.join(schedules.SCHEDULES)}); configs hold numbers, never code"
            )
        elif held is not None:
            name = _state_name(opt, key)
            if (
                name in held
                and name not in in_schedules
                and not isinstance(value, (Mapping, bool))
                and value is not None
            ):
                config[key] = float(held[name])
    if flavor == opt.flavor:
        if flavor == tf_keras.KERAS:
            return {"class_name": opt.class_name, "config": config}
        if opt.class_name in LOSS_SCALE_CLASSES and flavor != KERAS3:  # tf_keras registers them by class name
            return {
                "module": MODULE_TF_LOSS_SCALE,
                "class_name": opt.class_name,
                "config": config,
                "registered_name": opt.class_name,
            }
        if flavor == KERAS3:  # Keras 3's serialize() dict, which keras.optimizers.deserialize reads back
            return {
                "module": "keras.optimizers",
                "class_name": opt.class_name,
                "config": config,
                "registered_name": None,
            }
        if (opt.class_name, flavor) == ("Nadam", tf_keras.LEGACY) and config["decay"] != 0.004:
            # TensorFlow's legacy Nadam writes its schedule decay as `decay` but reads it back only as
            # `schedule_decay` (a `decay` argument is replaced by the default 0.004).
            config["schedule_decay"] = config.pop("decay")
        return _tf_dict(opt.class_name, config, flavor)
    if opt.flavor == tf_keras.KERAS and flavor == tf_keras.LEGACY:
        return _tf_dict(opt.class_name, _legacy_config(opt.class_name, config), flavor)
    raise ValueError(
        f"a {opt.flavor!r} optimizer cannot be written as a {flavor!r} config: the keys would mean other things; "
        f"serialize it with flavor={opt.flavor!r}"
    )


def _state_name(opt: Optimizer, key: str) -> str:
    """The state's name of the hyperparameter a config ``key`` holds."""
    if key in ("clipnorm", "global_clipnorm"):
        return "max_norm"
    if key == "clipvalue":
        return "max_delta"
    if key == "learning_rate":
        return "lr"
    if key == "decay" and opt.class_name == "Nadam" and opt.flavor == tf_keras.LEGACY:
        return "schedule_decay"
    return key


def _tf_dict(class_name: str, config: dict[str, Any], flavor: str) -> dict[str, Any]:
    return {"module": tf_keras.MODULES[flavor], "class_name": class_name, "config": config, "registered_name": None}


def _legacy_config(class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A Keras 2.2.4 config as the legacy TensorFlow config of the same optimizer."""
    if class_name not in tf_keras.OPTIMIZERS or class_name == "AdamW":
        raise ValueError(f"TensorFlow's legacy optimizers have no {class_name}")
    config = dict(config)
    refused = [key for key in ("state_dtype", "packed") if key in config]
    if refused:
        raise ValueError(f"TensorFlow has no {' or '.join(refused)}: build the optimizer without it to write it")
    if config.get("clipnorm") and config.get("clipvalue"):
        raise ValueError(
            "clipnorm with clipvalue cannot be written for TensorFlow: Keras 2.2.4 clips the norm first, "
            "TensorFlow clips values first"
        )
    result: dict[str, Any] = {"name": class_name}
    if config.get("clipnorm"):
        result["global_clipnorm"] = config.pop("clipnorm")  # Keras 2.2.4's clipnorm is a global norm
    config.pop("clipnorm", None)
    result["learning_rate"] = config.pop("lr")
    if class_name == "Nadam":
        schedule_decay = config.pop("schedule_decay")
        result["decay" if schedule_decay == 0.004 else "schedule_decay"] = schedule_decay  # see serialize
    if class_name == "Adagrad":
        config.setdefault("initial_accumulator_value", 0.0)
    if class_name == "RMSprop":
        config.update(momentum=0.0, centered=False)
    return {**result, **config}


def _allowed(constructor: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(constructor).parameters)


#: Keys only the configs of TF >= 2.11's optimizers hold.
_CURRENT_KEYS = ("weight_decay", "use_ema", "jit_compile", "ema_momentum")

#: The flavor of Keras 3's configs (``keras.optimizers.serialize``, keras >= 3.0, TensorFlow >= 2.16's ``keras``),
#: told by the keys no TensorFlow config holds.
KERAS3 = "keras3"
MODULE_KERAS3 = "keras.optimizers"
_KERAS3_KEYS = ("loss_scale_factor", "gradient_accumulation_steps")


def config_flavor(config: Mapping[str, Any]) -> str:
    """Which Keras wrote an optimizer config: ``"keras"``, ``"tf_keras.legacy"``, ``"tf_keras"`` or ``"keras3"``.

    ``is_legacy_optimizer`` decides when present (only TensorFlow writes it);
    else Keras 3's own keys (``loss_scale_factor``,
    ``gradient_accumulation_steps``) mean Keras 3; else TensorFlow's ``module``;
    else a ``name`` (every TensorFlow config has one) means TensorFlow's, legacy
    unless keys of TF >= 2.11 (``weight_decay``, ``use_ema``, ...) are there.
    Anything else is Keras 2.2.4 (kopt's own configs).
    """
    arguments = config.get("config")
    arguments = arguments if isinstance(arguments, Mapping) else {}
    if "is_legacy_optimizer" in arguments:
        return tf_keras.LEGACY if arguments["is_legacy_optimizer"] else tf_keras.CURRENT
    if any(key in arguments for key in _KERAS3_KEYS):
        return KERAS3
    module = config.get("module")
    if module == tf_keras.MODULES[tf_keras.LEGACY]:
        return tf_keras.LEGACY
    if module is not None or "name" in arguments:
        return tf_keras.CURRENT if any(key in arguments for key in _CURRENT_KEYS) else tf_keras.LEGACY
    return tf_keras.KERAS


#: The widest integer a config may hold (step counts, ``decay_steps``): larger ones are refused before
#: anything formats them (Python refuses to print integers of more than 4300 digits).
_MAX_INT_BITS = 64

#: The most values (dicts, lists and scalars, counted as the walk meets them) a config may hold. An optimizer
#: config holds a few dozen; a piecewise schedule two per boundary, so up to ~10000 boundaries pass (building
#: one costs ~50 us a boundary, in ``as_real`` checks: 10000 take ~0.5 s, the limit keeps it there).
MAX_CONFIG_VALUES = 20_000

_SCALARS = (str, float, bool, type(None), np.bool_, np.floating)


def _check_plain_data(config: Any) -> None:
    """Refuses what no optimizer config holds, naming where: more than ``MAX_CONFIG_VALUES`` values, nesting
    deeper than ``MAX_DEPTH``, keys that are not strings, values other than JSON's (str, bool, float,
    int of at most 64 bits, None, lists/tuples, dicts) and NumPy's real scalars (0-d arrays too).
    Iterative, and the count is checked before a container's items are walked: a config nested 100000
    deep costs ``MAX_DEPTH`` steps, a list of 10**6 numbers one."""

    def where(keys: tuple[Any, ...]) -> str:  # formatted on refusal only; at most MAX_DEPTH keys, each shortened
        return "config" + "".join(f"[{shorten(key, 40)}]" for key in keys)

    stack: list[tuple[Any, tuple[Any, ...]]] = [(config, ())]
    count = 1
    while stack:
        value, keys = stack.pop()
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf":
            value = value[()]  # a 0-d array: checked as its scalar
        if isinstance(value, _SCALARS):
            continue
        if isinstance(value, (int, np.integer)):
            if int(value).bit_length() > _MAX_INT_BITS:
                raise ValueError(f"{where(keys)} is an integer of {int(value).bit_length()} bits, more than 64")
        elif isinstance(value, (Mapping, list, tuple)):
            if len(keys) >= MAX_DEPTH:
                raise ValueError(f"{where(keys)} nests deeper than {MAX_DEPTH} levels; optimizer configs nest a few")
            count += len(value)
            if count > MAX_CONFIG_VALUES:
                raise ValueError(
                    f"{where(keys)} makes the config hold more than {MAX_CONFIG_VALUES} values; optimizer configs "
                    "hold a few dozen"
                )
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in items:
                if isinstance(value, Mapping) and not isinstance(key, str):
                    raise ValueError(f"{where(keys)} has a key of type {type(key).__name__}; keys are strings")
                stack.append((item, (*keys, key)))
        else:
            raise ValueError(
                f"{where(keys)} is a {type(value).__name__}; configs hold only numbers (int, float), bools, "
                "strings, None, lists and dicts"
            )


def deserialize(config: Mapping[str, Any], *, flavor: str | None = None) -> Optimizer:
    """Builds the optimizer a config describes: kopt's, Keras 2.2.4's or TensorFlow's.

    ``config`` is ``{"class_name": ..., "config": {...}}``, optionally with
    TensorFlow's ``module`` and ``registered_name`` (what
    ``tf_keras.optimizers.serialize`` writes, and the ``optimizer_config`` of a
    saved model's training config, ``"Custom>Adam"`` too). ``flavor`` (default: told from the config
    itself, see :func:`config_flavor`) picks the meaning of its keys:
    ``"keras"`` builds ``kopt.Adam`` etc., ``"tf_keras.legacy"`` / ``"tf_keras"``
    build ``kopt.tf_keras.Adam(..., is_legacy_optimizer=...)`` with TensorFlow's
    defaults; ``"keras3"`` (Keras 3's ``keras.optimizers.serialize``) builds
    the same ``kopt.tf_keras`` optimizer, whose numbers are Keras 3's for the
    eight optimizers both have, and refuses, naming them, Keras 3's
    ``loss_scale_factor`` / ``gradient_accumulation_steps`` when not ``None``
    and Keras 3 optimizers kopt has no counterpart for (Lion, Ftrl, ...).
    ``class_name`` is matched case-insensitively. An unknown class
    name or config key is a ``ValueError`` listing what is allowed. The
    caller's dict is not modified. A kopt schedule's config (as the
    learning rate inside an optimizer config, or alone) gives the schedule
    (:func:`kopt.schedules.from_config`).

    Configs may come from strangers (a file's JSON): building from one never
    runs code, and a hostile config is a ``ValueError`` naming the key before
    anything else reads it: more than 20000 values (:data:`MAX_CONFIG_VALUES`),
    nesting deeper than 64 levels, keys that are not strings, values other than
    JSON's (str, bool, float, int, None, lists, dicts) and NumPy's real scalars,
    integers wider than 64 bits, a ``class_name`` / ``module`` /
    ``registered_name`` / ``name`` that is not a string, an
    ``is_legacy_optimizer`` that is not a bool; then unknown keys, and wrong
    types or non-finite values for hyperparameters. Messages quote values from
    the config shortened to 200 characters, never whole
    (``docs/threat_model.md``).

    Example:
        >>> import kopt
        >>> kopt.deserialize({"class_name": "adagrad", "config": {"name": "Adagrad"}}).config["learning_rate"]
        0.001
    """
    _check_plain_data(config)
    if (
        not isinstance(config, Mapping)
        or not {"class_name", "config"} <= set(config)
        or not set(config) <= {"class_name", "config", "module", "registered_name"}
    ):
        raise ValueError(
            f"Improper config format: {shorten(config)}; expected a dict with the keys 'class_name' and 'config' "
            "(and, as TensorFlow writes them, optionally 'module' and 'registered_name')"
        )
    if not isinstance(config["class_name"], str):
        raise ValueError(f"config['class_name'] must be a string, got {shorten(config['class_name'])}")
    for key in ("module", "registered_name"):
        if not isinstance(config.get(key), (str, type(None))):
            raise ValueError(f"config[{key!r}] must be a string or None, got {shorten(config[key])}")
    arguments = config["config"]
    if isinstance(arguments, Mapping) and not isinstance(arguments.get("name", ""), str):
        raise ValueError(f"config['config']['name'] must be a string, got {shorten(arguments['name'])}")
    if isinstance(arguments, Mapping) and not isinstance(arguments.get("is_legacy_optimizer", True), (bool, np.bool_)):
        raise ValueError(
            "config['config']['is_legacy_optimizer'] must be True or False, "
            f"got {shorten(arguments['is_legacy_optimizer'])}"
        )
    if config["class_name"].removeprefix("Custom>") in LOSS_SCALE_CLASSES and isinstance(arguments, Mapping):
        return _loss_scale_optimizer(config["class_name"].removeprefix("Custom>"), arguments)
    if config["class_name"] == "MultiOptimizer" and isinstance(arguments, Mapping):
        return _multi_optimizer(arguments)
    flavor = config_flavor(config) if flavor is None else flavor
    if flavor not in (*tf_keras.FLAVORS, KERAS3):
        raise ValueError(
            f"flavor must be one of {', '.join(map(repr, (*tf_keras.FLAVORS, KERAS3)))}, got {shorten(flavor)}"
        )
    try:
        # A schedule's config gives its Schedule (see above); typed as the optimizer nearly every caller wants.
        return _build(config, arguments, flavor)  # type: ignore[return-value]
    except ValueError as error:  # schedules' and TensorFlow's messages may quote the config: never at length
        if len(str(error)) <= MESSAGE_LIMIT:
            raise
        raise ValueError(clip(str(error), MESSAGE_LIMIT)) from None


def optimizer_from_config(config: Any, what: str) -> Optimizer:
    """:func:`deserialize` of ``config``, where only an optimizer will do (``what`` names the place): a
    schedule's config there is a ``ValueError``, not a schedule."""
    built: Any = deserialize(config)
    if not isinstance(built, Optimizer):
        raise ValueError(
            f"{what} is the config of a learning-rate schedule ({shorten(config.get('class_name'))}), "
            "not of an optimizer"
        )
    return built


def _build(config: Mapping[str, Any], arguments: Any, flavor: str) -> Optimizer | schedules.Schedule:
    """The optimizer (or schedule) of a config :func:`deserialize` has checked."""
    class_name = config["class_name"]
    if not isinstance(arguments, Mapping):
        raise ValueError(f"the 'config' of {shorten(class_name)} must be a dict, got {type(arguments).__name__}")
    if flavor == KERAS3:
        return _keras3(class_name, arguments)
    if flavor != tf_keras.KERAS:
        known = {name.lower(): constructor for name, constructor in tf_keras.OPTIMIZERS.items()}
        class_name = class_name.removeprefix("Custom>")  # a saved model's training config names TF >= 2.11's so
        if class_name.lower() not in known:
            raise ValueError(
                f"Unknown TensorFlow optimizer: {shorten(class_name)}; known: {', '.join(tf_keras.OPTIMIZERS)}"
            )
        try:
            return known[class_name.lower()](**{**arguments, "is_legacy_optimizer": flavor == tf_keras.LEGACY})
        except TypeError as error:  # an unknown key: a bad config is a ValueError, as for kopt's own
            raise ValueError(clip(str(error), MESSAGE_LIMIT)) from None
    if schedules.is_config(config):
        return schedules.from_config(config)
    if class_name.lower() not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer: {shorten(class_name)}; known: {', '.join(sorted(OPTIMIZERS))}")
    constructor = OPTIMIZERS[class_name.lower()]
    unknown = [key for key in arguments if key not in _allowed(constructor)]
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {', '.join(shorten(key, 80) for key in unknown[:8])}"
            f"{f' (and {len(unknown) - 8} more)' if len(unknown) > 8 else ''} for {constructor.__name__}; "
            f"allowed: {', '.join(_allowed(constructor))}"
        )
    rates = {key: schedules.from_config(value) for key, value in arguments.items() if isinstance(value, Mapping)}
    return constructor(**{**arguments, **rates})


def _keras3(class_name: str, arguments: Mapping[str, Any]) -> Optimizer:
    """A Keras 3 config: the :mod:`kopt.keras` optimizer of that class, from the config's keys alone."""
    from kopt import keras  # kopt.keras's MultiOptimizer reads variable paths with this module's helper

    known = {name.lower(): constructor for name, constructor in keras.OPTIMIZERS.items()}
    if class_name.lower() not in known:
        raise ValueError(
            f"Keras 3 optimizer {shorten(class_name)} (a keras.optimizers config, keras >= 3) has no kopt "
            f"counterpart yet; kopt builds Keras 3's {', '.join(keras.OPTIMIZERS)}, LossScaleOptimizer, "
            "MultiOptimizer"
        )
    try:
        return known[class_name.lower()](**arguments)
    except TypeError as error:  # an unknown key
        raise ValueError(clip(f"Keras 3's {class_name} config: {error}", MESSAGE_LIMIT)) from None


#: The class names of Keras' loss-scale optimizers: Keras 3's and tf_keras' legacy one, then TF >= 2.11's.
LOSS_SCALE_CLASSES = ("LossScaleOptimizer", "LossScaleOptimizerV3")
#: Where tf_keras' loss-scale optimizers are registered (its serialize() dict's ``module``).
MODULE_TF_LOSS_SCALE = "tf_keras.src.mixed_precision.loss_scale_optimizer"
_LOSS_SCALE_KEYS = {
    KERAS3: ("name", "inner_optimizer", "initial_scale", "dynamic_growth_steps"),
    "tf_keras": ("inner_optimizer", "dynamic", "initial_scale", "dynamic_growth_steps"),
}


def _loss_scale_optimizer(class_name: str, arguments: Mapping[str, Any]) -> Optimizer:
    """A loss-scale optimizer's config: its inner optimizer (a config of its own) in
    :func:`kopt.dynamic_loss_scale`. Keras 3's takes the scaled gradients and unscales them; tf_keras' takes
    them unscaled (``get_unscaled_gradients``), never lets the scale fall below 1 and counts skipped steps."""
    inner_config = arguments.get("inner_optimizer")
    if not isinstance(inner_config, Mapping):
        raise ValueError(f"{class_name} config needs 'inner_optimizer', a config dict; got {shorten(inner_config)}")
    if inner_config.get("class_name") in ("MultiOptimizer", *LOSS_SCALE_CLASSES):  # Keras refuses them too
        raise ValueError(f"{class_name}'s inner_optimizer cannot be a {shorten(inner_config.get('class_name'))}")
    inner = optimizer_from_config(inner_config, f"{class_name}'s inner_optimizer")
    keras3 = inner.flavor == KERAS3
    family = "Keras 3 (keras >= 3)" if keras3 else "tf_keras"
    allowed = _LOSS_SCALE_KEYS[KERAS3 if keras3 else "tf_keras"]
    unknown = [key for key in arguments if key not in allowed]
    if unknown:
        raise ValueError(
            f"{family}'s {class_name} config: kopt cannot honour {', '.join(map(repr, unknown))}; "
            f"its keys are {', '.join(allowed)}"
        )
    if keras3:
        from kopt import keras

        return keras.LossScaleOptimizer(inner, **{k: v for k, v in arguments.items() if k != "inner_optimizer"})
    dynamic = check_bool("dynamic", arguments.get("dynamic", True))
    growth = check_count("dynamic_growth_steps", arguments.get("dynamic_growth_steps", 2000)) if dynamic else None
    # tf_keras' apply_gradients takes unscaled gradients, floors the scale at 1 and counts skipped steps
    transform = dynamic_loss_scale(
        inner, arguments.get("initial_scale", 2.0**15), growth, unscale=False, min_scale=1.0, count_skipped=True
    )
    return Optimizer(transform, class_name, dict(arguments), inner.flavor)


def keras_variable_path(path: Sequence[Any]) -> str:
    """The Keras variable path of a pytree leaf's key path: its keys joined by ``/``.

    ``{"net": {"head": {"kernel": w}}}`` holds the Keras variable ``net/head/kernel``;
    a list index is its number (``blocks/0/kernel``); an attribute (Equinox, a
    dataclass) its name; a Flax NNX ``Variable``'s own ``value`` key is dropped
    (``linear/kernel``), as is Flax Linen's top ``params`` collection.

    Example:
        >>> import jax, jax.numpy as jnp, kopt
        >>> params = {"params": {"dense": {"kernel": jnp.zeros(2)}}, "blocks": [jnp.zeros(1)]}
        >>> [kopt.keras_variable_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        ['blocks/0', 'dense/kernel']
    """
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    if parts and parts[0] == "params":
        parts = parts[1:]
    return "/".join(parts)


#: A pattern of a MultiOptimizer's map is matched against every param's path: it may come from a stranger's
#: config, so patterns are bounded and a quantified group holding a quantifier (catastrophic backtracking,
#: e.g. ``(a+)+``) is refused.
MAX_PATTERN_LENGTH = 256
_NESTED_QUANTIFIER = re.compile(r"\([^)]*[+*}][^)]*\)\s*[+*{]")


def check_pattern(pattern: Any, what: str) -> str:
    """``pattern``, a regular expression to match variable paths with, or a ``ValueError`` naming ``what``: a
    string of at most :data:`MAX_PATTERN_LENGTH` characters without a quantified group holding a quantifier
    (such a pattern could take exponential time to match, and patterns come from files)."""
    if not isinstance(pattern, str):
        raise ValueError(f"{what} must be a string (a regular expression), got {shorten(pattern)}")
    if len(pattern) > MAX_PATTERN_LENGTH or _NESTED_QUANTIFIER.search(pattern):
        raise ValueError(
            f"{what} {shorten(pattern)} refused: at most {MAX_PATTERN_LENGTH} characters and "
            "no quantified group holding a quantifier (it could take exponential time to match)"
        )
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what} {shorten(pattern)} is not a regular expression: {error}") from None
    return pattern


def _multi_optimizer(arguments: Mapping[str, Any]) -> Optimizer:
    """Keras 3's MultiOptimizer config: its members' configs built, then :func:`kopt.keras.MultiOptimizer`."""
    from kopt import keras

    allowed = ("optimizer_map", "loss_scale_factor", "name")
    unknown = [key for key in arguments if key not in allowed]
    mapping = arguments.get("optimizer_map")
    inner = mapping.get("config") if isinstance(mapping, Mapping) else None
    if unknown or not isinstance(inner, Mapping) or not isinstance(inner.get("default_optimizer"), Mapping):
        raise ValueError(
            "Keras 3's MultiOptimizer config needs 'optimizer_map' (an OptimizerMap config with "
            f"'default_optimizer'){f'; kopt cannot honour {unknown}' if unknown else ''}; its keys are "
            f"{', '.join(allowed)} (a callable selector is code: it is never read)"
        )
    patterns = inner.get("optimizer_map") or {}
    if not isinstance(patterns, Mapping):
        raise ValueError(
            f"MultiOptimizer's OptimizerMap 'optimizer_map' must map patterns to configs, got {shorten(patterns)}"
        )
    for pattern in patterns:  # before any member is built
        check_pattern(pattern, "MultiOptimizer pattern")

    def member(config: Any) -> Optimizer:
        if not isinstance(config, Mapping) or config.get("class_name") in ("MultiOptimizer", *LOSS_SCALE_CLASSES):
            raise ValueError(f"a MultiOptimizer member must be an optimizer config, not {shorten(config, 80)}")
        arguments = dict(config.get("config") or {})
        if "loss_scale_factor" in arguments:  # Keras sets the MultiOptimizer's on every member
            arguments["loss_scale_factor"] = None
        return optimizer_from_config({**config, "config": arguments}, "a MultiOptimizer member")

    optimizer_map = keras.OptimizerMap(
        member(inner["default_optimizer"]), {pattern: member(config) for pattern, config in patterns.items()}
    )
    return keras.MultiOptimizer(optimizer_map, arguments.get("loss_scale_factor"), arguments.get("name"))


def get(identifier: str | Mapping[str, Any] | GradientTransformation) -> GradientTransformation:
    """An optimizer from a name (``"adam"``, any case), a config dict, or an optimizer.

    A name gives the optimizer with the Keras 2 defaults; a config dict goes
    through :func:`deserialize`; a ``GradientTransformation`` (kopt's or
    optax's) is returned as it is.

    Example:
        >>> import kopt
        >>> opt = kopt.get("RMSprop")
        >>> kopt.get(opt) is opt
        True
    """
    if callable(getattr(identifier, "init", None)) and callable(getattr(identifier, "update", None)):
        return cast(GradientTransformation, identifier)  # kopt's or optax's: an (init, update) pair
    if isinstance(identifier, str):
        return deserialize({"class_name": identifier, "config": {}})
    if isinstance(identifier, Mapping):
        return deserialize(identifier)
    raise ValueError(
        f"Could not interpret optimizer identifier: {shorten(identifier)}; give a name "
        f"({', '.join(sorted(OPTIMIZERS))}), a config dict or a GradientTransformation"
    )
