"""The bad-input catalogue: what kopt does with each kind of wrong input (README, "Bad inputs").

Every entry either works in a documented way or raises a ``TypeError`` / ``ValueError`` that
names the leaf path or argument and what is allowed, at the earliest point: params are checked
by ``init``, gradients by ``update`` (at trace time under ``jit``), hyperparameters by the
constructor and ``set_hyperparams``.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.matching import SLOTS

NAMES = ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam"]
WRAPPED = {
    "skip_nonfinite": lambda: kopt.skip_nonfinite(kopt.Adam()),
    "accumulate": lambda: kopt.accumulate(kopt.Adam(), every_k=2),
    "lookahead": lambda: kopt.lookahead(kopt.Adam()),
    "ema_params": lambda: kopt.chain(kopt.Adam(), kopt.ema_params(0.9)),
    "masked": lambda: kopt.masked(kopt.Adam(), lambda params: jax.tree.map(lambda _: True, params)),
    "partition": lambda: kopt.partition({"a": kopt.SGD()}, lambda params: jax.tree.map(lambda _: "a", params)),
    "clip_by_global_norm": lambda: kopt.chain(kopt.clip_by_global_norm(1.0)),
    "reduce_on_plateau": lambda: kopt.reduce_on_plateau(),
}
OPTIMIZERS = {name: (lambda name=name: getattr(kopt, name)(clipnorm=1.0)) for name in NAMES} | WRAPPED


def params_with(bad) -> dict:
    return {"dense": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "layers": [jnp.ones(2), bad]}


# --------------------------------------------------------------------------- params: init refuses them

BAD_PARAM_LEAVES = [
    ("int32", jnp.arange(3), r"has dtype int32.*an integer param cannot take a fractional step"),
    ("int8_numpy", np.arange(3, dtype=np.int8), r"has dtype int8.*integer param"),
    ("uint8", jnp.ones(2, jnp.uint8), r"has dtype uint8.*integer param"),
    ("python_int", 3, r"is of type int.*integer param"),
    ("bool", jnp.array([True, False]), r"has dtype bool.*a boolean param cannot take a fractional step"),
    ("python_bool", True, r"is of type bool.*boolean param"),
    ("string", "weights", r"is of type str.*convert it to a float array"),
    ("numpy_strings", np.array(["a", "b"]), r"has dtype <U1"),
    ("object", object(), r"is of type object"),
    ("numpy_objects", np.array([object()]), r"has dtype object"),
    ("function", jax.nn.relu, r"is of type"),
]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("label,bad,message", BAD_PARAM_LEAVES, ids=[case[0] for case in BAD_PARAM_LEAVES])
def test_init_refuses_a_param_leaf_that_is_not_a_real_float_array(name, label, bad, message):
    with pytest.raises(TypeError, match=r"params\['layers'\]\[1\] " + message) as error:
        OPTIMIZERS[name]().init(params_with(bad))
    assert "floating-point arrays (float32, float64, bfloat16, float16, complex64, complex128)" in str(error.value)
    assert "leave it out of the optimizer's params" in str(error.value)


def test_the_check_also_runs_under_jit_and_eval_shape():
    with pytest.raises(TypeError, match=r"params\['layers'\]\[1\] has dtype int32"):
        jax.jit(kopt.Adam().init)(params_with(jnp.arange(3)))
    with pytest.raises(TypeError, match=r"params\['layers'\]\[1\] has dtype bool"):
        jax.eval_shape(kopt.Adam().init, params_with(jnp.ones(2, bool)))


def test_a_non_float_leaf_left_out_as_none_is_fine():
    # The way out the message names (Equinox's eqx.filter(model, eqx.is_inexact_array) does this).
    params = params_with(None)
    opt = kopt.Adam()
    updates, _ = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)
    assert updates["layers"][1] is None
    assert kopt.apply_updates(params, updates)["layers"][1] is None


# --------------------------------------------------------------------------- gradients: update refuses or casts

BAD_GRADIENT_LEAVES = [
    ("bool", jnp.array([True, False]), r"has dtype bool"),
    ("float0", np.zeros(2, jax.dtypes.float0), r"has dtype \[\('float0', 'V'\)\]"),
    ("string", "grad", r"is of type str"),
    ("object", object(), r"is of type object"),
]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("label,bad,message", BAD_GRADIENT_LEAVES, ids=[case[0] for case in BAD_GRADIENT_LEAVES])
def test_update_refuses_a_gradient_leaf_that_is_not_a_real_number_array(name, label, bad, message):
    params = params_with(jnp.ones(2))
    opt = OPTIMIZERS[name]()
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"updates\['layers'\]\[1\]") as error:
        opt.update(params_with(bad), state, params, value=1.0)
    ours = re.search(message + r", but gradients must be floating-point or complex arrays", str(error.value))
    if hasattr(bad, "dtype"):
        assert ours
    else:
        # A chain's self-compiling update is a jax.jit, whose argument check stops a non-array
        # first; its message names the path and the type as well.
        assert ours or f"of type {type(bad)} and was passed to the function at path" in str(error.value)


def _step(opt, params, grads):
    updates, state = opt.update(grads, opt.init(params), params)
    return kopt.apply_updates(params, updates), state


def _assert_same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bfloat16, jnp.float16])
def test_integer_and_low_precision_gradients_are_cast_to_the_float32_math(dtype):
    params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.float32)}
    grads = {"w": jnp.asarray([3, -1, 0, 2, -4, 1], dtype)}
    as_float32 = {"w": grads["w"].astype(jnp.float32)}
    opt = kopt.Adam()
    updates, state = opt.update(grads, opt.init(params), params)
    float32_updates, float32_state = opt.update(as_float32, opt.init(params), params)
    _assert_same_bits(state, float32_state)  # the math and the state are float32's
    # The update comes back in the gradient's floating dtype (optax's contract), rounded once; integers: float32.
    expected = float32_updates if dtype == jnp.int32 else jax.tree.map(lambda u: u.astype(dtype), float32_updates)
    _assert_same_bits(updates, expected)


def test_float64_numpy_gradients_are_float32_unless_x64_is_on():
    params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.float32)}
    grads = {"w": np.linspace(0.5, -2.0, 6)}  # float64 NumPy: JAX takes it as float32
    _assert_same_bits(_step(kopt.Adam(), params, grads), _step(kopt.Adam(), params, {"w": jnp.asarray(grads["w"])}))


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def test_float64_gradients_for_float32_params_keep_the_state_and_params_float32(x64):
    params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.float32)}
    grads = {"w": jnp.linspace(0.5, -2.0, 6, dtype=jnp.float64)}
    opt = kopt.Adam(lr=0.1)
    state = opt.init(params)
    updates, new_state = opt.update(grads, state, params)
    assert updates["w"].dtype == jnp.float64  # that leaf's math ran in float64
    assert jax.tree.map(jnp.result_type, new_state) == jax.tree.map(jnp.result_type, state)  # jit/scan-safe
    new_params = kopt.apply_updates(params, updates)
    assert new_params["w"].dtype == jnp.float32  # rounded once to the param's dtype
    float32_run, _ = _step(opt, params, jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    np.testing.assert_allclose(new_params["w"], float32_run["w"], rtol=1e-6)


# --------------------------------------------------------------------------- structure and shape

STRUCTURES = [
    ("other_key", {"w": jnp.ones(2), "c": jnp.ones(3)}),
    ("missing_leaf", {"w": jnp.ones(2)}),
    ("extra_leaf", {"w": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)}),
    ("none_for_array", {"w": jnp.ones(2), "b": None}),
    ("list_for_dict", [jnp.ones(2), jnp.ones(3)]),
    ("nested_deeper", {"w": {"x": jnp.ones(2)}, "b": jnp.ones(3)}),
]


STATELESS = ("clip_by_global_norm", "reduce_on_plateau")  # no per-leaf state: any structure is fine


@pytest.mark.parametrize("name", sorted(set(OPTIMIZERS) - set(STATELESS)))
@pytest.mark.parametrize("label,grads", STRUCTURES, ids=[case[0] for case in STRUCTURES])
def test_gradients_with_another_structure_name_both_structures(name, label, grads):
    opt = OPTIMIZERS[name]()
    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"structure|do not match") as error:
        opt.update(grads, state, params, value=1.0)
    assert "PyTreeDef" in str(error.value)


@pytest.mark.parametrize("name", STATELESS)
def test_transforms_without_per_leaf_state_take_any_structure(name):
    opt = OPTIMIZERS[name]()
    state = opt.init({"w": jnp.ones(2), "b": jnp.ones(3)})
    updates, _ = opt.update([jnp.ones(4)], state, value=1.0)
    assert jax.tree.structure(updates) == jax.tree.structure([0])


def test_structure_errors_surface_at_trace_time_under_jit_too():
    opt = kopt.Adam()
    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"updates has structure PyTreeDef\(\[\*, \*\]\).*built for"):
        jax.jit(opt.update)([jnp.ones(2), jnp.ones(3)], state, params)
    with pytest.raises(ValueError, match=r"updates\['b'\] has shape \(2,\).*has shape \(3,\)"):
        jax.jit(opt.update)({"w": jnp.ones(2), "b": jnp.ones(2)}, state, params)


# --------------------------------------------------------------------------- NaN and Inf without a guard


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_a_non_finite_gradient_element_poisons_only_that_element(name, bad):
    """No guard: that element of the params (and of every slot) becomes NaN or +-Inf; nothing else moves."""
    opt = getattr(kopt, name)(lr=0.1)
    params = {"w": jnp.linspace(-1, 1, 4), "b": jnp.ones(2)}
    clean = {"w": jnp.asarray([0.5, -0.25, 1.0, 2.0]), "b": jnp.asarray([1.0, -1.0])}
    poisoned = {"w": clean["w"].at[2].set(bad), "b": clean["b"]}
    with jax.disable_jit():
        expected, expected_state = _step(opt, params, clean)
        got, state = _step(opt, params, poisoned)
    assert not np.isfinite(got["w"][2])
    keep = np.array([True, True, False, True])
    np.testing.assert_array_equal(got["w"][keep], expected["w"][keep])
    np.testing.assert_array_equal(got["b"], expected["b"])
    for slot in SLOTS[name]:
        got_w, clean_w = kopt.get_slot(state, slot)["w"], kopt.get_slot(expected_state, slot)["w"]
        assert not np.isfinite(got_w[2])
        np.testing.assert_array_equal(got_w[keep], clean_w[keep])
        np.testing.assert_array_equal(kopt.get_slot(state, slot)["b"], kopt.get_slot(expected_state, slot)["b"])


def test_with_clipnorm_nan_skips_the_clip_and_inf_zeroes_every_other_gradient():
    opt = kopt.SGD(lr=1.0, clipnorm=1.0)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    big = {"w": jnp.asarray([3.0, 4.0, 0.0]), "b": jnp.asarray([0.0, 0.0])}  # norm 5: clipped to 1
    nan_step, _ = _step(opt, params, {"w": big["w"].at[2].set(math.nan), "b": big["b"]})
    # NaN >= clipnorm is False (as in Keras): this step is not clipped at all.
    np.testing.assert_array_equal(nan_step["w"][:2], [-3.0, -4.0])
    inf_step, _ = _step(opt, params, {"w": big["w"].at[2].set(math.inf), "b": jnp.ones(2)})
    # The global norm is Inf: every other element is scaled by 1/Inf = 0, the Inf one gives 0 * Inf = NaN.
    assert np.isnan(inf_step["w"][2])
    np.testing.assert_array_equal(np.abs(inf_step["w"][:2]), [0.0, 0.0])
    np.testing.assert_array_equal(np.abs(inf_step["b"]), [0.0, 0.0])


def test_skip_nonfinite_is_the_guard():
    opt = kopt.skip_nonfinite(kopt.Adam(lr=0.1))
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    updates, state = opt.update({"w": jnp.asarray([1.0, math.nan, 1.0])}, state, params)
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0, 0.0])
    assert int(kopt.get_slot(state, "skipped")) == 1


# --------------------------------------------------------------------------- empty trees

EMPTY = [("dict", {}), ("list", []), ("tuple", ()), ("none", None), ("only_none_leaves", {"a": None, "b": [None]})]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("label,empty", EMPTY, ids=[case[0] for case in EMPTY])
def test_empty_trees_work_and_still_count_steps(name, label, empty):
    opt = OPTIMIZERS[name]()
    if empty is None and name in ("AdamW", "lookahead", "ema_params", "masked", "partition"):
        # A whole-tree None cannot be told apart from "no params given".
        with pytest.raises(ValueError, match=r"needs (the )?params"):
            opt.update(empty, opt.init(empty), empty)
        return
    state = opt.init(empty)
    with jax.disable_jit():  # nothing to compile: op by op is quicker
        updates, state = opt.update(empty, state, empty, value=1.0)
    assert jax.tree.structure(updates) == jax.tree.structure(empty)
    assert kopt.apply_updates(empty, updates) == empty
    if name in NAMES:
        assert int(kopt.iterations(state)) == 1


# --------------------------------------------------------------------------- Python numbers as leaves


@pytest.mark.parametrize("name,compiled", [(name, False) for name in NAMES] + [("Adam", True), ("AdamW", True)])
def test_python_float_leaves_work_like_float32_scalars(name, compiled):
    opt = getattr(kopt, name)(clipnorm=1.0)
    floats = ({"w": 0.5, "v": [1.5, -2.0]}, {"w": 0.25, "v": [1.0, -3.0]})
    arrays = jax.tree.map(jnp.float32, floats)
    with jax.disable_jit(not compiled):
        as_floats, as_arrays = _step(opt, *floats), _step(opt, *arrays)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(as_floats[0]))
    _assert_same_bits(as_floats[0], as_arrays[0])


# --------------------------------------------------------------------------- hyperparameters

WRONG_HYPERPARAMETERS = [
    # (argument, value, pattern)
    ("lr", "0.01", r"lr must be a real number, got '0.01' of type str"),
    ("lr", [0.01], r"lr must be a real number, got \[0.01\] of type list"),
    ("lr", np.full(1, 0.01), r"lr must be a scalar, got an array of shape \(1,\)"),
    ("lr", jnp.full((2, 2), 0.01), r"lr must be a scalar, got an array of shape \(2, 2\)"),
    ("lr", np.array("0.01"), r"lr must be a real number"),
    ("lr", True, r"lr must be a real number"),
    ("lr", 0.01 + 0j, r"lr must be a real number"),
    ("lr", math.nan, r"lr must be finite"),
    ("lr", -0.01, r"lr must be >= 0, got -0.01"),
    ("learning_rate", "fast", r"lr must be a real number"),
    ("decay", None, r"decay must be a real number, got None"),
    ("decay", {"rate": 0.1}, r"decay must be a real number"),
    ("clipnorm", "1.0", r"clipnorm must be a real number"),
    ("clipvalue", np.ones(3), r"clipvalue must be a scalar"),
    ("state_dtype", "int8", r"state_dtype must be None or a floating dtype"),
    ("state_dtype", "float31", r"state_dtype must be None or a floating dtype"),
]
PER_OPTIMIZER = {
    "SGD": [("momentum", "0.9"), ("momentum", np.ones(2)), ("nesterov", "yes"), ("nesterov", 1)],
    "RMSprop": [("rho", "0.9"), ("rho", np.ones(2)), ("epsilon", "tiny")],
    "Adagrad": [("epsilon", [1e-7]), ("epsilon", np.ones(2))],
    "Adadelta": [("rho", None), ("epsilon", "tiny")],
    "Adam": [("beta_1", "0.9"), ("beta_2", np.ones((1, 1))), ("amsgrad", "True"), ("amsgrad", None)],
    "AdamW": [("weight_decay", "0.01"), ("weight_decay", np.ones(2))],
    "Adamax": [("beta_1", None), ("beta_2", [0.999])],
    "Nadam": [("schedule_decay", "0.004"), ("schedule_decay", np.ones(2))],
}
CONSTRUCTOR_CASES = [
    (name, argument, value, pattern)
    for name in NAMES
    for argument, value, pattern in WRONG_HYPERPARAMETERS
    if not (name == "Nadam" and argument == "decay")  # Nadam has no decay (a TypeError, as in Keras 2)
] + [
    (name, argument, value, rf"{argument} must be")
    for name, cases in PER_OPTIMIZER.items()
    for argument, value in cases
]


@pytest.mark.parametrize(
    "name,argument,value,pattern",
    CONSTRUCTOR_CASES,
    ids=[
        f"{name}-{argument}-{type(value).__name__}-{index}"
        for index, (name, argument, value, _) in enumerate(CONSTRUCTOR_CASES)
    ],
)
def test_constructor_refuses_a_wrong_hyperparameter_naming_it(name, argument, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        getattr(kopt, name)(**{argument: value})


@pytest.mark.parametrize(
    "value,pattern",
    [
        ("0.1", r"lr must be a real number"),
        (np.full(2, 0.1), r"lr must be a scalar, got an array of shape \(2,\)"),
        (jnp.full(1, 0.1), r"lr must be a scalar, got an array of shape \(1,\)"),
        (None, r"lr must be a real number"),
        (-1.0, r"lr must be >= 0"),
        (math.inf, r"lr must be finite"),
    ],
)
def test_set_hyperparams_refuses_a_wrong_value_naming_it(value, pattern):
    state = kopt.Adam().init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=pattern):
        kopt.set_hyperparams(state, lr=value)


def test_set_hyperparams_refuses_an_unknown_or_read_only_name():
    state = kopt.Adam().init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"no hyperparameter named 'momentum'.*available: \['beta_1'"):
        kopt.set_hyperparams(state, momentum=0.9)
    with pytest.raises(ValueError, match=r"current_lr cannot be set"):
        kopt.set_hyperparams(state, current_lr=0.1)


# --------------------------------------------------------------------------- unknown keyword arguments


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("keyword", ["beta1", "learningrate", "foo"])
def test_unknown_keyword_is_a_type_error_naming_it(name, keyword):
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{keyword}'"):
        getattr(kopt, name)(**{keyword: 0.5})


@pytest.mark.parametrize(
    "constructor", [kopt.scale_by_adam, kopt.trace, kopt.clip_by_global_norm, kopt.skip_nonfinite, kopt.cosine_decay]
)
def test_unknown_keyword_to_a_transform_or_schedule_is_a_type_error(constructor):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'bogus'"):
        constructor(bogus=1)


def test_keras_only_spellings_are_refused_as_in_keras_and_config_keys_list_what_is_allowed():
    with pytest.raises(TypeError, match="decay"):
        kopt.Nadam(decay=0.01)  # Keras 2's Nadam has no decay either
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) 'beta1' for Adam; allowed: lr, beta_1"):
        kopt.get({"class_name": "Adam", "config": {"beta1": 0.9}})
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) 'foo' for SGD; allowed: lr, momentum"):
        kopt.deserialize({"class_name": "SGD", "config": {"foo": 1}})


@pytest.mark.parametrize(
    "opt, other, kept",
    [
        (kopt.SGD(), kopt.Adam(), "ScaleByLearningRateState"),
        (kopt.Adam(), kopt.RMSprop(), "ScaleByAdamState"),
        (kopt.RMSprop(), kopt.Adagrad(), "ScaleByRmsState"),
        (kopt.skip_nonfinite(kopt.Adam()), kopt.Adam(), "SkipNonfiniteState"),
    ],
)
def test_another_optimizers_state_names_both_state_types(opt, other, kept):
    params = {"w": jnp.ones(2)}
    state = other.init(params)
    got = type(state).__name__ if kept == "SkipNonfiniteState" else type(state[0]).__name__
    with pytest.raises(ValueError, match=rf"keeps a {kept}, but update got a {got}: pass the state returned"):
        opt.update(params, state, params)
