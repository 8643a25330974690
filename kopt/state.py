"""Reading and changing optimizer states by name.

Every kopt transformation keeps its state in a ``NamedTuple``: named slots
(``m``, ``v``, ``velocity``, ...), a step ``count`` where it needs one, and a
``hyperparams`` dict of scalar arrays. A chain's state is a tuple of those, and
wrappers keep their inner state under ``inner_state``. The functions here find
what you ask for by name wherever it sits, so nobody has to write
``state[2].hyperparams["lr"]``:

    >>> import jax.numpy as jnp, kopt
    >>> opt = kopt.Adam(lr=1e-3)
    >>> state = opt.init({"w": jnp.zeros(2)})
    >>> float(kopt.get_hyperparams(state)["lr"])
    0.001...
    >>> state = kopt.set_hyperparams(state, lr=1e-4)   # no recompile of a jitted step
    >>> kopt.get_slot(state, "m")                      # Adam's first moment
    {'w': Array([0., 0.], dtype=float32)}
    >>> int(kopt.iterations(state))
    0

Hyperparameters are arrays of a fixed dtype and shape, so replacing one never
changes the state's structure: a jitted train step is not traced again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from kopt.base import OptState, Params
from kopt.packing import is_packed
from kopt.tree import TreeDef, hyperparam_dtype
from kopt.validation import check_hyperparam, is_concrete

_INNER_FIELDS = ("inner_state", "inner_states")
_NOT_SLOTS = ("hyperparams", "layout", "rows", *_INNER_FIELDS)  # kopt.packed: structure and row numbers, not slots

#: Hyperparameters that are read-outs, written by ``update`` (not settable).
READ_ONLY = {"current_lr": "it is the learning rate of the latest step; set lr (the schedule's base value) instead"}


def init_hyperparams(values: Mapping[str, float | jax.Array], params: Params) -> dict[str, jax.Array]:
    """The ``hyperparams`` entry of a state: each value as a scalar in the params' float dtype."""
    dtype = hyperparam_dtype(params)
    return {name: jnp.asarray(value, dtype) for name, value in values.items()}


def current_hyperparams(held: Mapping[str, jax.Array], given: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The hyperparameters an ``update`` uses: those ``held`` in the state, except the ones
    ``given`` to the constructor as tracers, which are read from there (in the held dtype).

    ``optax.inject_hyperparams`` builds the transformation again at every update with
    its hyperparameters as arrays, traced under ``jit``: those must win over the copy
    ``init`` stored, and the update writes them back so the state shows them. Values
    known when the transformation is built (numbers, concrete arrays) live in the
    state, where ``set_hyperparams`` and checkpoints change them.
    """
    traced = {name: value for name, value in given.items() if not is_concrete(value)}
    if not traced:
        return dict(held)
    return {**held, **{name: jnp.asarray(value, held[name].dtype) for name, value in traced.items()}}


def _walk(state: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Yields ``(path, named_state)`` for every NamedTuple state inside ``state``."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        yield path, state
        for field in _INNER_FIELDS:
            if field in state._fields:
                yield from _walk(getattr(state, field), f"{path}.{field}")
    elif isinstance(state, (tuple, list)):
        for index, member in enumerate(state):
            yield from _walk(member, f"{path}[{index}]")
    elif isinstance(state, Mapping):
        for key, member in state.items():
            yield from _walk(member, f"{path}[{key!r}]")


def _fields_of(state: OptState, kind: str) -> Iterator[tuple[str, str, Any]]:
    """Yields ``(path, name, value)`` for every hyperparameter or slot in ``state``."""
    for path, named in _walk(state, "state"):
        if kind == "hyperparameter":
            hyperparams = getattr(named, "hyperparams", None)
            if isinstance(hyperparams, Mapping):
                for name, value in hyperparams.items():
                    yield f"{path}.hyperparams", name, value
        else:
            for name in named._fields:
                if name not in _NOT_SLOTS:
                    yield f"{path}.{name}", name, getattr(named, name)


def _rebuild(state: OptState, edit: Callable[[Any], dict[str, Any]]) -> OptState:
    """``state`` rebuilt with ``node._replace(**edit(node))`` applied to every NamedTuple state in it."""

    def visit(node: Any) -> Any:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            changes = {f: visit(getattr(node, f)) for f in _INNER_FIELDS if f in node._fields}
            # a NamedTuple (it has _fields), which mypy narrows to a plain tuple
            return node._replace(**changes, **edit(node))  # type: ignore[attr-defined]
        if isinstance(node, (tuple, list)):
            return type(node)(visit(member) for member in node)
        if isinstance(node, Mapping):
            # type(node) is a concrete mapping class (dict, FrozenDict, ...), which mypy sees as abstract Mapping
            return type(node)({key: visit(member) for key, member in node.items()})  # type: ignore[call-arg]
        return node

    return visit(state)


def get_hyperparams(state: OptState) -> dict[str, jax.Array]:
    """All hyperparameters held in ``state``, by name, as scalar arrays.

    A name held by two transformations of one chain is an error on lookup
    (``get_hyperparams`` then raises ``ValueError`` naming both places).
    """
    result: dict[str, jax.Array] = {}
    places: dict[str, str] = {}
    for path, name, value in _fields_of(state, "hyperparameter"):
        if name in result:
            raise ValueError(f"hyperparameter {name!r} is ambiguous: it is held at {places[name]} and {path}")
        result[name], places[name] = value, path
    return result


def set_hyperparams(state: OptState, **values: Any) -> OptState:
    """Returns ``state`` with the named hyperparameters replaced.

    Each value keeps the dtype and shape of the one it replaces, so a jitted
    step taking the new state is not recompiled. Concrete values are checked
    against the same ranges as the constructors (``ValueError`` otherwise);
    traced values (inside ``jit``) are taken as they are. The change takes
    effect on the next ``update``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> state = kopt.SGD(lr=0.1).init({"w": jnp.zeros(3)})
        >>> state = kopt.set_hyperparams(state, lr=1e-4, decay=1e-6)
        >>> round(float(kopt.get_hyperparams(state)["decay"]), 9)
        1e-06
    """
    known = get_hyperparams(state)
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"no hyperparameter named {name!r} in this state; available: {sorted(known)}")
        if name in READ_ONLY:
            raise ValueError(f"{name} cannot be set: {READ_ONLY[name]}")
        if is_concrete(value):
            check_hyperparam(name, value)
        if is_concrete(value) and jnp.issubdtype(known[name].dtype, jnp.integer) and float(value) != int(value):
            raise ValueError(f"{name} must be a whole number, got {value}")
        if jnp.shape(value) != jnp.shape(known[name]):
            raise ValueError(
                f"{name} must have shape {jnp.shape(known[name])}, got an array of shape {jnp.shape(value)}"
            )

    def edit(node: Any) -> dict[str, Any]:
        hyperparams = getattr(node, "hyperparams", None)
        if not isinstance(hyperparams, Mapping) or not hyperparams.keys() & values.keys():
            return {}
        new = dict(hyperparams)
        for name in new.keys() & values.keys():
            new[name] = jnp.asarray(values[name], dtype=jnp.result_type(new[name]))
        return {"hyperparams": new}

    return _rebuild(state, edit)


def get_slot(state: OptState, name: str) -> Any:
    """The slot called ``name`` (a pytree shaped like the params, or a scalar).

    Slot names follow the specification: ``velocity`` (SGD), ``accumulator``
    (RMSprop, Adagrad, Adadelta), ``delta_accumulator`` (Adadelta), ``m``,
    ``v``, ``vhat`` (Adam; ``vhat`` is ``None`` without AMSGrad), ``u``
    (Adamax), ``m_schedule`` (Nadam), ``m`` (Lion), ``count`` (step counters). Slots that
    :func:`kopt.packed` keeps in flat buffers come back leaf by leaf.
    """
    found = [(path, value) for path, field, value in _fields_of(state, "slot") if field == name]
    if not found:
        raise ValueError(f"no slot named {name!r} in this state; available: {slot_names(state)}")
    if len(found) > 1:
        raise ValueError(f"slot {name!r} is ambiguous: it is held at {', '.join(p for p, _ in found)}")
    value = found[0][1]
    return value.unpack() if is_packed(value) else value


def set_slot(state: OptState, name: str, value: Any) -> OptState:
    """Returns ``state`` with the slot called ``name`` replaced by ``value``.

    ``value`` has the structure and leaf shapes of the slot it replaces (see
    :func:`get_slot`); each leaf is cast to the old leaf's dtype and, outside
    ``jit``, placed on the old leaf's sharding, so a jitted step is not traced
    again. ``name="count"`` sets every step counter of the state. ``ValueError``
    for an unknown or ambiguous name, or a different structure or shape.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> state = kopt.Adam().init({"w": jnp.zeros(3)})
        >>> state = kopt.set_slot(state, "count", 1000)  # e.g. to resume Adam's bias correction
        >>> int(kopt.iterations(state))
        1000
    """
    places = [path for path, field, _ in _fields_of(state, "slot") if field == name]
    if not places:
        raise ValueError(f"no slot named {name!r} in this state; available: {slot_names(state)}")
    if len(places) > 1 and name != "count":
        raise ValueError(f"slot {name!r} is ambiguous: it is held at {', '.join(places)}")

    def cast(new: Any, old: Any) -> Any:
        if jnp.shape(new) != jnp.shape(old):
            raise ValueError(f"slot {name!r}: a leaf of shape {jnp.shape(new)} cannot replace one of {jnp.shape(old)}")
        if jnp.iscomplexobj(new) and not jnp.iscomplexobj(old):
            raise ValueError(
                f"slot {name!r} is real ({jnp.result_type(old)}): a complex value would lose its imaginary part"
            )
        new = jnp.asarray(new, dtype=jnp.result_type(old))
        if isinstance(old, jax.Array) and is_concrete(old):
            new = jax.device_put(new, old.sharding)
        return new

    def edit(node: Any) -> dict[str, Any]:
        if name not in node._fields or name in (*_INNER_FIELDS, "hyperparams"):
            return {}
        old = getattr(node, name)
        leafwise = old.unpack() if is_packed(old) else old
        given: TreeDef = jax.tree.structure(value)
        if given != jax.tree.structure(leafwise):
            raise ValueError(
                f"slot {name!r} has structure {jax.tree.structure(leafwise)}, got {jax.tree.structure(value)}"
            )
        new = jax.tree.map(cast, value, leafwise)
        if is_packed(old):
            new = jax.tree.map(cast, old.layout.pack(new, f"slot {name!r}"), old)
        return {name: new}

    return _rebuild(state, edit)


def slot_names(state: OptState) -> list[str]:
    """The names :func:`get_slot` accepts for ``state``, in the order they are held."""
    return [name for _, name, _ in _fields_of(state, "slot")]


def iterations(state: OptState) -> jax.Array:
    """The number of steps taken (Keras' ``iterations``).

    Every counting transformation of a chain advances its ``count`` once per
    ``update``, so they agree; this returns the first one. (Adam, Adamax and
    Nadam hold two: the moments' bias correction and the learning rate's
    schedule each count, which is why ``optax.tree_utils.tree_get(state,
    "count")`` finds several there.)
    """
    for _, name, value in _fields_of(state, "slot"):
        if name == "count":
            return value
    raise ValueError("this state holds no step counter ('count')")
