"""Every optimizer and option against the NumPy reference, in float64 (x64 enabled for this class)."""

import jax
import numpy as np

from tests.matching import MatchesReference


class TestFloat64(MatchesReference):
    __test__ = True
    dtype = np.float64
    rtol = 1e-10
    atol = 1e-12

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._x64 = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)

    @classmethod
    def tearDownClass(cls):
        jax.config.update("jax_enable_x64", cls._x64)
        super().tearDownClass()
