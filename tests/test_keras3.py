"""kopt inside Keras 3 (``kopt.to_keras3``), against the real Keras 3 package on its JAX backend.

``model.fit`` with a kopt optimizer must take the steps kopt takes by hand in
plain JAX on the same weights and batches (the gradients come from ``jax.grad``
of the same loss, the steps from ``opt.update`` / ``kopt.apply_updates``);
``evaluate``, the learning-rate callbacks and ``model.save`` / ``load_model``
(resuming the same run) must work with it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kopt

keras = pytest.importorskip("keras", reason="the keras3 extra is not installed")
if keras.backend.backend() != "jax":
    pytest.skip(f"kopt.to_keras3 needs Keras' JAX backend, not {keras.backend.backend()!r}", allow_module_level=True)

import chex  # noqa: E402

import kopt.keras3  # noqa: E402  (registers the optimizer class for load_model)

rng = np.random.default_rng(0)
X = rng.normal(size=(16, 4)).astype(np.float32)
Y = (3.0 * (X @ rng.normal(size=(4, 1)) + 0.5 * rng.normal(size=(16, 1)))).astype(np.float32)  # clipnorm bites
BATCH = 8  # two steps per epoch, in order (shuffle=False)
TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}  # Keras' jitted step against a jitted step by hand


def make_model(optimizer):
    keras.backend.clear_session()  # the same layer names every time
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def loss_fn(params, x, y):
    kernel, bias, out_kernel, out_bias = params  # model.trainable_variables' order
    return jnp.mean((jnp.tanh(x @ kernel + bias) @ out_kernel + out_bias - y) ** 2)


def by_hand(opt, params, epochs, lr_at_epoch=None, state=None):
    """The same steps with kopt in plain JAX: ``(params, state)``."""

    @jax.jit
    def step(params, state, x, y):
        updates, state = opt.update(jax.grad(loss_fn)(params, x, y), state, params)
        return kopt.apply_updates(params, updates), state

    state = opt.init(params) if state is None else state
    for epoch in range(epochs):
        if lr_at_epoch is not None:
            state = kopt.set_hyperparams(state, lr=lr_at_epoch(epoch))
        for start in range(0, len(X), BATCH):
            params, state = step(params, state, X[start : start + BATCH], Y[start : start + BATCH])
    return params, state


def weights(model):
    """Copies: Keras' train step donates the variables' buffers."""
    return [jnp.asarray(np.array(v.value)) for v in model.trainable_variables]


def fit(model, epochs, **kwargs):
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, **kwargs)


TRANSFORMATIONS = {
    "adam_clipnorm": lambda: kopt.Adam(lr=0.01, clipnorm=1.0),
    "sgd_nesterov_schedule": lambda: kopt.SGD(lr=kopt.cosine_decay(0.05, 6), momentum=0.9, nesterov=True),
    "optax_chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.01)),
    "chain_of_wrappers": lambda: kopt.chain(
        kopt.clip_by_global_norm(1.0), kopt.lookahead(kopt.Nadam(lr=0.01), sync_period=2), kopt.ema_params(0.9)
    ),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMATIONS))
def test_fit_and_evaluate_take_kopts_steps_by_hand(name):
    opt = TRANSFORMATIONS[name]()
    model = make_model(kopt.to_keras3(opt))
    initial = weights(model)
    fit(model, epochs=3)
    expected, state = by_hand(opt, initial, epochs=3)
    chex.assert_trees_all_close(weights(model), expected, **TOLERANCE)
    chex.assert_trees_all_close(model.optimizer.state, state, **TOLERANCE)
    loss = model.evaluate(X, Y, batch_size=len(X), verbose=0)
    assert loss == pytest.approx(float(loss_fn(expected, X, Y)), rel=1e-6)


def test_keras_learning_rate_callbacks_drive_kopts_lr():
    opt = kopt.Adam(lr=0.01, clipnorm=1.0)
    model = make_model(kopt.to_keras3(opt))
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
    initial = weights(model)
    halve = keras.callbacks.LearningRateScheduler(lambda epoch: 0.01 / 2**epoch)
    fit(model, epochs=3, callbacks=[halve])
    expected, _ = by_hand(opt, initial, epochs=3, lr_at_epoch=lambda epoch: np.float32(0.01 / 2**epoch))
    chex.assert_trees_all_close(weights(model), expected, **TOLERANCE)
    assert float(kopt.get_hyperparams(model.optimizer.state)["lr"]) == pytest.approx(0.0025)
    model.optimizer.learning_rate = 0.0  # set by hand: the next epoch leaves the weights alone
    before = weights(model)
    fit(model, epochs=1)
    chex.assert_trees_all_equal(weights(model), before)


def test_setting_keras_learning_rate_without_a_kopt_lr_is_refused():
    model = make_model(kopt.to_keras3(optax.adam(0.01)))
    fit(model, epochs=1)
    with pytest.raises(ValueError, match="holds no single lr hyperparameter"):
        model.optimizer.learning_rate = 0.1


def test_save_and_load_resume_the_same_run(tmp_path):
    opt = kopt.Adam(lr=kopt.join_schedules([kopt.linear_warmup(0.02, 2), kopt.cosine_decay(0.02, 8)], [2]))
    model = make_model(kopt.to_keras3(opt))
    initial = weights(model)
    fit(model, epochs=2)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.optimizer, kopt.keras3.KoptOptimizer)
    assert kopt.serialize(loaded.optimizer.transformation) == kopt.serialize(opt)
    chex.assert_trees_all_equal(loaded.optimizer.state, model.optimizer.state)
    fit(loaded, epochs=2)
    expected, _ = by_hand(opt, initial, epochs=4)
    chex.assert_trees_all_close(weights(loaded), expected, **TOLERANCE)


def test_a_transformation_kopt_cannot_write_is_given_back_by_name(tmp_path):
    opt = kopt.chain(kopt.clip_by_global_norm(1.0), kopt.skip_nonfinite(kopt.Adam(lr=0.01)))
    model = make_model(kopt.to_keras3(opt, name="clipped_adam"))
    initial = weights(model)
    fit(model, epochs=1)
    model.save(tmp_path / "model.keras")
    with pytest.raises(ValueError, match=r"custom_objects=\{'clipped_adam': transformation\}"):
        keras.models.load_model(tmp_path / "model.keras")
    with pytest.raises(ValueError, match="could not be loaded"):  # another transformation: refused, not mixed up
        keras.models.load_model(tmp_path / "model.keras", custom_objects={"clipped_adam": kopt.SGD()})
    loaded = keras.models.load_model(tmp_path / "model.keras", custom_objects={"clipped_adam": opt})
    fit(loaded, epochs=1)
    expected, _ = by_hand(opt, initial, epochs=2)
    chex.assert_trees_all_close(weights(loaded), expected, **TOLERANCE)


def test_kopts_adam_is_keras3_adam_with_a_global_clipnorm_not_its_per_variable_one():
    """What the README says about Keras 3's Adam: same rule, but its clipnorm clips each variable alone."""
    results = {}
    for label, optimizer in {
        "kopt": kopt.to_keras3(kopt.Adam(lr=0.01, clipnorm=1.0)),
        "global": keras.optimizers.Adam(0.01, epsilon=1e-7, global_clipnorm=1.0),
        "per_variable": keras.optimizers.Adam(0.01, epsilon=1e-7, clipnorm=1.0),
    }.items():
        model = make_model(optimizer)
        fit(model, epochs=3)
        results[label] = weights(model)
    chex.assert_trees_all_close(results["kopt"], results["global"], rtol=1e-5, atol=1e-6)
    difference = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(results["kopt"], results["per_variable"], strict=True)
    )
    assert difference > 1e-3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"transformation": kopt.Adam(), "clipnorm": 1.0}, r"takes no Keras optimizer options, got \['clipnorm'\]"),
        ({"transformation": "adam"}, "must be a GradientTransformation"),
        ({"transformation": kopt.Adam(), "tree": "dict"}, r"tree must be one of \('list', 'path'\)"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        kopt.keras3.KoptOptimizer(**arguments)


def test_tree_path_gives_the_transformation_a_dict_by_variable_path():
    """``tree="path"``: groups and masks by name, here biases on SGD and kernels on Adam."""
    opt = kopt.partition(
        {"adam": kopt.Adam(lr=0.01), "sgd": kopt.SGD(lr=0.1, momentum=0.9)},
        lambda params: {path: "sgd" if path.endswith("bias") else "adam" for path in params},
    )
    model = make_model(kopt.to_keras3(opt, tree="path"))
    paths = [v.path for v in model.trainable_variables]
    initial = dict(zip(paths, weights(model), strict=True))
    fit(model, epochs=2)

    def as_list(params):
        return [params[path] for path in paths]

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(lambda p: loss_fn(as_list(p), x, y))(params)
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    params, state = initial, opt.init(initial)
    for _ in range(2):
        for start in range(0, len(X), BATCH):
            params, state = step(params, state, X[start : start + BATCH], Y[start : start + BATCH])
    chex.assert_trees_all_close(weights(model), as_list(params), **TOLERANCE)
