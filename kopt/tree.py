"""Lifting per-array math to pytrees.

Every transformation in kopt writes its update rule once, for one array, and
hands it to :func:`map_arrays`; slots are created by :func:`zeros_slots` and
reductions over the whole tree go through :func:`sum_of_squares`. These three
functions are the only places that walk a parameter tree, so a different
execution strategy (for example packing many small leaves into one buffer)
changes them and no transformation.

``None`` leaves (as Equinox's ``filter`` produces) are carried through
untouched: they hold no slot and ``map_arrays`` never calls the math on them.

The same walkers check the leaves (:func:`check_params`, :func:`check_updates`),
so a bad leaf is a ``TypeError`` naming its path at ``init`` (params) or
``update`` (gradients) rather than a failure deep inside JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kopt.base import Params, Updates

_LEAVE_OUT = "leave it out of the optimizer's params (make it None, as eqx.filter(model, eqx.is_inexact_array) does)"
_PARAM_HINTS = {  # by dtype kind
    "b": f"a boolean param cannot take a fractional step: cast it to a float dtype or {_LEAVE_OUT}",
    "i": f"an integer param cannot take a fractional step: cast it to a float dtype or {_LEAVE_OUT}",
    "u": f"an integer param cannot take a fractional step: cast it to a float dtype or {_LEAVE_OUT}",
    "c": f"Keras 2 has no rule for complex numbers: keep real and imaginary parts as two float leaves or {_LEAVE_OUT}",
}


def _dtype_of(leaf: Any) -> jnp.dtype | None:
    """The dtype JAX gives ``leaf`` (an array or a Python number), or ``None`` if it is neither."""
    if not (hasattr(leaf, "dtype") or isinstance(leaf, (bool, int, float, complex))):
        return None
    try:
        return jnp.result_type(leaf)
    except TypeError:  # NumPy strings, objects ...
        return None


def _path(tree: Any, index: int) -> str:
    return jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(tree)[0][index][0])


def _what(leaf: Any) -> str:
    return f"has dtype {leaf.dtype}" if hasattr(leaf, "dtype") else f"is of type {type(leaf).__name__}"


def check_params(params: Params) -> list[jnp.dtype]:
    """The dtype of every leaf of ``params``, or a ``TypeError`` naming the first leaf that is
    not a real floating-point array (Python floats count as one).
    """
    dtypes = []
    for index, leaf in enumerate(jax.tree.leaves(params)):
        dtype = _dtype_of(leaf)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            hint = _PARAM_HINTS.get(getattr(dtype, "kind", None), f"convert it to a float array or {_LEAVE_OUT}")
            raise TypeError(
                f"params{_path(params, index)} {_what(leaf)}, but params must be real floating-point arrays "
                f"(float32, float64, bfloat16, float16) or Python floats; {hint}"
            )
        dtypes.append(dtype)
    return dtypes


def check_updates(updates: Updates) -> list[jnp.dtype]:
    """The dtype of every leaf of ``updates``, or a ``TypeError`` naming the first leaf that is
    not a real number array (floating, or integer: integers are cast to the math dtype).
    """
    dtypes = []
    for index, leaf in enumerate(jax.tree.leaves(updates)):
        dtype = _dtype_of(leaf)
        if dtype is None or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"updates{_path(updates, index)} {_what(leaf)}, but gradients must be real floating-point "
                "arrays (integer ones are accepted and cast), one per param leaf given to init"
            )
        dtypes.append(dtype)
    return dtypes


def slot_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of a slot (and of the math) for a leaf of ``dtype``: never below float32.

    float32 params keep float32 state (Keras' floatx), float64 params float64;
    bfloat16/float16 params get float32 state, since e.g. ``beta_2 = 0.999``
    rounds to 1.0 in bfloat16 and Adam would stop moving.
    """
    return jnp.promote_types(dtype, jnp.float32)


def hyperparam_dtype(params: Params) -> jnp.dtype:
    """The dtype of the scalar hyperparameters for ``params``: their widest slot dtype."""
    dtype = jnp.dtype(jnp.float32)
    for leaf_dtype in check_params(params):
        dtype = jnp.promote_types(dtype, slot_dtype(leaf_dtype))
    return dtype


def zeros_slots(params: Params, dtype: Any = None) -> Updates:
    """A zero-filled slot for every array of ``params`` (``None`` stays ``None``).

    Each slot has ``dtype`` if given (a ``state_dtype``), else :func:`slot_dtype`
    of its parameter. ``zeros_like`` keeps each parameter's sharding, so slots
    live where their parameters do.
    """
    check_params(params)
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype or slot_dtype(jnp.result_type(p))), params)


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """``on_true`` if the scalar ``pred`` else ``on_false``, leaf by leaf (``None`` leaves stay)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf of ``tree`` (updates) is finite (a scalar bool)."""
    check_updates(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)], dtype=bool))


def _structure_error(what: str, tree: Any, expected: Any) -> ValueError:
    return ValueError(
        f"{what} has structure {jax.tree.structure(tree)}, but the optimizer state "
        f"was built for {expected}; pass updates with the structure of the params given to init"
    )


def map_arrays(fn: Callable[..., tuple], updates: Updates, *slots: Updates | None) -> tuple:
    """Applies per-array math ``fn`` to every leaf of ``updates`` and its slots.

    ``fn(g, *slot_arrays) -> (new_g, *new_slot_arrays)`` is called once per
    array. A slot given as ``None`` (an unused slot, such as Adam's ``vhat``
    without AMSGrad) is passed to ``fn`` as ``None`` and comes back as ``None``.
    ``g`` arrives in its slot dtype (at least float32). Each new slot is cast
    back to its old dtype, so the state's dtypes never change between steps.
    Returns ``(new_updates, *new_slots)``; a tree or leaf shape that differs
    from the slots' is a ``ValueError``, a leaf that is not a real number
    array a ``TypeError`` (:func:`check_updates`).
    """
    leaves, treedef = jax.tree.flatten(updates)
    dtypes = check_updates(updates)
    per_slot = []
    for slot in slots:
        if slot is None:
            per_slot.append([None] * len(leaves))
            continue
        slot_treedef = jax.tree.structure(slot)
        if slot_treedef != treedef:
            raise _structure_error("updates", updates, slot_treedef)
        per_slot.append(slot_treedef.flatten_up_to(slot))

    for index, (g, *arrays) in enumerate(zip(leaves, *per_slot, strict=True)):
        if any(array is not None and jnp.shape(g) != jnp.shape(array) for array in arrays):
            shape = next(jnp.shape(a) for a in arrays if a is not None)
            raise ValueError(
                f"updates{_path(updates, index)} has shape {jnp.shape(g)}, "
                f"but its slot (from the param given to init) has shape {shape}"
            )
    # The math runs in the slot dtype (>= float32) even for bfloat16 gradients.
    outputs = [
        fn(jnp.asarray(g, slot_dtype(dtype)), *arrays)
        for g, dtype, *arrays in zip(leaves, dtypes, *per_slot, strict=True)
    ]
    new_updates = treedef.unflatten([out[0] for out in outputs])
    new_slots = []
    for index, (slot, old) in enumerate(zip(slots, per_slot, strict=True), start=1):
        if slot is None:
            new_slots.append(None)
            continue
        new = [jnp.asarray(out[index], jnp.result_type(o)) for out, o in zip(outputs, old, strict=True)]
        new_slots.append(treedef.unflatten(new))
    return (new_updates, *new_slots)


def sum_of_squares(updates: Updates, dtype: Any) -> jax.Array:
    """``sum over leaves of sum(g**2)``, accumulated in ``dtype`` leaf after leaf."""
    check_updates(updates)
    total = jnp.zeros((), dtype)
    for leaf in jax.tree.leaves(updates):
        total = total + jnp.sum(jnp.square(jnp.asarray(leaf, dtype)))
    return total
