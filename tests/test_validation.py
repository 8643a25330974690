"""Every constructor check: a ValueError naming the argument and its allowed range."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import kopt

BAD = [
    # (constructor, keyword arguments, pattern the message must contain)
    (kopt.SGD, {"lr": -0.1}, r"lr must be >= 0, got -0.1"),
    (kopt.SGD, {"momentum": -0.9}, r"momentum must be >= 0"),
    (kopt.SGD, {"decay": -1e-6}, r"decay must be >= 0"),
    (kopt.SGD, {"nesterov": "yes"}, r"nesterov must be True or False"),
    (kopt.SGD, {"lr": "0.1"}, r"lr must be a real number"),
    (kopt.SGD, {"lr": True}, r"lr must be a real number"),
    (kopt.SGD, {"lr": math.nan}, r"lr must be finite"),
    (kopt.SGD, {"lr": math.inf}, r"lr must be finite"),
    (kopt.SGD, {"lr": np.ones(2)}, r"lr must be a scalar"),
    (kopt.SGD, {"lr": 1 + 2j}, r"lr must be a real number"),
    (kopt.SGD, {"lr": None, "learning_rate": -1.0}, r"lr must be >= 0"),
    (kopt.SGD, {"lr": 0.1, "learning_rate": 0.1}, r"lr or as learning_rate, not both"),
    (kopt.SGD, {"clipnorm": -1.0}, r"clipnorm must be None \(off\), 0 \(off\) or > 0"),
    (kopt.SGD, {"clipvalue": -0.5}, r"clipvalue must be None \(off\), 0 \(off\) or > 0"),
    (kopt.SGD, {"clipnorm": "big"}, r"clipnorm must be a real number"),
    (kopt.RMSprop, {"rho": 1.0}, r"rho must be in \[0, 1\), got 1.0"),
    (kopt.RMSprop, {"rho": -0.1}, r"rho must be in \[0, 1\)"),
    (kopt.RMSprop, {"epsilon": -1e-7}, r"epsilon must be >= 0"),
    (kopt.Adagrad, {"epsilon": -1.0}, r"epsilon must be >= 0"),
    (kopt.Adagrad, {"decay": -0.5}, r"decay must be >= 0"),
    (kopt.Adadelta, {"rho": 1.5}, r"rho must be in \[0, 1\)"),
    (kopt.Adadelta, {"lr": -1.0}, r"lr must be >= 0"),
    (kopt.Adam, {"beta_1": 1.0}, r"beta_1 must be in \[0, 1\)"),
    (kopt.Adam, {"beta_1": -0.1}, r"beta_1 must be in \[0, 1\)"),
    (kopt.Adam, {"beta_2": 1.2}, r"beta_2 must be in \[0, 1\)"),
    (kopt.Adam, {"amsgrad": 1}, r"amsgrad must be True or False"),
    (kopt.Adam, {"epsilon": "tiny"}, r"epsilon must be a real number"),
    (kopt.Adamax, {"beta_2": 1.0}, r"beta_2 must be in \[0, 1\)"),
    (kopt.Adamax, {"lr": -2e-3}, r"lr must be >= 0"),
    (kopt.Nadam, {"schedule_decay": -0.004}, r"schedule_decay must be >= 0"),
    (kopt.Nadam, {"beta_1": 2.0}, r"beta_1 must be in \[0, 1\)"),
    (kopt.clip_by_global_norm, {"max_norm": 0.0}, r"max_norm must be > 0"),
    (kopt.clip_by_norm, {"max_norm": -1.0}, r"max_norm must be > 0"),
    (kopt.clip_by_value, {"max_delta": 0.0}, r"max_delta must be > 0"),
    (kopt.trace, {"momentum": -0.5}, r"momentum must be >= 0"),
    (kopt.inverse_time_decay, {"lr": 0.1, "decay": -1.0}, r"decay must be >= 0"),
]


@pytest.mark.parametrize("constructor,kwargs,message", BAD, ids=[f"{c.__name__}-{sorted(k)}" for c, k, _ in BAD])
def test_bad_argument_raises_value_error_naming_it(constructor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        constructor(**kwargs)


@pytest.mark.parametrize("value", [None, 0, 0.0])
def test_clip_options_none_or_zero_mean_off(value):
    opt = kopt.SGD(lr=1.0, clipnorm=value, clipvalue=value)
    state = opt.init(jnp.zeros(2))
    updates, _ = opt.update(jnp.array([30.0, -40.0]), state)
    np.testing.assert_array_equal(updates, [-30.0, 40.0])


def test_nadam_has_no_decay_and_unknown_keywords_are_rejected():
    with pytest.raises(TypeError, match="decay"):
        kopt.Nadam(decay=0.1)
    with pytest.raises(TypeError, match="momentum"):
        kopt.Adam(momentum=0.9)


def test_learning_rate_is_a_synonym_of_lr():
    opt = kopt.Adam(learning_rate=0.05)
    assert opt.config["lr"] == 0.05
    assert float(kopt.get_hyperparams(opt.init(jnp.zeros(1)))["lr"]) == pytest.approx(0.05)


def test_numpy_and_jax_scalars_are_accepted():
    opt = kopt.SGD(lr=np.float32(0.5), momentum=jnp.asarray(0.5))
    hyperparams = kopt.get_hyperparams(opt.init(jnp.zeros(1)))
    assert float(hyperparams["lr"]) == 0.5 and float(hyperparams["momentum"]) == 0.5


def test_decay_with_a_schedule_as_lr_is_rejected():
    with pytest.raises(ValueError, match="decay must be 0 when lr is a schedule"):
        kopt.SGD(lr=kopt.inverse_time_decay(0.1, 0.01), decay=0.1)
