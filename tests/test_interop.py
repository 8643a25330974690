"""kopt in the training loops JAX users already have: optax wrappers, Flax NNX, Flax Linen, Equinox.

Each library test trains a small tanh MLP for a few steps with the library's
own loop and checks it against the same steps done by hand with kopt on a
plain dict of arrays (``opt.init`` / ``opt.update`` / ``kopt.apply_updates``).
The basic optax cases (kopt inside ``optax.chain``, ``optax.MultiSteps``'s
first step, optax transforms inside ``kopt.chain``) are in test_protocol.py.
Flax and Equinox come with the ``integration`` extra.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kopt

STEPS = 5
TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}  # one jitted program against another: fusion may round differently
PACKED_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # and clipnorm's global norm summed in another order


def batches() -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, 8, 4)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(4, 2))).astype(np.float32)
    return [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(x, y, strict=True)]


def mse(params, x, y, out_bias=None):
    """The MLP on plain params ``{"hidden"|"out": {"kernel", "bias"}}`` (Flax's names and layout).

    ``out_bias`` stands in for a frozen ``params["out"]["bias"]`` (then ``None``).
    """
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    bias = params["out"]["bias"] if out_bias is None else out_bias
    return jnp.mean((h @ params["out"]["kernel"] + bias - y) ** 2)


def by_hand(opt, params, loss=mse):
    """The steps done with kopt alone: ``(params, state, losses)``."""

    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state, value

    state = opt.init(params)
    losses = []
    for x, y in batches():
        params, state, value = step(params, state, x, y)
        losses.append(value)
    return params, state, jnp.stack(losses)


def grads_for(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def small_params():
    return {"w": jnp.arange(6.0).reshape(2, 3) / 6, "b": jnp.ones(3)}


# --------------------------------------------------------------------------- optax wrappers and chains


@pytest.mark.parametrize("packed", [False, True])
def test_optax_multisteps_equals_kopt_on_the_mean_gradient(packed):
    params, every_k = small_params(), 3
    wrapped = optax.MultiSteps(kopt.Adam(lr=0.1, packed=packed), every_k_schedule=every_k)
    update = jax.jit(wrapped.update)
    p1, s1 = params, wrapped.init(params)
    micro = [grads_for(params, seed) for seed in range(2 * every_k)]
    for g in micro:
        updates, s1 = update(g, s1, p1)
        p1 = optax.apply_updates(p1, updates)
    opt = kopt.Adam(lr=0.1)
    p2, s2 = params, opt.init(params)
    for start in (0, every_k):
        mean = jax.tree.map(lambda *gs: sum(gs) / every_k, *micro[start : start + every_k])
        updates, s2 = opt.update(mean, s2, p2)
        p2 = kopt.apply_updates(p2, updates)
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)
    assert int(kopt.iterations(s1.inner_opt_state)) == 2


def test_optax_masked_and_multi_transform_route_leaves_to_kopt():
    params = small_params()
    masked = optax.masked(kopt.Adam(lr=0.1), {"w": True, "b": False})
    split = optax.multi_transform(
        {"adam": kopt.Adam(lr=0.1), "sgd": kopt.SGD(lr=0.1, momentum=0.9)}, {"w": "adam", "b": "sgd"}
    )
    adam, sgd = kopt.Adam(lr=0.1), kopt.SGD(lr=0.1, momentum=0.9)
    states = [masked.init(params), split.init(params), adam.init({"w": params["w"]}), sgd.init({"b": params["b"]})]
    for seed in range(3):
        g = grads_for(params, seed)
        masked_updates, states[0] = jax.jit(masked.update)(g, states[0], params)
        split_updates, states[1] = jax.jit(split.update)(g, states[1], params)
        adam_updates, states[2] = adam.update({"w": g["w"]}, states[2], {"w": params["w"]})
        sgd_updates, states[3] = sgd.update({"b": g["b"]}, states[3], {"b": params["b"]})
        # optax.masked passes the masked-out leaves through untouched.
        chex.assert_trees_all_close(masked_updates, {"w": adam_updates["w"], "b": g["b"]}, **TOLERANCE)
        chex.assert_trees_all_close(split_updates, {"w": adam_updates["w"], "b": sgd_updates["b"]}, **TOLERANCE)


@pytest.mark.parametrize("packed", [False, True])
def test_optax_apply_if_finite_skips_a_nan_step_of_kopt(packed):
    params = small_params()
    guarded = optax.apply_if_finite(kopt.Adam(lr=0.1, packed=packed), max_consecutive_errors=2)
    plain = kopt.Adam(lr=0.1)
    s1, s2 = guarded.init(params), plain.init(params)
    bad = {"w": jnp.full((2, 3), jnp.nan), "b": jnp.ones(3)}
    for g in (grads_for(params, 0), bad, grads_for(params, 1)):
        u1, s1 = jax.jit(guarded.update)(g, s1, params)
        if g is bad:
            chex.assert_trees_all_equal(u1, jax.tree.map(jnp.zeros_like, params))
            continue
        u2, s2 = plain.update(g, s2, params)
        chex.assert_trees_all_close(u1, u2, **TOLERANCE)
    assert int(s1.total_notfinite) == 1
    assert int(kopt.iterations(s1.inner_state)) == 2  # the NaN step left kopt's state untouched


@pytest.mark.parametrize("packed", [False, True])
def test_kopt_chain_forwards_the_loss_to_an_optax_transform_that_takes_it(packed):
    params = small_params()
    opt = kopt.chain(kopt.Adam(lr=0.1, packed=packed), optax.contrib.reduce_on_plateau(factor=0.5, patience=1))
    reference = kopt.Adam(lr=0.1)
    state, ref_state = opt.init(params), reference.init(params)
    g = grads_for(params, 0)
    for loss in (1.0, 1.0, 1.0):  # the first sets the best; no improvement after: halved twice
        updates, state = opt.update(g, state, params, value=jnp.asarray(loss))
        ref_updates, ref_state = reference.update(g, ref_state, params)
    scale = state[1].scale
    assert float(scale) == 0.25
    chex.assert_trees_all_close(updates, jax.tree.map(lambda u: scale * u, ref_updates), **TOLERANCE)


# --------------------------------------------------------------------------- Flax NNX


def train_in_nnx(opt):
    """The MLP as a Flax NNX module trained by ``nnx.Optimizer(model, opt)`` over :func:`batches`:
    ``(start params as a pure dict, losses, model, optimizer)``."""
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 16, rngs=rngs)
            self.out = nnx.Linear(16, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    start = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    return start, jnp.stack([step(model, optimizer, x, y) for x, y in batches()]), model, optimizer


@pytest.mark.parametrize("packed", [False, True, None])  # None: packs where init finds leaves to pack
def test_flax_nnx_optimizer_trains_like_kopt_by_hand(packed):
    nnx = pytest.importorskip("flax.nnx")
    start, losses, model, optimizer = train_in_nnx(kopt.Adam(lr=0.01, clipnorm=1.0, packed=packed))
    params, state, hand_losses = by_hand(kopt.Adam(lr=0.01, clipnorm=1.0), start)
    assert losses[-1] < losses[0]
    chex.assert_trees_all_close(losses, hand_losses, **(PACKED_TOLERANCE if packed is not False else TOLERANCE))
    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        params,
        **(PACKED_TOLERANCE if packed is not False else TOLERANCE),
    )
    nnx_state = nnx.as_pure(optimizer.opt_state)  # kopt's own state, slots keyed like the model
    for slot in ("m", "v"):
        chex.assert_trees_all_close(
            jax.tree.leaves(kopt.get_slot(nnx_state, slot)),
            jax.tree.leaves(kopt.get_slot(state, slot)),
            **(PACKED_TOLERANCE if packed is not False else TOLERANCE),
        )
    assert int(kopt.iterations(nnx_state)) == STEPS


# --------------------------------------------------------------------------- Flax Linen


@pytest.mark.parametrize("packed", [False, True, None])  # None: packs where init finds leaves to pack
def test_flax_linen_train_state_trains_like_kopt_by_hand(packed):
    nn = pytest.importorskip("flax.linen")
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="out")(jnp.tanh(nn.Dense(16, name="hidden")(x)))

    model = MLP()
    start = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=start, tx=kopt.SGD(lr=0.1, momentum=0.9, nesterov=True, decay=0.01, packed=packed)
    )

    @jax.jit
    def step(state, x, y):
        def loss_fn(params):
            return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for x, y in batches():
        state, loss = step(state, x, y)
        losses.append(loss)
    params, opt_state, hand_losses = by_hand(kopt.SGD(lr=0.1, momentum=0.9, nesterov=True, decay=0.01), start)
    assert losses[-1] < losses[0]
    chex.assert_trees_all_close(jnp.stack(losses), hand_losses, **TOLERANCE)
    chex.assert_trees_all_close(state.params, params, **TOLERANCE)
    chex.assert_trees_all_close(
        kopt.get_slot(state.opt_state, "velocity"), kopt.get_slot(opt_state, "velocity"), **TOLERANCE
    )
    assert int(state.step) == int(kopt.iterations(state.opt_state)) == STEPS


# --------------------------------------------------------------------------- Equinox


@pytest.mark.parametrize("packed", [False, True, None])  # None: packs where init finds leaves to pack
def test_equinox_loop_with_none_leaves_trains_like_kopt_by_hand(packed):
    eqx = pytest.importorskip("equinox")

    class MLP(eqx.Module):
        hidden: eqx.nn.Linear
        out: eqx.nn.Linear
        activation: callable  # a function leaf: eqx.filter makes it None

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.hidden = eqx.nn.Linear(4, 16, key=k1)
            self.out = eqx.nn.Linear(16, 2, key=k2)
            self.activation = jnp.tanh

        def __call__(self, x):
            return self.out(self.activation(self.hidden(x)))

    model = MLP(jax.random.key(0))
    # Train every array but the output bias: its place in params, grads and slots is None.
    trainable = eqx.tree_at(lambda m: m.out.bias, jax.tree.map(eqx.is_inexact_array, model), replace=False)
    opt = kopt.Nadam(lr=0.01, packed=packed)
    state = opt.init(eqx.filter(model, trainable))

    @eqx.filter_jit
    def step(model, state, x, y):
        diff, static = eqx.partition(model, trainable)

        def loss_fn(diff):
            return jnp.mean((jax.vmap(eqx.combine(diff, static))(x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(diff)
        updates, state = opt.update(grads, state, diff)
        return eqx.apply_updates(model, updates), state, loss

    def plain(tree):  # Equinox's layout -> the plain dict by_hand uses (kernel = weight.T)
        return {
            "hidden": {"kernel": tree.hidden.weight.T, "bias": tree.hidden.bias},
            "out": {"kernel": tree.out.weight.T, "bias": tree.out.bias},
        }

    frozen_bias = model.out.bias
    start = plain(eqx.filter(model, trainable))
    assert start["out"]["bias"] is None and eqx.filter(model, trainable).activation is None
    losses = []
    for x, y in batches():
        model, state, loss = step(model, state, x, y)
        losses.append(loss)
    params, hand_state, hand_losses = by_hand(kopt.Nadam(lr=0.01), start, functools.partial(mse, out_bias=frozen_bias))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_close(jnp.stack(losses), hand_losses, **TOLERANCE)
    chex.assert_trees_all_equal(model.out.bias, frozen_bias)
    chex.assert_trees_all_close(plain(eqx.filter(model, trainable)), params, **TOLERANCE)
    for slot in ("m", "v"):
        assert kopt.get_slot(state, slot).out.bias is None
        chex.assert_trees_all_close(plain(kopt.get_slot(state, slot)), kopt.get_slot(hand_state, slot), **TOLERANCE)
    assert int(kopt.iterations(state)) == STEPS


def test_flax_nnx_params_asking_for_a_sharding_keep_their_own_buffer():
    nnx = pytest.importorskip("flax.nnx")
    with jax.set_mesh(jax.make_mesh((1,), ("model",))):
        params = {
            "sharded": nnx.Param(jnp.ones((4, 8)), out_sharding=(None, "model")),
            "a": nnx.Param(jnp.ones(8)),
            "b": nnx.Param(jnp.ones(8)),
        }
        layout = kopt.Adam(packed=True).init(params).layout
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    buffers = dict(zip(paths, layout.buffers, strict=True))
    assert buffers["['sharded'].value"].startswith("leaf")
    assert buffers["['a'].value"] == buffers["['b'].value"] == "buffer0_0"


KERAS3 = {
    **{name: lambda f=f: f(0.01) for name, f in kopt.keras.OPTIMIZERS.items() if name != "Muon"},
    "Muon": lambda: kopt.keras.Muon(0.01),
    "LossScaleOptimizer": lambda: kopt.keras.LossScaleOptimizer(kopt.keras.Adam(0.01), initial_scale=1.0),
    "MultiOptimizer": lambda: kopt.keras.MultiOptimizer(
        kopt.keras.OptimizerMap(kopt.keras.Lion(0.01), {"out/.*": kopt.keras.Lamb(0.01)})
    ),
}


@pytest.mark.parametrize("name", list(KERAS3))
def test_keras3_optimizers_train_in_flax_nnx_and_inside_optax_chains(name):
    """Every Keras 3 optimizer, on kopt's default state layout, in Flax NNX's ``nnx.Optimizer`` and by hand
    inside ``optax.chain``: the same steps (paths: NNX's ``value`` is dropped, so MultiOptimizer's
    ``out/kernel`` is the same leaf in both)."""
    nnx = pytest.importorskip("flax.nnx")
    start, losses, model, _ = train_in_nnx(KERAS3[name]())
    params, _, hand_losses = by_hand(optax.chain(KERAS3[name](), optax.scale(1.0)), start)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, start)
    assert min(jax.tree.leaves(moved)) > 0, moved  # every leaf stepped (each batch differs: no loss trend)
    chex.assert_trees_all_close(losses, hand_losses, **PACKED_TOLERANCE)
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params, **PACKED_TOLERANCE)
