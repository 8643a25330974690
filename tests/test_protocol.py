"""The protocol: chain, apply_updates, None leaves, extra arguments, optax interop, scan, dtypes."""

import copy
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kopt
from tests import reference

ALL_OPTIMIZERS = {
    "SGD": lambda: kopt.SGD(lr=0.1, momentum=0.9, nesterov=True, decay=0.01),
    "RMSprop": lambda: kopt.RMSprop(clipnorm=1.0),
    "Adagrad": lambda: kopt.Adagrad(clipvalue=0.5),
    "Adadelta": lambda: kopt.Adadelta(),
    "Adam": lambda: kopt.Adam(amsgrad=True),
    "Adamax": lambda: kopt.Adamax(),
    "Nadam": lambda: kopt.Nadam(),
}


def tree(dtype=jnp.float32):
    return {"w": jnp.arange(6, dtype=dtype).reshape(2, 3) / 6, "b": jnp.ones(3, dtype), "s": jnp.asarray(0.5, dtype)}


def grads_for(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def test_optimizers_are_gradient_transformations():
    for make in ALL_OPTIMIZERS.values():
        opt = make()
        assert isinstance(opt, kopt.GradientTransformation)
        init, update = opt  # a plain (init, update) pair
        assert callable(init) and callable(update)


def test_apply_updates_keeps_param_dtype():
    params = {"bf16": jnp.ones(3, jnp.bfloat16), "f32": jnp.ones(3, jnp.float32)}
    updates = {"bf16": jnp.full(3, 0.25, jnp.float32), "f32": jnp.full(3, 0.25, jnp.float32)}
    out = kopt.apply_updates(params, updates)
    chex.assert_trees_all_equal_dtypes(out, params)
    chex.assert_trees_all_close(out, {"bf16": jnp.full(3, 1.25, jnp.bfloat16), "f32": jnp.full(3, 1.25)})


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_none_leaves_are_carried_through(name):
    opt = ALL_OPTIMIZERS[name]()
    params = {"w": jnp.ones(3), "frozen": None, "nested": [None, jnp.ones(2)]}
    grads = {"w": jnp.full(3, 0.5), "frozen": None, "nested": [None, jnp.full(2, -0.5)]}
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    assert updates["frozen"] is None and updates["nested"][0] is None
    new = kopt.apply_updates(params, updates)
    assert new["frozen"] is None and new["nested"][0] is None
    assert jnp.all(new["w"] < 1) and jnp.all(new["nested"][1] > 1)


def test_identity_and_empty_state():
    opt = kopt.identity()
    state = opt.init(tree())
    assert state == kopt.EmptyState()
    updates, _ = opt.update(tree(), state)
    chex.assert_trees_all_equal(updates, tree())


def test_chain_forwards_extra_args_only_to_transforms_that_take_them():
    def needs_value(updates, state, params=None, *, value):
        return jax.tree.map(lambda u: value * u, updates), state

    takes_value = kopt.GradientTransformation(lambda params: kopt.EmptyState(), needs_value)
    # optax.scale's update takes no extra keyword: it must not receive `value`.
    opt = kopt.chain(kopt.Adam(), optax.scale(2.0), takes_value)
    params = tree()
    state = opt.init(params)
    updates, _ = opt.update(grads_for(params, 0), state, params, value=3.0)
    expected, _ = kopt.Adam().update(grads_for(params, 0), kopt.Adam().init(params), params)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda u: 6 * u, expected))


def test_eager_update_compiles_once_and_matches_op_by_op():
    opt = kopt.Adam(clipnorm=1.0)
    params = tree()
    state = opt.init(params)
    with jax.disable_jit():
        expected, _ = opt.update(grads_for(params, 0), state, params)
    with jax.log_compiles():
        updates, state = opt.update(grads_for(params, 0), state, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)
    assert opt.update.__wrapped__ is not None  # the eager path goes through one cached jit
    traced = jax.jit(lambda g, s, p: opt.update(g, s, p))(grads_for(params, 1), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(traced[1], state)


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match="argument 1"):
        kopt.chain(kopt.Adam(), 3.0)


def test_kopt_inside_optax_chain_and_with_optax_wrappers():
    params = tree()
    kopt_clipped = kopt.Adam(lr=0.01, clipnorm=0.5)
    # optax clips when the norm exceeds max_norm; the gradients here are well above it.
    mixed = optax.chain(optax.clip_by_global_norm(0.5), kopt.Adam(lr=0.01))
    p1, p2 = params, params
    s1, s2 = kopt_clipped.init(params), mixed.init(params)
    for seed in range(5):
        g = jax.tree.map(lambda x: 10 * x, grads_for(params, seed))
        u1, s1 = kopt_clipped.update(g, s1, p1)
        u2, s2 = mixed.update(g, s2, p2)
        p1, p2 = kopt.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)
    # An optax wrapper around a kopt optimizer.
    wrapped = optax.MultiSteps(kopt.SGD(lr=0.1), every_k_schedule=2)
    state = wrapped.init(params)
    updates, state = wrapped.update(grads_for(params, 0), state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))


def test_optax_transforms_inside_kopt_chain_match_optax():
    params = tree()
    ours = kopt.chain(optax.scale_by_adam(), kopt.scale_by_learning_rate(1e-2))
    theirs = optax.adam(1e-2)
    p1, p2, s1, s2 = params, params, ours.init(params), theirs.init(params)
    for seed in range(5):
        g = grads_for(params, seed)
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = theirs.update(g, s2, p2)
        p1, p2 = kopt.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6)


def test_structure_mismatch_names_both_structures():
    opt = kopt.Adam()
    state = opt.init({"w": jnp.ones(2), "b": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"structure .*'w'.*'x'.*built for .*'b'.*'w'"):
        opt.update({"w": jnp.ones(2), "x": jnp.ones(1)}, state)


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_state_shapes_and_dtypes_never_change_so_scan_works(name):
    opt = ALL_OPTIMIZERS[name]()
    params = tree()
    state = opt.init(params)
    grads = [grads_for(params, seed) for seed in range(4)]

    def body(carry, g):
        params, state = carry
        updates, state = opt.update(g, state, params)
        return (kopt.apply_updates(params, updates), state), None

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
    (scanned_params, scanned_state), _ = jax.lax.scan(body, (params, state), stacked)
    chex.assert_trees_all_equal_shapes_and_dtypes(scanned_state, state)
    loop = (params, state)
    for g in grads:
        loop, _ = body(loop, g)
    chex.assert_trees_all_close(scanned_params, loop[0], rtol=1e-6, atol=1e-7)
    assert int(kopt.iterations(scanned_state)) == 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_get_float32_state(dtype):
    opt = kopt.Adam(lr=0.1)
    params = tree(dtype)
    state = opt.init(params)
    for leaf in jax.tree.leaves(kopt.get_slot(state, "m")) + list(kopt.get_hyperparams(state).values()):
        assert leaf.dtype == jnp.float32
    # beta_2 keeps its float32 value instead of rounding to 1.0 in bfloat16.
    assert float(kopt.get_hyperparams(state)["beta_2"]) == pytest.approx(0.999, rel=1e-6)
    for seed in range(3):
        updates, state = jax.jit(opt.update)(grads_for(params, seed), state, params)
        params = kopt.apply_updates(params, updates)
    chex.assert_trees_all_equal_dtypes(params, tree(dtype))
    assert not jnp.allclose(params["w"].astype(jnp.float32), tree()["w"])


def test_init_is_jittable():
    opt = kopt.Nadam(clipnorm=1.0)
    eager, jitted = opt.init(tree()), jax.jit(opt.init)(tree())
    chex.assert_trees_all_equal(eager, jitted)
    chex.assert_trees_all_equal_shapes_and_dtypes(eager, jitted)


def test_leaf_shape_mismatch_is_an_error_naming_the_leaf():
    opt = kopt.Adam()
    state = opt.init({"w": jnp.ones((2, 3)), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"updates\['w'\] has shape \(3,\).*has shape \(2, 3\)"):
        opt.update({"w": jnp.ones(3), "b": jnp.ones(3)}, state)


# --------------------------------------------------------------------------- optimizers are pytrees (optax's contract)


def _first_update(name: str, config: dict) -> np.ndarray:
    """The Keras 2.2.4 reference's first update of params [1, -2] with gradient [1, -2]."""
    start = np.asarray([1.0, -2.0], np.float32)
    return reference.make(name, dtype=np.float32, **config).step([start], [start])[0] - start


PYTREE_CASES = [
    (kopt.Adam(lr=0.1, clipnorm=1.0), ("Adam", {"lr": 0.1, "clipnorm": 1.0})),
    (kopt.tf_keras.SGD(0.1, momentum=0.9), ("SGD", {"lr": 0.1, "momentum": 0.9})),  # the same first step
    (kopt.Nadam(packed=None), ("Nadam", {})),
]


def _same_optimizer(opt, like, keras):
    """``opt`` is an Optimizer with ``like``'s label, and its first step is the Keras reference's."""
    assert isinstance(opt, kopt.Optimizer)
    assert kopt.serialize(opt) == kopt.serialize(like)
    params = {"w": jnp.asarray([1.0, -2.0])}
    updates, _ = opt.update(params, opt.init(params), params)
    chex.assert_trees_all_close(updates, {"w": _first_update(*keras)}, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("opt", "keras"), PYTREE_CASES, ids=lambda x: repr(x)[:40])
def test_an_optimizer_survives_tree_utilities_as_optaxs_transformations_do(opt, keras):
    # As optax's GradientTransformation: init and update are the children, the label is static data.
    assert jax.tree.leaves(opt) == [opt.init, opt.update]
    _same_optimizer(jax.tree.map(lambda f: f, opt), opt, keras)
    _same_optimizer(jax.tree.unflatten(*reversed(jax.tree.flatten(opt))), opt, keras)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(opt)[0]]
    assert paths == [".init", ".update"]
    _same_optimizer(opt._replace(update=opt.update), opt, keras)
    _same_optimizer(copy.deepcopy(opt), opt, keras)
    _same_optimizer(copy.copy(opt), opt, keras)
    emptied = jax.tree.map(lambda _: None, opt)  # eqx.filter(opt, eqx.is_array) gives this: the label stays
    assert kopt.serialize(emptied) == kopt.serialize(opt)
    assert hash(jax.tree.structure(opt)) == hash(jax.tree.structure(jax.tree.map(lambda f: f, opt)))


@pytest.mark.parametrize(("opt", "keras"), PYTREE_CASES, ids=lambda x: repr(x)[:40])
def test_an_optimizer_pickles_where_optaxs_does(opt, keras):
    cloudpickle = pytest.importorskip("cloudpickle")
    _same_optimizer(cloudpickle.loads(cloudpickle.dumps(opt)), opt, keras)
    cloudpickle.loads(cloudpickle.dumps(optax.adam(0.1)))  # optax's survives cloudpickle too
    # Plain pickle cannot write closures (init and update), optax's no more than kopt's.
    for transformation in (opt, optax.adam(0.1)):
        with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
            pickle.dumps(transformation)


def test_an_optimizer_in_equinox_and_flax_struct():
    eqx = pytest.importorskip("equinox")
    struct = pytest.importorskip("flax.struct")
    opt, keras = kopt.Adam(lr=0.1), ("Adam", {"lr": 0.1})
    dynamic, static = eqx.partition({"opt": opt, "x": jnp.ones(2)}, eqx.is_array)
    _same_optimizer(eqx.combine(dynamic, static)["opt"], opt, keras)
    _same_optimizer(eqx.filter({"opt": opt}, eqx.is_array, inverse=True)["opt"], opt, keras)

    traces = []

    @eqx.filter_jit
    def step(opt, params):  # the optimizer as an argument of a filtered jit: static, hashed, compared
        traces.append(opt)
        updates, _ = opt.update(params, opt.init(params), params)
        return updates

    params = {"w": jnp.asarray([1.0, -2.0])}
    for _ in range(3):
        chex.assert_trees_all_close(step(opt, params), {"w": _first_update(*keras)}, rtol=1e-5, atol=1e-7)
    assert len(traces) == 1  # the same optimizer again: a cache hit, no retrace

    @struct.dataclass
    class TrainState:
        params: dict
        tx: kopt.Optimizer = struct.field(pytree_node=False)

    state = TrainState(params, opt)
    moved = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda p: p + 1, s.params)))(state)
    _same_optimizer(moved.tx, opt, keras)

    @struct.dataclass
    class Holder:
        tx: kopt.Optimizer  # a pytree node: the optimizer's children are visited

    _same_optimizer(jax.tree.map(lambda f: f, Holder(opt)).tx, opt, keras)


def test_an_optimizer_is_a_static_jit_argument():
    opt = kopt.SGD(lr=0.1)
    step = jax.jit(lambda opt, g: opt.update(g, opt.init(g))[0], static_argnums=0)
    chex.assert_trees_all_close(step(opt, jnp.ones(2)), -0.1 * jnp.ones(2))
