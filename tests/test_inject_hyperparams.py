"""``optax.inject_hyperparams`` around every kopt alias and transformation, with and without jit.

optax rebuilds the transformation at every update with its hyperparameters as
arrays (tracers under ``jit``); kopt must let them through validation and use
them. Each alias is checked against the NumPy reference of the spec with the
learning rate changed mid-run (``state.hyperparams["lr"] = ...``, the optax
idiom, against the reference's ``set_value``); each transformation against the
same transformation driven by ``kopt.set_hyperparams`` (the property: both ways
of changing a hyperparameter give the same steps). Changes are made under jit
only: an eager update reads kopt's own state (see the README), so without jit
the same runs are checked unchanged.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import kopt
from tests import reference
from tests.matching import make_grads, make_params

STEPS = 6
CHANGE_AT = 3  # the injected hyperparameter is changed before this step

ALIASES = [
    ("sgd", "SGD", {"lr": 0.1, "momentum": 0.9, "decay": 0.1, "nesterov": True, "clipnorm": 2.0}),
    ("rmsprop", "RMSprop", {"lr": 0.01, "rho": 0.8, "clipvalue": 0.5}),
    ("adagrad", "Adagrad", {"lr": 0.1, "decay": 0.05}),
    ("adadelta", "Adadelta", {"lr": 0.5, "rho": 0.9}),
    ("adam", "Adam", {"lr": 0.01, "amsgrad": True, "clipnorm": 2.0}),
    ("adamw", "AdamW", {"lr": 0.01, "weight_decay": 0.1}),
    ("adamax", "Adamax", {"lr": 0.01, "beta_1": 0.7}),
    ("nadam", "Nadam", {"lr": 0.01, "schedule_decay": 0.05}),
]


class InjectedAliasesMatchReference(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*ALIASES)
    def test_injected_lr_change_matches_reference_set_value(self, name, config):
        opt = optax.inject_hyperparams(getattr(kopt, name))(**config)
        ref = reference.make(name, **config)
        params = make_params(np.float32)
        update = self.variant(opt.update)
        state = opt.init(params)
        ref_params = [np.asarray(p) for p in jax.tree.leaves(params)]
        for step, grads in enumerate(make_grads(params, STEPS, 1.0)):
            if step == CHANGE_AT and self.variant.type == chex.ChexVariantType.WITH_JIT:
                state.hyperparams["lr"] = jnp.asarray(config["lr"] / 10, jnp.float32)
                ref.set_value("lr", config["lr"] / 10)
            updates, state = update(grads, state, params)
            params = kopt.apply_updates(params, updates)
            ref_params = ref.step(ref_params, [np.asarray(g) for g in jax.tree.leaves(grads)])
            chex.assert_trees_all_close(
                jax.tree.leaves(params), ref_params, rtol=2e-5, atol=2e-6, custom_message=f"step {step}"
            )
        # the state shows the injected value, and kopt's readers find it
        if self.variant.type == chex.ChexVariantType.WITH_JIT:
            self.assertAlmostEqual(float(kopt.get_hyperparams(state.inner_state)["lr"]), config["lr"] / 10, places=6)

    def test_a_schedule_as_lr_is_evaluated_by_optax_with_the_same_numbers(self):
        schedule = kopt.cosine_decay(0.1, decay_steps=4)
        injected = optax.inject_hyperparams(kopt.Adam)(lr=schedule)
        direct = kopt.Adam(lr=schedule)
        params = make_params(np.float32)
        update = jax.jit(injected.update)
        state, direct_state = injected.init(params), direct.init(params)
        for grads in make_grads(params, STEPS, 1.0):
            updates, state = update(grads, state, params)
            expected, direct_state = direct.update(grads, direct_state, params)
            chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-8)

    def test_concrete_values_are_still_checked(self):
        with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
            optax.inject_hyperparams(kopt.Adam)(lr=-1.0).init(make_params(np.float32))
        with pytest.raises(ValueError, match=r"beta_1 must be in \[0, 1\)"):
            optax.inject_hyperparams(kopt.scale_by_adam)(beta_1=1.5).init(make_params(np.float32))


# (test name, factory, arguments, (injected argument, new value, its kopt.set_hyperparams name)[, static_args])
TRANSFORMS = [
    ("clip_by_value", kopt.clip_by_value, {"max_delta": 0.5}, ("max_delta", 0.2, "max_delta")),
    ("clip_by_norm", kopt.clip_by_norm, {"max_norm": 1.0}, ("max_norm", 0.3, "max_norm")),
    ("clip_by_global_norm", kopt.clip_by_global_norm, {"max_norm": 1.0}, ("max_norm", 0.3, "max_norm")),
    ("trace", kopt.trace, {"momentum": 0.9, "nesterov": True}, ("momentum", 0.5, "momentum")),
    ("scale_by_rms", kopt.scale_by_rms, {"rho": 0.8}, ("rho", 0.5, "rho")),
    ("scale_by_adagrad", kopt.scale_by_adagrad, {"epsilon": 1e-3}, ("epsilon", 1e-1, "epsilon")),
    ("scale_by_adadelta", kopt.scale_by_adadelta, {"rho": 0.9}, ("rho", 0.5, "rho")),
    ("scale_by_adam", kopt.scale_by_adam, {"beta_1": 0.8}, ("beta_2", 0.9, "beta_2")),
    ("scale_by_adamax", kopt.scale_by_adamax, {"beta_1": 0.8}, ("beta_1", 0.5, "beta_1")),
    ("scale_by_nadam", kopt.scale_by_nadam, {}, ("schedule_decay", 0.1, "schedule_decay")),
    ("scale_by_learning_rate", kopt.scale_by_learning_rate, {"lr": 0.1}, ("lr", 0.01, "lr")),
    ("add_decayed_weights", kopt.add_decayed_weights, {"rate": 0.1}, ("rate", 0.5, "weight_decay")),
    ("ema_params", kopt.ema_params, {"decay": 0.9}, ("decay", 0.5, "ema_decay")),
    (
        "lookahead",
        kopt.lookahead,
        {"inner": kopt.SGD(0.1), "sync_period": 2, "slow_step_size": 0.5},
        ("slow_step_size", 0.25, "slow_step_size"),
    ),
    ("accumulate", kopt.accumulate, {"inner": kopt.SGD(0.1), "every_k": 2}, None),
    ("skip_nonfinite", kopt.skip_nonfinite, {"inner": kopt.SGD(0.1), "max_consecutive": 2}, None),
    ("tf_keras_adam", kopt.tf_keras.Adam, {"learning_rate": 0.1}, ("learning_rate", 0.01, "lr")),
    ("tf_keras_adagrad", kopt.tf_keras.Adagrad, {"learning_rate": 0.1}, ("learning_rate", 0.01, "lr")),
    ("tf_keras_adadelta", kopt.tf_keras.Adadelta, {"learning_rate": 1.0}, ("rho", 0.5, "rho")),
    ("tf_keras_adamax", kopt.tf_keras.Adamax, {"learning_rate": 0.1}, ("beta_1", 0.5, "beta_1")),
    ("tf_keras_nadam", kopt.tf_keras.Nadam, {"learning_rate": 0.1}, ("learning_rate", 0.01, "lr")),
    (
        "tf_keras_adamw",
        kopt.tf_keras.AdamW,
        {"learning_rate": 0.1, "is_legacy_optimizer": False},
        ("weight_decay", 0.1, "weight_decay"),
    ),
    # kopt.tf_keras' SGD and RMSprop keep a velocity or not depending on momentum: it must stay a number.
    (
        "tf_keras_sgd",
        kopt.tf_keras.SGD,
        {"learning_rate": 0.1, "momentum": 0.9, "global_clipnorm": 1.0},
        ("learning_rate", 0.01, "lr"),
        ("momentum",),
    ),
    (
        "tf_keras_rmsprop",
        kopt.tf_keras.RMSprop,
        {"momentum": 0.5, "centered": True},
        ("rho", 0.5, "rho"),
        ("momentum",),
    ),
]


class InjectedTransformsMatchSetHyperparams(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*TRANSFORMS)
    def test_injected_change_equals_set_hyperparams(self, factory, arguments, change, static=()):
        injected = optax.inject_hyperparams(factory, static_args=static)(**arguments)
        plain = factory(**arguments)
        params = make_params(np.float32)
        update = self.variant(injected.update)
        state, plain_state = injected.init(params), plain.init(params)
        for step, grads in enumerate(make_grads(params, STEPS, 1.0)):
            if step == CHANGE_AT and change is not None and self.variant.type == chex.ChexVariantType.WITH_JIT:
                argument, value, held_as = change
                state.hyperparams[argument] = jnp.asarray(value, jnp.float32)
                plain_state = kopt.set_hyperparams(plain_state, **{held_as: value})
            updates, state = update(grads, state, params)
            expected, plain_state = plain.update(grads, plain_state, params)
            chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-7, custom_message=f"step {step}")
            params = kopt.apply_updates(params, updates)

    @parameterized.parameters("SGD", "RMSprop")
    def test_a_traced_momentum_keeps_tensorflows_velocity(self, name):
        # Whether TensorFlow keeps a velocity depends on momentum > 0; a traced momentum is on (as a traced clipnorm).
        factory = getattr(kopt.tf_keras, name)
        injected = optax.inject_hyperparams(factory)(learning_rate=0.1, momentum=0.9)
        plain = factory(learning_rate=0.1, momentum=0.9)
        params = make_params(np.float32)
        state, plain_state = injected.init(params), plain.init(params)
        for grads in make_grads(params, 3, 1.0):
            updates, state = jax.jit(injected.update)(grads, state, params)
            expected, plain_state = plain.update(grads, plain_state, params)
            chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-7)
            params = kopt.apply_updates(params, updates)
        assert kopt.slot_names(state.inner_state) == kopt.slot_names(plain_state)

    @parameterized.parameters("SGD", "RMSprop")
    def test_an_injected_momentum_of_zero_is_refused_naming_static_args(self, name):
        # The eager init sees momentum=0 (legacy: no velocity), the jitted update a traced one (a velocity).
        opt = optax.inject_hyperparams(getattr(kopt.tf_keras, name))(
            learning_rate=0.1, momentum=0.0, is_legacy_optimizer=True
        )
        params = make_params(np.float32)
        with pytest.raises(ValueError, match=r"made with momentum=0 .* static_args=\('momentum',\)"):
            jax.jit(opt.update)(make_grads(params, 1, 1.0)[0], opt.init(params), params)


def test_concrete_arrays_live_in_the_state_like_numbers():
    """Only traced values are read from the arguments: set_hyperparams still rules a jnp-valued lr."""
    opt = kopt.SGD(lr=jnp.float32(0.1), momentum=jnp.float32(0.5))
    params = {"w": jnp.ones(3)}
    state = kopt.set_hyperparams(opt.init(params), lr=0.0)
    updates, state = jax.jit(opt.update)({"w": jnp.ones(3)}, state, params)
    chex.assert_trees_all_equal(updates, {"w": jnp.zeros(3)})
    assert float(kopt.get_hyperparams(state)["lr"]) == 0.0
