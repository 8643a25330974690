"""Every optimizer and option against the NumPy reference, in float64 (x64 enabled for this class)."""

import numpy as np

from tests.matching import X64, MatchesReference


class TestFloat64(X64, MatchesReference):
    __test__ = True
    dtype = np.float64
    rtol = 1e-10
    atol = 1e-12
