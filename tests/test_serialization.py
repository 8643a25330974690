"""kopt.get / serialize / deserialize, checked against the Keras 2 configs of the spec."""

import copy
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kopt

# Keras 2.2.4 get_config() of a default-constructed optimizer (spec sections 2-8), in key order.
KERAS_DEFAULTS = {
    "SGD": {"lr": 0.01, "momentum": 0.0, "decay": 0.0, "nesterov": False},
    "RMSprop": {"lr": 0.001, "rho": 0.9, "decay": 0.0, "epsilon": 1e-07},
    "Adagrad": {"lr": 0.01, "decay": 0.0, "epsilon": 1e-07},
    "Adadelta": {"lr": 1.0, "rho": 0.95, "decay": 0.0, "epsilon": 1e-07},
    "Adam": {"lr": 0.001, "beta_1": 0.9, "beta_2": 0.999, "decay": 0.0, "epsilon": 1e-07, "amsgrad": False},
    "Adamax": {"lr": 0.002, "beta_1": 0.9, "beta_2": 0.999, "decay": 0.0, "epsilon": 1e-07},
    "Nadam": {"lr": 0.002, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "schedule_decay": 0.004},
}

NON_DEFAULT = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "decay": 0.01, "nesterov": True, "clipnorm": 1.0},
    "RMSprop": {"lr": 0.01, "rho": 0.8, "epsilon": 1e-5, "decay": 0.1, "clipvalue": 0.3},
    "Adagrad": {"lr": 0.1, "epsilon": 1e-4, "decay": 0.2},
    "Adadelta": {"lr": 0.5, "rho": 0.9, "epsilon": 1e-6, "decay": 0.1},
    "Adam": {"lr": 0.01, "beta_1": 0.8, "beta_2": 0.99, "amsgrad": True, "clipnorm": 2.0, "clipvalue": 0.5},
    "Adamax": {"lr": 0.01, "beta_1": 0.7, "decay": 0.05},
    "Nadam": {"lr": 0.01, "schedule_decay": 0.01, "clipnorm": 1.0},
}


def trajectory(opt, steps=4):
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(2)}
    state = opt.init(params)
    for i in range(1, steps + 1):
        grads = jax.tree.map(lambda p, i=i: jnp.cos(p * i) * 3.0, params)
        updates, state = opt.update(grads, state, params)
        params = kopt.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("class_name", sorted(KERAS_DEFAULTS))
@pytest.mark.parametrize("spelling", [str.lower, str.upper, str.capitalize, lambda s: s])
def test_get_by_name_any_case_gives_keras_defaults(class_name, spelling):
    opt = kopt.get(spelling(class_name))
    config = kopt.serialize(opt)
    assert config["class_name"] == class_name
    assert list(config["config"].items()) == list(KERAS_DEFAULTS[class_name].items())


def test_clip_keys_come_first_and_only_when_given():
    config = kopt.serialize(kopt.SGD(clipvalue=0.5, clipnorm=0.0))["config"]
    assert list(config)[:2] == ["clipnorm", "clipvalue"]
    assert config["clipnorm"] == 0.0 and config["clipvalue"] == 0.5
    assert "clipnorm" not in kopt.serialize(kopt.SGD())["config"]


@pytest.mark.parametrize("class_name", sorted(NON_DEFAULT))
def test_round_trip_through_json_gives_equal_trajectories(class_name):
    opt = getattr(kopt, class_name)(**NON_DEFAULT[class_name])
    config = json.loads(json.dumps(kopt.serialize(opt)))
    rebuilt = kopt.deserialize(config)
    assert kopt.serialize(rebuilt) == kopt.serialize(opt)
    chex.assert_trees_all_equal(trajectory(rebuilt), trajectory(opt))
    chex.assert_trees_all_equal(trajectory(kopt.get(config)), trajectory(opt))
    # A different config gives a different trajectory, so the comparison can fail.
    assert not jnp.allclose(trajectory(getattr(kopt, class_name)())["w"], trajectory(opt)["w"])


def test_serialize_with_state_reads_current_hyperparameters():
    opt = kopt.Adam(lr=0.01, clipnorm=1.0)
    state = kopt.set_hyperparams(opt.init(jnp.zeros(2)), lr=0.5, max_norm=2.0)
    config = kopt.serialize(opt, state)["config"]
    assert config["lr"] == 0.5 and config["clipnorm"] == 2.0
    # float32 state: values read back with Keras' float32 rounding.
    assert config["beta_2"] == pytest.approx(0.9990000128746033, abs=0)
    assert kopt.serialize(opt)["config"]["lr"] == 0.01  # without a state: as given


def test_get_returns_optimizers_unchanged():
    opt = kopt.Adam()
    assert kopt.get(opt) is opt
    tx = optax.adam(1e-3)
    assert kopt.get(tx) is tx


def test_get_does_not_modify_the_callers_dict():
    config = {"class_name": "ADAM", "config": {"lr": 0.1}}
    before = copy.deepcopy(config)
    kopt.get(config)
    assert config == before


def test_learning_rate_key_is_accepted_and_reported_as_lr():
    opt = kopt.deserialize({"class_name": "sgd", "config": {"learning_rate": 0.3}})
    assert kopt.serialize(opt)["config"]["lr"] == 0.3


@pytest.mark.parametrize("name", ["momentum", "nesterov", "", "tfoptimizer", "adam_w"])
def test_unknown_names_list_the_known_ones(name):
    # The seven Keras names plus kopt's AdamW (an extension the spec's section 10 does not have).
    with pytest.raises(ValueError, match=r"Unknown optimizer: .*known: adadelta, adagrad, adam, adamax, adamw, nadam"):
        kopt.get(name)


def test_unknown_config_key_lists_allowed_keys():
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) 'momentum' for Adam; allowed: lr, beta_1"):
        kopt.deserialize({"class_name": "Adam", "config": {"momentum": 0.9}})
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) 'decay' for Nadam"):
        kopt.get({"class_name": "Nadam", "config": {"decay": 0.1}})


@pytest.mark.parametrize(
    "config", [{"class_name": "adam"}, {"config": {}}, {"class_name": "adam", "config": {}, "x": 1}]
)
def test_improper_config_format(config):
    with pytest.raises(ValueError, match="Improper config format"):
        kopt.get(config)


@pytest.mark.parametrize("identifier", [None, 3, 0.1, ["adam"]])
def test_uninterpretable_identifiers(identifier):
    with pytest.raises(ValueError, match="Could not interpret optimizer identifier"):
        kopt.get(identifier)


def test_serialize_rejects_what_it_cannot_describe():
    with pytest.raises(ValueError, match="built by kopt"):
        kopt.serialize(optax.adam(1e-3))
    with pytest.raises(ValueError, match="lr is a plain function, not one of kopt's schedules"):
        kopt.serialize(kopt.SGD(lr=lambda step: 0.1 / (1 + step)))
    with pytest.raises(ValueError, match="not made by one of kopt's schedule functions"):
        kopt.serialize(kopt.Schedule(lambda step, lr: lr, {"lr": 0.1}))


# Every kopt schedule, with arguments away from their defaults, and a joined one (nested too).
SCHEDULES = {
    "constant": kopt.constant_schedule(0.3),
    "inverse_time": kopt.inverse_time_decay(0.1, 0.5, decay_steps=3, staircase=True),
    "exponential": kopt.exponential_decay(0.2, decay_steps=4, decay_rate=0.7, staircase=True),
    "piecewise": kopt.piecewise_constant(0.1, boundaries=[2, 5], scales=[0.5, 0.2]),
    "polynomial": kopt.polynomial_decay(0.5, end_lr=0.01, decay_steps=4, power=2.0, cycle=True),
    "cosine": kopt.cosine_decay(0.4, decay_steps=3, alpha=0.1, restarts=True, t_mul=2.0, m_mul=0.5, scale_floor=False),
    "warmup": kopt.linear_warmup(0.3, warmup_steps=3, init_lr=0.01),
    "joined": kopt.join_schedules(
        [
            kopt.linear_warmup(0.2, 2),
            kopt.join_schedules([kopt.cosine_decay(0.2, 3), kopt.constant_schedule(0.05)], boundaries=[3]),
        ],
        boundaries=[2],
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_round_trip_through_json_alone_and_as_lr(name):
    schedule = SCHEDULES[name]
    config = json.loads(json.dumps(kopt.serialize(schedule)))
    rebuilt = kopt.deserialize(config)
    assert isinstance(rebuilt, kopt.Schedule)
    assert kopt.serialize(rebuilt) == config
    steps = jnp.arange(12)
    chex.assert_trees_all_equal(jax.vmap(rebuilt)(steps), jax.vmap(schedule)(steps))
    opt = kopt.Adam(lr=schedule, clipnorm=1.0)
    opt_config = json.loads(json.dumps(kopt.serialize(opt)))
    assert opt_config["config"]["lr"] == config
    chex.assert_trees_all_equal(trajectory(kopt.deserialize(opt_config)), trajectory(opt))


def test_a_schedule_config_is_plain_data_as_documented():
    config = kopt.serialize(
        kopt.SGD(lr=kopt.join_schedules([kopt.linear_warmup(0.1, 5), kopt.constant_schedule(0.1)], [5]))
    )
    assert config["config"]["lr"] == {
        "class_name": "join_schedules",
        "config": {
            "schedules": [
                {"class_name": "linear_warmup", "config": {"lr": 0.1, "init_lr": 0.0, "warmup_steps": 5}},
                {"class_name": "constant_schedule", "config": {"lr": 0.1}},
            ],
            "boundaries": [5],
        },
    }


def test_serialize_with_state_writes_a_schedule_as_rescaled():
    opt = kopt.SGD(lr=SCHEDULES["joined"])
    state = kopt.set_hyperparams(
        opt.init({"w": jnp.zeros(2)}), lr_0=0.5, lr_0_1=0.25
    )  # the nested join names its parts lr_0_1, lr_1_1
    lr = kopt.serialize(opt, state)["config"]["lr"]["config"]
    assert lr["schedules"][0]["config"]["lr"] == 0.5
    assert lr["schedules"][1]["config"]["schedules"][0]["config"]["lr"] == 0.25
    assert lr["schedules"][1]["config"]["schedules"][1]["config"]["lr"] == pytest.approx(0.05)


def test_a_schedule_in_a_checkpoint_header_rebuilds_the_optimizer(tmp_path):
    opt = kopt.Adam(lr=SCHEDULES["cosine"])
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    kopt.save_state(tmp_path / "state.ckpt", state, config=opt)
    header = kopt.read_checkpoint_header(tmp_path / "state.ckpt")
    rebuilt = kopt.deserialize(header["config"])
    assert kopt.serialize(rebuilt) == kopt.serialize(opt)
    kopt.load_state(tmp_path / "state.ckpt", rebuilt.init(params), config=rebuilt)


def test_tensorflow_flavored_optimizers_carry_a_kopt_schedule_too():
    opt = kopt.tf_keras.Adam(learning_rate=SCHEDULES["warmup"])
    config = json.loads(json.dumps(kopt.serialize(opt)))
    chex.assert_trees_all_equal(trajectory(kopt.deserialize(config)), trajectory(opt))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"class_name": "cosine_decay", "config": {"lr": 0.1, "decay_steps": 5, "warmup": 3}}, "unknown argument"),
        ({"class_name": "cosine_decay", "config": {"lr": 0.1}}, "decay_steps"),
        ({"class_name": "cosine_decay", "config": {"lr": -0.1, "decay_steps": 5}}, "lr must be >= 0"),
        ({"class_name": "Adam", "config": {"lr": {"class_name": "os.system", "config": {}}}}, "not a kopt schedule"),
    ],
)
def test_bad_schedule_configs_are_clear_errors(config, message):
    with pytest.raises(ValueError, match=message):
        kopt.deserialize(config)


def test_a_schedules_hyperparameters_stay_inside_its_config_when_written_with_state():
    opt = kopt.SGD(lr=kopt.inverse_time_decay(0.1, 0.01))  # the schedule's decay, the optimizer's decay=0
    config = kopt.serialize(opt, opt.init({"w": jnp.zeros(2)}))
    assert config["config"]["decay"] == 0.0
    assert config["config"]["lr"]["config"]["decay"] == pytest.approx(0.01)
    kopt.deserialize(config)


def test_schedule_arguments_given_as_arrays_are_written_as_plain_numbers():
    schedule = kopt.piecewise_constant(jnp.float32(0.5), [jnp.asarray(5)], [np.float32(0.25)])
    assert json.loads(json.dumps(kopt.serialize(schedule))) == {
        "class_name": "piecewise_constant",
        "config": {"lr": 0.5, "boundaries": [5], "scales": [0.25]},
    }
    assert json.dumps(kopt.serialize(kopt.cosine_decay(0.1, jnp.asarray(10))))


def test_a_tensorflow_flavored_config_with_a_kopt_schedule_is_written_with_state_values():
    opt = kopt.deserialize(kopt.serialize(kopt.tf_keras.Adam(learning_rate=kopt.cosine_decay(0.1, 10))))
    state = kopt.set_hyperparams(opt.init({"w": jnp.zeros(2)}), lr=0.5)
    assert kopt.serialize(opt, state)["config"]["learning_rate"]["config"]["lr"] == 0.5
