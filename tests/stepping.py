"""Stepping kopt beside a reference, shared by the tests of single optimizers (Lion, FTRL, Lamb, Adafactor,
use_ema, loss scaling). Not a test module itself.

A reference is a NumPy transcription of the rule (a list of params after each step) or a live Keras
(a function that applies one step of gradients and returns its variables). kopt is stepped with the same
gradients and compared after every step; with ``handover``, kopt is also restarted from the live optimizer's
weights after that step and must go on like the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

import kopt

#: float32 against a live Keras (2e-6 + 2e-5 |keras|, the suite's bound for Keras references)
LIVE = {"rtol": 2e-5, "atol": 2e-6}


def rule_tolerance(dtype: Any) -> dict[str, float]:
    """Against a NumPy transcription of the rule, computed in the same dtype."""
    return {"rtol": 2e-6, "atol": 2e-7} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}


def arrays(seed: int, shapes: Sequence[tuple[int, ...]], count: int | None = None, dtype: Any = np.float32) -> Any:
    """Fixed-seed normal arrays of ``shapes`` (a list of them), or ``count`` such lists (gradients per step)."""
    rng = np.random.default_rng(seed)

    def draw() -> list[np.ndarray]:
        return [rng.normal(size=s).astype(dtype) for s in shapes]

    return draw() if count is None else [draw() for _ in range(count)]


def stepped(opt: Any, start: Sequence[Any], grads: Sequence[Sequence[Any]]) -> Iterator[tuple[int, list, Any]]:
    """Yields ``(t, params, state)`` after each of kopt's (jitted) steps from ``start`` over ``grads``."""
    params = [jnp.asarray(p) for p in start]
    state, update = opt.init(params), jax.jit(opt.update)
    for t, g in enumerate(grads, start=1):
        updates, state = update([jnp.asarray(x) for x in g], state, params)
        params = kopt.apply_updates(params, updates)
        yield t, params, state


def assert_follows_rule(
    opt: Any, start: Sequence[Any], grads: Sequence[Sequence[Any]], expected: Sequence
) -> tuple[list, Any]:
    """kopt's params equal ``expected[t - 1]`` after every step ``t``, in the dtype of ``start``; returns the
    last ``(params, state)``."""
    dtype = np.asarray(start[0]).dtype
    last: tuple[list, Any] = ([], None)
    for t, params, state in stepped(opt, start, grads):
        assert all(leaf.dtype == dtype for leaf in params)
        chex.assert_trees_all_close(params, [np.asarray(x, dtype) for x in expected[t - 1]], **rule_tolerance(dtype))
        last = (params, state)
    return last


def assert_follows_live(
    opt: Any,
    start: Sequence[Any],
    grads: Sequence[Sequence[Any]],
    live_step: Callable[[Sequence[Any]], list],
    *,
    handover: int | None = None,
    live_weights: Callable[[], list] | None = None,
) -> Any:
    """kopt follows ``live_step(gradients) -> variables`` at every step; after step ``handover`` a second kopt
    run starts from ``live_weights()`` (and the live variables) and must follow too. Returns the last state."""
    resumed, last = None, None
    for (t, params, state), g in zip(stepped(opt, start, grads), grads, strict=True):
        last = state
        expected = live_step(g)
        chex.assert_trees_all_close(params, expected, **LIVE)
        if resumed is not None:
            chex.assert_trees_all_close(next(resumed)[1], expected, **LIVE)
        if t == handover:
            weights_state = kopt.from_keras_weights(opt, [jnp.asarray(v) for v in expected], live_weights())
            assert int(kopt.iterations(weights_state)) == handover
            resumed = _continue(opt, expected, weights_state, grads[handover:])
    return last


def _continue(opt: Any, params: Sequence[Any], state: Any, grads: Sequence[Sequence[Any]]) -> Iterator:
    params, update = [jnp.asarray(p) for p in params], jax.jit(opt.update)
    for g in grads:
        updates, state = update([jnp.asarray(x) for x in g], state, params)
        params = kopt.apply_updates(params, updates)
        yield state, params


def jitted_step(opt: Any) -> Callable:
    """One jitted kopt step ``(params, state, grads) -> (params, state)``, to share between runs of a case."""
    return jax.jit(lambda p, s, g: (lambda u, s: (kopt.apply_updates(p, u), s))(*opt.update(g, s, p)))


def run_steps(step: Callable, params: Any, state: Any, grads: Sequence[Any]) -> tuple[list, Any, Any]:
    """``(params after each step, last params, last state)`` of ``step`` (:func:`jitted_step`) over ``grads``."""
    trajectory = []
    for g in grads:
        params, state = step(params, state, jax.tree.map(jnp.asarray, g))
        trajectory.append(jax.device_get(params))
    return trajectory, params, state


def assert_same_trajectory(got: Sequence[Any], expected: Sequence[Any]) -> None:
    """Every step's params within the live bound (:data:`LIVE`), naming the step and the leaf that differ."""
    for t, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
        for k, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
            np.testing.assert_allclose(x, y, **LIVE, err_msg=f"step {t}, variable {k}")
