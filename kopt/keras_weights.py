"""Keras 2 optimizer weights in and out: resume a Keras 2 training run in JAX, or go back.

A Keras 2.2.4 optimizer's ``get_weights()`` is a flat list of NumPy arrays
(specification §2-§8; ``n`` is the number of parameter arrays)::

    SGD       [iterations, velocity_1..n]
    RMSprop   [accumulator_1..n]                              (no iterations)
    Adagrad   [accumulator_1..n]                              (no iterations)
    Adadelta  [accumulator_1..n, delta_accumulator_1..n]      (no iterations)
    Adam      [iterations, m_1..n, v_1..n, vhat_1..n]         (vhat: shape (1,) placeholders without amsgrad)
    Adamax    [iterations, m_1..n, u_1..n]
    Nadam     [iterations, m_1..n, v_1..n]                    (m_schedule is not included)

Parameter ``k`` of that list is leaf ``k`` of ``jax.tree.leaves(params)``:
build ``params`` so that this order is Keras' ``model.trainable_weights``
order (a list does it; a dict is ordered by sorted keys). Shapes are checked.

    >>> import numpy as np, jax.numpy as jnp, kopt
    >>> from kopt.keras_weights import from_keras_weights, to_keras_weights
    >>> opt = kopt.Adam(lr=1e-3)
    >>> params = [jnp.zeros((2, 3)), jnp.zeros(3)]                # kernel, bias
    >>> weights = [np.int64(7), np.ones((2, 3)), np.ones(3), np.ones((2, 3)), np.ones(3),
    ...            np.zeros(1), np.zeros(1)]                         # Adam without amsgrad
    >>> state = from_keras_weights(opt, params, weights)
    >>> int(kopt.iterations(state))
    7
    >>> [w.shape for w in to_keras_weights(opt, state)]
    [(), (2, 3), (3,), (2, 3), (3,), (1,), (1,)]

What the weights do not hold, and how kopt fills it in:

* **Hyperparameters** (``lr``, ``beta_1``, ...) are not weights: they come
  from ``opt``. Set them with ``kopt.set_hyperparams`` if they changed.
* **iterations of RMSprop, Adagrad, Adadelta**: pass ``iterations=``
  (Keras: ``K.get_value(opt.iterations)``). It only matters with ``decay``; by
  default it is 0, as in a fresh Keras optimizer given ``set_weights`` (a
  ``UserWarning`` says so when ``decay`` is not 0).
* **Nadam's m_schedule** (the product ``mu_1 ... mu_t``): ``m_schedule="replay"``
  (default) recomputes it by running the optimizer's own schedule arithmetic
  for ``iterations`` steps, which is what the interrupted run held (assuming
  ``beta_1`` and ``schedule_decay`` did not change during it); a number (e.g.
  ``K.get_value(opt.m_schedule)``) is taken as it is; ``"reset"`` gives 1.0,
  which is what Keras 2 itself does when it restores weights into a fresh Nadam
  (``load_model``), and continues differently from the original run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kopt.base import OptState, Params
from kopt.optimizers import Optimizer
from kopt.state import get_slot, set_slot
from kopt.state import iterations as step_count

__all__ = ["from_keras_weights", "to_keras_weights"]

# class name -> (iterations first?, per-leaf slot groups in Keras' order)
_LAYOUTS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "SGD": (True, ("velocity",)),
    "RMSprop": (False, ("accumulator",)),
    "Adagrad": (False, ("accumulator",)),
    "Adadelta": (False, ("accumulator", "delta_accumulator")),
    "Adam": (True, ("m", "v", "vhat")),
    "Adamax": (True, ("m", "u")),
    "Nadam": (True, ("m", "v")),
}

# Where wrappers keep the state they wrap; the same convention as kopt/state.py.

_INT32_MAX = int(np.iinfo(np.int32).max)  # kopt counts steps in int32


def _layout(opt: Any) -> tuple[bool, tuple[str, ...], bool]:
    """``(has_iterations, slot names, amsgrad)`` of a kopt Keras optimizer."""
    if not isinstance(opt, Optimizer) or opt.class_name not in _LAYOUTS:
        raise ValueError(f"opt must be a kopt Keras optimizer ({', '.join(_LAYOUTS)}, e.g. kopt.Adam()), got {opt!r}")
    has_iterations, slots = _LAYOUTS[opt.class_name]
    return has_iterations, slots, bool(opt.config.get("amsgrad", False))


def _describe(has_iterations: bool, slots: tuple[str, ...], amsgrad: bool, n: int) -> str:
    """E.g. ``7 weights [iterations, m x2, v x2, vhat x2] (vhat: placeholders ...)``."""
    parts = (["iterations"] if has_iterations else []) + [f"{slot} x{n}" for slot in slots]
    note = " (vhat: placeholders of shape (1,) without amsgrad)" if "vhat" in slots and not amsgrad else ""
    return f"{int(has_iterations) + len(slots) * n} weights [{', '.join(parts)}]{note}"


def _as_iterations(value: Any, where: str) -> int:
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "iuf":
        raise ValueError(
            f"{where} must be a scalar step count, got an array of dtype {array.dtype}, shape {array.shape}"
        )
    number = array.item()
    if not np.isfinite(number) or number != int(number) or not 0 <= number <= _INT32_MAX:
        raise ValueError(f"{where} must be a whole number of steps in [0, {_INT32_MAX}], got {number!r}")
    return int(number)


def _replayed_m_schedule(opt: Optimizer, params: Params, steps: int) -> jax.Array:
    """Nadam's ``m_schedule`` after ``steps`` updates, formed by ``opt``'s own update rule.

    The schedule does not depend on the gradients, so the optimizer is run
    on zero-size copies of the params (same dtypes, hence the same
    hyperparameter dtype and the very same float operations as training).
    The product of factors below ``beta_1 < 1`` underflows to exactly 0 after
    a few hundred (float32) or thousand (float64) steps and then stays 0, so
    the loop stops there: the cost is bounded whatever ``steps`` is.
    """
    tiny = jax.tree.map(lambda p: jnp.zeros((0,), jnp.result_type(p)), params)

    def run(count):
        def going(carry):
            index, state = carry
            return (index < count) & (get_slot(state, "m_schedule") != 0)

        def step(carry):
            index, state = carry
            return index + 1, opt.update(tiny, state, tiny)[1]

        _, state = jax.lax.while_loop(going, step, (jnp.zeros((), jnp.int32), opt.init(tiny)))
        return get_slot(state, "m_schedule")

    return jax.jit(run)(jnp.asarray(steps, jnp.int32))


def from_keras_weights(
    opt: Optimizer,
    params: Params,
    weights: Sequence[Any],
    *,
    iterations: int | None = None,
    m_schedule: float | str = "replay",
) -> OptState:
    """The kopt state of ``opt`` for ``params`` holding a Keras 2 optimizer's ``get_weights()``.

    ``weights`` follows the layout of ``opt``'s class (module docstring); its
    per-leaf arrays are matched to ``jax.tree.leaves(params)`` in order, cast
    to the slot dtypes of ``opt.init(params)`` and placed on their shardings.
    Every step counter (``count``) of the state is set to the imported
    iterations; hyperparameters are ``opt``'s.

    ``iterations`` (RMSprop, Adagrad, Adadelta only, whose weights omit it;
    default 0) gives the step count. ``m_schedule`` (Nadam only):
    ``"replay"`` (default), ``"reset"`` or a number; see the module docstring.

    Raises ``ValueError`` for a wrong number of weights (naming the expected
    layout), a weight whose shape differs from its parameter's (naming both),
    Adam ``vhat`` entries that do not fit ``amsgrad``, non-numeric or
    non-finite values, and an ``iterations`` that is not a whole number in
    ``[0, 2**31 - 1]``.

    Example:
        >>> state = from_keras_weights(kopt.RMSprop(decay=1e-4), [kernel, bias],
        ...                            keras_opt.get_weights(), iterations=1200)  # doctest: +SKIP
    """
    has_iterations, slots, amsgrad = _layout(opt)
    if not isinstance(weights, (list, tuple)):
        raise ValueError(f"weights must be the list Keras' get_weights() returns, got {type(weights).__name__}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    shapes = [tuple(np.shape(leaf)) for _, leaf in flat]
    n = len(flat)
    expected = int(has_iterations) + len(slots) * n
    if len(weights) != expected:
        hint = ""
        if not weights and n:
            hint = " (Keras returns [] before the optimizer's first step: start from opt.init(params) instead)"
        elif len(weights) == expected + 1 and not has_iterations:
            hint = f" ({opt.class_name}'s weights hold no iterations; pass iterations= instead)"
        raise ValueError(
            f"{opt!r} with {n} parameter arrays expects {_describe(has_iterations, slots, amsgrad, n)}, "
            f"got {len(weights)} weights{hint}"
        )

    arrays = []
    for index, weight in enumerate(weights):
        array = np.asarray(weight)
        if array.dtype.kind not in "iuf":
            raise ValueError(f"weights[{index}] must hold real numbers, got dtype {array.dtype}")
        arrays.append(array)

    if has_iterations:
        if iterations is not None:
            raise ValueError(f"{opt.class_name}'s weights hold iterations (weights[0]); do not pass iterations=")
        steps = _as_iterations(arrays[0], "weights[0] (iterations)")
    elif iterations is None:
        steps = 0
        if opt.config.get("decay", 0):
            warnings.warn(
                f"{opt.class_name} weights hold no iterations: the decayed learning rate restarts at step 0. "
                "Pass iterations=K.get_value(keras_optimizer.iterations) to continue the schedule.",
                UserWarning,
                stacklevel=2,
            )
    else:
        steps = _as_iterations(iterations, "iterations")

    per_slot: dict[str, Any] = {}
    offset = int(has_iterations)
    for slot in slots:
        group = arrays[offset : offset + n]
        placeholders = slot == "vhat" and not amsgrad
        for k, array in enumerate(group):
            index = offset + k
            want = (1,) if placeholders else shapes[k]
            if array.shape != want:
                hint = ""
                if slot == "vhat" and amsgrad and array.shape == (1,) != shapes[k]:
                    hint = " (a (1,) placeholder: were these weights saved by an Adam with amsgrad=False?)"
                elif placeholders and array.shape == shapes[k]:
                    hint = " (a full vhat: were these weights saved by an Adam with amsgrad=True?)"
                what = "placeholder" if placeholders else f"for params{paths[k]}"
                raise ValueError(f"weights[{index}] ({slot} {what}) has shape {array.shape}, expected {want}{hint}")
            if not placeholders and not np.all(np.isfinite(array)):
                raise ValueError(f"weights[{index}] ({slot} for params{paths[k]}) holds NaN or Inf")
        offset += n
        if not placeholders:
            per_slot[slot] = jax.tree.unflatten(treedef, group)

    state = set_slot(opt.init(params), "count", np.asarray(steps))
    for name, tree in per_slot.items():
        state = set_slot(state, name, tree)

    if opt.class_name == "Nadam":
        if isinstance(m_schedule, str):
            if m_schedule not in ("replay", "reset"):
                raise ValueError(f"m_schedule must be 'replay', 'reset' or a number, got {m_schedule!r}")
            schedule_value = _replayed_m_schedule(opt, params, steps) if m_schedule == "replay" else np.asarray(1.0)
        else:
            number = float(np.asarray(m_schedule))  # TypeError/ValueError for non-numbers, as float() gives
            if not 0.0 <= number <= 1.0:
                raise ValueError(f"m_schedule is a product of momentum factors in [0, 1], got {m_schedule!r}")
            schedule_value = np.asarray(m_schedule)
        state = set_slot(state, "m_schedule", np.asarray(schedule_value))
    elif not (isinstance(m_schedule, str) and m_schedule == "replay"):
        raise ValueError(f"m_schedule applies to Nadam only, not {opt.class_name}")

    return state


def to_keras_weights(opt: Optimizer, state: OptState) -> list[np.ndarray]:
    """The list a Keras 2 optimizer of ``opt``'s class takes in ``set_weights``.

    The inverse of :func:`from_keras_weights`: ``iterations`` (int64 scalar;
    left out for RMSprop, Adagrad, Adadelta: set it in Keras with
    ``K.set_value(opt.iterations, int(kopt.iterations(state)))``), then each
    slot leaf by leaf in ``jax.tree.leaves`` order, as NumPy arrays of the
    state's dtypes. Adam without amsgrad gets zero ``vhat`` placeholders of
    shape (1,). Nadam's ``m_schedule`` is not a Keras weight
    (``kopt.get_slot(state, "m_schedule")`` reads it). Raises ``ValueError``
    if ``state`` was not made by an optimizer of ``opt``'s kind.

    Example:
        >>> keras_opt.set_weights(to_keras_weights(opt, state))  # doctest: +SKIP
    """
    has_iterations, slots, amsgrad = _layout(opt)
    weights: list[np.ndarray] = []
    if has_iterations:
        weights.append(np.asarray(int(step_count(state)), np.int64))
    leaves_of: dict[str, list[Any]] = {}
    for slot in slots:
        try:
            value = get_slot(state, slot)
        except ValueError as error:
            raise ValueError(f"this state was not made by {opt!r}: {error}") from None
        if slot == "vhat" and (value is None) == amsgrad:
            held = "no vhat" if value is None else "a vhat"
            raise ValueError(f"this state holds {held}, but {opt!r} has amsgrad={amsgrad}")
        if value is not None:
            leaves_of[slot] = jax.device_get(jax.tree.leaves(value))
    first = leaves_of[slots[0]]
    for slot in slots:
        if slot in leaves_of:
            weights.extend(np.asarray(leaf) for leaf in leaves_of[slot])
        else:  # Adam without amsgrad: Keras' placeholders, in the slots' dtype
            weights.extend(np.zeros((1,), np.asarray(leaf).dtype) for leaf in first)
    return weights
