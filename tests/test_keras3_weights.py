"""Keras 3's optimizer variables both ways, live against the installed ``keras`` (JAX backend).

Keras 3 steps a few times; its ``optimizer.variables`` (what a ``.keras`` file keeps under ``optimizer/vars``)
then go into :func:`kopt.from_keras_weights` of the optimizer :func:`kopt.deserialize` builds from Keras'
config, and kopt must continue exactly as the uninterrupted Keras run does. The other way, kopt steps first,
:func:`kopt.to_keras_weights` (``flavor="keras3"``) is assigned to a fresh Keras optimizer's variables, and
Keras must continue as kopt does. Float32, ``2e-6 + 2e-5 |keras|`` at every step.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.stepping import assert_same_trajectory, jitted_step, run_steps

keras = pytest.importorskip("keras", reason="the keras3 extra is not installed")
if not keras.__version__.startswith("3."):
    pytest.skip(f"Keras 3 is needed, not {keras.__version__}", allow_module_level=True)

SHAPES = [(3, 2), (2,), (2, 2, 3)]  # a kernel, a bias and a 3-D variable (Adafactor factors its last two axes)
BEFORE, AFTER = 4, 3
K = keras.optimizers

CASES = {
    "SGD": lambda: K.SGD(0.05),
    "SGD momentum accumulation": lambda: K.SGD(0.05, momentum=0.9, nesterov=True, gradient_accumulation_steps=3),
    "RMSprop centered momentum": lambda: K.RMSprop(0.01, momentum=0.5, centered=True),
    "Adagrad": lambda: K.Adagrad(0.1),
    "Adadelta": lambda: K.Adadelta(1.0),
    "Adam amsgrad ema": lambda: K.Adam(0.01, amsgrad=True, use_ema=True, ema_momentum=0.8),
    "AdamW schedule": lambda: K.AdamW(K.schedules.ExponentialDecay(0.05, 2, 0.5), weight_decay=0.1),
    "Adamax": lambda: K.Adamax(0.01),
    "Nadam": lambda: K.Nadam(0.01),
    "Ftrl": lambda: K.Ftrl(0.1, l1_regularization_strength=0.01, beta=0.3),
    "Adafactor": lambda: K.Adafactor(0.05),
    "Lion": lambda: K.Lion(0.01),
    "Lamb": lambda: K.Lamb(0.01),
    "ScheduleFreeAdamW": lambda: K.ScheduleFreeAdamW(0.02, warmup_steps=2),
    "LossScaleOptimizer Adam": lambda: K.LossScaleOptimizer(K.Adam(0.01), initial_scale=8.0, dynamic_growth_steps=2),
}


def data(seed: int):
    rng = np.random.default_rng(seed)
    start = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(BEFORE + AFTER)]
    if seed % 2:  # a non-finite step for the loss-scale optimizer to skip (others see it too: only LSO runs odd)
        grads[1][0][0, 0] = np.inf
    return start, grads


class KerasRun:
    """A Keras 3 optimizer over variables, stepped statelessly (as ``model.fit`` does on JAX)."""

    def __init__(self, optimizer, start):
        self.optimizer = optimizer
        self.variables = [keras.Variable(x, name=f"v{i}") for i, x in enumerate(start)]
        optimizer.build(self.variables)
        self.trainable = [v.value for v in self.variables]
        self.held = [v.value for v in optimizer.variables]

    def step(self, grads):
        self.trainable, self.held = self.optimizer.stateless_apply(
            self.held, [jnp.asarray(g) for g in grads], self.trainable
        )
        return [np.asarray(x) for x in self.trainable]


@pytest.mark.parametrize("name", list(CASES))
def test_keras3_variables_both_ways(name):
    start, grads = data(3 if name.startswith("Loss") else 2)
    run = KerasRun(CASES[name](), start)
    opt = kopt.deserialize(keras.optimizers.serialize(run.optimizer))
    step = jitted_step(opt)

    # Keras -> kopt: Keras steps, kopt goes on from its variables as Keras does.
    for g in grads[:BEFORE]:
        middle = run.step(g)
    state = kopt.from_keras_weights(opt, [jnp.asarray(x) for x in middle], [np.asarray(x) for x in run.held])
    expected = [run.step(g) for g in grads[BEFORE:]]
    assert_same_trajectory(run_steps(step, [jnp.asarray(x) for x in middle], state, grads[BEFORE:])[0], expected)

    # kopt -> Keras: kopt steps, a fresh Keras optimizer takes its state and goes on as kopt does.
    params = [jnp.asarray(x) for x in start]
    _, params, state = run_steps(step, params, opt.init(params), grads[:BEFORE])
    weights = kopt.to_keras_weights(opt, state, flavor="keras3")
    fresh = KerasRun(CASES[name](), [np.asarray(x) for x in params])
    assert [w.shape for w in weights] == [h.shape for h in fresh.held]
    # Keras 3's own loader, the one model.load_weights / load_model run on a file's optimizer/vars group
    fresh.optimizer.load_own_variables({str(i): w for i, w in enumerate(weights)})
    fresh.held = [v.value for v in fresh.optimizer.variables]
    expected = run_steps(step, params, state, grads[BEFORE:])[0]
    assert_same_trajectory([fresh.step(g) for g in grads[BEFORE:]], expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: K.Adam(0.01, use_ema=True, ema_momentum=0.9, gradient_accumulation_steps=2),
        lambda: K.SGD(0.05, momentum=0.9, weight_decay=0.01),
        lambda: K.Nadam(0.01, clipnorm=0.5),
    ],
    ids=["Adam ema accumulation", "SGD momentum decay", "Nadam clipnorm"],
)
def test_kopt_resumes_a_keras3_file(tmp_path, make):
    """``model.save`` of a Keras 3 model mid-training; ``kopt.load_keras_optimizer`` reads its optimizer (config
    and variables) and goes on as Keras' uninterrupted run does."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    model.compile(optimizer=make(), loss="mse")
    variables = model.trainable_variables
    model.optimizer.build(variables)
    rng = np.random.default_rng(11)
    grads = [[rng.normal(size=v.shape).astype(np.float32) for v in variables] for _ in range(BEFORE + AFTER)]
    for g in grads[: BEFORE + 1]:  # an odd count: the accumulating optimizer is saved mid-cycle
        model.optimizer.apply(g, variables)
    model.save(tmp_path / "model.keras")
    params = [jnp.asarray(v.value) for v in variables]
    opt, state = kopt.load_keras_optimizer(tmp_path / "model.keras", params)
    assert opt.flavor == "keras3"
    expected = []
    for g in grads[BEFORE + 1 :]:
        model.optimizer.apply(g, variables)
        expected.append([np.asarray(v.value) for v in variables])
    assert_same_trajectory(run_steps(jitted_step(opt), params, state, grads[BEFORE + 1 :])[0], expected)
