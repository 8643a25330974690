"""Hyperparameters and slots in the state: reading, changing without recompiling, and by name."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kopt
from tests import reference
from tests.matching import make_grads, make_params

# (optimizer, constructor arguments, hyperparameters changed after 5 of 10 steps)
MID_RUN_CHANGES = [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "decay": 0.1}, {"lr": 0.02, "momentum": 0.5, "decay": 0.3}),
    ("SGD", {"lr": 0.1, "nesterov": True}, {"momentum": 0.7, "decay": 0.5}),  # decay was 0: live anyway
    ("RMSprop", {"lr": 0.01}, {"lr": 0.002, "rho": 0.5}),
    ("Adagrad", {"lr": 0.1, "decay": 0.1}, {"lr": 0.5}),
    ("Adadelta", {}, {"lr": 0.3, "decay": 0.2}),
    ("Adam", {"lr": 0.01, "amsgrad": True}, {"lr": 0.001, "beta_1": 0.5, "beta_2": 0.9, "decay": 0.1}),
    ("Adamax", {"lr": 0.01}, {"lr": 0.05, "beta_2": 0.5}),
    ("Nadam", {"lr": 0.01}, {"lr": 0.001, "beta_1": 0.8}),
]


@pytest.mark.parametrize(
    "name,config,changes", MID_RUN_CHANGES, ids=[f"{n}-{'-'.join(c)}" for n, _, c in MID_RUN_CHANGES]
)
def test_changing_hyperparameters_mid_run_matches_reference(name, config, changes):
    opt = getattr(kopt, name)(**config)
    ref = reference.make(name, dtype=np.float32, **config)
    params = make_params(np.float32)
    treedef = jax.tree.structure(params)
    ref_params = jax.tree.leaves(params)
    state = opt.init(params)
    step = jax.jit(opt.update)
    for i, grads in enumerate(make_grads(params, 10, 1.0)):
        if i == 5:
            state = kopt.set_hyperparams(state, **changes)
            for key, value in changes.items():
                ref.set_value(key, value)
        updates, state = step(grads, state, params)
        params = kopt.apply_updates(params, updates)
        ref_params = ref.step([np.asarray(p) for p in ref_params], [np.asarray(g) for g in jax.tree.leaves(grads)])
    chex.assert_trees_all_close(params, treedef.unflatten(ref_params), rtol=2e-5, atol=2e-6)


def test_set_hyperparams_does_not_recompile():
    opt = kopt.SGD(lr=0.1, momentum=0.9, decay=0.01)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    params = jnp.ones(3)
    state = opt.init(params)
    params, state = step(params, state, jnp.ones(3))
    state = kopt.set_hyperparams(state, lr=0.0, momentum=0.0, decay=0.5)
    before = params
    params, state = step(params, state, jnp.ones(3))
    assert len(traces) == 1
    chex.assert_trees_all_equal(params, before)  # lr = 0 and momentum = 0: the change took effect


def test_set_hyperparams_accepts_traced_values_inside_jit():
    opt = kopt.Adam()
    state = opt.init(jnp.ones(2))
    new = jax.jit(lambda s, lr: kopt.set_hyperparams(s, lr=lr))(state, 0.25)
    assert float(kopt.get_hyperparams(new)["lr"]) == 0.25
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)


def test_hyperparameter_names_follow_keras():
    expected = {
        "SGD": {"lr", "decay", "momentum"},
        "RMSprop": {"lr", "decay", "rho", "epsilon"},
        "Adagrad": {"lr", "decay", "epsilon"},
        "Adadelta": {"lr", "decay", "rho", "epsilon"},
        "Adam": {"lr", "decay", "beta_1", "beta_2", "epsilon"},
        "Adamax": {"lr", "decay", "beta_1", "beta_2", "epsilon"},
        "Nadam": {"lr", "beta_1", "beta_2", "epsilon", "schedule_decay"},
    }
    for name, keys in expected.items():
        state = getattr(kopt, name)(clipnorm=1.0, clipvalue=2.0).init(jnp.ones(2))
        assert set(kopt.get_hyperparams(state)) == keys | {"max_norm", "max_delta", "current_lr"}


def test_hyperparameters_take_the_params_float_dtype_with_keras_rounding():
    state = kopt.SGD(lr=0.01).init(jnp.ones(2, jnp.float32))
    lr = kopt.get_hyperparams(state)["lr"]
    assert lr.dtype == jnp.float32 and lr.shape == ()
    assert float(lr) == 0.009999999776482582  # float32(0.01), as Keras' get_config reports it


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"lr": -1.0}, r"lr must be >= 0"),
        ({"beta_1": 1.0}, r"beta_1 must be in \[0, 1\)"),
        ({"momentum": 0.9}, r"no hyperparameter named 'momentum'.*available: \['beta_1'"),
        ({"lr": "fast"}, r"lr must be a real number"),
        ({"lr": jnp.ones(2)}, r"lr must be a scalar"),
    ],
)
def test_set_hyperparams_rejects_bad_values(changes, message):
    state = kopt.Adam().init(jnp.ones(2))
    with pytest.raises(ValueError, match=message):
        kopt.set_hyperparams(state, **changes)


def test_slots_by_name():
    opt = kopt.Adam(amsgrad=True, clipnorm=10.0)  # gradient norm 1.22: not clipped
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    state = opt.init(params)
    grads = {"w": jnp.full((2, 2), 0.5), "b": jnp.full(2, -0.5)}
    _, state = opt.update(grads, state, params)
    # After one step from zero: m = (1 - beta_1) g, v = (1 - beta_2) g**2, vhat = v, with
    # 1 - beta formed from the float32 variables, as Keras does.
    one_minus_b1, one_minus_b2 = 1 - np.float32(0.9), 1 - np.float32(0.999)
    chex.assert_trees_all_close(kopt.get_slot(state, "m"), jax.tree.map(lambda g: one_minus_b1 * g, grads), rtol=1e-6)
    chex.assert_trees_all_close(
        kopt.get_slot(state, "v"), jax.tree.map(lambda g: one_minus_b2 * g * g, grads), rtol=1e-6
    )
    chex.assert_trees_all_equal(kopt.get_slot(state, "vhat"), kopt.get_slot(state, "v"))
    assert int(kopt.iterations(state)) == 1
    assert kopt.get_slot(kopt.Adam().init(params), "vhat") is None
    with pytest.raises(ValueError, match=r"no slot named 'velocity'.*available: \["):
        kopt.get_slot(state, "velocity")
    with pytest.raises(ValueError, match="ambiguous"):
        kopt.get_slot(state, "count")  # Adam's and the learning rate's counters


def test_nadam_m_schedule_is_a_running_product():
    opt = kopt.Nadam()
    state = opt.init(jnp.ones(1))
    for _ in range(3):
        _, state = opt.update(jnp.ones(1), state)
    mu = [0.9 * (1 - 0.5 * 0.96 ** (t * 0.004)) for t in (1, 2, 3)]
    assert float(kopt.get_slot(state, "m_schedule")) == pytest.approx(mu[0] * mu[1] * mu[2], rel=1e-6)


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam"])
def test_optax_tree_get_finds_the_step_count_as_the_readme_says(name):
    opt = getattr(kopt, name)(clipnorm=1.0)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    for _ in range(3):
        _, state = opt.update({"w": jnp.full(3, 0.5)}, state, params)
    assert float(optax.tree_utils.tree_get(state, "lr")) == pytest.approx(opt.config["lr"])
    assert int(kopt.iterations(state)) == 3
    if name in ("SGD", "RMSprop", "Adagrad", "Adadelta"):
        assert int(optax.tree_utils.tree_get(state, "count")) == 3
    else:  # two counters (bias correction, schedule): optax refuses to choose, as for its own adam with a schedule
        with pytest.raises(KeyError, match="Found multiple values for 'count'"):
            optax.tree_utils.tree_get(state, "count")
    lr_count = optax.tree_utils.tree_get(
        state, "count", filtering=lambda path, _: path[-1].tuple_name == "ScaleByLearningRateState"
    )
    assert int(lr_count) == 3
