"""Keras 3 optimizer configs (``keras.optimizers.serialize``) build kopt optimizers that follow Keras 3.

Live against the installed ``keras`` (the keras3 extra, JAX backend): each optimizer Keras 3 shares with
TF >= 2.11, with each of its common options, is built in Keras 3, serialized, and rebuilt by
``kopt.deserialize`` from the dict alone; both then take the same gradients, and the params must agree at
every step within ``2e-6 + 2e-5 |keras|`` (float32). Keras 3's own keys are refused, naming the key and
the Keras, when they are not at their no-op ``None``, and so are Keras 3 optimizers kopt has no
counterpart for yet (:data:`REFUSED` lists any option kopt still refuses).
``use_ema`` and ``loss_scale_factor`` are honoured (the test gives both the same unscaled gradients: Keras 3
divides them by the factor, as kopt's ``unscale_loss`` does), and ``kopt.serialize`` writes the config back.
"""

import copy
import inspect
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt

keras = pytest.importorskip("keras", reason="the keras3 extra is not installed")
if not keras.__version__.startswith("3."):
    pytest.skip(f"Keras 3 is needed, not {keras.__version__}", allow_module_level=True)

STEPS = 6
SHAPES = {"bias": (4,), "conv": (2, 3, 4), "kernel": (3, 4)}  # sorted: kopt's leaf order is Keras' variable order


def schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)


OPTIMIZERS = {
    "SGD": lambda **o: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, **o),
    "RMSprop": lambda **o: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True, **o),
    "Adagrad": lambda **o: keras.optimizers.Adagrad(0.1, **o),
    "Adadelta": lambda **o: keras.optimizers.Adadelta(1.0, **o),
    "Adam": lambda **o: keras.optimizers.Adam(0.01, **o),
    "Adam amsgrad": lambda **o: keras.optimizers.Adam(0.01, amsgrad=True, **o),
    "AdamW": lambda **o: keras.optimizers.AdamW(0.01, **{"weight_decay": 0.1, **o}),
    "Adamax": lambda **o: keras.optimizers.Adamax(0.01, **o),
    "Nadam": lambda **o: keras.optimizers.Nadam(0.01, **o),
    "Lion": lambda **o: keras.optimizers.Lion(0.01, beta_1=0.8, beta_2=0.95, **o),
    "Ftrl": lambda **o: keras.optimizers.Ftrl(0.1, l1_regularization_strength=0.01, beta=0.3, **o),
    "Lamb": lambda **o: keras.optimizers.Lamb(0.01, beta_1=0.8, epsilon=1e-6, **o),
    "Adafactor": lambda **o: keras.optimizers.Adafactor(0.05, clip_threshold=0.5, **o),
    "ScheduleFreeAdamW": lambda **o: keras.optimizers.ScheduleFreeAdamW(0.02, warmup_steps=3, **o),
}
OPTIONS = {
    "defaults": {},
    "clipnorm": {"clipnorm": 0.5},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "clipvalue": {"clipvalue": 0.3},
    "weight_decay": {"weight_decay": 0.05},
    "ema": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3},
    "ema kept only": {"use_ema": True, "ema_momentum": 0.8},
    "loss_scale_factor": {"loss_scale_factor": 64.0},
    "gradient_accumulation_steps": {"gradient_accumulation_steps": 3},
    "schedule": {"learning_rate": None},  # replaced by schedule()
}


#: What kopt still refuses, by (optimizer, option), with the message's pattern: nothing now (the weight decay of
#: SGD and RMSprop with momentum, and of Lamb, is honoured: tests/test_weight_decay.py).
REFUSED: dict[tuple[str, str], str] = {}


def inputs(seed: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (2 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def keras_trajectory(optimizer, params: dict, grads: list[dict]) -> list[dict]:
    variables = [keras.Variable(params[k], name=k) for k in SHAPES]
    optimizer.build(variables)
    trajectory = []
    for g in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g[k]) for k in SHAPES], variables)
        trajectory.append({k: np.asarray(v.value) for k, v in zip(SHAPES, variables, strict=True)})
    return trajectory


def kopt_trajectory(opt, params: dict, grads: list[dict]) -> list[dict]:
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s: (kopt.apply_updates(p, u), s))(*opt.update(g, s, p)))
    trajectory = []
    for g in grads:
        params, state = step(params, state, g)
        trajectory.append(jax.device_get(params))
    return trajectory


def make(name: str, option: str):
    kwargs = dict(OPTIONS[option])
    if option == "schedule":
        kwargs["learning_rate"] = schedule()
    if "learning_rate" in kwargs:  # the schedule replaces the constructor's positional rate
        rate = kwargs.pop("learning_rate")
        optimizer = OPTIMIZERS[name](**kwargs)
        optimizer = type(optimizer).from_config({**optimizer.get_config(), "learning_rate": rate})
        return optimizer
    return OPTIMIZERS[name](**kwargs)


#: Keras 3's own options wrap any rule the same way (before it, or around it): they are checked on one
#: optimizer of each kind of state (moments, sign, FTRL's rule, factored moments, schedule-free), not on all.
WRAPPING = ("ema kept only", "loss_scale_factor", "gradient_accumulation_steps")
WRAPPED = ("Adam", "Lion", "Ftrl", "Adafactor", "ScheduleFreeAdamW")
CASES = [
    (name, option)
    for name in OPTIMIZERS
    for option in OPTIONS
    if (option not in WRAPPING or name in WRAPPED) and (name, option) != ("AdamW", "weight_decay")  # always decays
]


@pytest.mark.parametrize(("name", "option"), CASES, ids=[f"{name}-{option}" for name, option in CASES])
def test_keras3_config_follows_keras3(name, option):
    params, grads = inputs(seed=len(name) * 7 + len(option))
    optimizer = make(name, option)
    config = keras.optimizers.serialize(optimizer)
    refusal = REFUSED.get((name, option))
    if refusal:  # as for TF >= 2.11's configs; issue 21 asks for these to be honoured
        with pytest.raises(ValueError, match=refusal):
            kopt.deserialize(config)
        return
    opt = kopt.deserialize(config)  # from the dict alone, before Keras has stepped
    assert kopt.serialize(opt) == json.loads(json.dumps(config))  # written back as Keras 3 wrote it
    expected = keras_trajectory(optimizer, params, grads)
    got = kopt_trajectory(opt, params, grads)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=f"step {step + 1}, {k}")


def test_keras3_config_is_told_from_tf_keras_and_keras2():
    config = keras.optimizers.serialize(keras.optimizers.Adam(0.01))
    assert kopt.keras_io.configs.config_flavor(config) == "keras3"
    tf_keras_like = {**config, "config": {**config["config"], "is_legacy_optimizer": False}}
    assert kopt.keras_io.configs.config_flavor(tf_keras_like) == "tf_keras"  # only TensorFlow writes the key
    assert kopt.keras_io.configs.config_flavor({"class_name": "Adam", "config": {"lr": 0.1}}) == "keras"
    chex.assert_trees_all_close(kopt.deserialize(config).config["learning_rate"], np.float32(0.01))


def test_keras3_config_of_an_unknown_class_is_named():
    config = keras.optimizers.serialize(keras.optimizers.Adam())
    config["class_name"] = "Shampoo"
    with pytest.raises(ValueError, match=r"Keras 3 optimizer 'Shampoo' .*keras >= 3.* no kopt counterpart"):
        kopt.deserialize(config)


def test_multi_optimizer_follows_keras3():
    """Keras 3's MultiOptimizer from its config: params go to members by their Keras variable paths
    (``{"dense": {"kernel": w}}`` is ``dense/kernel``), an exact key before the patterns, the rest to the
    default; each member follows its own Keras 3 trajectory, and the config is written back."""
    variables = {"dense/kernel": (3, 4), "dense/bias": (4,), "head/kernel": (4, 2)}
    mapping = keras.optimizers.OptimizerMap(default_optimizer=keras.optimizers.SGD(0.1, momentum=0.5))
    mapping["dense/.*"] = keras.optimizers.Adam(0.01, clipnorm=0.5)
    mapping["head/kernel"] = keras.optimizers.Lion(0.01)
    k_opt = keras.optimizers.MultiOptimizer(mapping)
    config = keras.optimizers.serialize(k_opt)
    opt = kopt.deserialize(config)
    assert kopt.serialize(opt) == json.loads(json.dumps(config))

    rng = np.random.default_rng(7)
    start = {path: rng.normal(size=shape).astype(np.float32) for path, shape in variables.items()}
    dense, head = keras.layers.Dense(4, name="dense"), keras.layers.Dense(2, use_bias=False, name="head")
    dense.build((None, 3))
    head.build((None, 4))
    k_vars = [dense.kernel, dense.bias, head.kernel]
    assert [v.path for v in k_vars] == ["dense/kernel", "dense/bias", "head/kernel"]
    for var, value in zip(k_vars, start.values(), strict=True):
        var.assign(value)
    k_opt.build(k_vars)
    params = {
        "dense": {"kernel": start["dense/kernel"], "bias": start["dense/bias"]},
        "head": {"kernel": start["head/kernel"]},
    }
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    assert sorted(int(k) for k in state.inner_states) == [0, 1, 2]
    for _ in range(5):
        grads = {path: rng.normal(size=shape).astype(np.float32) for path, shape in variables.items()}
        k_opt.apply([keras.ops.convert_to_tensor(grads[path]) for path in start], k_vars)
        tree = {
            "dense": {"kernel": grads["dense/kernel"], "bias": grads["dense/bias"]},
            "head": {"kernel": grads["head/kernel"]},
        }
        updates, state = opt.update(jax.tree.map(jnp.asarray, tree), state, params)
        params = kopt.apply_updates(params, updates)
        got = {f"{layer}/{name}": value for layer, inner in params.items() for name, value in inner.items()}
        for var, path in zip(k_vars, start, strict=True):
            np.testing.assert_allclose(got[path], np.asarray(var.value), rtol=2e-5, atol=2e-6, err_msg=path)


def test_multi_optimizer_refuses_dangerous_patterns():
    config = keras.optimizers.serialize(
        keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(default_optimizer=keras.optimizers.SGD()))
    )
    config["config"]["optimizer_map"]["config"]["optimizer_map"] = {
        "(a+)+": config["config"]["optimizer_map"]["config"]["default_optimizer"]
    }
    with pytest.raises(ValueError, match="exponential time"):
        kopt.deserialize(config)


def test_hostile_multi_and_loss_scale_configs_are_refused_by_name():
    """Configs from a file, edited: every bad part is a ValueError naming it, before anything is built."""
    base = keras.optimizers.serialize(
        keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(default_optimizer=keras.optimizers.SGD()))
    )
    default = base["config"]["optimizer_map"]["config"]["default_optimizer"]

    def multi(patterns):
        config = copy.deepcopy(base)
        config["config"]["optimizer_map"]["config"]["optimizer_map"] = patterns
        return config

    cases = [
        (multi({"a" * 300: default}), "at most 256 characters"),
        (multi({"(": default}), "not a regular expression"),
        (multi([default]), "must map patterns to configs"),
        (multi({"x": base}), "member must be an optimizer config"),
        ({**base, "config": {**base["config"], "callable": "os.system"}}, "cannot honour \\['callable'\\]"),
    ]
    lso = keras.optimizers.serialize(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    cases += [
        (
            {**lso, "config": {**lso["config"], "inner_optimizer": lso}},
            "inner_optimizer cannot be a 'LossScaleOptimizer'",
        ),
        ({**lso, "config": {**lso["config"], "inner_optimizer": "sgd"}}, "needs 'inner_optimizer', a config dict"),
        ({**lso, "config": {**lso["config"], "dynamic": False}}, "cannot honour 'dynamic'"),
        (
            {**lso, "config": {**lso["config"], "inner_optimizer": kopt.serialize(kopt.cosine_decay(0.1, 10))}},
            "inner_optimizer is the config of a learning-rate schedule",
        ),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            kopt.deserialize(config)


@pytest.mark.parametrize("name", sorted(kopt.keras.OPTIMIZERS))
def test_namespace_has_keras3_signature_defaults_and_config(name):
    """``kopt.keras.X`` takes every argument of ``keras.optimizers.X`` with Keras 3's default, and its
    defaults serialize to the dict Keras 3's defaults do (the learning rate as Keras holds it, in float32;
    Keras numbers a second optimizer's name, ``adam_1``)."""
    ours, theirs = getattr(kopt.keras, name), getattr(keras.optimizers, name)
    ours_parameters = inspect.signature(ours).parameters
    for parameter in list(inspect.signature(theirs.__init__).parameters.values())[1:]:
        if parameter.kind is parameter.VAR_KEYWORD:
            continue
        assert parameter.name in ours_parameters, parameter.name
        assert ours_parameters[parameter.name].default == parameter.default, parameter.name
    expected = json.loads(json.dumps(keras.optimizers.serialize(theirs())))
    got = kopt.serialize(ours())
    expected["config"]["name"] = re.sub(r"_\d+$", "", expected["config"]["name"])
    assert got["config"]["learning_rate"] == pytest.approx(expected["config"].pop("learning_rate"), rel=1e-7)
    got["config"].pop("learning_rate")
    assert got == expected


def test_namespace_refuses_two_clips_as_keras3_does():
    with pytest.raises(ValueError, match="Only one of"):
        keras.optimizers.Adam(clipnorm=1.0, clipvalue=0.5)
    with pytest.raises(ValueError, match=r"at most one of clipnorm, clipvalue and global_clipnorm"):
        kopt.keras.Adam(clipnorm=1.0, clipvalue=0.5)


def test_namespace_wrappers_serialize_as_keras3_reads_them():
    """LossScaleOptimizer and MultiOptimizer built in kopt.keras are read back by Keras 3 itself."""
    lso = kopt.keras.LossScaleOptimizer(kopt.keras.Adam(0.01), initial_scale=64.0)
    back = keras.optimizers.deserialize(kopt.serialize(lso))
    assert isinstance(back, keras.optimizers.LossScaleOptimizer)
    assert float(back.initial_scale) == 64.0
    multi = kopt.keras.MultiOptimizer(kopt.keras.OptimizerMap(kopt.keras.SGD(), {"head/.*": kopt.keras.Lion()}))
    back = keras.optimizers.deserialize(kopt.serialize(multi))
    assert isinstance(back, keras.optimizers.MultiOptimizer)
    with pytest.raises(ValueError, match="must be a Keras 3 optimizer"):
        kopt.keras.LossScaleOptimizer(kopt.tf_keras.Adam())


def test_schedule_under_accumulation_is_read_at_the_call_count():
    """Keras 3 evaluates a schedule at its call counter, which gradient accumulation advances ``steps`` times a
    step (while Adam's bias correction counts the steps): kopt reads it there too."""
    params, grads = inputs(seed=5)
    rate = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)
    optimizer = keras.optimizers.Adam(rate, gradient_accumulation_steps=2, weight_decay=0.1)
    opt = kopt.deserialize(keras.optimizers.serialize(optimizer))
    expected = keras_trajectory(optimizer, params, grads)
    for step, (a, b) in enumerate(zip(kopt_trajectory(opt, params, grads), expected, strict=True)):
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=f"step {step + 1}, {k}")
