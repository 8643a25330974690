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

TensorFlow's Keras (tf.keras 2.x, ``tf_keras``) always starts with ``iterations``
and groups slots by kind (legacy ``OptimizerV2.get_weights()``), or interleaves
them leaf by leaf (TF >= 2.11's ``optimizer.variables``, as in ``.keras`` files)::

    SGD       [iterations, (momentum_1..n if momentum > 0; always in TF >= 2.11)]
    RMSprop   [iterations, rms_1..n, (momentum_1..n), (mg_1..n)]   (momentum holds -velocity; mg: centered)
    Adagrad   [iterations, accumulator_1..n]
    Adadelta  [iterations, accum_grad_1..n, accum_var_1..n]      (TF >= 2.11: interleaved)
    Adam      [iterations, m_1..n, v_1..n, (vhat_1..n)]           (TF >= 2.11: m_1, v_1, m_2, ..., then vhat)
    Adamax    [iterations, m_1..n, u_1..n]                        (TF >= 2.11: interleaved)
    Nadam     [iterations, momentum_cache, m_1..n, v_1..n]       (momentum_cache is kopt's m_schedule;
                                                                  TF >= 2.11: interleaved, no momentum_cache)
    Lion      [iterations, m_1..n]                               (TF >= 2.13 only)
    Ftrl      [iterations, accumulator_1, linear_1, accumulator_2, ...]   (both generations)
    Adafactor [iterations, r_1, c_1, v_1, v_2, r_3, ...]         (TF >= 2.11 only; r, c: none for
                                                                  variables of fewer than 2 dimensions)

With ``use_ema`` (TF >= 2.11), ``average_1..n`` follow ``iterations``.

tf_keras' ``LossScaleOptimizer`` (legacy inner) and ``LossScaleOptimizerV3`` (TF >= 2.11 inner) hold
their inner optimizer's weights only, in its layout (``get_weights()``, ``variables``, ``.h5`` and
``.keras`` files alike): the loss scale and its count of finite steps (``current_loss_scale``,
``counter``) are saved by ``tf.train.Checkpoint`` only. ``from_keras_weights`` takes them as
``loss_scale=`` and ``good_steps=`` (``keras_opt.loss_scale``, ``keras_opt.dynamic_counter``); without
them they restart at ``initial_scale`` and 0, as ``tf_keras.models.load_model`` restarts them.

Keras 3 (``flavor="keras3"``, ``optimizer.variables``): ``iteration``, ``learning_rate``, then as
``_keras3_layout`` says; Muon holds ``momentum`` for its matrices and ``momentum, velocity`` for its
Adam variables, interleaved variable by variable.

``kopt.X`` reads Keras 2.2.4's layout and TensorFlow's legacy one (the counts
tell them apart; where they are equal, so are the layouts), ``kopt.tf_keras.X``
its own generation's.

Parameter ``k`` of that list is leaf ``k`` of ``jax.tree.leaves(params)``:
build ``params`` so that this order is Keras' ``model.trainable_weights``
order (a list does it; a dict is ordered by sorted keys). Shapes are checked.

    >>> import numpy as np, jax.numpy as jnp, kopt
    >>> from kopt.keras_io.weights import from_keras_weights, to_keras_weights
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
* **iterations of Keras 2.2.4's RMSprop, Adagrad, Adadelta**: pass ``iterations=``
  (Keras: ``K.get_value(opt.iterations)``). It only matters with ``decay``; by
  default it is 0, as in a fresh Keras optimizer given ``set_weights`` (a
  ``UserWarning`` says so when ``decay`` is not 0).
* **Nadam's m_schedule** (the product ``mu_1 ... mu_t``), unless TensorFlow's legacy
  weights hold it (``momentum_cache``, restored exactly): ``m_schedule="replay"``
  (default) recomputes it by running the optimizer's own schedule arithmetic
  for ``iterations`` steps, which is what the interrupted run held (assuming
  ``beta_1`` and ``schedule_decay`` did not change during it); a number (e.g.
  ``K.get_value(opt.m_schedule)``) is taken as it is; ``"reset"`` gives 1.0,
  which is what Keras 2 itself does when it restores weights into a fresh Nadam
  (``load_model``; TF >= 2.11's ``load_model`` too), and continues differently
  from the original run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kopt.base import OptState, Params
from kopt.optimizers import Optimizer
from kopt.state import get_hyperparams, get_slot, set_hyperparams, set_slot
from kopt.state import iterations as step_count
from kopt.tree import TreeDef, first_complex

__all__ = ["from_keras_weights", "to_keras_weights"]

#: A layout is a list of parts: a scalar of ``_SCALARS``, a slot name (one array per param leaf, in leaf
#: order), or a tuple of slot names (interleaved: the slots of leaf 0, then those of leaf 1, ...). A slot
#: name may end in a mark: "-name" stored negated; "name?" Keras 2.2.4's (1,) placeholders; "name*"
#: Adafactor's factored moment, an int32 0 placeholder for leaves of fewer than 2 dimensions (Keras 3);
#: "name+" the same moment left out for those leaves (tf_keras); "name~" held only for the leaves whose
#: kopt state holds the slot (not None: Muon's momentum for its matrices, Adam's moments for the rest).
Layout = list

_MARKS = "-?*+~"

KERAS_LAYOUT, LEGACY_LAYOUT, CURRENT_LAYOUT = "Keras 2.2.4", "TensorFlow legacy", "TensorFlow >= 2.11"
KERAS3_LAYOUT = "Keras 3"

#: The scalars a layout may hold, with the NumPy dtype kinds a file may store each in. ``wrapped_*`` are
#: a Keras 3 LossScaleOptimizer's own counter and rate, which Keras keeps at 0 (its inner optimizer's count).
_SCALARS = {
    "iterations": "iu",
    "m_schedule": "f",
    "learning_rate": "f",
    "good_steps": "iu",
    "loss_scale": "f",
    "wrapper_iterations": "iu",
    "wrapper_learning_rate": "f",
}


_KERAS_CLASSES = ("SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "Adamax", "Nadam")


def _keras_layout(class_name: str, config: dict[str, Any]) -> Layout:
    """Keras 2.2.4's ``get_weights()`` (specification §2-§8)."""
    return {
        "SGD": ["iterations", "velocity"],
        "RMSprop": ["accumulator"],
        "Adagrad": ["accumulator"],
        "Adadelta": ["accumulator", "delta_accumulator"],
        "Adam": ["iterations", "m", "v", "vhat" if config.get("amsgrad") else "vhat?"],
        "Adamax": ["iterations", "m", "u"],
        "Nadam": ["iterations", "m", "v"],
    }[class_name]


def _rmsprop_parts(config: Mapping[str, Any]) -> Layout:
    # TensorFlow's momentum slot holds the positive step, kopt's velocity the descent direction.
    return (["-velocity"] if config.get("momentum", 0) > 0 else []) + (["mean_grad"] if config.get("centered") else [])


def _legacy_layout(class_name: str, config: dict[str, Any]) -> Layout:
    """TensorFlow's legacy ``OptimizerV2.get_weights()``: ``iterations`` first, slots grouped by kind."""
    return {
        "SGD": ["iterations"] + (["velocity"] if config.get("momentum", 0) > 0 else []),
        "RMSprop": ["iterations", "accumulator", *_rmsprop_parts(config)],
        "Adagrad": ["iterations", "accumulator"],
        "Adadelta": ["iterations", "accumulator", "delta_accumulator"],
        "Adam": ["iterations", "m", "v"] + (["vhat"] if config.get("amsgrad") else []),
        "Adamax": ["iterations", "m", "u"],
        "Nadam": ["iterations", "m_schedule", "m", "v"],  # m_schedule: TensorFlow's momentum_cache
        "Ftrl": ["iterations", ("accumulator", "linear")],  # its slots are made leaf by leaf
    }[class_name]


def _current_layout(class_name: str, config: dict[str, Any]) -> Layout:
    """TF >= 2.11's ``optimizer.variables``: Adam-like slots interleaved leaf by leaf; with ``use_ema``, the
    moving averages of the variables come right after ``iterations`` (the base class makes them first)."""
    adam = ["iterations", ("m", "v")] + (["vhat"] if config.get("amsgrad") else [])
    layout = {
        "SGD": ["iterations", "velocity"],
        "RMSprop": ["iterations", "accumulator", *_rmsprop_parts(config)],
        "Adagrad": ["iterations", "accumulator"],
        "Adadelta": ["iterations", ("accumulator", "delta_accumulator")],
        "Adam": adam,
        "AdamW": adam,
        "Adamax": ["iterations", ("m", "u")],
        "Nadam": ["iterations", ("m", "v")],  # TensorFlow does not save its u_product
        "Lion": ["iterations", "m"],
        "Ftrl": ["iterations", ("accumulator", "linear")],
        "Adafactor": ["iterations", ("r+", "c+", "v")],  # r, c: none for variables of fewer than 2 dimensions
    }[class_name]
    return [layout[0], "average", *layout[1:]] if config.get("use_ema") else layout


def _keras3_slots(class_name: str, config: Mapping[str, Any], wrapped: bool = False) -> Layout:
    """``wrapped``: inside a LossScaleOptimizer, whose ``variables`` list only the inner optimizer's slot
    variables (Nadam's ``u_product`` and Adafactor's int32 placeholders are not among them)."""
    if wrapped and class_name in ("Nadam", "Adafactor"):
        return [("m", "v")] if class_name == "Nadam" else [("r+", "c+", "v")]
    adam = [("m", "v")] + (["vhat"] if config.get("amsgrad") else [])
    return {
        "SGD": ["velocity"] if config.get("momentum", 0) != 0 else [],  # Keras 3 keeps none without momentum
        "RMSprop": ["accumulator", *_rmsprop_parts(config)],
        "Adagrad": ["accumulator"],
        "Adadelta": [("accumulator", "delta_accumulator")],
        "Adam": adam,
        "AdamW": adam,
        "Lamb": [("m", "v")],
        "Adamax": [("m", "u")],
        "Nadam": [("m", "v"), "m_schedule"],  # Keras 3 saves its u_product, last
        "Ftrl": [("accumulator", "linear")],
        "Lion": ["m"],
        "Adafactor": [("r*", "c*", "v")],  # r, c: int32 placeholders for variables of fewer than 2 dimensions
        "ScheduleFreeAdamW": [("z", "v")],
        "Muon": [("velocity~", "m~", "v~")],  # momentum for its matrices, momentum and velocity for Adam's leaves
    }[class_name]


def _keras3_layout(class_name: str, config: Mapping[str, Any], wrapped: bool = False) -> Layout:
    """Keras 3's ``optimizer.variables`` (what ``.keras`` files hold under ``optimizer/vars``): ``iteration``
    (the calls, accumulating ones too), the ``learning_rate`` variable (none with a schedule), the moving
    averages (``use_ema``), the gradient accumulators, then the rule's slots; a LossScaleOptimizer's own
    four scalars come before its inner optimizer's variables."""
    if class_name == "LossScaleOptimizer":
        inner = config["inner_optimizer"]
        wrapper = ["wrapper_iterations", "wrapper_learning_rate", "good_steps", "loss_scale"]
        return wrapper + _keras3_layout(inner["class_name"], inner["config"], wrapped=True)
    rate = config.get("learning_rate")
    return [
        "iterations",
        *(["learning_rate"] if isinstance(rate, (int, float)) else []),
        *(["average"] if config.get("use_ema") else []),
        *(["grad_sum"] if config.get("gradient_accumulation_steps") else []),
        *_keras3_slots(class_name, config, wrapped),
    ]


def _layouts(opt: Any) -> dict[str, Layout]:
    """The weight layouts ``opt`` can read, by name: its own flavor's first."""
    if not isinstance(opt, Optimizer) or (opt.flavor, opt.class_name) == ("keras", "AdamW"):
        raise ValueError(
            f"opt must be a kopt Keras optimizer (SGD, RMSprop, Adagrad, Adadelta, Adam, Adamax, Nadam, "
            f"e.g. kopt.Adam() or kopt.tf_keras.Adam()), got {opt!r}"
        )
    if _is_tf_loss_scale(opt):
        # tf_keras keeps the loss scale and its counter out of get_weights(), variables and saved files
        return _layouts(_inner_optimizer(opt))
    if opt.flavor == "keras3":
        inner = opt.config.get("inner_optimizer", {})
        if "MultiOptimizer" in (opt.class_name, inner.get("class_name")):
            raise ValueError(
                "Keras 3's MultiOptimizer optimizer variables are not read or written yet; start from opt.init(params)"
            )
        return {KERAS3_LAYOUT: _keras3_layout(opt.class_name, opt.config)}
    if opt.flavor == "tf_keras.legacy":
        return {LEGACY_LAYOUT: _legacy_layout(opt.class_name, opt.config)}
    if opt.flavor == "tf_keras":
        return {CURRENT_LAYOUT: _current_layout(opt.class_name, opt.config)}
    return {
        KERAS_LAYOUT: _keras_layout(opt.class_name, opt.config),
        LEGACY_LAYOUT: _legacy_layout(opt.class_name, opt.config),
    }


#: tf_keras' loss-scale optimizers: ``LossScaleOptimizer`` (legacy inner), ``LossScaleOptimizerV3`` (TF >= 2.11).
LOSS_SCALE_CLASSES = ("LossScaleOptimizer", "LossScaleOptimizerV3")


def _inner_optimizer(opt: Optimizer) -> Optimizer:
    """The kopt optimizer of a tf_keras loss-scale optimizer's ``inner_optimizer`` config."""
    from kopt.keras_io.configs import deserialize  # configs builds the loss-scale optimizers

    return deserialize(dict(opt.config["inner_optimizer"]))


def _is_tf_loss_scale(opt: Optimizer) -> bool:
    return opt.class_name in LOSS_SCALE_CLASSES and opt.flavor != "keras3"


class _Entry(NamedTuple):
    """What weight ``j`` of a layout holds: a scalar (``leaf`` None) or slot ``name`` of leaf ``leaf``.
    ``factored``: Adafactor's row or column moment, a placeholder for leaves of fewer than 2 dimensions."""

    name: str
    leaf: int | None = None
    negated: bool = False
    placeholder: bool = False
    factored: bool = False


def _names(layout: Layout) -> list[str]:
    """The slot names of ``layout``'s parts, marks kept."""
    return [name for part in layout if part not in _SCALARS for name in (part if isinstance(part, tuple) else (part,))]


def _entries(layout: Layout, held: Sequence[frozenset[str]]) -> list[_Entry]:
    """The weights of ``layout`` for ``len(held)`` param leaves; ``held[k]``: the names of the optional slots
    ("name+", "name~") leaf ``k`` has."""

    def slot(part: str, leaf: int) -> _Entry:
        factored = part.endswith(("*", "+"))
        return _Entry(part.strip(_MARKS), leaf, part.startswith("-"), part.endswith("?"), factored)

    def kept(part: str, leaf: int) -> bool:
        return not part.endswith(("+", "~")) or part.strip(_MARKS) in held[leaf]

    entries = []
    for part in layout:
        if part in _SCALARS:
            entries.append(_Entry(part))
        elif isinstance(part, tuple):
            entries.extend(slot(name, k) for k in range(len(held)) for name in part if kept(name, k))
        else:
            entries.extend(slot(part, k) for k in range(len(held)) if kept(part, k))
    return entries


def _every(layout: Layout, n: int) -> list[frozenset[str]]:
    """``held`` for ``n`` leaves holding every optional slot (the most weights ``layout`` may have)."""
    return [frozenset(name.strip(_MARKS) for name in _names(layout))] * n


def _held(layout: Layout, params: Params, opt: Optimizer) -> list[frozenset[str]]:
    """The optional slots each leaf of ``params`` has: "name+" for 2 or more dimensions, "name~" where
    ``opt.init(params)`` holds the slot (its shapes only: nothing is allocated)."""
    treedef: TreeDef
    leaves, treedef = jax.tree.flatten(params)
    held = [
        {name.strip(_MARKS) for name in _names(layout) if name.endswith("+") and np.ndim(leaf) >= 2} for leaf in leaves
    ]
    present = {name.strip(_MARKS) for name in _names(layout) if name.endswith("~")}
    if present:
        shapes = jax.eval_shape(opt.init, params)
        for name in present:
            for k, value in enumerate(treedef.flatten_up_to(get_slot(shapes, name))):
                if value is not None:
                    held[k].add(name)
    return [frozenset(names) for names in held]


def _describe(layout: Layout, held: Sequence[frozenset[str]]) -> str:
    """E.g. ``7 weights [iterations, m x2, v x2, vhat x2] (vhat: placeholders ...)``."""
    n = len(held)

    def name(part: str) -> str:
        return part.strip(_MARKS) + (" (2+ dims)" if part.endswith("+") else " (if held)" if part.endswith("~") else "")

    parts = [
        part
        if part in _SCALARS
        else f"({', '.join(map(name, part))}) x{n}"
        if isinstance(part, tuple)
        else f"{name(part)} x{n}"
        for part in layout
    ]
    note = " (vhat: placeholders of shape (1,) without amsgrad)" if "vhat?" in layout else ""
    return f"{len(_entries(layout, held))} weights [{', '.join(parts)}]{note}"


def _entries_for(opt: Any, params: Params, count: int) -> list[_Entry]:
    """The entries of ``opt``'s layout with ``count`` weights for ``params``; ``ValueError`` naming them if none."""
    layouts = _layouts(opt)
    n = len(jax.tree.leaves(params))
    helds = {name: _held(layout, params, opt) for name, layout in layouts.items()}
    matching = [name for name, layout in layouts.items() if len(_entries(layout, helds[name])) == count]
    if matching:
        return _entries(layouts[matching[0]], helds[matching[0]])
    hint = ""
    if not count and n:
        hint = " (Keras returns [] before the optimizer's first step: start from opt.init(params) instead)"
    elif (
        len(layouts) == 1
        and not _is_tf_loss_scale(opt)
        and opt.class_name in _KERAS_CLASSES
        and count == len(_entries(_keras_layout(opt.class_name, opt.config), [frozenset()] * n))
    ):
        hint = f" (Keras 2.2.4's layout: read it with kopt.{opt.class_name} instead)"
    expected = " or ".join(f"{_describe(layout, helds[name])} ({name})" for name, layout in layouts.items())
    raise ValueError(f"{opt!r} with {n} parameter arrays expects {expected}, got {count} weights{hint}")


def max_weights_per_leaf(opt: Optimizer) -> int:
    """The most saved weights any layout of ``opt`` holds for one parameter array (its scalars included)."""
    return max(len(_entries(layout, _every(layout, 1))) for layout in _layouts(opt).values())


class WeightSpec(NamedTuple):
    """What saved weight ``j`` must be, known before it is read: ``shape`` and NumPy dtype ``kinds``.

    ``what`` names it (``"iterations"``, ``"m for params[0]"``); ``kinds`` is
    ``"iu"`` for the step counter (an integer) and ``"f"`` for slots and
    Nadam's momentum product (floating).
    """

    what: str
    shape: tuple[int, ...]
    kinds: str


def weight_specs(opt: Optimizer, params: Params, count: int) -> list[WeightSpec]:
    """The shape and dtype kinds of each of ``count`` saved weights of ``opt`` for ``params``.

    What :func:`from_keras_weights` will accept, for readers of untrusted
    files that check each weight before reading it. Raises the same
    ``ValueError`` as :func:`from_keras_weights` when no layout of ``opt``
    has ``count`` weights.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    specs = []
    for entry in _entries_for(opt, params, count):
        if entry.leaf is None:
            specs.append(WeightSpec(entry.name, (), _SCALARS[entry.name]))
            continue
        path, leaf = flat[entry.leaf]
        shape = _held_shape(entry, np.shape(leaf))
        if shape is None:
            specs.append(WeightSpec(f"{entry.name} placeholder", (1,) if entry.placeholder else (), "iuf"))
        else:
            specs.append(WeightSpec(f"{entry.name} for params{jax.tree_util.keystr(path)}", shape, "f"))
    return specs


def _held_shape(entry: _Entry, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape of the slot ``entry`` holds for a param of ``shape``; ``None`` for a placeholder."""
    if entry.placeholder or (entry.factored and len(shape) < 2):
        return None
    if entry.factored:  # Adafactor: row moments drop the last axis, column moments the one before it
        return shape[:-1] if entry.name == "r" else shape[:-2] + shape[-1:]
    return shape


_INT32_MAX = int(np.iinfo(np.int32).max)  # kopt counts steps in int32


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
    loss_scale: float | None = None,
    good_steps: int | None = None,
) -> OptState:
    """The kopt state of ``opt`` for ``params`` holding a Keras optimizer's weights.

    ``weights`` is Keras 2.2.4's or TensorFlow's ``get_weights()`` (or TF >=
    2.11's ``[v.numpy() for v in opt.variables]``), in the layout of ``opt``'s
    class (module docstring); which one is told from the number of weights.
    Its per-leaf arrays are matched to ``jax.tree.leaves(params)`` in order,
    cast to the slot dtypes of ``opt.init(params)`` and placed on their
    shardings. Every step counter (``count``) of the state is set to the
    imported iterations; hyperparameters are ``opt``'s.

    ``iterations`` (Keras 2.2.4's RMSprop, Adagrad, Adadelta only, whose
    weights omit it; default 0) gives the step count. ``m_schedule`` (Nadam,
    when the weights do not hold it): ``"replay"`` (default), ``"reset"`` or a
    number; see the module docstring. TensorFlow's legacy Nadam stores it
    (``momentum_cache``), and it is then restored exactly.

    ``loss_scale`` and ``good_steps`` (tf_keras' ``LossScaleOptimizer`` and
    ``LossScaleOptimizerV3`` only, whose weights are their inner optimizer's:
    ``keras_opt.loss_scale`` and ``keras_opt.dynamic_counter``) give the
    dynamic loss scale and its count of finite steps; by default they restart
    at ``initial_scale`` and 0, as ``tf_keras.models.load_model`` does.

    Raises ``ValueError`` for a wrong number of weights (naming the expected
    layouts), a weight whose shape differs from its parameter's (naming both),
    Adam ``vhat`` entries that do not fit ``amsgrad``, non-numeric or
    non-finite values, complex params (Keras' weights are real), and an
    ``iterations`` that is not a whole number in ``[0, 2**31 - 1]``, a
    ``loss_scale`` that is not a finite number >= 1 or a ``good_steps`` that is
    not a whole number of steps.

    Example:
        >>> state = from_keras_weights(kopt.RMSprop(decay=1e-4), [kernel, bias],
        ...                            keras_opt.get_weights(), iterations=1200)  # doctest: +SKIP
    """
    if not isinstance(weights, (list, tuple)):
        raise ValueError(f"weights must be the list Keras' get_weights() returns, got {type(weights).__name__}")
    _refuse_complex(params, "params")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    shapes = [tuple(np.shape(leaf)) for _, leaf in flat]
    n = len(flat)
    entries = _entries_for(opt, params, len(weights))
    rule = _inner_optimizer(opt) if opt.class_name in LOSS_SCALE_CLASSES else opt  # the config of the update rule

    arrays = []
    for index, weight in enumerate(weights):
        array = np.asarray(weight)
        if array.dtype.kind not in "iuf":
            raise ValueError(f"weights[{index}] must hold real numbers, got dtype {array.dtype}")
        arrays.append(array)

    held = {entry.name: arrays[index] for index, entry in enumerate(entries) if entry.leaf is None}
    if "iterations" in held:
        if iterations is not None:
            raise ValueError(f"these {opt.class_name} weights hold iterations (weights[0]); do not pass iterations=")
        steps = _as_iterations(held["iterations"], "weights[0] (iterations)")
    elif iterations is None:
        steps = 0
        if rule.config.get("decay", 0):
            warnings.warn(
                f"{rule.class_name} weights hold no iterations: the decayed learning rate restarts at step 0. "
                "Pass iterations=K.get_value(keras_optimizer.iterations) to continue the schedule.",
                UserWarning,
                stacklevel=2,
            )
    else:
        steps = _as_iterations(iterations, "iterations")

    per_slot: dict[str, list[Any]] = {}
    for index, (entry, array) in enumerate(zip(entries, arrays, strict=True)):
        if entry.leaf is None:
            if not np.all(np.isfinite(array)):
                raise ValueError(f"weights[{index}] ({entry.name}) holds NaN or Inf")
            continue
        k = entry.leaf
        held_shape = _held_shape(entry, shapes[k])
        want = held_shape or ((1,) if entry.placeholder else ())
        if array.shape != want:
            hint = ""
            if entry.name == "vhat" and not entry.placeholder and array.shape == (1,) != shapes[k]:
                hint = " (a (1,) placeholder: were these weights saved by an Adam with amsgrad=False?)"
            elif entry.placeholder and array.shape == shapes[k]:
                hint = " (a full vhat: were these weights saved by an Adam with amsgrad=True?)"
            what = "placeholder" if entry.placeholder else f"for params{paths[k]}"
            raise ValueError(f"weights[{index}] ({entry.name} {what}) has shape {array.shape}, expected {want}{hint}")
        if entry.factored and held_shape is None:  # kopt holds a 0 where Keras holds its placeholder
            continue
        if entry.placeholder:
            continue
        if not np.all(np.isfinite(array)):
            raise ValueError(f"weights[{index}] ({entry.name} for params{paths[k]}) holds NaN or Inf")
        per_slot.setdefault(entry.name, [None] * n)[k] = -array if entry.negated else array

    every = _accumulation_steps(opt)
    state = set_slot(opt.init(params), "count", np.asarray(steps // every))
    if every > 1:  # Keras 3 counts the calls; kopt counts the steps taken and the calls since the last one
        state = set_slot(state, "micro_step", np.asarray(steps % every))
    for name in {entry.name for entry in entries if entry.factored}:  # kopt's 0 where Keras has no factor
        per_slot[name] = [np.zeros(()) if leaf is None else leaf for leaf in per_slot.get(name, [None] * n)]
    for name, leaves in per_slot.items():  # None: a leaf without this slot ("name~": kopt holds None too)
        state = set_slot(state, name, jax.tree.unflatten(treedef, leaves))
    if _is_tf_loss_scale(opt):
        if loss_scale is not None:
            held["loss_scale"] = _as_loss_scale(loss_scale)
        if good_steps is not None:
            held["good_steps"] = np.asarray(_as_iterations(good_steps, "good_steps"))
    elif loss_scale is not None or good_steps is not None:
        where = "these weights hold them" if "loss_scale" in held else "it is not a tf_keras loss-scale optimizer"
        raise ValueError(f"loss_scale= and good_steps= apply to tf_keras' LossScaleOptimizer only: {where}")
    for name, hyperparam in (("learning_rate", "lr"), ("loss_scale", None), ("good_steps", None)):
        if name not in held:
            continue
        value = held[name]
        if hyperparam:  # the variable is what Keras steps with, as it restores it
            state = set_hyperparams(state, **{hyperparam: value})
        else:
            state = set_slot(state, name, np.asarray(value))

    if rule.class_name == "Nadam":
        if "m_schedule" in held:
            if not (isinstance(m_schedule, str) and m_schedule == "replay"):
                raise ValueError("these Nadam weights hold m_schedule (TensorFlow's momentum_cache); do not pass it")
            schedule_value: np.ndarray | jax.Array = _as_schedule(held["m_schedule"])
        elif isinstance(m_schedule, str):
            if m_schedule not in ("replay", "reset"):
                raise ValueError(f"m_schedule must be 'replay', 'reset' or a number, got {m_schedule!r}")
            schedule_value = _replayed_m_schedule(rule, params, steps) if m_schedule == "replay" else np.asarray(1.0)
        else:
            schedule_value = _as_schedule(m_schedule)
        state = set_slot(state, "m_schedule", np.asarray(schedule_value))
    elif not (isinstance(m_schedule, str) and m_schedule == "replay"):
        raise ValueError(f"m_schedule applies to Nadam only, not {rule.class_name}")

    return state


def _as_loss_scale(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "iuf" or not np.isfinite(array) or array < 1:
        raise ValueError(f"loss_scale must be a finite number >= 1 (tf_keras' floor), got {value!r}")
    return array


def _accumulation_steps(opt: Optimizer) -> int:
    """Keras 3's ``gradient_accumulation_steps`` (1 without): its saved ``iteration`` counts the calls."""
    config = opt.config.get("inner_optimizer", {}).get("config", opt.config) if opt.flavor == "keras3" else {}
    return int(config.get("gradient_accumulation_steps") or 1)


def _as_schedule(value: Any) -> np.ndarray:
    number = float(np.asarray(value))  # TypeError/ValueError for non-numbers, as float() gives
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"m_schedule is a product of momentum factors in [0, 1], got {value!r}")
    return np.asarray(value)


def _refuse_complex(tree: Any, what: str) -> None:
    """Keras keeps real weights only: a complex param (or slot) has no Keras counterpart to go to or come from."""
    found = first_complex(tree)
    if found:
        raise ValueError(
            f"{what}{found[0]} is complex ({found[1]}): Keras optimizer weights "
            "are real, so complex params have no Keras weights (save the state with kopt.save_state instead)"
        )


def to_keras_weights(opt: Optimizer, state: OptState, *, flavor: str | None = None) -> list[np.ndarray]:
    """The list a Keras optimizer of ``opt``'s class takes in ``set_weights``.

    The inverse of :func:`from_keras_weights`. ``flavor`` picks the layout:
    ``"keras"`` (Keras 2.2.4, the default for ``kopt.X``), ``"tf_keras.legacy"``
    (TensorFlow's legacy ``get_weights()``, the default for
    ``kopt.tf_keras.X``; a Keras 2.2.4 optimizer may be written so too) or
    ``"tf_keras"`` (TF >= 2.11's ``variables`` order). ``iterations`` (int64
    scalar; left out of Keras 2.2.4's RMSprop, Adagrad, Adadelta: set it with
    ``K.set_value(opt.iterations, int(kopt.iterations(state)))``), then each
    slot leaf by leaf in ``jax.tree.leaves`` order, as NumPy arrays of the
    state's dtypes. Keras 2.2.4's Adam without amsgrad gets zero ``vhat``
    placeholders of shape (1,). Raises ``ValueError`` if ``state`` was not
    made by an optimizer of ``opt``'s kind, or holds complex slots (Keras'
    weights are real).

    A tf_keras loss-scale optimizer's list is its inner optimizer's; its scale
    and counter (``get_slot(state, "loss_scale")``, ``"good_steps"``) have no
    public setter in tf_keras: they are the variables
    ``keras_opt._loss_scale.current_loss_scale`` and ``.counter``, which a
    ``tf.train.Checkpoint`` of the optimizer saves and restores.

    Example:
        >>> keras_opt.set_weights(to_keras_weights(opt, state))  # doctest: +SKIP
    """
    layouts = _layouts(opt)
    _refuse_complex(state, "state")
    names = {"keras": KERAS_LAYOUT, "tf_keras.legacy": LEGACY_LAYOUT, "tf_keras": CURRENT_LAYOUT}
    names["keras3"] = KERAS3_LAYOUT
    name = next(iter(layouts)) if flavor is None else names.get(flavor)
    if name not in layouts:
        raise ValueError(
            f"flavor {flavor!r} is not a weight layout of {opt!r}; choose from "
            f"{', '.join(repr(key) for key, value in names.items() if value in layouts)}"
        )
    layout = layouts[name]
    # "name~" slots hold None for some leaves: every slot is then flattened with those Nones kept, aligned
    optional = any(slot.endswith("~") for slot in _names(layout))
    flatten = (lambda tree: jax.tree.leaves(tree, is_leaf=lambda x: x is None)) if optional else jax.tree.leaves
    values: dict[str, list[Any]] = {}
    first: list[Any] | None = None
    for part in layout:
        for slot in part if isinstance(part, tuple) else (part,):
            slot = slot.strip(_MARKS)
            if slot in _SCALARS or slot in values:
                continue
            try:
                value = get_slot(state, slot)
            except ValueError as error:
                raise ValueError(f"this state was not made by {opt!r}: {error}") from None
            if slot == "vhat" and (value is None) == bool(opt.config.get("amsgrad")):
                holds = "no vhat" if value is None else "a vhat"
                raise ValueError(f"this state holds {holds}, but {opt!r} has amsgrad={opt.config.get('amsgrad')}")
            values[slot] = [] if value is None else [None if x is None else np.asarray(x) for x in flatten(value)]
            first = values[slot] if first is None and value is not None else first
    leaves = first or []  # none: a layout of scalars only (Keras 3's SGD without momentum)
    # The optional slots of each leaf: "name+" where kopt holds a factor (not its 0), "name~" where not None.
    held = [
        frozenset(
            slot.strip(_MARKS)
            for slot in _names(layout)
            if (slot.endswith("+") and np.ndim(values[slot.strip(_MARKS)][k]) > 0)
            or (slot.endswith("~") and values[slot.strip(_MARKS)][k] is not None)
        )
        for k in range(len(leaves))
    ]
    keras3 = name == KERAS3_LAYOUT
    every = _accumulation_steps(opt)
    steps = int(step_count(state)) * every + (int(get_slot(state, "micro_step")) if every > 1 else 0)
    scalars = {
        "iterations": np.asarray(steps, np.int32 if keras3 else np.int64),
        "wrapper_iterations": np.asarray(0, np.int32),
        "wrapper_learning_rate": np.asarray(0.0, np.float32),
    }
    weights: list[np.ndarray] = []
    for entry in _entries(layout, held):
        if entry.name in scalars:
            weights.append(scalars[entry.name])
        elif entry.name == "learning_rate":
            weights.append(np.asarray(jax.device_get(get_hyperparams(state)["lr"])))
        elif entry.leaf is None:  # m_schedule, loss_scale, good_steps
            weights.append(np.asarray(jax.device_get(get_slot(state, entry.name))))
        elif entry.placeholder:  # Keras 2.2.4's Adam without amsgrad, in the slots' dtype
            weights.append(np.zeros((1,), leaves[entry.leaf].dtype))
        elif entry.factored and values[entry.name][entry.leaf].ndim == 0:  # Keras 3's int32 placeholder
            weights.append(np.zeros((), np.int32))
        else:
            array = values[entry.name][entry.leaf]
            weights.append(-array if entry.negated else array)
    return weights
