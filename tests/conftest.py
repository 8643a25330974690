"""Keras 3 (tests/test_keras3.py, kopt.keras3's doctest) runs on its JAX backend; set before Keras is imported."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
