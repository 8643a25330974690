"""kopt.train_step (one donated program) and the packed-parameters path, against plain per-leaf steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kopt

OPTIMIZERS = {
    "SGD": lambda: kopt.SGD(lr=0.1, momentum=0.9, nesterov=True, decay=0.01),
    "RMSprop": lambda: kopt.RMSprop(lr=0.01),
    "Adagrad": lambda: kopt.Adagrad(lr=0.1),
    "Adadelta": lambda: kopt.Adadelta(),
    "Adam": lambda: kopt.Adam(lr=0.01, amsgrad=True, clipnorm=1.0),
    "Adamax": lambda: kopt.Adamax(clipvalue=0.5),
    "Nadam": lambda: kopt.Nadam(lr=0.01),
    "AdamW": lambda: kopt.AdamW(lr=0.01, weight_decay=0.1),
    "wrapped": lambda: kopt.skip_nonfinite(kopt.accumulate(kopt.Adam(lr=0.01), 2)),
}


def loss_fn(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def model():
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(3, 8)) * 0.5,
        "b1": np.zeros(8),
        "w2": rng.normal(size=(8, 1)) * 0.5,
        "b2": np.zeros(1),
    }
    batch = (rng.normal(size=(16, 3)), rng.normal(size=(16, 1)))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (params, batch))


def manual_steps(opt, params, batch, n):
    state = opt.init(params)
    for _ in range(n):
        grads = jax.grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        params = kopt.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_train_step_equals_manual_steps_and_donates(name):
    opt = OPTIMIZERS[name]()
    params, batch = model()
    expected, expected_state = manual_steps(opt, params, batch, 4)
    step = kopt.train_step(loss_fn, opt)
    state = opt.init(params)
    losses = []
    for _ in range(4):
        old = params
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
        assert old["w1"].is_deleted()  # donated: updated in place
    chex.assert_trees_all_close(params, expected, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(state, expected_state, rtol=1e-6, atol=1e-7)
    assert losses[-1] < losses[0]


def test_train_step_with_aux_extra_args_and_no_donation():
    params, batch = model()
    opt = kopt.chain(kopt.SGD(lr=0.1), kopt.reduce_on_plateau(patience=0, factor=0.5))
    step = kopt.train_step(lambda p, b: (loss_fn(p, b), {"twice": 2 * loss_fn(p, b)}), opt, has_aux=True, donate=False)
    state = opt.init(params)
    new, state, loss, aux = step(params, state, batch, value=1.0)
    new, state, loss, aux = step(new, state, batch, value=1.0)  # no improvement: scale halves
    assert not params["w1"].is_deleted()
    assert float(aux["twice"]) == pytest.approx(2 * float(loss), rel=1e-6)
    assert float(kopt.get_slot(state, "scale")) == 0.5


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_packed_parameters_path_gives_the_per_leaf_numbers(name):
    # Params kept as one flat buffer, unpacked inside the loss: one leaf for the optimizer.
    params, batch = model()
    expected, _ = manual_steps(OPTIMIZERS[name](), params, batch, 4)
    flat, unravel = ravel_pytree(params)
    opt = OPTIMIZERS[name]()
    step = kopt.train_step(lambda f, b: loss_fn(unravel(f), b), opt)
    state = opt.init(flat)
    for _ in range(4):
        flat, state, _ = step(flat, state, batch)
    chex.assert_trees_all_close(unravel(flat), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "opt",
    [
        *[make() for make in OPTIMIZERS.values()],
        kopt.chain(kopt.Adam(), kopt.reduce_on_plateau(), kopt.ema_params(0.9)),
        kopt.lookahead(kopt.Nadam()),
        kopt.partition({"a": kopt.SGD(momentum=0.9), "b": kopt.Adam()}, {"w1": "a", "b1": "b", "w2": "a", "b2": "b"}),
        kopt.masked(kopt.Adadelta(), {"w1": True, "b1": False, "w2": True, "b2": False}),
    ],
)
def test_every_state_leaf_is_its_own_buffer_so_the_state_can_be_donated(opt):
    params, _ = model()
    leaves = jax.tree.leaves(opt.init(params)) + jax.tree.leaves(params)
    pointers = [leaf.unsafe_buffer_pointer() for leaf in leaves]
    assert len(set(pointers)) == len(pointers)
