"""ZeRO-1 on many small leaves: the state split over N devices, per-leaf vs packed kopt vs optax.

    python benchmarks/zero1_packed.py            # 4 host devices (XLA's forced host platform count)

Params replicated over a ``data`` axis of N devices, the optimizer state split over it
(``kopt.init_shardings(opt, params, axis="data")``; optax's state via
``kopt.state_shardings``), a donated jitted Adam + global clipnorm step. Prints ms per step
(median of 5 bursts of 20 steps), the first call (compile) and, for packed, the largest
difference of the params after the run from the per-leaf run (optax's Adam is another rule).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

DEVICES = 4
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kopt  # noqa: E402

LEAVES = int(sys.argv[1]) if len(sys.argv) > 1 else 400


def main() -> None:
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    shapes = [(16, 8), (32,), (4, 4, 8), (64, 4)]
    params = {f"l{i:04d}": jnp.asarray(rng.normal(size=shapes[i % 4]), jnp.float32) for i in range(LEAVES)}
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    grads = jax.tree.map(lambda p: 3.0 * p, params)
    contestants = {
        "kopt per leaf": kopt.Adam(lr=1e-3, clipnorm=1.0),
        "kopt packed": kopt.Adam(lr=1e-3, clipnorm=1.0, packed=True),
        "optax": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    }
    results = {}
    for name, opt in contestants.items():
        if name.startswith("kopt"):
            shardings = kopt.init_shardings(opt, params, axis="data")
        else:
            shardings = kopt.state_shardings(jax.eval_shape(opt.init, params), mesh, "data")
        state = jax.jit(opt.init, out_shardings=shardings)(params)

        def step(p, s, g, opt=opt):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        param_shardings = jax.tree.map(lambda _: replicated, params)
        jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_shardings, shardings))
        p = jax.tree.map(jnp.copy, params)
        t0 = time.perf_counter()
        p, state = jitted(p, state, grads)
        jax.block_until_ready(p)
        first = time.perf_counter() - t0
        bursts = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                p, state = jitted(p, state, grads)
            jax.block_until_ready(p)
            bursts.append((time.perf_counter() - t0) / 20 * 1e3)
        results[name] = (statistics.median(bursts), first, p)
    reference = results["kopt per leaf"][2]
    print(f"{LEAVES} leaves, state split over {DEVICES} host devices; jax {jax.__version__}\n")
    print("| contestant | ms / step | first call s (compile) | max abs param difference vs per leaf |")
    print("| --- | --- | --- | --- |")
    for name, (ms, first, p) in results.items():
        leaves = zip(jax.tree.leaves(p), jax.tree.leaves(reference), strict=True)
        difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves)
        shown = f"{difference:.1e}" if name.startswith("kopt") else "(another Adam)"
        print(f"| {name} | {ms:.2f} | {first:.2f} | {shown} |")


if __name__ == "__main__":
    main()
