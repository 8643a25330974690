"""kopt inside Keras 3: any kopt (or optax) transformation as a ``keras.optimizers.Optimizer``.

Keras 3's ``model.compile`` accepts only its own optimizer class, and its
optimizers are not Keras 2's (per-variable ``clipnorm``, Adagrad starting at
0.1, no ``decay``, another Nadam). :func:`to_keras3` wraps a kopt
transformation in one, for the JAX backend::

    import os; os.environ["KERAS_BACKEND"] = "jax"
    import keras, kopt
    model.compile(optimizer=kopt.to_keras3(kopt.Adam(lr=1e-3, clipnorm=1.0)), loss="mse")
    model.fit(x, y)           # the steps kopt takes by hand on model.trainable_variables

How it runs. At ``build`` the transformation's ``init`` runs on the trainable
variables (a list in ``model.trainable_variables`` order, or with
``tree="path"`` a dict by variable path, for masks by name) and every leaf of
the state (slots, int32 counters, hyperparameters) becomes one Keras optimizer
variable, so Keras' jitted train step carries it and ``model.save`` /
``keras.models.load_model`` store and restore it exactly. Each step runs one
``update`` on all variables at once (``clipnorm`` is kopt's global norm)
and ``apply_updates``. Keras' own gradient processing (``clipnorm``,
``weight_decay``, EMA, gradient accumulation, loss scaling) is refused: put
it in the transformation. A variable without a gradient gets a zero gradient
(kopt's slots decay for it, as in a hand-written JAX step) and keeps its value.

The learning rate. When the state holds one scalar ``lr`` (every kopt alias),
Keras' ``optimizer.learning_rate`` is that ``lr``: it is written into the state
before each step, so ``optimizer.learning_rate = x`` and Keras' learning-rate
callbacks work (for a schedule, ``lr`` is its base value, so they rescale it).
Otherwise (an optax transformation, several ``lr``) setting Keras'
``learning_rate`` after ``build`` is a ``ValueError``: it would change nothing.

Saving. The optimizer's config holds ``kopt.serialize(transformation)`` for
kopt's optimizers (schedules included). A transformation kopt cannot write (a
``kopt.chain``, a wrapper, optax's) is given back at load time by the
optimizer's name: ``keras.models.load_model(path, custom_objects={name:
transformation})``. Loading needs this module imported (``import kopt.keras3``),
which registers the class with Keras.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from kopt.base import GradientTransformation, OptState, apply_updates
from kopt.keras_io.configs import optimizer_from_config, serialize
from kopt.state import get_hyperparams, set_hyperparams
from kopt.tree import TreeDef

TREES = ("list", "path")


def _held_lr(state: OptState) -> jax.Array | None:
    """The state's one scalar ``lr`` hyperparameter, or ``None`` (none, several, or not a kopt state)."""
    try:
        lr = get_hyperparams(state).get("lr")
    except ValueError:  # several transformations hold an lr: no single rate to show
        return None
    return lr if lr is not None and jnp.shape(lr) == () else None


def _variable_name(path: tuple) -> str:
    """A Keras variable name (no ``/``) for the state leaf at ``path``."""
    return "kopt" + re.sub(r"[^0-9A-Za-z]+", "_", jax.tree_util.keystr(path)).rstrip("_")


@keras.saving.register_keras_serializable(package="kopt", name="KoptOptimizer")
class KoptOptimizer(keras.optimizers.Optimizer):
    """A Keras 3 optimizer that runs a kopt transformation on all trainable variables at once.

    Build it with :func:`to_keras3`; see the module docstring for how it runs,
    the learning rate and saving. ``state`` is the transformation's state as
    kopt reads it (``kopt.get_slot(opt.state, "m")``).
    """

    def __init__(
        self, transformation: GradientTransformation, tree: str = "list", name: str | None = None, **kwargs: Any
    ):
        if kwargs:
            raise ValueError(
                f"to_keras3 takes no Keras optimizer options, got {sorted(kwargs)}: put clipping, weight decay "
                "and schedules in the kopt transformation (e.g. kopt.Adam(lr=..., clipnorm=...))"
            )
        if not (callable(getattr(transformation, "init", None)) and callable(getattr(transformation, "update", None))):
            raise ValueError(
                f"transformation must be a GradientTransformation (kopt's or optax's), got {transformation!r}"
            )
        if tree not in TREES:
            raise ValueError(f"tree must be one of {TREES}, got {tree!r}")
        if keras.backend.backend() != "jax":
            raise ValueError(
                f"kopt.to_keras3 needs Keras' JAX backend, this Keras runs {keras.backend.backend()!r}: set "
                "KERAS_BACKEND=jax before importing keras"
            )
        lr = self._first_guess_of_lr(transformation)
        super().__init__(learning_rate=0.0 if lr is None else lr, name=name)
        self._lr_guessed = lr is not None
        # Keras' attribute tracking would rebuild the NamedTuple field by field: keep it out of sight.
        object.__setattr__(self, "transformation", transformation)
        self.tree = tree
        self._treedef: TreeDef = None  # set by build
        self._state_variables: list = []
        self._lr_is_keras = lr is not None

    @staticmethod
    def _first_guess_of_lr(transformation: GradientTransformation) -> float | None:
        """Keras wants a learning rate before ``build``: the lr of the state of a one-leaf tree, if any."""
        try:
            lr = _held_lr(transformation.init([jnp.zeros((1,), jnp.float32)]))
        except Exception:  # a transformation that needs the real tree (a mask, say): decided at build
            return None
        return None if lr is None else float(lr)

    # ------------------------------------------------------------------ the params tree kopt sees

    def _as_tree(self, values: list) -> Any:
        if self.tree == "path":
            return {variable.path: value for variable, value in zip(self._trainable_variables, values, strict=True)}
        return list(values)

    def _as_list(self, tree: Any) -> list:
        if self.tree == "path":
            return [tree[variable.path] for variable in self._trainable_variables]
        return list(tree)

    # ------------------------------------------------------------------ Keras' hooks

    def build(self, variables: list) -> None:
        if self.built:
            return
        super().build(variables)
        if self.tree == "path" and len({v.path for v in variables}) != len(variables):
            raise ValueError("tree='path' needs distinct variable paths; use tree='list'")
        state = self.transformation.init(self._as_tree([v.value for v in variables]))
        lr = _held_lr(state)
        self._lr_is_keras = lr is not None
        if self._lr_is_keras and not self._lr_guessed:  # else Keras' value (maybe set since) stands
            self._learning_rate.assign(lr)
        # Keras holds the rate in float32: while it still shows kopt's own lr, the step uses that exact value
        # (a float64 model keeps its float64 rate); once Keras' rate is changed, the new one.
        self._lr_exact: tuple[float, np.ndarray] | None = (
            None if lr is None else (np.float32(lr).item(), np.asarray(lr))
        )
        leaves, self._treedef = jax.tree_util.tree_flatten_with_path(state)
        self._state_variables = [
            self.add_variable(
                shape=np.shape(leaf),
                dtype=leaf.dtype,
                initializer=lambda shape, dtype, leaf=leaf: jnp.asarray(leaf, dtype),
                name=_variable_name(path),
            )
            for path, leaf in leaves
        ]

    @property
    def state(self) -> OptState:
        """The transformation's state, read from the optimizer variables."""
        return self._treedef.unflatten([variable.value for variable in self._state_variables])

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate: Any) -> None:
        # Keras calls this eagerly (optimizer.apply) and inside its jitted train step, where .value
        # reads and .assign records the traced values of a stateless scope: one body serves both.
        del learning_rate
        given = {self._get_variable_index(v): g for g, v in zip(grads, trainable_variables, strict=True)}
        values = [variable.value for variable in self._trainable_variables]
        grads = [given[i] if i in given else jnp.zeros_like(value) for i, value in enumerate(values)]
        grads = [jnp.asarray(g, value.dtype) for g, value in zip(grads, values, strict=True)]
        state = self.state
        if self._lr_is_keras:
            state = set_hyperparams(state, lr=self._kopt_lr())
        params = self._as_tree(values)
        updates, state = self.transformation.update(self._as_tree(grads), state, params)
        for index, new in enumerate(self._as_list(apply_updates(params, updates))):
            if index in given:
                self._trainable_variables[index].assign(new)
        for variable, leaf in zip(self._state_variables, jax.tree.leaves(state), strict=True):
            variable.assign(leaf)

    def _kopt_lr(self) -> jax.Array:
        """Keras' current learning rate as kopt's ``lr`` (see ``build``)."""
        shown, exact = self._lr_exact  # type: ignore[misc]  # not None: called only when _lr_is_keras
        rate = self._get_current_learning_rate()  # a variable, or a Keras schedule's value
        rate = jnp.asarray(getattr(rate, "value", rate))
        return jnp.where(rate == shown, exact, rate.astype(exact.dtype))

    @property
    def learning_rate(self) -> Any:
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if self.built and not self._lr_is_keras:
            raise ValueError(
                f"optimizer {self.name!r}: its transformation holds no single lr hyperparameter, so Keras' "
                "learning_rate would change nothing; change the transformation's own hyperparameters instead"
            )
        keras.optimizers.Optimizer.learning_rate.fset(self, value)

    def update_step(self, gradient, variable, learning_rate):
        raise NotImplementedError("a kopt optimizer updates all variables at once")

    def load_own_variables(self, store: Any) -> None:
        # Keras only warns when the saved variables do not fit; another transformation must be an error.
        if len(store.keys()) != len(self.variables):
            raise ValueError(
                f"optimizer {self.name!r}: the file holds {len(store.keys())} optimizer variables, this "
                f"transformation has {len(self.variables)}; load it with the transformation it was saved with"
            )
        for index, variable in enumerate(self.variables):
            saved = store[str(index)]
            if tuple(saved.shape) != tuple(variable.shape) or np.dtype(saved.dtype) != np.dtype(variable.dtype):
                raise ValueError(
                    f"optimizer variable {variable.path} is {saved.dtype}{tuple(saved.shape)} in the file, "
                    f"{variable.dtype}{tuple(variable.shape)} here; load it with the transformation it was saved with"
                )
        super().load_own_variables(store)

    def get_config(self) -> dict[str, Any]:
        try:
            written = serialize(self.transformation)
        except ValueError:  # a chain, a wrapper, optax's: given back at load time (module docstring)
            written = None
        return {"name": self.name, "tree": self.tree, "transformation": written}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict | None = None) -> KoptOptimizer:
        config = dict(config)
        name, written = config.get("name"), config.pop("transformation", None)
        given = (custom_objects or {}).get(name) or keras.saving.get_registered_object(name)
        if given is None and written is None:
            raise ValueError(
                f"optimizer {name!r} runs a transformation kopt cannot write to a config; give it back with "
                f"keras.models.load_model(path, custom_objects={{{name!r}: transformation}})"
            )
        transformation = given if given is not None else optimizer_from_config(written, "its transformation")
        return cls(transformation, **config)


def to_keras3(transformation: GradientTransformation, *, tree: str = "list", name: str | None = None) -> KoptOptimizer:
    """``transformation`` as a Keras 3 optimizer (JAX backend), for ``model.compile(optimizer=...)``.

    ``tree``: the params tree the transformation sees, ``"list"`` (the
    trainable variables in order) or ``"path"`` (a dict by variable path, for
    masks and partitions by name). ``name``: the optimizer's Keras name, which
    ``load_model(..., custom_objects={name: transformation})`` uses for a
    transformation kopt cannot write to a config. See :mod:`kopt.keras3`.

    Example (with ``KERAS_BACKEND=jax``):
        >>> import kopt
        >>> opt = kopt.to_keras3(kopt.Adam(lr=1e-3, clipnorm=1.0))  # model.compile(optimizer=opt, ...)
        >>> round(float(opt.learning_rate), 6)
        0.001
    """
    return KoptOptimizer(transformation, tree=tree, name=name)
