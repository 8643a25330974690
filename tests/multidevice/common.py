"""The problem every multi-device check solves, and its single-device reference.

Imported by the scripts in this folder (which run with 8 virtual CPU devices,
or 4 per process) and by ``tests/test_multidevice.py`` (one device), so the
sharded runs and the reference share one definition of model, data and
optimizer. Importing it does not touch JAX's device configuration.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kopt

STEPS = 3
BATCH = 16  # divisible by 8 devices: 2 examples each
SHAPES = {"w1": (8, 32), "b1": (32,), "w2": (32, 4), "b2": (4,)}  # b2 cannot be split 8 ways


def make_opt(packed: bool | None = False) -> kopt.GradientTransformation:
    # clipnorm needs the global norm over all (sharded) leaves; AMSGrad adds a third slot. The scenarios
    # check each slot's sharding against its param's, so they keep slots leaf by leaf; the default layout
    # (packed=None: these small replicated params share one buffer) has its own ZeRO-1 scenario.
    return kopt.Adam(lr=0.05, clipnorm=1.0, amsgrad=True, packed=packed)


def make_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32) for name, shape in SHAPES.items()}


def make_batches() -> tuple[np.ndarray, np.ndarray]:
    """``STEPS`` batches of inputs ``(STEPS, BATCH, 8)`` and targets ``(STEPS, BATCH, 4)``."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(STEPS, BATCH, 8)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(8, 4))).astype(np.float32)
    return x, y


def loss_fn(params: Any, x: jax.Array, y: jax.Array, out_sharding: Any = None) -> jax.Array:
    """Mean squared error of a one-hidden-layer tanh MLP.

    ``out_sharding`` is for explicit-axes meshes, where ``h @ w2`` contracts a
    dimension split over ``model`` and JAX asks where the result goes.
    """
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    out = jnp.matmul(h, params["w2"], out_sharding=out_sharding) + params["b2"]
    return jnp.mean((out - y) ** 2)


def make_step(opt: kopt.GradientTransformation, out_sharding: Any = None):
    """The plain (un-jitted) train step ``(params, state, x, y) -> (params, state, loss)``."""

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, out_sharding)
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state, loss

    return step


def reference_run() -> tuple[Any, Any, list[float]]:
    """The single-device run every sharded run must equal: ``(params, state, losses)``."""
    opt = make_opt()
    step = jax.jit(make_step(opt))
    params = jax.tree.map(jnp.asarray, make_params())
    state = opt.init(params)
    xs, ys = make_batches()
    losses = []
    for x, y in zip(xs, ys, strict=True):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    return params, state, losses


def flat_numpy(tree: Any) -> dict[str, np.ndarray]:
    """Every leaf as a host NumPy array, keyed by its path (for ``np.savez`` and comparisons)."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def per_device_bytes(tree: Any) -> dict[int, int]:
    """Bytes of ``tree`` held on each local device (device id -> bytes), from its addressable shards."""
    held: collections.Counter = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] += shard.data.nbytes
    return dict(held)


def sharding_mismatches(tree: Any, expected: Any) -> list[str]:
    """Paths of the leaves of ``tree`` whose sharding is not equivalent to ``expected``'s (a tree of shardings)."""
    flat_expected = jax.tree.leaves(expected, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert len(flat) == len(flat_expected), (len(flat), len(flat_expected))
    return [
        f"{jax.tree_util.keystr(path)}: {leaf.sharding} != {want}"
        for (path, leaf), want in zip(flat, flat_expected, strict=True)
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim)
    ]


def report(result: dict) -> None:
    """Prints ``result`` as the one line the parent test reads."""
    print("RESULT " + json.dumps(result), flush=True)
