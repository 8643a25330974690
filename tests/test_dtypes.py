"""optax's dtype contract, and complex params, against the Keras 2.2.4 NumPy reference.

* Updates come back in the gradients' dtype (the params' dtype, as ``jax.grad``
  gives them): a bfloat16 update is the reference's float32 update rounded
  once, the state stays float32 and matches the reference, and a bfloat16
  training run differs from the former float32 updates by that one rounding.
* Complex params (optax's convention: the conjugated gradient in, real second
  moments of ``|g|**2``): a complex param with zero imaginary part follows the
  Keras trajectory of its real part exactly, and a genuinely complex one
  follows a NumPy implementation of the complex rule.
* Equinox keeps a bfloat16 model bfloat16 through ``eqx.apply_updates``, and
  Flax NNX trains bfloat16 params with float32 state.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kopt
from tests import reference

BF16_ULP = 2.0**-7  # bfloat16 keeps 8 significant bits: neighbours differ by at most 2**-7 relative

#: (alias, Keras 2.2.4 arguments): every optimizer, with clipping on some.
ALIASES = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("RMSprop", {"clipnorm": 2.0}),
    ("Adagrad", {"lr": 0.1}),
    ("Adadelta", {"clipvalue": 0.5}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "clipnorm": 1.0}),
    ("Adamax", {}),
    ("Nadam", {}),
]
IDS = [f"{name}-{'-'.join(config)}" for name, config in ALIASES]
#: Without clipvalue, which has no complex meaning (test_clipvalue_on_complex_params_is_refused_naming_the_leaf).
COMPLEX_ALIASES = [(name, config) for name, config in ALIASES if "clipvalue" not in config] + [("Adadelta", {})]


def _grads(steps: int, shapes: tuple[tuple[int, ...], ...], dtype, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=shape).astype(dtype) for shape in shapes] for _ in range(steps)]


@pytest.mark.parametrize(("name", "config"), ALIASES, ids=IDS)
def test_bfloat16_updates_are_the_references_float32_updates_rounded_once(name, config):
    # The reference holds float32 state; with zero params its new params are exactly its float32 updates
    # (the moments do not depend on the params), so each kopt bfloat16 update must be that, rounded once.
    shapes = ((3, 4), (5,))
    opt, ref = getattr(kopt, name)(**config), reference.make(name, dtype=np.float32, **config)
    params = [jnp.zeros(shape, jnp.bfloat16) for shape in shapes]
    state = opt.init(params)
    step = jax.jit(opt.update)
    for grads in _grads(6, shapes, ml_dtypes.bfloat16):
        updates, state = step([jnp.asarray(g) for g in grads], state, params)
        expected = ref.step([np.zeros(shape, np.float32) for shape in shapes], [g.astype(np.float32) for g in grads])
        chex.assert_trees_all_equal_dtypes(updates, params)
        chex.assert_trees_all_close(
            [u.astype(np.float32) for u in updates],
            [e.astype(ml_dtypes.bfloat16).astype(np.float32) for e in expected],
            rtol=BF16_ULP,
            atol=1e-30,
        )
    for slot, arrays in ref.slots().items():  # the state is float32 and is the reference's, untouched by the cast
        chex.assert_trees_all_equal_dtypes(kopt.get_slot(state, slot), [np.zeros(1, np.float32)] * len(shapes))
        chex.assert_trees_all_close(kopt.get_slot(state, slot), arrays, rtol=2e-5, atol=1e-7)


def _regression(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8) + 0.1 * rng.normal(size=32)).astype(np.float32)

    def grad(w: np.ndarray) -> np.ndarray:  # of mean((x w - y)**2), in float32 from the bfloat16 weights
        return (2.0 / len(y) * x.T @ (x @ w.astype(np.float32) - y)).astype(ml_dtypes.bfloat16)

    def loss(w: np.ndarray) -> float:
        return float(np.mean((x @ w.astype(np.float32) - y) ** 2))

    return grad, loss


def test_a_bfloat16_training_run_moves_by_one_rounding_of_the_update():
    """What the cast changes: kopt's run (bfloat16 updates) against the reference's float32 updates."""
    grad, loss = _regression()
    opt = kopt.Adam(lr=0.01)
    zeros = [np.zeros(8, np.float32)]
    step = jax.jit(lambda w, state, g: opt.update(g, state, w))

    # Step by step from kopt's own params: kopt's next params are the reference update rounded to bfloat16,
    # then added to the bfloat16 params and rounded again (p + u in bfloat16).
    ref = reference.make("Adam", dtype=np.float32, lr=0.01)
    w, state = jnp.zeros(8, jnp.bfloat16), opt.init(jnp.zeros(8, jnp.bfloat16))
    for _ in range(100):
        g = grad(np.asarray(w))
        updates, state = step(w, state, jnp.asarray(g))
        u = ref.step(zeros, [g.astype(np.float32)])[0]
        expected = (np.asarray(w).astype(np.float32) + u.astype(ml_dtypes.bfloat16).astype(np.float32)).astype(
            ml_dtypes.bfloat16
        )
        w = kopt.apply_updates(w, updates)
        assert w.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(w, np.float32), expected.astype(np.float32), rtol=BF16_ULP, atol=1e-6)

    # Free-running, the once-rounded update (kopt now) against the float32 update added in one rounding (before):
    # the runs reach the same loss (measured: 0.018867 and 0.018868); the weights differ by under 2 bfloat16 ulps.
    runs = {}
    for rounded in (True, False):
        ref, w = reference.make("Adam", dtype=np.float32, lr=0.05), np.zeros(8, ml_dtypes.bfloat16)
        for _ in range(300):
            u = ref.step(zeros, [grad(w).astype(np.float32)])[0]
            u = u.astype(ml_dtypes.bfloat16).astype(np.float32) if rounded else u
            w = (w.astype(np.float32) + u).astype(ml_dtypes.bfloat16)
        runs[rounded] = w.astype(np.float32)
    assert loss(runs[True]) == pytest.approx(loss(runs[False]), rel=1e-3)
    np.testing.assert_allclose(runs[True], runs[False], rtol=2 * BF16_ULP)
    assert loss(runs[True]) < 0.01 * loss(np.zeros(8, np.float32))


# --------------------------------------------------------------------------- complex params


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize(("name", "config"), COMPLEX_ALIASES, ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_complex_params_with_zero_imaginary_part_follow_keras(name, config, dtype):
    real = np.float32 if dtype == np.complex64 else np.float64
    with jax.enable_x64(dtype == np.complex128):
        shapes = ((3, 4), (5,))
        opt, ref = getattr(kopt, name)(**config), reference.make(name, dtype=real, **config)
        rng = np.random.default_rng(1)
        start = [rng.normal(size=shape).astype(real) for shape in shapes]
        params = [jnp.asarray(p, dtype) for p in start]
        ref_params, state = start, opt.init(params)
        for grads in _grads(8, shapes, real):
            updates, state = opt.update([jnp.asarray(g, dtype) for g in grads], state, params)
            params = kopt.apply_updates(params, updates)
            ref_params = ref.step(ref_params, grads)
        chex.assert_trees_all_equal_dtypes(params, [np.zeros(1, dtype)] * len(shapes))
        tolerance = {"rtol": 2e-5, "atol": 2e-6} if real == np.float32 else {"rtol": 1e-12, "atol": 1e-13}
        chex.assert_trees_all_close([np.real(p) for p in params], ref_params, **tolerance)
        chex.assert_trees_all_equal([np.imag(p) for p in params], [np.zeros(s, real) for s in shapes])


def _complex_adam(params, grads_sequence, lr=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras 2.2.4's Adam with optax's complex convention: m complex, v of |g|**2 (real)."""
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros(p.shape, np.float64) for p in params]
    for t, grads in enumerate(grads_sequence, start=1):
        step = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        m = [beta_1 * a + (1 - beta_1) * g for a, g in zip(m, grads, strict=True)]
        v = [beta_2 * b + (1 - beta_2) * np.abs(g) ** 2 for b, g in zip(v, grads, strict=True)]
        params = [p - step * a / (np.sqrt(b) + epsilon) for p, a, b in zip(params, m, v, strict=True)]
    return params, m, v


def test_complex_adam_follows_the_complex_rule():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        shapes = ((4,), (2, 3))
        start = [rng.normal(size=s) + 1j * rng.normal(size=s) for s in shapes]
        sequence = [[rng.normal(size=s) + 1j * rng.normal(size=s) for s in shapes] for _ in range(10)]
        opt = kopt.Adam(lr=0.01)
        params = [jnp.asarray(p, jnp.complex128) for p in start]
        state = opt.init(params)
        for grads in sequence:
            updates, state = opt.update([jnp.asarray(g) for g in grads], state, params)
            params = kopt.apply_updates(params, updates)
        expected, m, v = _complex_adam(start, sequence)
        chex.assert_trees_all_close(params, expected, rtol=1e-12, atol=1e-14)
        chex.assert_trees_all_close(kopt.get_slot(state, "m"), m, rtol=1e-12)
        chex.assert_trees_all_close(kopt.get_slot(state, "v"), v, rtol=1e-12)
        assert kopt.get_slot(state, "v")[0].dtype == jnp.float64  # second moments are real


def test_complex_global_norm_clip_measures_both_parts():
    clip = kopt.clip_by_global_norm(1.0)
    updates, _ = clip.update({"z": jnp.asarray([3.0 + 4.0j])}, clip.init(None))
    chex.assert_trees_all_close(updates, {"z": jnp.asarray([0.6 + 0.8j], jnp.complex64)})


@pytest.mark.parametrize("opt", [kopt.clip_by_value(1.0), kopt.Adam(clipvalue=1.0), kopt.tf_keras.SGD(clipvalue=1.0)])
def test_clipvalue_on_complex_params_is_refused_naming_the_leaf(opt):
    with pytest.raises(TypeError, match=r"params\['z'\] is complex .* clip_by_value .* no order"):
        opt.init({"z": jnp.zeros(2, jnp.complex64)})


def test_clip_by_value_on_complex_updates_is_refused_naming_the_leaf():
    clip = kopt.clip_by_value(1.0)
    with pytest.raises(TypeError, match=r"updates\['z'\] is complex"):
        clip.update({"z": jnp.ones(2, jnp.complex64)}, clip.init(None))


@pytest.mark.parametrize("opt", [kopt.Adam(), kopt.SGD(momentum=0.9), kopt.Adam(packed=True)])
def test_complex_gradients_for_real_params_are_refused(opt):
    params = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"updates\['w'\] is complex, but its param .* is real"):
        opt.update({"w": jnp.ones(2, jnp.complex64)}, opt.init(params), params)
    with pytest.raises(TypeError, match=r"a complex update .* for a real param"):
        kopt.apply_updates(params, {"w": jnp.ones(2, jnp.complex64)})


def test_a_real_state_dtype_for_complex_params_is_refused():
    with pytest.raises(ValueError, match="state_dtype=bfloat16 cannot hold the complex moments of a complex64 param"):
        kopt.Adam(state_dtype="bfloat16").init({"z": jnp.zeros(2, jnp.complex64)})


# --------------------------------------------------------------------------- Equinox and Flax NNX in bfloat16


def test_equinox_bfloat16_model_stays_bfloat16_with_the_optimizer_as_an_argument():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.Linear(4, 2, key=jax.random.key(0), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.bfloat16)
    y = jnp.sum(x, axis=1, keepdims=True).repeat(2, axis=1)

    @eqx.filter_jit
    def step(model, opt_state, opt):  # the optimizer is an argument: Equinox partitions it like any pytree
        def loss_fn(model):
            return jnp.mean((jax.vmap(model)(x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    for opt in (kopt.Adam(lr=0.05), kopt.SGD(lr=0.05, momentum=0.9, clipnorm=1.0), kopt.Nadam(lr=0.05, packed=True)):
        trained, opt_state = model, opt.init(eqx.filter(model, eqx.is_array))
        losses = []
        for _ in range(20):
            trained, opt_state, loss = step(trained, opt_state, opt)
            losses.append(float(loss))
        assert trained.weight.dtype == trained.bias.dtype == jnp.bfloat16, opt
        assert losses[-1] < 0.5 * losses[0], (opt, losses)
        assert {leaf.dtype for leaf in jax.tree.leaves(opt_state) if leaf.ndim} == {jnp.dtype(jnp.float32)}


def test_flax_nnx_bfloat16_params_train_with_float32_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 1, param_dtype=jnp.bfloat16, dtype=jnp.float32, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, kopt.Adam(lr=0.05, clipnorm=1.0), wrt=nnx.Param)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert model.kernel[...].dtype == model.bias[...].dtype == jnp.bfloat16
    assert losses[-1] < 0.5 * losses[0]
    state = nnx.as_pure(optimizer.opt_state)
    assert {leaf.dtype for leaf in jax.tree.leaves(kopt.get_slot(state, "m"))} == {jnp.dtype(jnp.float32)}


def test_complex_states_have_no_keras_weights_and_real_slots_refuse_complex_values():
    opt, params = kopt.Adam(lr=0.1), {"z": jnp.ones(2, jnp.complex64)}
    state = opt.update(params, opt.init(params), params)[1]
    with pytest.raises(ValueError, match=r"state.* is complex \(complex64\): Keras optimizer weights are real"):
        kopt.to_keras_weights(opt, state)
    weights = [np.int64(1), np.ones(2, np.float32), np.ones(2, np.float32), np.zeros(1), np.zeros(1)]
    with pytest.raises(ValueError, match=r"params\['z'\] is complex"):
        kopt.from_keras_weights(opt, params, weights)
    with pytest.raises(ValueError, match=r"slot 'v' is real \(float32\): a complex value would lose"):
        kopt.set_slot(state, "v", {"z": jnp.ones(2, jnp.complex64)})
    chex.assert_trees_all_equal(
        kopt.get_slot(kopt.set_slot(state, "m", {"z": jnp.full(2, 1j)}), "m"), {"z": jnp.full(2, 1j, jnp.complex64)}
    )
