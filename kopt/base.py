"""The protocol: ``GradientTransformation``, ``chain`` and ``apply_updates``.

A gradient transformation is a pair of pure functions::

    state = init(params)
    updates, state = update(updates, state, params=None, **extra_args)

This is the calling convention of optax, so a kopt transformation can be used
wherever an optax one is accepted and the other way round.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Params = Any  # a pytree of arrays; ``None`` leaves are allowed
Updates = Any  # a pytree with the structure of ``Params``
OptState = Any  # a pytree of arrays (usually NamedTuples and tuples of them)


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """An ``(init, update)`` pair of pure functions.

    ``init(params) -> state`` builds the state; ``update(updates, state,
    params=None, **extra_args) -> (updates, state)`` transforms a gradient tree.
    Extra keyword arguments (for example ``value=loss``) are offered to every
    transformation; those that do not use them ignore them.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.Adam(lr=1e-3)
        >>> params = {"w": jnp.ones(3)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        >>> params = kopt.apply_updates(params, updates)
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a transformation that keeps nothing."""


def identity() -> GradientTransformation:
    """The transformation that returns its updates unchanged and keeps no state."""

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        del params, extra_args
        return updates, state

    return GradientTransformation(init, update)


def accepted_extra_args(update: Callable) -> Callable[[dict], dict]:
    """Returns a filter keeping the extra keyword arguments ``update`` accepts (for wrappers and ``chain``).

    kopt's own transformations take ``**extra_args``; an optax transformation
    (or a user's function) may not, and must not be broken by a keyword meant
    for another member of the chain.
    """
    try:
        signature = inspect.signature(update)
    except (TypeError, ValueError):  # builtins or C callables: pass nothing extra
        return lambda extra: {}
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return lambda extra: extra
    named = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    } - {"updates", "state", "params"}
    return lambda extra: {k: v for k, v in extra.items() if k in named}


def expects(state_type: type) -> Callable[[TransformUpdateFn], TransformUpdateFn]:
    """Decorates an ``update`` so that a state of another type is a ``ValueError`` naming both types.

    Without it, the state of another optimizer (say Adam's given to SGD's
    ``update``) fails deep inside as a bare ``KeyError`` on a hyperparameter.
    """

    def decorate(update: TransformUpdateFn) -> TransformUpdateFn:
        @functools.wraps(update)
        def checked(
            updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
        ) -> tuple[Updates, OptState]:
            if not isinstance(state, state_type):
                raise ValueError(
                    f"this transformation keeps a {state_type.__name__}, but update got a {type(state).__name__}: "
                    "pass the state returned by this optimizer's own init (another optimizer's state does not fit)"
                )
            return update(updates, state, params, **extra_args)

        return checked

    return decorate


def _traced(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def compiled_when_eager(update: TransformUpdateFn) -> TransformUpdateFn:
    """Runs ``update`` through one cached ``jax.jit`` when it is called outside any trace.

    Called eagerly (in a notebook, say) a chain would otherwise dispatch every
    operation of every leaf on its own, which is slow for trees with thousands
    of leaves. Inside a trace (``jit``, ``grad``, ``scan``, ...) ``update``
    runs as it is and inlines into the caller's program. Under
    ``jax.disable_jit()`` it runs op by op, for debugging.
    """
    compiled = jax.jit(update)

    @functools.wraps(update)
    def dispatch(
        updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        if _traced((updates, state, params, extra_args)):
            return update(updates, state, params, **extra_args)
        return compiled(updates, state, params, **extra_args)

    return dispatch


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` one after the other.

    The state is a plain tuple holding each member's state, in order. Extra
    keyword arguments given to ``update`` reach every member that accepts them.
    Called outside ``jit``, ``update`` compiles itself once per input
    structure (see :func:`compiled_when_eager`).

    Example:
        >>> import kopt
        >>> opt = kopt.chain(kopt.clip_by_global_norm(1.0), kopt.scale_by_adam(),
        ...                  kopt.scale_by_learning_rate(1e-3))
    """
    for position, transform in enumerate(transforms):
        if not (callable(getattr(transform, "init", None)) and callable(getattr(transform, "update", None))):
            raise TypeError(
                f"chain: argument {position} must be a GradientTransformation "
                f"(an object with init and update), got {type(transform).__name__}"
            )
    extra_filters = tuple(accepted_extra_args(t.update) for t in transforms)

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    @compiled_when_eager
    def update(
        updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(
                f"chain of {len(transforms)} transformations got a state that is not a "
                f"tuple of {len(transforms)} states: {type(state).__name__}"
            )
        new_state = []
        for transform, keep, member_state in zip(transforms, extra_filters, state, strict=True):
            updates, member_state = transform.update(updates, member_state, params, **keep(extra_args))
            new_state.append(member_state)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``params + updates``, leaf by leaf, each result in its param's dtype.

    The sum is formed in the wider of the two dtypes and rounded once to the
    param's dtype, so bfloat16 params take float32 updates without a double
    rounding. ``None`` leaves (in either tree) leave the param as it is. A
    complex update for a real param is a ``TypeError`` (its imaginary part
    would be dropped).
    """

    def add(p: Any, u: Any) -> Any:
        if p is None or u is None:
            return p
        if jnp.iscomplexobj(u) and not jnp.iscomplexobj(p):
            raise TypeError(
                f"apply_updates: a complex update ({jnp.result_type(u)}) for a real param ({jnp.result_type(p)}) "
                "would lose its imaginary part; complex updates need complex params"
            )
        return jnp.asarray(p + u).astype(jnp.result_type(p))

    return jax.tree.map(add, params, updates, is_leaf=lambda x: x is None)
