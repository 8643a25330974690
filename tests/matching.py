"""kopt against the NumPy reference of the spec, step by step (shared by the float32/float64 modules).

Not a test module itself: ``test_reference_float32.py`` and
``test_reference_float64.py`` subclass :class:`MatchesReference` with their dtype.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import kopt
from tests import reference

STEPS = 12

# (test name, optimizer, constructor arguments, gradient scale). Every optimizer (and kopt's AdamW)
# and every documented option; scale 1e-8 makes epsilon dominate the denominators.
CASES = [
    ("sgd", "SGD", {}, 1.0),
    ("sgd_momentum", "SGD", {"lr": 0.05, "momentum": 0.9}, 1.0),
    ("sgd_nesterov", "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}, 1.0),
    ("sgd_decay", "SGD", {"lr": 0.1, "decay": 0.3}, 1.0),
    ("sgd_momentum_decay_nesterov", "SGD", {"lr": 0.1, "momentum": 0.8, "decay": 0.5, "nesterov": True}, 1.0),
    ("sgd_clipnorm", "SGD", {"lr": 0.1, "momentum": 0.5, "clipnorm": 4.0}, 1.0),
    ("sgd_clipvalue", "SGD", {"lr": 0.1, "clipvalue": 0.5}, 1.0),
    ("sgd_clipnorm_clipvalue", "SGD", {"lr": 0.1, "clipnorm": 1.0, "clipvalue": 0.2}, 1.0),
    ("rmsprop", "RMSprop", {}, 1.0),
    ("rmsprop_options", "RMSprop", {"lr": 0.01, "rho": 0.8, "epsilon": 1e-4, "decay": 0.1}, 1.0),
    ("rmsprop_tiny", "RMSprop", {}, 1e-8),
    ("rmsprop_clipnorm", "RMSprop", {"clipnorm": 2.0}, 1.0),
    ("adagrad", "Adagrad", {}, 1.0),
    ("adagrad_decay", "Adagrad", {"lr": 0.1, "decay": 0.2, "epsilon": 1e-3}, 1.0),
    ("adagrad_tiny", "Adagrad", {}, 1e-8),
    ("adadelta", "Adadelta", {}, 1.0),
    ("adadelta_options", "Adadelta", {"lr": 0.5, "rho": 0.9, "epsilon": 1e-6, "decay": 0.05}, 1.0),
    ("adadelta_tiny", "Adadelta", {}, 1e-8),
    ("adadelta_clipvalue", "Adadelta", {"clipvalue": 0.3}, 1.0),
    ("adam", "Adam", {}, 1.0),
    ("adam_amsgrad", "Adam", {"amsgrad": True}, 1.0),
    ("adam_options", "Adam", {"lr": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5, "decay": 0.1}, 1.0),
    ("adam_tiny", "Adam", {}, 1e-8),
    ("adam_amsgrad_tiny", "Adam", {"amsgrad": True, "decay": 0.01}, 1e-8),
    ("adam_clipnorm_clipvalue", "Adam", {"clipnorm": 3.0, "clipvalue": 0.5}, 1.0),
    ("adamw", "AdamW", {"lr": 0.01, "weight_decay": 0.1}, 1.0),
    ("adamw_options", "AdamW", {"lr": 0.01, "decay": 0.1, "amsgrad": True, "weight_decay": 0.05, "clipnorm": 2.0}, 1.0),
    ("adamax", "Adamax", {}, 1.0),
    ("adamax_options", "Adamax", {"lr": 0.01, "beta_1": 0.7, "beta_2": 0.9, "decay": 0.2}, 1.0),
    ("adamax_tiny", "Adamax", {}, 1e-8),
    ("nadam", "Nadam", {}, 1.0),
    ("nadam_schedule_decay", "Nadam", {"lr": 0.01, "schedule_decay": 0.05, "beta_2": 0.99}, 1.0),
    ("nadam_tiny", "Nadam", {}, 1e-8),
    ("nadam_clipnorm", "Nadam", {"clipnorm": 2.0}, 1.0),
]

SLOTS = {
    "SGD": ("velocity",),
    "RMSprop": ("accumulator",),
    "Adagrad": ("accumulator",),
    "Adadelta": ("accumulator", "delta_accumulator"),
    "Adam": ("m", "v"),
    "AdamW": ("m", "v"),
    "Adamax": ("m", "u"),
    "Nadam": ("m", "v"),
}


def make_params(dtype) -> dict:
    """Several leaves: a matrix, a vector, a scalar, and a leaf whose gradient is always zero."""
    rng = np.random.default_rng(0)
    params = {
        "dense": {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))},
        "scale": np.asarray(rng.normal()),
        "frozen": rng.normal(size=(2,)),
    }
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def make_grads(params, steps: int, scale: float, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    sequence = []
    for _ in range(steps):
        grads = jax.tree.map(lambda p: scale * rng.normal(size=p.shape), params)
        grads["frozen"] = np.zeros(params["frozen"].shape)
        sequence.append(jax.tree.map(lambda g, p: jnp.asarray(g, p.dtype), grads, params))
    return sequence


class X64:
    """Mixin for a test class that runs with ``jax_enable_x64`` on (restored afterwards)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._x64 = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)

    @classmethod
    def tearDownClass(cls):
        jax.config.update("jax_enable_x64", cls._x64)
        super().tearDownClass()


class MatchesReference(chex.TestCase):
    """Subclasses set ``dtype``, ``rtol`` and ``atol``."""

    __test__ = False
    dtype = np.float32
    rtol = 2e-5
    atol = 2e-6

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_trajectory_matches_reference(self, name, config, scale):
        opt = getattr(kopt, name)(**config)
        ref = reference.make(name, dtype=self.dtype, **config)
        params = make_params(self.dtype)
        grads_sequence = make_grads(params, STEPS, scale)

        @self.variant
        def step(params, state, grads):
            updates, state = opt.update(grads, state, params)
            return kopt.apply_updates(params, updates), state

        state = opt.init(params)
        ref_params = [np.asarray(p) for p in jax.tree.leaves(params)]
        treedef = jax.tree.structure(params)
        for grads in grads_sequence:
            params, state = step(params, state, grads)
            ref_params = ref.step(ref_params, [np.asarray(g) for g in jax.tree.leaves(grads)])
            chex.assert_trees_all_close(params, treedef.unflatten(ref_params), rtol=self.rtol, atol=self.atol)
        chex.assert_trees_all_equal_dtypes(params, make_params(self.dtype))
        self.assertEqual(int(kopt.iterations(state)), STEPS)
        self.assertEqual(ref.iterations, STEPS)
        for slot in SLOTS[name]:
            expected = ref.slots()[slot]
            # Slots can be tiny (v ~ g**2 ~ 1e-16): tolerance relative to the slot's magnitude.
            magnitude = max(float(np.max(np.abs(x), initial=0.0)) for x in expected)
            chex.assert_trees_all_close(
                kopt.get_slot(state, slot),
                treedef.unflatten(expected),
                rtol=self.rtol,
                atol=self.rtol * magnitude,
            )
