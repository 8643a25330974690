"""One of 2 processes (4 virtual CPU devices each) training kopt on one global 8-device mesh.

Launched twice by ``tests/test_multidevice.py``::

    python tests/multidevice/multi_process.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

The processes meet at a coordinator on ``127.0.0.1:PORT`` (process 0 serves
it) and exchange data with Gloo, JAX's CPU cross-process collectives. The mesh
is ("data": one row per process) x ("model": the 4 local devices): the batch
is split across processes, the params across each process's devices, and the
optimizer state additionally across processes (ZeRO-1 over "data"). Process 0
saves the gathered final params and state to ``OUT_DIR/multi_process.npz``.
"""

import os
import sys

# Set before JAX starts (common imports it too): the device count is fixed then.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from kopt.sharding import init_shardings

PARAM_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds in full: each process supplies its own shards."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    # Must precede initialize: without it the CPU client has no cross-process collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",  # not every interface, which is the default
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    assert jax.process_count() == num_processes and jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((num_processes, 8 // num_processes), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    opt = common.make_opt()
    param_shardings = {name: NamedSharding(mesh, spec) for name, spec in PARAM_SPECS.items()}
    params = {name: global_array(value, param_shardings[name]) for name, value in common.make_params().items()}
    state_shardings = init_shardings(opt, params, axis="data")
    state = jax.jit(opt.init, out_shardings=state_shardings)(params)
    replicated = NamedSharding(mesh, P())
    step = jax.jit(common.make_step(opt), out_shardings=(param_shardings, state_shardings, replicated))

    batch = NamedSharding(mesh, P("data", None))
    losses = []
    for x, y in zip(*common.make_batches(), strict=True):
        params, state, loss = step(params, state, global_array(x, batch), global_array(y, batch))
        losses.append(float(loss.addressable_data(0)))  # replicated: every process holds it

    local_bytes = common.per_device_bytes(state)
    gathered = common.flat_numpy(
        {
            "params": multihost_utils.process_allgather(params, tiled=True),
            "state": multihost_utils.process_allgather(state, tiled=True),
        }
    )
    if process_id == 0:
        np.savez(os.path.join(out_dir, "multi_process.npz"), **gathered)
    common.report(
        {
            "process": process_id,
            "local_devices": jax.local_device_count(),
            "per_device_state_bytes": sorted(set(local_bytes.values())),
            "losses": losses,
        }
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
