"""Property tests (hypothesis) on random pytrees and random hyperparameters.

* Every optimizer matches the NumPy reference (``tests/reference.py``) in float32 on random
  pytrees -- nested dicts, lists and tuples with ``None`` leaves, 0-d arrays, Python floats and
  zero-size arrays -- with random valid hyperparameters (clipping included), params and slots.
* Random invalid hyperparameters always raise ``ValueError``, at construction and in
  ``set_hyperparams``.
* ``save_state`` / ``load_state`` round trips are exact, bit for bit, for random optimizer
  states and for random trees of arbitrary bit patterns.

Every example has a tree structure of its own, so the optimizers run op by op here
(``jax.disable_jit()``): the self-compiling eager ``update`` would compile once per structure,
about twice as slow in total. That the compiled paths give the same bits as each other (and
what op-by-op changes) is ``test_determinism.py``'s subject.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kopt
from tests import reference
from tests.matching import SLOTS

RTOL, ATOL = 2e-5, 2e-6
STEPS = 3
NAMES = ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam"]
QUICK = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- random pytrees


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A placeholder leaf of a tree skeleton: an array of ``shape``, or a Python float."""

    shape: tuple[int, ...] = ()
    python_float: bool = False


# Few distinct shapes (op-by-op dispatch compiles each primitive once per shape), 0-d and zero-size
# ones included.
SHAPES = [(), (3,), (2, 3), (0,), (2, 0)]
LEAVES = st.one_of(st.sampled_from(SHAPES).map(Leaf), st.just(Leaf(python_float=True)), st.none())
SKELETONS = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from("abcd"), children, max_size=3),
    ),
    max_leaves=6,
).filter(lambda skeleton: skeleton is not None)  # `params=None` means "no params" to update (AdamW)


def materialize(skeleton, rng: np.random.Generator, scale: float = 1.0, dtypes=(jnp.float32,)):
    """``skeleton`` with every :class:`Leaf` replaced by normal random numbers (``None`` stays)."""

    def make(leaf: Leaf):
        if leaf.python_float:
            return float(scale * rng.normal())
        dtype = dtypes[rng.integers(len(dtypes))]
        return jnp.asarray(scale * rng.normal(size=leaf.shape), dtype)

    return jax.tree.map(make, skeleton, is_leaf=lambda x: isinstance(x, Leaf))


# --------------------------------------------------------------------------- hyperparameters


def _floats(low: float, high: float):
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


LR = _floats(1e-4, 1.0)
DECAY = _floats(0.0, 1.0)
EPSILON = st.one_of(st.none(), _floats(1e-8, 1e-2))
BETA_1 = _floats(0.0, 0.999)
BETA_2 = _floats(0.0, 0.9999)
CLIPPING = {
    "clipnorm": st.one_of(st.none(), st.just(0.0), _floats(0.1, 10.0)),
    "clipvalue": st.one_of(st.none(), st.just(0.0), _floats(0.05, 2.0)),
}
VALID = {
    "SGD": {"lr": LR, "momentum": _floats(0.0, 0.99), "decay": DECAY, "nesterov": st.booleans()},
    "RMSprop": {"lr": LR, "rho": _floats(0.0, 0.999), "epsilon": EPSILON, "decay": DECAY},
    "Adagrad": {"lr": LR, "epsilon": EPSILON, "decay": DECAY},
    "Adadelta": {"lr": _floats(1e-3, 2.0), "rho": _floats(0.0, 0.9999), "epsilon": EPSILON, "decay": DECAY},
    "Adam": {
        "lr": LR,
        "beta_1": BETA_1,
        "beta_2": BETA_2,
        "epsilon": EPSILON,
        "decay": DECAY,
        "amsgrad": st.booleans(),
    },
    "Adamax": {"lr": LR, "beta_1": BETA_1, "beta_2": BETA_2, "epsilon": EPSILON, "decay": DECAY},
    "Nadam": {"lr": LR, "beta_1": BETA_1, "beta_2": BETA_2, "epsilon": EPSILON, "schedule_decay": _floats(0.0, 0.1)},
}
VALID["AdamW"] = {**VALID["Adam"], "weight_decay": _floats(0.0, 0.1)}


def configs(name: str):
    """Random valid keyword arguments of optimizer ``name`` (each one may be left at its default)."""
    return st.fixed_dictionaries({}, optional={**VALID[name], **CLIPPING})


# --------------------------------------------------------------------------- kopt == reference


@pytest.mark.parametrize("name", NAMES)
@QUICK
@given(
    skeleton=SKELETONS,
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    data=st.data(),
)
def test_random_trees_and_hyperparameters_match_the_reference(name, skeleton, seed, scale, data):
    config = data.draw(configs(name), label="config")
    rng = np.random.default_rng(seed)
    opt, ref = getattr(kopt, name)(**config), reference.make(name, dtype=np.float32, **config)
    params = materialize(skeleton, rng)
    treedef = jax.tree.structure(params)
    ref_params = [np.asarray(p, np.float32) for p in jax.tree.leaves(params)]
    with jax.disable_jit():
        state = opt.init(params)
        for _ in range(STEPS):
            grads = materialize(skeleton, rng, scale)
            updates, state = opt.update(grads, state, params)
            params = kopt.apply_updates(params, updates)
            ref_params = ref.step(ref_params, [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)])
    assert jax.tree.structure(params) == treedef  # None leaves stay None, containers keep their types
    for got, want in zip(jax.tree.leaves(params), ref_params, strict=True):
        assert jnp.result_type(got) == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    assert int(kopt.iterations(state)) == ref.iterations == STEPS
    for slot in SLOTS[name]:
        got, want = jax.tree.leaves(kopt.get_slot(state, slot)), ref.slots()[slot]
        # Slots can be tiny (v ~ g**2): the tolerance is relative to the slot's magnitude.
        magnitude = max((float(np.max(np.abs(w), initial=0.0)) for w in want), default=0.0)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=RTOL, atol=RTOL * magnitude, err_msg=slot)


# --------------------------------------------------------------------------- invalid hyperparameters

NON_NEGATIVE = ("lr", "decay", "momentum", "epsilon", "schedule_decay", "weight_decay")
UNIT_INTERVAL = ("rho", "beta_1", "beta_2")  # [0, 1)
OPTIONAL = ("lr", "epsilon", "clipnorm", "clipvalue")  # None means the default / off
FLAGS = ("nesterov", "amsgrad")
NOT_A_NUMBER = st.one_of(
    st.text(max_size=4),
    st.booleans(),
    st.lists(_floats(0.0, 1.0), max_size=2),
    st.lists(st.integers(1, 3), min_size=1, max_size=2).map(lambda shape: np.full(shape, 0.5)),
    st.complex_numbers(allow_nan=False, allow_infinity=False, max_magnitude=1.0),
    st.sampled_from([math.nan, math.inf, -math.inf, np.array("0.5"), object(), {"lr": 0.1}]),
)
NEGATIVE = st.floats(max_value=-1e-300, allow_nan=False)


def invalid_values(argument: str):
    """Values ``argument`` must refuse: wrong types, non-finite numbers, numbers out of its range."""
    if argument in FLAGS:
        return st.one_of(st.integers(0, 1), st.none(), st.text(max_size=4), st.just(np.array([True])))
    if argument == "state_dtype":
        return st.sampled_from(["int32", "bool", "complex64", "uint8", "not a dtype", 3, object()])
    wrong = NOT_A_NUMBER if argument in OPTIONAL else st.one_of(NOT_A_NUMBER, st.none())
    if argument in UNIT_INTERVAL:
        return st.one_of(wrong, NEGATIVE, st.floats(min_value=1.0, allow_nan=False))
    return st.one_of(wrong, NEGATIVE)  # NON_NEGATIVE and the clipping options


def arguments(name: str) -> list[str]:
    return [*VALID[name], *CLIPPING, "state_dtype"]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_invalid_hyperparameters_raise_value_error(data):
    name = data.draw(st.sampled_from(NAMES), label="optimizer")
    config = data.draw(configs(name), label="valid part")
    argument = data.draw(st.sampled_from(arguments(name)), label="argument")
    value = data.draw(invalid_values(argument), label="invalid value")
    if argument == "lr" and data.draw(st.booleans(), label="spelled learning_rate"):
        config.pop("lr", None)
        argument = "learning_rate"
    with pytest.raises(ValueError, match=r"must be|state_dtype|lr or as learning_rate"):
        getattr(kopt, name)(**{**config, argument: value})


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_invalid_values_for_set_hyperparams_raise_value_error(data):
    name = data.draw(st.sampled_from(NAMES), label="optimizer")
    state = getattr(kopt, name)(clipnorm=1.0, clipvalue=1.0).init({"w": jnp.zeros(2)})
    held = sorted(set(kopt.get_hyperparams(state)) - {"current_lr"})
    argument = data.draw(st.sampled_from(held), label="hyperparameter")
    checked_as = {"max_norm": "clipnorm", "max_delta": "clipvalue"}.get(argument, argument)
    value = data.draw(invalid_values(checked_as), label="invalid value")
    if checked_as in ("clipnorm", "clipvalue") and value is None:
        return  # `None` means "off" to the constructor only; in the state the threshold is a number
    with pytest.raises(ValueError, match="must be"):
        kopt.set_hyperparams(state, **{argument: value})


# --------------------------------------------------------------------------- checkpoints


def _assert_bitwise_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert (g.dtype, g.shape) == (w.dtype, w.shape)
        assert g.tobytes() == w.tobytes()


@QUICK
@given(
    skeleton=SKELETONS,
    name=st.sampled_from(NAMES),
    steps=st.integers(0, 2),
    seed=st.integers(0, 2**32 - 1),
    wrap=st.sampled_from([None, "skip_nonfinite", "accumulate", "lookahead"]),
)
def test_save_load_round_trip_of_random_optimizer_states_is_exact(skeleton, name, steps, seed, wrap):
    rng = np.random.default_rng(seed)
    opt = getattr(kopt, name)(clipnorm=1.0)
    opt = {
        None: opt,
        "skip_nonfinite": kopt.skip_nonfinite(opt),
        "accumulate": kopt.accumulate(opt, every_k=2),
        "lookahead": kopt.lookahead(opt, sync_period=2),
    }[wrap]
    params = materialize(skeleton, rng, dtypes=(jnp.float32, jnp.bfloat16, jnp.float16))
    with jax.disable_jit():
        state = opt.init(params)
        for _ in range(steps):
            updates, state = opt.update(materialize(skeleton, rng, 10.0), state, params)
            params = kopt.apply_updates(params, updates)
    tree = {"params": params, "opt_state": state}
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder, "ckpt")
        kopt.save_state(path, tree)
        like = {"params": params, "opt_state": opt.init(params)}
        _assert_bitwise_equal(kopt.load_state(path, like=like), tree)


BIT_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int8, np.uint32, np.bool_, np.complex64]


@QUICK
@given(skeleton=SKELETONS, seed=st.integers(0, 2**32 - 1))
def test_save_load_round_trip_of_random_bit_patterns_is_exact(skeleton, seed):
    """Any bits (NaN payloads, infinities, subnormals, -0.0) in any of several dtypes come back."""
    rng = np.random.default_rng(seed)

    def make(leaf: Leaf):
        dtype = np.dtype(BIT_DTYPES[rng.integers(len(BIT_DTYPES))])
        raw = rng.integers(0, 256, size=(*leaf.shape, dtype.itemsize), dtype=np.uint8)
        values = raw.view(dtype).reshape(leaf.shape) if dtype != np.bool_ else raw[..., 0] % 2 == 1
        return values if rng.integers(2) else jnp.asarray(values)  # NumPy and JAX leaves

    tree = jax.tree.map(make, skeleton, is_leaf=lambda x: isinstance(x, Leaf))
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder, "ckpt")
        kopt.save_state(path, tree)
        _assert_bitwise_equal(kopt.load_state(path, like=tree), tree)
