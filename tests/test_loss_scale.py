"""Dynamic loss scaling: ``kopt.dynamic_loss_scale`` against a plain-Python transcription of the rule, in a
jitted float16 train step, and Keras' loss-scale optimizers from their configs against the real packages
(Keras 3's ``LossScaleOptimizer``, which takes scaled gradients, and tf_keras' ``mixed_precision``
``LossScaleOptimizer`` over legacy and TF >= 2.11 optimizers, which takes unscaled ones), live when installed."""

import itertools
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt

SHAPES = [(3, 2), (2,)]
TOLERANCE = {"rtol": 2e-5, "atol": 2e-6}
# Steps 3 and 6 overflow; with growth every 2 finite steps the scale goes up, down, up.
NONFINITE_STEPS = (3, 6)
STEPS = 9


def gradients(seed: int, dtype=np.float32) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    grads = [[rng.normal(size=s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    for t in NONFINITE_STEPS:
        grads[t - 1][0][0, 0] = np.inf if t == 3 else np.nan
    return grads


def expected_scales(initial: float, growth: int, min_scale: float) -> list[float]:
    """The scale after each step, by the rule, in plain Python."""
    scale, good, scales = initial, 0, []
    for t in range(1, STEPS + 1):
        if t in NONFINITE_STEPS:
            scale, good = max(scale / 2, min_scale), 0
        elif good + 1 >= growth:
            scale, good = scale * 2, 0
        else:
            good += 1
        scales.append(scale)
    return scales


@pytest.mark.parametrize("unscale", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dynamic_loss_scale_is_the_rule(dtype, unscale):
    with jax.enable_x64(dtype == np.float64):
        rng = np.random.default_rng(0)
        params = [rng.normal(size=s).astype(dtype) for s in SHAPES]
        opt = kopt.dynamic_loss_scale(kopt.SGD(lr=0.1), initial_scale=4.0, growth_steps=2, unscale=unscale)
        state, current, reference = opt.init(params), [jnp.asarray(p) for p in params], [p.copy() for p in params]
        scales = expected_scales(4.0, 2, 0.0)
        scale = 4.0
        for t, g in enumerate(gradients(1, dtype), start=1):
            updates, state = jax.jit(opt.update)([jnp.asarray(x) for x in g], state, current)
            current = kopt.apply_updates(current, updates)
            if t not in NONFINITE_STEPS:  # a skipped step leaves the params (and SGD's state) as they were
                reference = [p - 0.1 * (x / scale if unscale else x) for p, x in zip(reference, g, strict=True)]
            chex.assert_trees_all_close(current, reference, rtol=1e-6, atol=1e-7)
            assert float(kopt.get_slot(state, "loss_scale")) == scales[t - 1]
            scale = scales[t - 1]
        assert int(kopt.iterations(state)) == STEPS - len(NONFINITE_STEPS)  # the inner step count skips too


def test_dynamic_loss_scale_floor_fixed_scale_and_bad_input():
    opt = kopt.dynamic_loss_scale(kopt.SGD(lr=0.1), initial_scale=2.0, growth_steps=5, min_scale=1.0)
    state, params = opt.init(jnp.ones(2)), jnp.ones(2)
    for _ in range(3):
        _, state = opt.update(jnp.array([jnp.nan, 0.0]), state, params)
    assert float(kopt.get_slot(state, "loss_scale")) == 1.0  # halved once, then held at min_scale
    fixed = kopt.dynamic_loss_scale(kopt.SGD(lr=0.1), initial_scale=8.0, growth_steps=None)
    updates, state = fixed.update(jnp.array([8.0, jnp.inf]), fixed.init(params), params)
    assert updates.tolist()[0] == pytest.approx(-0.1) and math.isinf(updates.tolist()[1])  # nothing skipped
    assert float(kopt.get_slot(state, "loss_scale")) == 8.0
    with pytest.raises(ValueError, match="initial_scale must be > 0"):
        kopt.dynamic_loss_scale(kopt.SGD(), initial_scale=0.0)
    with pytest.raises(ValueError, match="growth_steps"):
        kopt.dynamic_loss_scale(kopt.SGD(), growth_steps=0)


def test_float16_train_step_with_dynamic_loss_scale():
    """A jitted float16 regression step: the loss is scaled from the state, overflowing steps are skipped,
    the scale adapts, and training still converges."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 4)).astype(np.float16)
    y = (x.astype(np.float32) @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)).astype(np.float16)
    params = {"w": jnp.zeros(4, jnp.float16)}
    opt = kopt.dynamic_loss_scale(kopt.Adam(lr=0.05), initial_scale=2.0**15, growth_steps=10)

    def loss_fn(p):
        return jnp.mean((x @ p["w"] - y) ** 2)

    @jax.jit
    def step(p, state):
        scale = kopt.get_slot(state, "loss_scale")
        loss, grads = jax.value_and_grad(lambda q: (loss_fn(q) * scale).astype(jnp.float16))(p)
        updates, state = opt.update(grads, state, p)
        return kopt.apply_updates(p, updates), state, loss / scale

    state, scales = opt.init(params), []
    first = float(loss_fn(params))
    for _ in range(150):
        params, state, _ = step(params, state)
        scales.append(float(kopt.get_slot(state, "loss_scale")))
    assert params["w"].dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(params["w"])))
    assert min(scales) < 2.0**15  # the first steps overflow float16 and halve the scale
    assert any(b > a for a, b in itertools.pairwise(scales))  # and it grows back
    assert float(loss_fn(params)) < 0.01 * first


def _keras3():
    keras = pytest.importorskip("keras", reason="the keras3 extra is not installed")
    if not keras.__version__.startswith("3."):
        pytest.skip("Keras 3 is needed")
    return keras


def test_keras3_loss_scale_optimizer_from_its_config_follows_keras3():
    keras = _keras3()
    k_opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05), initial_scale=8.0, dynamic_growth_steps=2)
    config = keras.optimizers.serialize(k_opt)
    opt = kopt.deserialize(config)
    assert kopt.serialize(opt) == json.loads(json.dumps(config))
    rng = np.random.default_rng(3)
    start = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    variables = [keras.Variable(p) for p in start]
    k_opt.build(variables)
    # The JAX backend steps this optimizer statelessly (as model.fit does): its eager apply cannot run here.
    held = [v.value for v in k_opt.variables]
    where = {id(v): i for i, v in enumerate(k_opt.variables)}
    scale_at, iterations_at = where[id(k_opt.dynamic_scale)], where[id(k_opt.iterations)]
    trainable = [v.value for v in variables]
    params = [jnp.asarray(p) for p in start]
    state = opt.init(params)
    for g in gradients(4):  # Keras 3 takes the scaled gradients: the same arrays go to both
        trainable, held = k_opt.stateless_apply(held, [jnp.asarray(x) for x in g], trainable)
        updates, state = opt.update([jnp.asarray(x) for x in g], state, params)
        params = kopt.apply_updates(params, updates)
        chex.assert_trees_all_close(params, [np.asarray(v) for v in trainable], **TOLERANCE)
        assert float(kopt.get_slot(state, "loss_scale")) == float(held[scale_at])
    assert int(kopt.iterations(state)) == int(held[iterations_at])


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "current"])
def test_tf_keras_loss_scale_optimizer_from_its_config_follows_tensorflow(legacy):
    tf_keras = pytest.importorskip("tf_keras")
    import tensorflow as tf

    inner = (tf_keras.optimizers.legacy.Adam if legacy else tf_keras.optimizers.Adam)(0.05)
    tf_opt = tf_keras.mixed_precision.LossScaleOptimizer(inner, initial_scale=8.0, dynamic_growth_steps=2)
    config = json.loads(json.dumps(tf_keras.optimizers.serialize(tf_opt)))
    opt = kopt.deserialize(config)
    assert kopt.serialize(opt) == config
    rng = np.random.default_rng(5)
    start = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    variables = [tf.Variable(p) for p in start]
    params = [jnp.asarray(p) for p in start]
    state = opt.init(params)
    for g in gradients(6):  # tf_keras takes unscaled gradients (get_unscaled_gradients)
        tf_opt.apply_gradients(zip([tf.constant(x) for x in g], variables, strict=True))
        updates, state = opt.update([jnp.asarray(x) for x in g], state, params)
        params = kopt.apply_updates(params, updates)
        chex.assert_trees_all_close(params, [v.numpy() for v in variables], **TOLERANCE)
        assert float(kopt.get_slot(state, "loss_scale")) == float(tf_opt.loss_scale)
    assert float(kopt.get_slot(state, "loss_scale")) == expected_scales(8.0, 2, 1.0)[-1]
    assert int(kopt.iterations(state)) == int(tf_opt.iterations) == STEPS  # tf_keras counts the skipped steps
