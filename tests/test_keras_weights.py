"""kopt.keras_io.weights: Keras 2 get_weights() lists in and out, checked against the spec's layouts and the reference.

The Keras lists here are assembled by hand from the NumPy reference
(``tests/reference.py``) following the spec's §2-§8 layouts, independently of
the module under test.
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt.keras_io.weights import from_keras_weights, to_keras_weights
from tests import reference
from tests.matching import SLOTS

SHAPES = [(3, 2), (2,), ()]  # Keras order: kernel, bias, a scalar
N = len(SHAPES)
RTOL, ATOL = 2e-5, 2e-6


def make_params(dtype=jnp.float32) -> list:
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.normal(size=shape), dtype) for shape in SHAPES]


def grads_at(step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]


def keras_list(name: str, ref, amsgrad: bool = False) -> list[np.ndarray]:
    """What Keras' get_weights() returns for the reference's state (spec §2-§8)."""
    slots = ref.slots()
    iterations = [np.asarray(ref.iterations, np.int64)]
    if name == "SGD":
        return iterations + slots["velocity"]
    if name in ("RMSprop", "Adagrad"):
        return slots["accumulator"]
    if name == "Adadelta":
        return slots["accumulator"] + slots["delta_accumulator"]
    if name == "Adam":
        vhat = slots["vhat"] if amsgrad else [np.zeros((1,), np.float32)] * N
        return iterations + slots["m"] + slots["v"] + vhat
    if name == "Adamax":
        return iterations + slots["m"] + slots["u"]
    assert name == "Nadam"
    return iterations + slots["m"] + slots["v"]


WITHOUT_ITERATIONS = ("RMSprop", "Adagrad", "Adadelta")

CASES = [
    ("sgd", "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "decay": 0.1}),
    ("rmsprop", "RMSprop", {"lr": 0.01, "decay": 0.1, "clipnorm": 2.0}),
    ("adagrad", "Adagrad", {"lr": 0.1, "decay": 0.05}),
    ("adadelta", "Adadelta", {"decay": 0.1}),
    ("adam", "Adam", {"lr": 0.01, "decay": 0.1}),
    ("adam_amsgrad", "Adam", {"lr": 0.01, "amsgrad": True, "clipvalue": 1.0}),
    ("adamax", "Adamax", {"lr": 0.01, "decay": 0.1}),
    ("nadam", "Nadam", {"lr": 0.01, "clipnorm": 3.0}),
]
CASE_IDS = [case[0] for case in CASES]

_STEPS: dict[str, object] = {}


def step_of(case_id: str, opt):
    """One jitted train step per case, shared by all tests."""
    if case_id not in _STEPS:

        @jax.jit
        def step(params, state, grads):
            updates, state = opt.update(grads, state, params)
            return kopt.apply_updates(params, updates), state

        _STEPS[case_id] = step
    return _STEPS[case_id]


def counts(state) -> list[int]:
    """Every ``count`` field of the state."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return [int(leaf) for path, leaf in flat if jax.tree_util.keystr(path).endswith(".count")]


def run_reference(name, config, steps):
    ref = reference.make(name, dtype=np.float32, **config)
    params = [np.asarray(p) for p in make_params()]
    for i in range(steps):
        params = ref.step(params, grads_at(i))
    return ref, params


def assert_close_to_reference(state, params, ref, ref_params, name):
    chex.assert_trees_all_close(params, [jnp.asarray(p) for p in ref_params], rtol=RTOL, atol=ATOL)
    for slot in SLOTS[name] + (("vhat",) if "vhat" in ref.slots() else ()):
        expected = ref.slots()[slot]
        magnitude = max(float(np.max(np.abs(x), initial=0.0)) for x in expected)
        chex.assert_trees_all_close(kopt.get_slot(state, slot), expected, rtol=RTOL, atol=RTOL * magnitude)


# --------------------------------------------------------------------------- resuming from Keras weights


@pytest.mark.parametrize("case_id,name,config", CASES, ids=CASE_IDS)
def test_resume_from_imported_weights_continues_like_the_reference(case_id, name, config):
    ref, ref_params = run_reference(name, config, 5)
    opt = getattr(kopt, name)(**config)
    weights = keras_list(name, ref, amsgrad=config.get("amsgrad", False))
    extra = {"iterations": ref.iterations} if name in WITHOUT_ITERATIONS else {}
    params = [jnp.asarray(p) for p in ref_params]
    state = from_keras_weights(opt, params, weights, **extra)
    assert counts(state) and set(counts(state)) == {5}
    if name == "Nadam":  # replayed: the product the reference holds
        np.testing.assert_allclose(kopt.get_slot(state, "m_schedule"), ref.m_schedule, rtol=RTOL)
    step = step_of(case_id, opt)
    for i in range(5, 10):
        params, state = step(params, state, [jnp.asarray(g) for g in grads_at(i)])
        ref_params = ref.step(ref_params, grads_at(i))
    assert_close_to_reference(state, params, ref, ref_params, name)
    assert int(kopt.iterations(state)) == ref.iterations == 10


@pytest.mark.parametrize("mode", ["number", "reset"])
def test_nadam_m_schedule_given_or_reset_continues_like_the_reference(mode):
    config = {"lr": 0.01, "clipnorm": 3.0}
    ref, ref_params = run_reference("Nadam", config, 5)
    opt = kopt.Nadam(**config)
    weights = keras_list("Nadam", ref)
    if mode == "number":
        m_schedule = float(ref.m_schedule)  # what K.get_value(opt.m_schedule) would give
    else:
        m_schedule = "reset"
        ref.m_schedule = np.float32(1.0)  # Keras' set_weights into a fresh Nadam: the product restarts
    params = [jnp.asarray(p) for p in ref_params]
    state = from_keras_weights(opt, params, weights, m_schedule=m_schedule)
    step = step_of("nadam", opt)
    for i in range(5, 10):
        params, state = step(params, state, [jnp.asarray(g) for g in grads_at(i)])
        ref_params = ref.step(ref_params, grads_at(i))
    assert_close_to_reference(state, params, ref, ref_params, "Nadam")
    np.testing.assert_allclose(kopt.get_slot(state, "m_schedule"), ref.m_schedule, rtol=RTOL)


def test_reset_and_replay_really_differ():
    ref, ref_params = run_reference("Nadam", {}, 5)
    params = [jnp.asarray(p) for p in ref_params]
    replay = from_keras_weights(kopt.Nadam(), params, keras_list("Nadam", ref))
    reset = from_keras_weights(kopt.Nadam(), params, keras_list("Nadam", ref), m_schedule="reset")
    assert float(kopt.get_slot(reset, "m_schedule")) == 1.0
    assert float(kopt.get_slot(replay, "m_schedule")) < 0.02  # ~0.45**5


def test_nadam_replay_is_cheap_for_long_runs():
    # The product underflows to exactly 0 after a few hundred float32 steps; the replay stops there.
    weights = [np.int64(2**31 - 1)] + [np.zeros(s, np.float32) for s in SHAPES] * 2
    state = from_keras_weights(kopt.Nadam(), make_params(), weights)
    assert float(kopt.get_slot(state, "m_schedule")) == 0.0
    assert set(counts(state)) == {2**31 - 1}


def test_missing_iterations_restart_decay_with_a_warning():
    ref, ref_params = run_reference("RMSprop", {"decay": 0.1}, 3)
    params = [jnp.asarray(p) for p in ref_params]
    with pytest.warns(UserWarning, match="restarts at step 0"):
        state = from_keras_weights(kopt.RMSprop(decay=0.1), params, keras_list("RMSprop", ref))
    assert counts(state) == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without decay, the step count does not matter: no warning
        from_keras_weights(kopt.RMSprop(), params, keras_list("RMSprop", ref))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case_id,name,config", CASES, ids=CASE_IDS)
def test_kopt_state_round_trips_through_keras_weights(case_id, name, config):
    opt = getattr(kopt, name)(**config)
    params = make_params()
    state = opt.init(params)
    step = step_of(case_id, opt)
    for i in range(4):
        params, state = step(params, state, [jnp.asarray(g) for g in grads_at(i)])
    weights = to_keras_weights(opt, state)
    assert all(isinstance(w, np.ndarray) for w in weights)
    if name not in WITHOUT_ITERATIONS:
        assert weights[0].dtype == np.int64 and weights[0].shape == () and int(weights[0]) == 4
    extra = {"iterations": 4} if name in WITHOUT_ITERATIONS else {}
    back = from_keras_weights(opt, params, weights, **extra)
    # Bit for bit, Nadam's replayed m_schedule included; `current_lr` is a read-out of the last step.
    flat_back = jax.tree_util.tree_flatten_with_path(back)[0]
    for (path, got), want in zip(flat_back, jax.tree.leaves(state), strict=True):
        if not jax.tree_util.keystr(path).endswith("['current_lr']"):
            assert got.dtype == want.dtype and np.asarray(got).tobytes() == np.asarray(want).tobytes(), path
    assert jax.tree.structure(back) == jax.tree.structure(state)


def _numbered(shapes_per_weight):
    """Weights whose every entry is its own index: any misplacement shows."""
    return [np.full(shape, float(index), np.float32) for index, shape in enumerate(shapes_per_weight)]


@pytest.mark.parametrize(
    "name,config,layout",
    [
        ("SGD", {}, ["iterations", "velocity"]),
        ("RMSprop", {}, ["accumulator"]),
        ("Adagrad", {}, ["accumulator"]),
        ("Adadelta", {}, ["accumulator", "delta_accumulator"]),
        ("Adam", {}, ["iterations", "m", "v", "placeholders"]),
        ("Adam", {"amsgrad": True}, ["iterations", "m", "v", "vhat"]),
        ("Adamax", {}, ["iterations", "m", "u"]),
        ("Nadam", {}, ["iterations", "m", "v"]),
    ],
)
def test_hand_built_keras_lists_land_in_the_right_slots(name, config, layout):
    shapes = []
    for group in layout:
        shapes += [()] if group == "iterations" else [(1,)] * N if group == "placeholders" else SHAPES
    weights = _numbered(shapes)
    if layout[0] == "iterations":
        weights[0] = np.asarray(12, np.int64)
    opt = getattr(kopt, name)(**config)
    params = make_params()
    state = from_keras_weights(opt, params, weights)
    offset = 1 if layout[0] == "iterations" else 0
    for group in layout[offset:]:
        if group != "placeholders":
            leaves = jax.tree.leaves(kopt.get_slot(state, group))
            assert [float(leaf.reshape(-1)[0]) if leaf.size else None for leaf in leaves] == [
                float(offset + k) for k in range(N)
            ], group
            assert [leaf.shape for leaf in leaves] == SHAPES
        offset += N
    assert set(counts(state)) == {12 if layout[0] == "iterations" else 0}
    if name == "Adam" and not config:
        assert kopt.get_slot(state, "vhat") is None
    back = to_keras_weights(opt, state)
    assert [w.shape for w in back] == [w.shape for w in weights]
    if layout[-1] == "placeholders":  # Keras' placeholders carry nothing: they come back as zeros
        weights[-N:] = [np.zeros((1,), np.float32)] * N
    for got, want in zip(back, weights, strict=True):
        np.testing.assert_array_equal(got, want)
    if layout[0] == "iterations":
        assert back[0].dtype == np.int64


def test_dict_params_none_leaves_bfloat16_and_float64_weights():
    # Leaf order is jax.tree.leaves order: dict keys sorted ("bias" before "kernel"); None leaves hold nothing.
    params = {"kernel": jnp.ones((2, 3), jnp.bfloat16), "bias": jnp.zeros(3, jnp.bfloat16), "frozen": None}
    weights = [np.int64(3), np.full(3, 0.1), np.full((2, 3), 0.2), np.full(3, 0.3), np.full((2, 3), 0.4)]
    state = from_keras_weights(kopt.Adamax(), params, weights)
    m = kopt.get_slot(state, "m")
    assert m["frozen"] is None and m["bias"].dtype == jnp.float32  # the slot dtype of opt.init, not the weights'
    u = kopt.get_slot(state, "u")
    assert float(m["bias"][0]) == np.float32(0.1) and float(u["kernel"][0, 0]) == np.float32(0.4)
    assert [w.shape for w in to_keras_weights(kopt.Adamax(), state)] == [(), (3,), (2, 3), (3,), (2, 3)]


def test_bfloat16_state_dtype_takes_and_gives_its_own_dtype():
    opt = kopt.Adam(amsgrad=True, state_dtype="bfloat16")
    weights = [np.int64(1)] + [np.full(s, 0.1, np.float32) for s in SHAPES] * 3
    state = from_keras_weights(opt, make_params(), weights)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(kopt.get_slot(state, "vhat")))
    back = to_keras_weights(opt, state)
    assert [w.dtype for w in back[1:]] == [np.dtype(jnp.bfloat16)] * (3 * N)
    np.testing.assert_array_equal(back[1].astype(np.float32), np.float32(jnp.bfloat16(0.1)))


# --------------------------------------------------------------------------- bad inputs


def _adam_weights():
    """Adam (no amsgrad) weights for make_params(): [iterations, m x3, v x3, placeholders x3]."""
    return [np.int64(2)] + [np.ones(s, np.float32) for s in SHAPES] * 2 + [np.zeros(1, np.float32)] * N


def _with(index, value):
    weights = _adam_weights()
    weights[index] = value
    return weights


@pytest.mark.parametrize(
    "weights,message",
    [
        (_adam_weights()[:-1], r"expects 10 weights \[iterations, m x3, v x3, vhat x3\].*got 9"),
        ([], r"Keras returns \[\] before the optimizer's first step"),
        (_with(4, np.ones((2, 3))), r"weights\[4\] \(v for params\[0\]\) has shape \(2, 3\), expected \(3, 2\)"),
        (_with(7, np.ones((3, 2))), r"weights\[7\] \(vhat placeholder\).*amsgrad=True\?"),
        (_with(0, np.int64(-1)), r"whole number of steps in \[0, 2147483647\], got -1"),
        (_with(0, np.float64(2.5)), r"whole number of steps"),
        (_with(0, np.int64(2**31)), r"whole number of steps"),
        (_with(0, np.ones(1)), r"weights\[0\] \(iterations\) must be a scalar"),
        (_with(1, np.full((3, 2), np.nan)), r"weights\[1\] \(m for params\[0\]\) holds NaN or Inf"),
        (_with(2, np.asarray(["a", "b"])), r"weights\[2\] must hold real numbers"),
        (tuple(_with(3, np.ones(3))), r"weights\[3\] \(m for params\[2\]\) has shape \(3,\), expected \(\)"),
    ],
    ids=["short", "empty", "shape", "full-vhat", "negative", "fraction", "int32", "array", "nan", "strings", "tuple"],
)
def test_bad_weights_are_refused_with_a_clear_message(weights, message):
    with pytest.raises(ValueError, match=message):
        from_keras_weights(kopt.Adam(), make_params(), weights)


def test_placeholders_given_to_amsgrad_are_named():
    with pytest.raises(ValueError, match=r"weights\[7\] \(vhat for params\[0\]\).*amsgrad=False\?"):
        from_keras_weights(kopt.Adam(amsgrad=True), make_params(), _adam_weights())


def test_bad_arguments_are_refused():
    params = make_params()
    with pytest.raises(ValueError, match="kopt Keras optimizer"):
        from_keras_weights(kopt.chain(kopt.scale_by_adam()), params, _adam_weights())
    with pytest.raises(ValueError, match="kopt Keras optimizer"):
        from_keras_weights(kopt.AdamW(), params, _adam_weights())  # not a Keras 2 optimizer: no layout
    with pytest.raises(ValueError, match="get_weights"):
        from_keras_weights(kopt.Adam(), params, np.zeros(10))
    with pytest.raises(ValueError, match="do not pass iterations"):
        from_keras_weights(kopt.Adam(), params, _adam_weights(), iterations=2)
    rms = [np.ones(s) for s in SHAPES]
    for bad in (-3, float("inf"), float("nan"), 1.5):
        with pytest.raises(ValueError, match="iterations must be a whole number"):
            from_keras_weights(kopt.RMSprop(), params, rms, iterations=bad)
    # [iterations, *rms] is TensorFlow's legacy layout: iterations come from the list, not the argument
    assert int(kopt.iterations(from_keras_weights(kopt.RMSprop(), params, [np.int64(3), *rms]))) == 3
    with pytest.raises(ValueError, match="do not pass iterations"):
        from_keras_weights(kopt.RMSprop(), params, [np.int64(1), *rms], iterations=1)
    with pytest.raises(ValueError, match="Nadam only"):
        from_keras_weights(kopt.RMSprop(), params, rms, m_schedule="reset")
    nadam = _adam_weights()[: 1 + 2 * N]
    with pytest.raises(ValueError, match="'replay', 'reset' or a number"):
        from_keras_weights(kopt.Nadam(), params, nadam, m_schedule="restart")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        from_keras_weights(kopt.Nadam(), params, nadam, m_schedule=1.5)


def test_to_keras_weights_refuses_a_state_of_another_optimizer():
    params = make_params()
    with pytest.raises(ValueError, match=r"holds no vhat, but .*amsgrad=True"):
        to_keras_weights(kopt.Adam(amsgrad=True), kopt.Adam().init(params))
    with pytest.raises(ValueError, match=r"holds a vhat, but .*amsgrad=False"):
        to_keras_weights(kopt.Adam(), kopt.Adam(amsgrad=True).init(params))
    with pytest.raises(ValueError, match=r"not made by kopt\.Adamax"):
        to_keras_weights(kopt.Adamax(), kopt.SGD().init(params))
