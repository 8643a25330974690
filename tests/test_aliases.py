"""Each optimizer is exactly the chain of its transforms (the documented composition), packed if asked."""

import chex
import jax
import jax.numpy as jnp
import pytest

import kopt

ALIASES = [
    (
        "sgd",
        kopt.SGD(lr=0.1, momentum=0.9, decay=0.2, nesterov=True, clipnorm=1.5, clipvalue=0.4),
        kopt.chain(
            kopt.clip_by_global_norm(1.5),
            kopt.clip_by_value(0.4),
            kopt.scale_by_learning_rate(kopt.inverse_time_decay(0.1, 0.2)),
            kopt.trace(0.9, nesterov=True),
        ),
    ),
    (
        "rmsprop",
        kopt.RMSprop(lr=0.01, rho=0.8, decay=0.1),
        kopt.chain(kopt.scale_by_rms(0.8, 1e-7), kopt.scale_by_learning_rate(kopt.inverse_time_decay(0.01, 0.1))),
    ),
    (
        "adagrad",
        kopt.Adagrad(clipnorm=1.0),
        kopt.chain(
            kopt.clip_by_global_norm(1.0),
            kopt.scale_by_adagrad(1e-7),
            kopt.scale_by_learning_rate(kopt.inverse_time_decay(0.01, 0.0)),
        ),
    ),
    (
        "adadelta",
        kopt.Adadelta(lr=0.5, epsilon=1e-6),
        kopt.chain(kopt.scale_by_adadelta(0.95, 1e-6), kopt.scale_by_learning_rate(kopt.inverse_time_decay(0.5, 0.0))),
    ),
    (
        "adam",
        kopt.Adam(amsgrad=True, decay=0.01, clipvalue=0.5),
        kopt.chain(
            kopt.clip_by_value(0.5),
            kopt.scale_by_adam(0.9, 0.999, 1e-7, amsgrad=True),
            kopt.scale_by_learning_rate(kopt.inverse_time_decay(0.001, 0.01)),
        ),
    ),
    (
        "adamax",
        kopt.Adamax(beta_1=0.8),
        kopt.chain(
            kopt.scale_by_adamax(0.8, 0.999, 1e-7), kopt.scale_by_learning_rate(kopt.inverse_time_decay(0.002, 0))
        ),
    ),
    (
        "nadam",
        kopt.Nadam(schedule_decay=0.01),
        kopt.chain(kopt.scale_by_nadam(0.9, 0.999, 1e-7, 0.01), kopt.scale_by_learning_rate(0.002)),
    ),
]


@pytest.mark.parametrize("packed", [None, False])
@pytest.mark.parametrize("name,alias,composed", ALIASES, ids=[a[0] for a in ALIASES])
def test_alias_equals_its_chain(name, alias, composed, packed):
    # packed=None is the chain in kopt.packed(auto=True); packed=False (the default) is the bare chain.
    alias = kopt.deserialize({"class_name": alias.class_name, "config": {**alias.config, "packed": packed}})
    composed = kopt.packed(composed, auto=True) if packed is None else composed
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.zeros(2)}
    p1, p2 = params, params
    s1, s2 = alias.init(params), composed.init(params)
    for i in range(1, 6):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(3.0 * p + i) * 2.0, params)
        u1, s1 = alias.update(grads, s1, p1)
        u2, s2 = composed.update(grads, s2, p2)
        p1, p2 = kopt.apply_updates(p1, u1), kopt.apply_updates(p2, u2)
    chex.assert_trees_all_equal(p1, p2)
    chex.assert_trees_all_equal(s1, s2)
    assert not jnp.allclose(p1["w"], params["w"])  # the optimizer moved
