"""Determinism: the same inputs give the same bits, run after run; where jit and eager differ, by how much.

For every optimizer, 5 steps on a tree of three leaves (a 64x33 float32 matrix, a 0-d float32
scalar, a bfloat16 vector) and a ``None`` leaf, with clipping on, in three ways:

* ``step``: update and ``apply_updates`` in one ``jax.jit`` program (a train step);
* ``eager``: ``opt.update`` called outside ``jit`` (it compiles itself), then ``apply_updates``;
* ``op_by_op``: the same calls under ``jax.disable_jit()``.

Findings (CPU; README "Determinism"): each way gives the same bits every time: ``eager`` and
``op_by_op`` in this process with the optimizer rebuilt and traced again, ``step`` in a new
process. ``eager`` is ``jax.jit(opt.update)``'s program: the same bits. ``step`` has the same
state bits; its params may differ from ``eager``'s in the last bit of the leaf's scale, because
XLA fuses ``p + (-lr * x)`` into one fused multiply-add when both are in one program.
``op_by_op`` rounds every operation on its own (no fused multiply-adds), so its params and
slots differ from the compiled ways at float32 rounding level.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from tests.matching import SLOTS

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 5
OPTIMIZERS = {
    "SGD": lambda: kopt.SGD(lr=0.1, momentum=0.9, nesterov=True, decay=0.01, clipnorm=5.0),
    "RMSprop": lambda: kopt.RMSprop(lr=0.01, decay=0.1, clipvalue=0.5),
    "Adagrad": lambda: kopt.Adagrad(lr=0.1, clipnorm=5.0),
    "Adadelta": lambda: kopt.Adadelta(decay=0.05, clipvalue=1.0),
    "Adam": lambda: kopt.Adam(lr=0.01, amsgrad=True, clipnorm=5.0),
    "AdamW": lambda: kopt.AdamW(lr=0.01, weight_decay=0.1, clipnorm=5.0),
    "Adamax": lambda: kopt.Adamax(clipnorm=5.0),
    "Nadam": lambda: kopt.Nadam(clipnorm=5.0),
}
NAMES = sorted(OPTIMIZERS)


def make_params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 33)), jnp.float32),
        "s": jnp.asarray(0.5, jnp.float32),
        "h": jnp.asarray(rng.normal(size=7), jnp.bfloat16),
        "frozen": None,
    }


def grads_at(step: int) -> dict:
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: jnp.asarray(2.0 * rng.normal(size=p.shape), p.dtype), make_params())


def run(name: str, way: str) -> tuple[dict, object]:
    """``(params, state)`` after ``STEPS`` steps, with a freshly built optimizer (traced and compiled anew)."""
    opt = OPTIMIZERS[name]()
    params = make_params()
    state = opt.init(params)

    def train_step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    jitted_step, jitted_update = jax.jit(train_step), jax.jit(opt.update)
    for step in range(STEPS):
        grads = grads_at(step)
        if way == "step":
            params, state = jitted_step(params, state, grads)
            continue
        if way == "eager":
            updates, state = opt.update(grads, state, params)
        elif way == "jit_update":
            updates, state = jitted_update(grads, state, params)
        else:
            with jax.disable_jit():
                updates, state = opt.update(grads, state, params)
        params = kopt.apply_updates(params, updates)
    return params, state


@functools.cache
def first_run(name: str, way: str) -> tuple[dict, object]:
    return run(name, way)


def digest(tree) -> str:
    """SHA-256 of every leaf's path, dtype, shape and bytes."""
    sha = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.asarray(leaf)
        sha.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
        sha.update(leaf.tobytes())
    return sha.hexdigest()


def digests() -> dict[str, str]:
    """The digest of the ``step`` way of every optimizer (what the new process prints)."""
    return {name: digest(first_run(name, "step")) for name in NAMES}


def assert_same_bits(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} differs"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("way", ["eager", "op_by_op"])
def test_two_runs_give_the_same_bits(name, way):
    assert_same_bits(run(name, way), first_run(name, way))


@pytest.mark.parametrize("name", ["Adam", "Nadam"])
def test_eager_update_and_jitted_update_give_the_same_bits(name):
    assert_same_bits(first_run(name, "eager"), run(name, "jit_update"))


@pytest.mark.parametrize("name", NAMES)
def test_one_program_train_step_differs_from_eager_only_by_fused_multiply_adds_in_the_params(name):
    (step_params, step_state), (eager_params, eager_state) = first_run(name, "step"), first_run(name, "eager")
    assert_same_bits(step_state, eager_state)  # the state never depends on how p + u is rounded here
    for a, b in zip(jax.tree.leaves(step_params), jax.tree.leaves(eager_params), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        # Each step rounds p + u once (fused) or twice: the difference is one rounding of the
        # leaf's scale per step (it can be many ulps of an element that has come close to zero).
        assert np.max(np.abs(a - b), initial=0) <= STEPS * np.spacing(np.max(np.abs(b)))


@pytest.mark.parametrize("name", NAMES)
def test_op_by_op_matches_the_compiled_update_to_float32_rounding(name):
    (op_params, op_state), (params, state) = first_run(name, "op_by_op"), first_run(name, "eager")
    for a, b in zip(jax.tree.leaves(op_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-5, atol=2e-6)
    for slot in SLOTS[name]:
        for a, b in zip(
            jax.tree.leaves(kopt.get_slot(op_state, slot)), jax.tree.leaves(kopt.get_slot(state, slot)), strict=True
        ):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.max(np.abs(b)), err_msg=slot)


def test_a_new_process_gives_the_same_bits():
    code = "import json; from tests.test_determinism import digests; print(json.dumps(digests()))"
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(child.stdout.strip().splitlines()[-1]) == digests()
