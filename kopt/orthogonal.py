"""Orthogonalised updates: the matrix step of Muon (Jordan et al. 2024; Keras 3's ``Muon``).

Muon replaces the momentum ``G`` of a weight matrix by (an approximation of)
its orthogonal polar factor ``U V^T`` (``G = U S V^T``): every singular
direction of the step gets the same size, however ill-conditioned ``G`` is.
The factor is approximated by a few Newton-Schulz iterations, matrix products
only, so it runs at matmul speed on accelerators.

:func:`orthogonalize_by_newton_schulz` is that one concept, usable in any
chain; Muon's momentum is :func:`kopt.trace` (Keras' ``m <- momentum*m + g``,
with ``nesterov`` its look-ahead ``momentum*m + g``). Keras 3's whole
optimizer, with its AdamW branch for the other variables, is
``kopt.keras.Muon``.

The math is per matrix, so a chain holding it keeps its leaves apart: it
refuses :func:`kopt.packed` input.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import GradientTransformation, expects
from kopt.packing import refuse_packed
from kopt.state import current_hyperparams, init_hyperparams
from kopt.tree import map_arrays
from kopt.validation import as_real, check_count, check_hyperparam, is_concrete

__all__ = ["OrthogonalizeByNewtonSchulzState", "orthogonalize_by_newton_schulz"]

#: Keras 3's quintic coefficients ``(muon_a, muon_b, muon_c)``, tuned for the steepest slope at 0.
KERAS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class OrthogonalizeByNewtonSchulzState(NamedTuple):
    """No slots: ``muon_a``, ``muon_b``, ``muon_c``, ``ns_epsilon`` and (unless off) ``rms_rate``."""

    hyperparams: dict[str, jax.Array]


def _adjoint(x: jax.Array) -> jax.Array:
    """The (conjugate) transpose of the last two axes; leading axes are a batch of matrices."""
    return jnp.conj(jnp.swapaxes(x, -1, -2))


def _newton_schulz_array(
    g: jax.Array,
    a: jax.Array,
    b: jax.Array,
    c: jax.Array,
    epsilon: jax.Array,
    rms_rate: jax.Array | None,
    steps: int,
    precision: Any,
) -> tuple[jax.Array]:
    rows, columns = g.shape[-2:]
    tall = rows > columns
    # p(X X^T) X = X p(X^T X): either orientation gives the same result; the wide one has the smaller Gram.
    x = _adjoint(g) if tall else g
    # The Frobenius norm bounds the spectral norm: every singular value starts in [0, 1].
    norm = jnp.sqrt(jnp.sum(jnp.square(jnp.abs(x)), axis=(-2, -1), keepdims=True))
    x = x / (norm + epsilon)
    for _ in range(steps):
        gram = jnp.matmul(x, _adjoint(x), precision=precision)
        polynomial = b * gram + jnp.matmul(c * gram, gram, precision=precision)
        x = a * x + jnp.matmul(polynomial, x, precision=precision)
    x = _adjoint(x) if tall else x
    if rms_rate is not None:  # Moonlight's factor: the step's RMS near rms_rate, as an AdamW step's
        x = x * (math.sqrt(max(rows, columns)) * rms_rate)
    return (x,)


def _check_matrices(updates: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        if jnp.ndim(leaf) < 2:
            raise ValueError(
                f"orthogonalize_by_newton_schulz orthogonalises matrices, but updates{jax.tree_util.keystr(path)} "
                f"has shape {jnp.shape(leaf)}; give it only leaves of 2 or more dimensions (kopt.masked or "
                "kopt.partition route the others elsewhere, as kopt.keras.Muon does)"
            )


def orthogonalize_by_newton_schulz(
    ns_steps: int = 5,
    coefficients: tuple[float, float, float] = KERAS_COEFFICIENTS,
    epsilon: float = 1e-7,
    rms_rate: float | None = 0.2,
    *,
    precision: jax.lax.PrecisionLike = None,
) -> GradientTransformation:
    """Each matrix update ``G`` replaced by Newton-Schulz's approximation of its orthogonal factor (Muon's step).

    With ``(a, b, c) = coefficients`` and ``G`` transposed first when it has
    more rows than columns (and back at the end)::

        X = G / (||G||_F + epsilon)
        ns_steps times:  A = X X^T;  X <- a*X + (b*A + c*A A) X
        output X * sqrt(max(rows, columns)) * rms_rate

    Each singular value ``s`` of the normalised ``G`` goes through the scalar
    map ``s <- a*s + b*s**3 + c*s**5``. Keras' coefficients trade exactness
    for speed: they push every ``s`` into a band around 1 (about
    ``[0.68, 1.13]`` once settled), not onto 1. ``rms_rate`` (Moonlight, Liu et al. 2025) scales
    the step to the RMS of an AdamW step, so AdamW's learning rate and weight
    decay carry over; ``None`` leaves ``X`` unscaled. Leaves of more than 2
    dimensions are batches of matrices over their last two axes; leaves of
    fewer are a ``ValueError`` (route them with :func:`kopt.masked` or
    :func:`kopt.partition`). Complex matrices use the conjugate transpose.

    ``a, b, c``, ``epsilon`` and ``rms_rate`` live in the state as ``muon_a``,
    ``muon_b``, ``muon_c``, ``ns_epsilon``, ``rms_rate`` (Keras 3's config
    names); ``ns_steps`` is the loop count, fixed when traced. ``precision``
    is the matmuls' (``None``: JAX's default, which on GPUs and TPUs may run
    float32 products in fewer passes, as Keras 3 on JAX does). Defaults are
    Keras 3's: ``ns_steps=5``, ``coefficients=(3.4445, -4.775, 2.0315)``,
    ``epsilon=1e-7``, ``rms_rate=0.2``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.orthogonalize_by_newton_schulz(ns_steps=20, coefficients=(1.5, -0.5, 0.0), rms_rate=None)
        >>> updates, _ = opt.update(jnp.array([[3.0, 0.0], [0.0, 0.1]]), opt.init(None))
        >>> updates.round(3).tolist()  # the cubic iteration converges: singular values 3 and 0.1 both become 1
        [[1.0, 0.0], [0.0, 1.0]]
    """
    steps = check_count("ns_steps", ns_steps, minimum=0)
    if not is_concrete(steps) or not isinstance(steps, int):
        raise ValueError(
            "ns_steps is a loop count and must be a Python integer when the transformation is built "
            "(with optax.inject_hyperparams, list it in static_args)"
        )
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
        raise ValueError(f"coefficients must be three numbers (a, b, c), got {coefficients!r}")
    values: dict[str, float | jax.Array] = {
        name: as_real(name, value) for name, value in zip(("muon_a", "muon_b", "muon_c"), coefficients, strict=True)
    }
    values["ns_epsilon"] = _non_negative("epsilon", epsilon)
    if rms_rate is not None:
        values["rms_rate"] = _non_negative("rms_rate", rms_rate)

    def init(params):
        return OrthogonalizeByNewtonSchulzState(init_hyperparams(values, params))

    @expects(OrthogonalizeByNewtonSchulzState)
    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        refuse_packed("orthogonalize_by_newton_schulz", updates)
        _check_matrices(updates)
        hp = current_hyperparams(state.hyperparams, values)
        rate = hp["rms_rate"] if "rms_rate" in values else None  # off is structural, whatever a state holds
        coefficients = (hp["muon_a"], hp["muon_b"], hp["muon_c"], hp["ns_epsilon"], rate)
        (updates,) = map_arrays(lambda g: _newton_schulz_array(g, *coefficients, steps, precision), updates)
        return updates, OrthogonalizeByNewtonSchulzState(hp)

    return GradientTransformation(init, update)


def _non_negative(name: str, value: Any) -> float | jax.Array:
    value = check_hyperparam(name, value)
    if is_concrete(value) and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value
