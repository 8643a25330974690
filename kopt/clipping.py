"""Gradient clipping: Keras 2's ``clipnorm`` and ``clipvalue``, and a per-leaf norm clip.

The thresholds are hyperparameters held in the state (``max_norm``,
``max_delta``), so they can be changed between steps like a learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, Updates, expects
from kopt.packing import refuse_packed
from kopt.state import current_hyperparams, init_hyperparams
from kopt.tree import check_real, map_arrays, squares, sum_of_squares
from kopt.validation import check_hyperparam


class ClipState(NamedTuple):
    """The state of a clipping transformation: just its threshold."""

    hyperparams: dict[str, jax.Array]


def _clip_transform(
    name: str, value: float, update_with: Callable[[Updates, jax.Array], Updates], real_only: bool = False
) -> GradientTransformation:
    """A stateless-but-for-its-threshold transformation; ``update_with(updates, threshold)``."""
    values = {name: check_hyperparam(name, value)}

    def init(params):
        if real_only:
            check_real("clip_by_value (clipvalue)", params, "params")
        return ClipState(init_hyperparams(values, params))

    @expects(ClipState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        hp = current_hyperparams(state.hyperparams, values)
        return update_with(updates, hp[name]), ClipState(hp)

    return GradientTransformation(init, update)


def _norm_scale(norm: jax.Array, max_norm: jax.Array) -> jax.Array:
    # Keras clips when norm >= max_norm (at equality the factor is exactly 1)
    # and leaves an all-zero gradient alone instead of dividing by zero.
    safe_norm = jnp.where(norm > 0, norm, 1)
    return jnp.where(norm >= max_norm, max_norm / safe_norm, jnp.ones_like(norm))


def clip_by_value(max_delta: float) -> GradientTransformation:
    """Clamps every gradient element: ``g <- clip(g, -max_delta, max_delta)``.

    Keras 2's ``clipvalue``. ``max_delta > 0``. Complex numbers have no order
    to clamp in: complex params or gradients are a ``TypeError`` (clip their
    norm with :func:`clip_by_norm` or :func:`clip_by_global_norm` instead).

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> clip = kopt.clip_by_value(0.5)
        >>> clip.update(jnp.array([-2.0, 0.1, 3.0]), clip.init(None))[0]
        Array([-0.5,  0.1,  0.5], dtype=float32)
    """

    def clip(updates, max_delta):
        check_real("clip_by_value (clipvalue)", updates, "updates")
        (clipped,) = map_arrays(lambda g: (jnp.clip(g, -max_delta, max_delta),), updates)
        return clipped

    return _clip_transform("max_delta", max_delta, clip, real_only=True)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scales the whole tree down when its global L2 norm reaches ``max_norm``.

    ``N = sqrt(sum over leaves of sum(g**2))``; if ``N >= max_norm`` every leaf
    becomes ``(max_norm / N) * g``, else nothing changes. This is Keras 2's
    ``clipnorm`` (one norm over all leaves). ``max_norm > 0``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> clip = kopt.clip_by_global_norm(1.0)
        >>> clip.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, clip.init(None))[0]
        {'a': Array([0.6], dtype=float32), 'b': Array([0.8], dtype=float32)}
    """

    def clip(updates, max_norm):
        scale = _norm_scale(jnp.sqrt(sum_of_squares(updates, max_norm.dtype)), max_norm)
        (clipped,) = map_arrays(lambda g: (scale * g,), updates)
        return clipped

    return _clip_transform("max_norm", max_norm, clip)


def clip_by_norm(max_norm: float) -> GradientTransformation:
    """Clips each leaf on its own L2 norm: ``g <- (max_norm / |g|) * g`` if ``|g| >= max_norm``.

    Unlike :func:`clip_by_global_norm` (Keras' ``clipnorm``), every leaf is
    measured separately. ``max_norm > 0``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> clip = kopt.clip_by_norm(1.0)
        >>> clip.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}, clip.init(None))[0]
        {'a': Array([0.6, 0.8], dtype=float32), 'b': Array([0.5], dtype=float32)}
    """

    def clip_leaf(g, max_norm):
        norm = jnp.sqrt(jnp.sum(squares(g, max_norm.dtype)))
        return (_norm_scale(norm, max_norm) * g,)

    def clip(updates, max_norm):
        refuse_packed("clip_by_norm", updates)
        (clipped,) = map_arrays(lambda g: clip_leaf(g, max_norm), updates)
        return clipped

    return _clip_transform("max_norm", max_norm, clip)
