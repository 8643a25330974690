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
from collections.abc import Mapping
from typing import Any

from kopt.base import GradientTransformation, OptState
from kopt.optimizers import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, Nadam, Optimizer, RMSprop
from kopt.state import get_hyperparams

#: The optimizers ``get``/``deserialize`` know, by lower-case name.
OPTIMIZERS = {c.__name__.lower(): c for c in (SGD, RMSprop, Adagrad, Adadelta, Adam, Adamax, Nadam, AdamW)}

# Keras config keys whose hyperparameter has another name in the state.
_STATE_NAMES = {"clipnorm": "max_norm", "clipvalue": "max_delta"}


def serialize(opt: Optimizer, state: OptState | None = None) -> dict[str, Any]:
    """``{"class_name": ..., "config": {...}}`` for an optimizer built by kopt.

    Without ``state`` the values are those given to the constructor (defaults
    resolved, e.g. ``epsilon=1e-07``). With ``state`` every hyperparameter is
    read from it, as Keras' ``get_config`` reads its variables: changes made
    by ``set_hyperparams`` show, in the state's float dtype (``lr=0.01`` held
    in float32 reads back as ``0.009999999776482582``).
    """
    if not isinstance(opt, Optimizer):
        raise ValueError(
            f"serialize takes an optimizer built by kopt ({', '.join(c.__name__ for c in OPTIMIZERS.values())} "
            f"or kopt.get), got {type(opt).__name__}"
        )
    config = dict(opt.config)
    for key, value in config.items():
        if callable(value):
            raise ValueError(f"cannot serialize {opt.class_name}: {key} is a schedule, not a number")
    if state is not None:
        held = get_hyperparams(state)
        for key in config:
            name = _STATE_NAMES.get(key, key)
            if name in held:
                config[key] = float(held[name])
    return {"class_name": opt.class_name, "config": config}


def _allowed(constructor) -> list[str]:
    return list(inspect.signature(constructor).parameters)


def deserialize(config: Mapping[str, Any]) -> Optimizer:
    """Builds the optimizer a :func:`serialize` config describes.

    ``class_name`` is matched case-insensitively. An unknown class name or
    config key is a ``ValueError`` listing what is allowed. The caller's dict
    is not modified.
    """
    if not isinstance(config, Mapping) or set(config) != {"class_name", "config"}:
        raise ValueError(
            f"Improper config format: {config!r}; expected a dict with exactly the keys 'class_name' and 'config'"
        )
    class_name, arguments = config["class_name"], config["config"]
    if not isinstance(class_name, str) or class_name.lower() not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer: {class_name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    if not isinstance(arguments, Mapping):
        raise ValueError(f"the 'config' of {class_name} must be a dict, got {type(arguments).__name__}")
    constructor = OPTIMIZERS[class_name.lower()]
    unknown = [key for key in arguments if key not in _allowed(constructor)]
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {', '.join(map(repr, unknown))} for {constructor.__name__}; "
            f"allowed: {', '.join(_allowed(constructor))}"
        )
    return constructor(**arguments)


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
        return identifier
    if isinstance(identifier, str):
        return deserialize({"class_name": identifier, "config": {}})
    if isinstance(identifier, Mapping):
        return deserialize(identifier)
    raise ValueError(
        f"Could not interpret optimizer identifier: {identifier!r}; give a name "
        f"({', '.join(sorted(OPTIMIZERS))}), a config dict or a GradientTransformation"
    )
