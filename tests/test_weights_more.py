"""More optimizer weights both ways, live: tf_keras' Adafactor, tf_keras' loss-scale optimizers (and a saved
``mixed_float16`` model), Keras 3's Muon.

As in ``tests/test_keras3_weights.py``: Keras steps a few times, kopt goes on from its weights
(:func:`kopt.from_keras_weights`) and must match the uninterrupted Keras run; then kopt steps first, a fresh
Keras optimizer takes :func:`kopt.to_keras_weights` and must match kopt. Float32, ``2e-6 + 2e-5 |keras|``.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt.keras_io.weights import weight_specs
from tests.stepping import assert_same_trajectory, jitted_step, run_steps

SHAPES = [(3, 2), (2,), (2, 2, 3)]  # a kernel, a bias and a 3-D variable (Adafactor factors its last two axes)
BEFORE, AFTER = 4, 3


def data(seed, shapes=SHAPES, infs=()):
    rng = np.random.default_rng(seed)
    start = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(BEFORE + AFTER)]
    for t in infs:  # non-finite steps, for the loss-scale optimizers to skip
        grads[t][0].flat[0] = np.inf
    return start, grads


# --------------------------------------------------------------------------- tf_keras


@pytest.fixture(scope="module")
def tf_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pytest.importorskip("tensorflow")
    return pytest.importorskip("tf_keras")


def tf_variables(optimizer):
    """tf_keras' optimizer variables: a property of TF >= 2.11's, a method of the legacy ones (and their LSO)."""
    held = optimizer.variables
    return list(held() if callable(held) else held)


class TfRun:
    """A tf_keras optimizer stepping tf.Variables eagerly with ``apply_gradients``."""

    def __init__(self, tf_keras, optimizer, start):
        import tensorflow as tf

        self.optimizer = optimizer
        self.variables = [tf.Variable(x, name=f"v{i}") for i, x in enumerate(start)]

    def step(self, grads):
        self.optimizer.apply_gradients(zip([np.asarray(g) for g in grads], self.variables, strict=True))
        return [v.numpy() for v in self.variables]

    def weights(self):
        return [v.numpy() for v in tf_variables(self.optimizer)]


def tf_both_ways(tf_keras, make, seed, infs=(), loss_scaled=False):
    """Keras -> kopt -> same continuation; kopt -> fresh Keras -> same continuation. Returns kopt's opt."""
    start, grads = data(seed, infs=infs)
    run = TfRun(tf_keras, make(), start)
    opt = kopt.deserialize(tf_keras.optimizers.serialize(run.optimizer))
    step = jitted_step(opt)

    for g in grads[:BEFORE]:
        middle = run.step(g)
    extra = {}
    if loss_scaled:
        extra = {"loss_scale": run.optimizer.loss_scale.numpy(), "good_steps": run.optimizer.dynamic_counter.numpy()}
    params = [jnp.asarray(x) for x in middle]
    state = kopt.from_keras_weights(opt, params, run.weights(), **extra)
    _, _, last = run_steps(step, params, state, grads[BEFORE:])
    expected = [run.step(g) for g in grads[BEFORE:]]
    assert_same_trajectory(run_steps(step, params, state, grads[BEFORE:])[0], expected)
    if loss_scaled:
        assert float(kopt.get_slot(last, "loss_scale")) == run.optimizer.loss_scale.numpy()
        assert int(kopt.get_slot(last, "good_steps")) == run.optimizer.dynamic_counter.numpy()
    assert int(kopt.iterations(last)) == run.optimizer.iterations.numpy()

    params = [jnp.asarray(x) for x in start]
    _, params, state = run_steps(step, params, opt.init(params), grads[:BEFORE])
    weights = kopt.to_keras_weights(opt, state, flavor=opt.flavor)
    fresh = TfRun(tf_keras, make(), [np.asarray(x) for x in params])
    fresh.step([np.zeros(s, np.float32) for s in SHAPES])  # makes the slots (a zero step moves nothing)
    held = tf_variables(fresh.optimizer)
    assert [w.shape for w in weights] == [tuple(v.shape) for v in held]
    for variable, weight in zip(held, weights, strict=True):
        variable.assign(weight)
    if loss_scaled:
        counters = fresh.optimizer._loss_scale  # tf_keras has no public setter (tf.train.Checkpoint restores them)
        counters.current_loss_scale.assign(kopt.get_slot(state, "loss_scale"))
        counters.counter.assign(kopt.get_slot(state, "good_steps"))
    for variable, x in zip(fresh.variables, params, strict=True):
        variable.assign(np.asarray(x))
    expected = run_steps(step, params, state, grads[BEFORE:])[0]
    assert_same_trajectory([fresh.step(g) for g in grads[BEFORE:]], expected)
    return opt


def test_tf_keras_adafactor_both_ways(tf_keras):
    opt = tf_both_ways(tf_keras, lambda: tf_keras.optimizers.Adafactor(0.05), seed=1)
    # r and c only for the kernel and the 3-D variable: iterations, (r, c, v), (v), (r, c, v)
    specs = weight_specs(opt, [np.zeros(s, np.float32) for s in SHAPES], 8)
    assert [s.shape for s in specs] == [(), (3,), (2,), (3, 2), (2,), (2, 2), (2, 3), (2, 2, 3)]
    assert [s.kinds for s in specs] == ["iu"] + ["f"] * 7


def test_tf_keras_adafactor_ema_counts(tf_keras):
    opt = kopt.tf_keras.Adafactor(0.05, use_ema=True)
    params = [jnp.zeros(s) for s in SHAPES]
    weights = kopt.to_keras_weights(opt, opt.init(params), flavor="tf_keras")
    assert [w.shape for w in weights] == [
        (),
        (3, 2),
        (2,),
        (2, 2, 3),
        (3,),
        (2,),
        (3, 2),
        (2,),
        (2, 2),
        (2, 3),
        (2, 2, 3),
    ]
    with pytest.raises(ValueError, match=r"11 weights \[iterations, average x3, \(r \(2\+ dims\), c"):
        kopt.from_keras_weights(opt, params, weights[:-1])


@pytest.mark.parametrize("legacy", [True, False], ids=["LossScaleOptimizer", "LossScaleOptimizerV3"])
def test_tf_keras_loss_scale_optimizer_both_ways(tf_keras, legacy):
    def make():
        inner = (tf_keras.optimizers.legacy if legacy else tf_keras.optimizers).Adam(0.01)
        return tf_keras.mixed_precision.LossScaleOptimizer(inner, initial_scale=8.0, dynamic_growth_steps=2)

    opt = tf_both_ways(tf_keras, make, seed=2, infs=(1, BEFORE + 1), loss_scaled=True)
    assert opt.class_name == ("LossScaleOptimizer" if legacy else "LossScaleOptimizerV3")


def test_loss_scale_arguments_are_checked(tf_keras):
    inner = {"class_name": "SGD", "config": {"learning_rate": 0.1, "momentum": 0.5, "is_legacy_optimizer": False}}
    opt = kopt.deserialize({"class_name": "LossScaleOptimizerV3", "config": {"inner_optimizer": inner}})
    params = [jnp.ones(2)]
    weights = [np.int64(3), np.ones(2, np.float32)]
    state = kopt.from_keras_weights(opt, params, weights)  # the scale restarts, as load_model does
    assert float(kopt.get_slot(state, "loss_scale")) == 2.0**15 and int(kopt.get_slot(state, "good_steps")) == 0
    state = kopt.from_keras_weights(opt, params, weights, loss_scale=4.0, good_steps=7)
    assert float(kopt.get_slot(state, "loss_scale")) == 4.0 and int(kopt.get_slot(state, "good_steps")) == 7
    assert int(kopt.iterations(state)) == 3
    for bad in ({"loss_scale": 0.5}, {"loss_scale": np.inf}, {"good_steps": -1}, {"good_steps": 1.5}):
        with pytest.raises(ValueError):
            kopt.from_keras_weights(opt, params, weights, **bad)
    with pytest.raises(ValueError, match="LossScaleOptimizer only"):
        kopt.from_keras_weights(kopt.tf_keras.SGD(0.1, momentum=0.5), params, weights, loss_scale=4.0)


def test_mixed_float16_model_files(tf_keras, tmp_path):
    """model.save of a tiny mixed_float16 model (compiled with "adam": a LossScaleOptimizerV3): its .h5 file
    holds the inner Adam's variables; kopt reads them, the loss scale restarting as load_model does."""
    mixed = tf_keras.mixed_precision
    before = mixed.global_policy()
    mixed.set_global_policy("mixed_float16")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,)), tf_keras.layers.Dense(1)])
            model.compile("adam", "mse")
            model.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0, epochs=2)
            model.save(tmp_path / "m.h5")
    finally:
        mixed.set_global_policy(before)
    params = [w.numpy() for w in model.trainable_weights]
    opt, state = kopt.load_keras_optimizer(tmp_path / "m.h5", params)
    assert opt.class_name == "LossScaleOptimizerV3"
    assert int(kopt.iterations(state)) == 2
    assert float(kopt.get_slot(state, "loss_scale")) == 2.0**15 and int(kopt.get_slot(state, "good_steps")) == 0
    expected = [v.numpy() for v in tf_variables(model.optimizer)]
    got = kopt.to_keras_weights(opt, state, flavor="tf_keras")
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize(
    ("make", "suffix"),
    [
        (lambda k: k.optimizers.legacy.Ftrl(0.1, l1_regularization_strength=0.01), "h5"),
        (lambda k: k.optimizers.Ftrl(0.1, l2_shrinkage_regularization_strength=0.01, beta=0.3), "keras"),
        (lambda k: k.optimizers.Lion(0.01, weight_decay=0.05), "keras"),
        (lambda k: k.optimizers.Adafactor(0.05), "keras"),
    ],
    ids=["legacy Ftrl h5", "Ftrl keras", "Lion keras", "Adafactor keras"],
)
def test_tf_keras_files_of_the_new_optimizers_resume(tf_keras, tmp_path, make, suffix):
    """A tf_keras model trained and saved mid-run with Ftrl, Lion or Adafactor: kopt reads the file's optimizer
    (config and weights) and goes on as the live optimizer does with the same gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(4,)), tf_keras.layers.Dense(2)])
        model.compile(make(tf_keras), "mse")
        model.fit(np.ones((8, 4)), np.ones((8, 2)), verbose=0, epochs=3, batch_size=4)
        model.save(tmp_path / f"m.{suffix}")
    params = [jnp.asarray(w.numpy()) for w in model.trainable_weights]
    opt, state = kopt.load_keras_optimizer(tmp_path / f"m.{suffix}", params)
    assert int(kopt.iterations(state)) == 6
    grads = data(9, [tuple(w.shape) for w in model.trainable_weights])[1][:3]
    expected = []
    for g in grads:
        model.optimizer.apply_gradients(zip(g, model.trainable_weights, strict=True))
        expected.append([w.numpy() for w in model.trainable_weights])
    assert_same_trajectory(run_steps(jitted_step(opt), params, state, grads)[0], expected)


# --------------------------------------------------------------------------- Keras 3 Muon


@pytest.fixture(scope="module")
def keras():
    keras = pytest.importorskip("keras", reason="the keras3 extra is not installed")
    if not keras.__version__.startswith("3."):
        pytest.skip(f"Keras 3 is needed, not {keras.__version__}")
    return keras


#: Keras paths and kopt dict keys alike (sorted as Keras holds them): a Muon matrix, an Adam bias, an Adam
#: embedding (2-D, excluded by name) and an excluded matrix.
MUON = {"a_kernel": (3, 2), "b_bias": (2,), "c_embedding": (5, 3), "d_head": (2, 4)}


class Keras3Run:
    def __init__(self, keras, optimizer, start):
        self.optimizer = optimizer
        self.variables = [keras.Variable(x, name=name) for name, x in start.items()]
        optimizer.build(self.variables)
        self.trainable = [v.value for v in self.variables]
        self.held = [v.value for v in optimizer.variables]

    def step(self, grads):
        grads = [jnp.asarray(g) for g in grads.values()]
        self.trainable, self.held = self.optimizer.stateless_apply(self.held, grads, self.trainable)
        return dict(zip(MUON, map(np.asarray, self.trainable), strict=True))


MUON_CASES = {
    "Muon": lambda k: k.Muon(0.02, exclude_layers=["d_head"]),
    "LossScaleOptimizer Muon ema": lambda k: k.LossScaleOptimizer(
        k.Muon(0.02, use_ema=True, ema_momentum=0.8, nesterov=False), initial_scale=8.0, dynamic_growth_steps=2
    ),
}


@pytest.mark.parametrize("name", list(MUON_CASES))
def test_keras3_muon_variables_both_ways(keras, name):
    def make():
        return MUON_CASES[name](keras.optimizers)

    start, grads = data(5, list(MUON.values()), infs=(1,) if name.startswith("Loss") else ())
    start = dict(zip(MUON, start, strict=True))
    grads = [dict(zip(MUON, g, strict=True)) for g in grads]
    run = Keras3Run(keras, make(), start)
    opt = kopt.deserialize(keras.optimizers.serialize(run.optimizer))
    step = jitted_step(opt)

    for g in grads[:BEFORE]:
        middle = run.step(g)
    params = jax.tree.map(jnp.asarray, middle)
    specs = weight_specs(opt, params, len(run.held))
    assert [s.shape for s in specs] == [tuple(h.shape) for h in run.held]
    state = kopt.from_keras_weights(opt, params, [np.asarray(x) for x in run.held])
    expected = [run.step(g) for g in grads[BEFORE:]]
    assert_same_trajectory(run_steps(step, params, state, grads[BEFORE:])[0], expected)

    params = jax.tree.map(jnp.asarray, start)
    _, params, state = run_steps(step, params, opt.init(params), grads[:BEFORE])
    weights = kopt.to_keras_weights(opt, state, flavor="keras3")
    fresh = Keras3Run(keras, make(), {k: np.asarray(v) for k, v in params.items()})
    assert [w.shape for w in weights] == [h.shape for h in fresh.held]
    fresh.held = [jnp.asarray(w, held.dtype) for held, w in zip(fresh.held, weights, strict=True)]
    expected = run_steps(step, params, state, grads[BEFORE:])[0]
    assert_same_trajectory([fresh.step(g) for g in grads[BEFORE:]], expected)
