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

**Dtypes.** The math of a leaf runs in :func:`slot_dtype` of its gradient
(never below float32), and the update a transformation returns is cast back to
the dtype of the update it was given, as optax's are: bfloat16 gradients give
bfloat16 updates, so ``p + u`` (Equinox's ``apply_updates``) keeps bfloat16
params bfloat16. The aliases run their whole chain in the math dtype and round
once at the end (:func:`rounded_once`).

**Complex leaves** follow optax's convention: the gradient given to ``update``
is the conjugate of ``jax.grad``'s (so ``p - lr * g`` descends), first moments
are complex, second moments accumulate ``|g|**2`` and are real
(:func:`zeros_slots` with ``real=True``), and hyperparameters are real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, Params, Updates, accepted_extra_args, compiled_when_eager

#: ``jax.tree_util.PyTreeDef`` as the type checker sees it. jaxlib ships no annotations mypy can read for it
#: (``unflatten``, ``flatten_up_to`` and ``==`` are unknown to it), so a treedef is annotated as this ``Any``.
TreeDef = Any

_LEAVE_OUT = "leave it out of the optimizer's params (make it None, as eqx.filter(model, eqx.is_inexact_array) does)"
_PARAM_HINTS: dict[str | None, str] = {  # by dtype kind
    "b": f"a boolean param cannot take a fractional step: cast it to a float dtype or {_LEAVE_OUT}",
    "i": f"an integer param cannot take a fractional step: cast it to a float dtype or {_LEAVE_OUT}",
    "u": f"an integer param cannot take a fractional step: cast it to a float dtype or {_LEAVE_OUT}",
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


def needs_params(params: Params | None, who: str) -> None:
    """A ``ValueError`` naming ``who`` when an update that reads the params was not given them."""
    if params is None:
        raise ValueError(f"{who} needs the params: call update(updates, state, params)")


def check_params(params: Params) -> list[jnp.dtype]:
    """The dtype of every leaf of ``params``, or a ``TypeError`` naming the first leaf that is
    not a floating-point or complex array (Python floats count as one).
    """
    dtypes = []
    for index, leaf in enumerate(jax.tree.leaves(params)):
        dtype = _dtype_of(leaf)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            hint = _PARAM_HINTS.get(getattr(dtype, "kind", None), f"convert it to a float array or {_LEAVE_OUT}")
            raise TypeError(
                f"params{_path(params, index)} {_what(leaf)}, but params must be floating-point arrays "
                f"(float32, float64, bfloat16, float16, complex64, complex128) or Python floats; {hint}"
            )
        dtypes.append(dtype)
    return dtypes


def check_updates(updates: Updates) -> list[jnp.dtype]:
    """The dtype of every leaf of ``updates``, or a ``TypeError`` naming the first leaf that is
    not a number array (floating, complex, or integer: integers are cast to the math dtype).
    """
    dtypes = []
    for index, leaf in enumerate(jax.tree.leaves(updates)):
        dtype = _dtype_of(leaf)
        if dtype is None or not (jnp.issubdtype(dtype, jnp.inexact) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(
                f"updates{_path(updates, index)} {_what(leaf)}, but gradients must be floating-point or "
                "complex arrays (integer ones are accepted and cast), one per param leaf given to init"
            )
        dtypes.append(dtype)
    return dtypes


def first_complex(tree: Any) -> tuple[str, jnp.dtype] | None:
    """``(path, dtype)`` of the first complex leaf of ``tree`` (``keystr`` path), or ``None`` if all are real."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.iscomplexobj(leaf):
            return jax.tree_util.keystr(path), jnp.result_type(leaf)
    return None


def check_real(transform: str, tree: Any, what: str) -> None:
    """A ``TypeError`` naming the first complex leaf of ``tree``, for math that has no complex meaning."""
    found = first_complex(tree)
    if found:
        raise TypeError(
            f"{what}{found[0]} is complex ({found[1]}), but {transform} "
            "compares numbers, and complex numbers have no order; use real leaves or leave it out"
        )


def complex_for_real(where: str) -> TypeError:
    """The error for a complex gradient meeting a real param's slot or buffer (its imaginary part would be lost)."""
    return TypeError(
        f"{where} is complex, but its param (given to init) is real: "
        "complex gradients need complex params (or take the real part of the gradient)"
    )


def slot_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of a slot (and of the math) for a leaf of ``dtype``: never below float32.

    float32 params keep float32 state (Keras' floatx), float64 params float64;
    bfloat16/float16 params get float32 state, since e.g. ``beta_2 = 0.999``
    rounds to 1.0 in bfloat16 and Adam would stop moving. complex64 stays
    complex64 (float32 parts).
    """
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of ``dtype``'s parts: float32 for complex64, ``dtype`` itself when real."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|**2``, real: ``x**2`` for real ``x`` (the same operation), ``re**2 + im**2`` for complex."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def hyperparam_dtype(params: Params) -> jnp.dtype:
    """The dtype of the scalar hyperparameters for ``params``: their widest real slot dtype."""
    dtype = jnp.dtype(jnp.float32)
    for leaf_dtype in check_params(params):
        dtype = jnp.promote_types(dtype, real_dtype(slot_dtype(leaf_dtype)))
    return dtype


def zeros_slots(params: Params, dtype: Any = None, *, real: bool = False) -> Updates:
    """A zero-filled slot for every array of ``params`` (``None`` stays ``None``).

    Each slot has ``dtype`` if given (a ``state_dtype``), else :func:`slot_dtype`
    of its parameter. ``real=True`` is for slots of ``|g|**2`` (second moments):
    a complex parameter's slot is then real. A real ``state_dtype`` cannot hold
    a complex parameter's (complex) slot: ``ValueError``. ``zeros_like`` keeps
    each parameter's sharding, so slots live where their parameters do.
    """
    check_params(params)

    def zeros(p):
        param_dtype = jnp.result_type(p)
        slot = jnp.dtype(dtype) if dtype is not None else slot_dtype(param_dtype)
        if real:
            slot = real_dtype(slot)
        elif jnp.issubdtype(param_dtype, jnp.complexfloating) and not jnp.issubdtype(slot, jnp.complexfloating):
            raise ValueError(
                f"state_dtype={slot.name} cannot hold the complex moments of a {param_dtype.name} param: "
                "leave state_dtype=None for complex params"
            )
        return jnp.zeros_like(p, dtype=slot)

    return jax.tree.map(zeros, params)


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
    ``g`` arrives in its slot dtype (at least float32); ``new_g`` is cast back
    to ``g``'s own floating dtype (integer gradients stay in the math dtype),
    and each new slot to its old dtype, so updates keep the gradients' dtypes
    and the state's dtypes never change between steps.
    Returns ``(new_updates, *new_slots)``; a tree or leaf shape that differs
    from the slots' is a ``ValueError``, a leaf that is not a real number
    array a ``TypeError`` (:func:`check_updates`).
    """
    treedef: TreeDef
    leaves, treedef = jax.tree.flatten(updates)
    dtypes = check_updates(updates)
    per_slot = []
    for slot in slots:
        if slot is None:
            per_slot.append([None] * len(leaves))
            continue
        slot_treedef: TreeDef = jax.tree.structure(slot)
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
    new_updates = treedef.unflatten([_cast_back(out[0], dtype) for out, dtype in zip(outputs, dtypes, strict=True)])
    new_slots: list[Any] = []
    for index, (slot, old) in enumerate(zip(slots, per_slot, strict=True), start=1):
        if slot is None:
            new_slots.append(None)
            continue
        for leaf, (out, o) in enumerate(zip(outputs, old, strict=True)):
            if jnp.iscomplexobj(out[index]) and not jnp.iscomplexobj(o):
                raise complex_for_real(f"updates{_path(updates, leaf)}")
        new = [jnp.asarray(out[index], jnp.result_type(o)) for out, o in zip(outputs, old, strict=True)]
        new_slots.append(treedef.unflatten(new))
    return (new_updates, *new_slots)


def _cast_back(update: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``update`` in ``dtype`` (an incoming update's), unless that is an integer dtype."""
    return update.astype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else update


def cast_like(updates: Updates, like: Updates) -> Updates:
    """``updates`` leaf by leaf in the floating dtypes of ``like`` (integer leaves of ``like`` cast nothing)."""
    return jax.tree.map(lambda u, x: _cast_back(u, jnp.result_type(x)), updates, like)


def in_math_dtype(updates: Updates) -> Updates:
    """``updates`` leaf by leaf in :func:`slot_dtype` of their dtypes (at least float32)."""
    check_updates(updates)
    return jax.tree.map(lambda g: jnp.asarray(g, slot_dtype(jnp.result_type(g))), updates)


def squares(x: jax.Array, dtype: Any) -> jax.Array:
    """``|x|**2`` element by element, formed in the real ``dtype`` (complex ``x`` in the complex dtype of its
    precision, so no imaginary part is dropped)."""
    if jnp.iscomplexobj(x):
        return abs_sq(jnp.asarray(x, jnp.promote_types(dtype, jnp.result_type(x))))
    return jnp.square(jnp.asarray(x, dtype))


def sum_of_squares(updates: Updates, dtype: Any) -> jax.Array:
    """``sum over leaves of sum(|g|**2)``, accumulated in ``dtype`` (real) leaf after leaf."""
    check_updates(updates)
    total = jnp.zeros((), dtype)
    for leaf in jax.tree.leaves(updates):
        total = total + jnp.sum(squares(leaf, dtype))
    return total


def rounded_once(inner: GradientTransformation) -> GradientTransformation:
    """Runs ``inner`` on the updates in their math dtype, then rounds its result once to the incoming dtypes.

    Every kopt transformation returns updates in the dtype it was given, so a
    chain fed bfloat16 gradients would round to bfloat16 after each member.
    The aliases wrap their chain in this: the whole chain runs in float32 (the
    math dtype of bfloat16, see :func:`slot_dtype`) and only its result is
    rounded, once. The state is ``inner``'s own.
    """
    keep = accepted_extra_args(inner.update)

    @compiled_when_eager
    def update(updates, state, params=None, **extra_args):
        new_updates, state = inner.update(in_math_dtype(updates), state, params, **keep(extra_args))
        return cast_like(new_updates, updates), state

    return GradientTransformation(inner.init, update)
