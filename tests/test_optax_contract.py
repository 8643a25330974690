"""The optax contract, measured by optax's own tests: kopt's aliases under optax's ``alias_test.py``.

optax ships its test suite in its wheel. ``AliasTest`` there builds each
optimizer as ``getattr(alias, name)(**kwargs)``; :class:`KoptAliasTest` runs
those very tests with ``alias`` pointing at kopt's aliases of the same names
(optax's keyword ``learning_rate`` and ``momentum`` are kopt's too). optax is
pinned in the ``test`` extra, so the tests are the same on every run; names
that kopt has no alias for are skipped. Deliberate differences, each a Keras
numerics choice, are listed in ``KERAS_DIFFERENCES`` and skipped with that reason.
"""

from __future__ import annotations

import importlib.metadata
import unittest

import chex
import jax
import jax.numpy as jnp
import pytest

import kopt

alias_test = pytest.importorskip("optax._src.alias_test", reason="optax's shipped tests (optax, scikit-learn, scipy)")


def _rmsprop(learning_rate=None, momentum=None):
    # Keras 2.2.4's RMSprop has no momentum; TensorFlow's Keras has (and keeps Keras' defaults otherwise). The
    # default None is no number, so optax.inject_hyperparams injects momentum only where a test gives it.
    if momentum is None:
        return kopt.RMSprop(learning_rate=learning_rate)
    return kopt.tf_keras.RMSprop(learning_rate=learning_rate, momentum=momentum)


class _KoptAliases:
    """optax's alias names, answered by kopt's aliases (Keras' defaults for everything optax does not set)."""

    adadelta = staticmethod(lambda learning_rate=None: kopt.Adadelta(learning_rate=learning_rate))
    adagrad = staticmethod(lambda learning_rate=None: kopt.Adagrad(learning_rate=learning_rate))
    adam = staticmethod(lambda learning_rate=None: kopt.Adam(learning_rate=learning_rate))
    adamax = staticmethod(lambda learning_rate=None: kopt.Adamax(learning_rate=learning_rate))
    adamw = staticmethod(lambda learning_rate=None: kopt.AdamW(learning_rate=learning_rate))
    amsgrad = staticmethod(lambda learning_rate=None: kopt.Adam(learning_rate=learning_rate, amsgrad=True))
    nadam = staticmethod(lambda learning_rate=None: kopt.Nadam(learning_rate=learning_rate))
    rmsprop = staticmethod(_rmsprop)
    # Keras 3's (kopt.keras): optax's names for the same optimizers, Keras 3's defaults otherwise
    adafactor = staticmethod(lambda learning_rate=0.001: kopt.keras.Adafactor(learning_rate))
    lamb = staticmethod(lambda learning_rate=None: kopt.keras.Lamb(learning_rate))
    lion = staticmethod(
        lambda learning_rate=None, weight_decay=None: kopt.keras.Lion(learning_rate, weight_decay=weight_decay)
    )
    sgd = staticmethod(
        lambda learning_rate=None, momentum=0.0: kopt.SGD(learning_rate=learning_rate, momentum=momentum)
    )

    def __getattr__(self, name: str):  # optax's tests build by name; these have no Keras counterpart
        raise unittest.SkipTest(f"kopt has no alias {name!r} (not a Keras optimizer)")


#: (test, what its parameters say, why kopt differs): optax's expectations that are optax's choices, not the contract.
KERAS_DIFFERENCES = [
    (
        "test_optimizers_can_be_wrapped_in_inject_hyperparams",
        "opt_name='adafactor'",
        "optax's min_dim_size_to_factor knob (given as a static arg): Keras' Adafactor factors every variable of "
        "2 or more dimensions and has no such argument",
    ),
    (
        "test_explicit_dtype",
        "",
        "optax's mu_dtype / accumulator_dtype knobs; kopt's state_dtype=None keeps moments in at least float32 for "
        "bfloat16 params (beta_2 = 0.999 rounds to 1 in bfloat16), see tests/test_dtypes.py",
    ),
    (
        "test_optimization",
        "opt_name='adadelta', opt_kwargs={'learning_rate': 0.1}, target=<function _setup_parabola",
        "Keras numerics: Adadelta's epsilon=1e-7 and rho=0.95 (optax: 1e-6, 0.9) take 10000 steps of lr=0.1 only "
        "from 10 to 5.6 on the parabola; with optax's values it converges (test_with_optaxs_defaults_kopt_converges)",
    ),
    (
        "test_optimization",
        "opt_name='adamw', opt_kwargs={'learning_rate': 0.1}, target=<function _setup_rosenbrock",
        "Keras numerics: AdamW's weight_decay=0.004 (optax: 1e-4) pulls the complex Rosenbrock optimum 2j to 1.9j; "
        "with optax's value it converges (test_with_optaxs_defaults_kopt_converges)",
    ),
]


class KoptAliasTest(alias_test.AliasTest):
    """optax's ``AliasTest``, every test, on kopt's aliases."""

    def setUp(self):
        super().setUp()
        parameters = alias_test.AliasTest._test_params_reprs.get(self._testMethodName, "")
        name = parameters.partition("opt_name='")[2].partition("'")[0]
        if name and not hasattr(_KoptAliases, name):
            self.skipTest(f"kopt has no alias {name!r} (not a Keras optimizer)")
        for test, condition, reason in KERAS_DIFFERENCES:
            if self._testMethodName.rstrip("0123456789") == test and condition in parameters:
                self.skipTest(reason)
        self._optax_alias = alias_test.alias
        alias_test.alias = _KoptAliases()

    def tearDown(self):
        alias_test.alias = self._optax_alias
        super().tearDown()


@pytest.mark.parametrize(
    ("opt", "target", "dtype"),
    [
        (kopt.Adadelta(learning_rate=0.1, rho=0.9, epsilon=1e-6), alias_test._setup_parabola, jnp.float32),
        (kopt.AdamW(learning_rate=0.1, weight_decay=1e-4), alias_test._setup_rosenbrock, jnp.complex64),
    ],
    ids=["adadelta-parabola", "adamw-complex-rosenbrock"],
)
def test_with_optaxs_defaults_kopt_converges(opt, target, dtype):
    # The two KERAS_DIFFERENCES of test_optimization, with optax's default hyperparameters: optax's own check.
    initial, final, objective = target(dtype)

    def step(_, carry):
        params, state = carry
        grads = jax.tree.map(jnp.conj, jax.grad(objective)(params))
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 10000, step, (p, opt.init(p))))(initial)
    chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


def test_optax_is_the_pinned_version():
    # The shipped tests change between optax releases: the pin in pyproject.toml's test extra is what ran.
    assert importlib.metadata.version("optax") == "0.2.8"
