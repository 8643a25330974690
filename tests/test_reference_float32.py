"""Every optimizer and option against the NumPy reference, in float32 (Keras' floatx)."""

import numpy as np

from tests.matching import MatchesReference


class TestFloat32(MatchesReference):
    __test__ = True
    dtype = np.float32
    rtol = 2e-5
    atol = 2e-6
