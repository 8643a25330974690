"""A jitted train step with the fast path as the default: one program, params and state donated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from kopt.base import GradientTransformation, apply_updates


def train_step(
    loss_fn: Callable[..., Any], opt: GradientTransformation, has_aux: bool = False, donate: bool = True
) -> Callable[..., tuple]:
    """A jitted ``step(params, state, batch) -> (params, state, loss[, aux])``.

    One XLA program computes ``loss_fn(params, batch)`` and its gradient, the
    optimizer update and ``apply_updates``. With ``donate=True`` (the default)
    the params and state buffers are donated: XLA writes the new values in
    place instead of allocating fresh arrays every step, which on CPU makes an
    Adam step several times faster on large tensors. Donated inputs are dead
    after the call (JAX raises if you touch them), so always rebind:
    ``params, state, loss = step(params, state, batch)``. Writing your own
    step? Use ``jax.jit(step, donate_argnums=(0, 1))`` for the same effect.

    ``loss_fn(params, batch)`` returns the loss, or ``(loss, aux)`` with
    ``has_aux=True``. Extra keyword arguments of ``step`` (e.g. ``value=`` for
    :func:`~kopt.reduce_on_plateau`) are passed to ``opt.update``.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> step = kopt.train_step(lambda p, b: jnp.sum((p["w"] * b) ** 2), kopt.Adam(lr=0.1))
        >>> params = {"w": jnp.ones(3)}
        >>> state = kopt.Adam(lr=0.1).init(params)
        >>> params, state, loss = step(params, state, jnp.ones(3))
    """
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def step(params, state, batch, **extra_args):
        out, grads = value_and_grad(params, batch)
        updates, state = opt.update(grads, state, params, **extra_args)
        params = apply_updates(params, updates)
        return (params, state, *out) if has_aux else (params, state, out)

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
