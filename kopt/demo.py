"""Trains a small MLP with every kopt optimizer and prints a table.

Run with ``python -m kopt.demo``. The data is generated here (a noisy
nonlinear regression), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import kopt

OPTIMIZERS = {
    "SGD(momentum=0.9, nesterov=True)": lambda: kopt.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "RMSprop()": lambda: kopt.RMSprop(),
    "Adagrad(lr=0.05)": lambda: kopt.Adagrad(lr=0.05),
    "Adadelta()": lambda: kopt.Adadelta(),
    "Adam(clipnorm=1.0)": lambda: kopt.Adam(lr=3e-3, clipnorm=1.0),
    "Adam(amsgrad=True)": lambda: kopt.Adam(lr=3e-3, amsgrad=True),
    "Adamax()": lambda: kopt.Adamax(),
    "Nadam()": lambda: kopt.Nadam(),
}


def make_data(key: jax.Array, n: int = 512) -> tuple[jax.Array, jax.Array]:
    kx, kn = jax.random.split(key)
    x = jax.random.uniform(kx, (n, 2), minval=-2.0, maxval=2.0)
    y = jnp.sin(x[:, :1]) * jnp.cos(x[:, 1:]) + 0.05 * jax.random.normal(kn, (n, 1))
    return x, y


def init_mlp(key: jax.Array, sizes: Sequence[int] = (2, 32, 32, 1)) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def loss_fn(params, x, y):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    prediction = h @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean((prediction - y) ** 2)


def train(
    opt: kopt.GradientTransformation, params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array, steps: int
) -> tuple[float, float]:
    """Returns (final loss, steps per second after compilation)."""

    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state, loss

    # Params and state are donated, so XLA updates them in place.
    step = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params)
    state = opt.init(params)
    params, state, _ = step(params, state)  # compile
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(steps - 1):
        params, state, _ = step(params, state)
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - start
    return float(loss_fn(params, x, y)), (steps - 1) / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)
    x, y = make_data(jax.random.PRNGKey(0))
    params = init_mlp(jax.random.PRNGKey(1))
    initial = float(loss_fn(params, x, y))
    print(f"MLP 2-32-32-1 on {x.shape[0]} synthetic points, {args.steps} full-batch steps, initial loss {initial:.4f}")
    print(f"{'optimizer':<34} {'final loss':>11} {'steps/s':>9}")
    print("-" * 56)
    for name, make in OPTIMIZERS.items():
        final, rate = train(make(), params, x, y, args.steps)
        print(f"{name:<34} {final:>11.5f} {rate:>9.0f}")


if __name__ == "__main__":
    main()
