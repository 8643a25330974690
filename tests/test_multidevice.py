"""kopt on 8 virtual CPU devices: sharded params (both mesh styles), shard_map, ZeRO-1, two processes.

The device count is fixed when JAX starts, so the sharded runs happen in
child processes (``tests/multidevice/*.py``); this process (one device)
computes the single-device reference they must equal, and asserts on what
the children saved and reported.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kopt
from kopt.sharding import init_shardings, state_shardings
from tests.multidevice import common

HERE = Path(__file__).resolve().parent / "multidevice"
ROOT = HERE.parent.parent
TIMEOUT_S = 180
# Sharded reductions (global norm, gradient sums) add in another order than one device does.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def child_env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def result_line(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    params, state, losses = common.reference_run()
    assert losses[-1] < losses[0]
    return common.flat_numpy({"params": params, "state": state})


@pytest.fixture(scope="module")
def single_host(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single_host")
    run = subprocess.run(
        [sys.executable, str(HERE / "single_host.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=child_env(),
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return out, result_line(run.stdout)


def assert_equals_reference(path: Path, reference: dict[str, np.ndarray]) -> None:
    saved = dict(np.load(path))
    assert saved.keys() == reference.keys()
    chex.assert_trees_all_close(saved, reference, **TOLERANCE)


def test_explicit_axes_mesh_keeps_slot_shardings(single_host, reference):
    out, result = single_host
    explicit = result["explicit"]
    assert explicit["init_mismatches"] == []  # plain jit(init): slots as their params, scalars replicated
    assert explicit["helper_mismatches"] == []  # init_shardings says the same
    assert explicit["step_mismatches"] == []  # params and state keep their shardings step after step
    assert_equals_reference(out / "explicit.npz", reference)


def test_auto_axes_mesh_eager_init_and_init_shardings(single_host, reference):
    out, result = single_host
    auto = result["auto"]
    assert auto["eager_slot_mismatches"] == []
    assert auto["init_mismatches"] == [] and auto["init_equals_eager"]
    assert auto["step_mismatches"] == []
    assert_equals_reference(out / "auto.npz", reference)


def test_shard_map_data_parallel_identical_replicas(single_host, reference):
    out, result = single_host
    assert result["shard_map"] == {"replicas_differ": [], "devices": 8}
    assert_equals_reference(out / "shard_map.npz", reference)


def test_zero1_splits_state_memory_by_device_count(single_host, reference):
    out, result = single_host
    zero1 = result["zero1"]
    before, after = zero1["replicated"], zero1["zero1"]
    print(f"per-device optimizer state: {before['per_device_state_bytes']} B -> {after['per_device_state_bytes']} B")
    assert before["per_device_state_bytes"] == [zero1["full_state_bytes"]]
    assert before["devices"] == after["devices"] == 8
    # Every device holds the same amount: 1/8 of each split slot plus the replicated rest (scalars, b2's slots).
    assert len(after["per_device_state_bytes"]) == 1
    assert after["per_device_state_bytes"][0] * 8 < 1.25 * zero1["full_state_bytes"]
    assert before["unchanged_by_steps"] and after["unchanged_by_steps"]
    assert before["step_mismatches"] == after["step_mismatches"] == []
    assert zero1["state_shardings_mismatches"] == []
    assert zero1["split_specs"] == {  # first dimension divisible by 8; b2 (4,) stays replicated
        "['b1']": "P('data',)",
        "['b2']": "P(None,)",
        "['w1']": "P('data', None)",
        "['w2']": "P('data', None)",
    }
    assert_equals_reference(out / "replicated.npz", reference)
    assert_equals_reference(out / "zero1.npz", reference)


def test_zero1_on_the_default_layout_splits_the_packed_buffers(single_host, reference):
    """The default (packed=None) packs these small replicated params into one buffer per slot: ZeRO-1 splits it
    8 ways, and training gives the single-device per-leaf reference."""
    out, result = single_host
    zero1 = result["default_zero1"]
    before, after = zero1["replicated"], zero1["zero1"]
    assert before["per_device_state_bytes"] == [zero1["full_state_bytes"]]
    assert len(after["per_device_state_bytes"]) == 1
    assert after["per_device_state_bytes"][0] * 8 < 1.25 * zero1["full_state_bytes"]
    assert before["unchanged_by_steps"] and after["unchanged_by_steps"]
    assert before["step_mismatches"] == after["step_mismatches"] == []
    assert zero1["state_shardings_mismatches"] == []
    assert_equals_reference(out / "default_replicated.npz", reference)
    assert_equals_reference(out / "default_zero1.npz", reference)


def test_default_layout_under_auto_and_explicit_axes(single_host, reference):
    """The default layout with tensor-parallel params: under auto axes the small split leaves share a buffer
    (a traced init cannot see where they live) and eager init agrees; under explicit axes each keeps its
    slots where its param is; an explicit-axes ZeRO-1 splits the shared buffer. All train to the reference."""
    out, result = single_host
    auto, explicit = result["default_layout"]["auto"], result["default_layout"]["explicit"]
    assert auto == {"packed": True, "eager_structure_equal": True, "init_mismatches": []}
    tensor_parallel = explicit["tensor_parallel"]
    assert not tensor_parallel["packed"] and tensor_parallel["init_mismatches"] == []
    split_as_params = {"b1": "P('model',)", "b2": "P()", "w1": "P(None, 'model')", "w2": "P('model', None)"}
    assert tensor_parallel["specs"] == {  # every leaf alone, its slots split as its param
        f"[1].{slot}['{name}']": spec for slot in ("m", "v", "vhat") for name, spec in split_as_params.items()
    }
    zero1 = explicit["zero1"]
    assert zero1["packed"] and zero1["init_mismatches"] == []
    assert sorted(zero1["specs"].values()) == ["P('data',)"] * 3  # m, v, vhat: one buffer each, split 8 ways
    for name in ("default_auto", "default_explicit_tensor_parallel", "default_explicit_zero1"):
        assert_equals_reference(out / f"{name}.npz", reference)


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_one_global_mesh(tmp_path, reference):
    # Gloo listens on the address the host name resolves to; stay off any real network interface.
    try:
        loopback = socket.gethostbyname(socket.gethostname()).startswith("127.")
    except OSError:
        loopback = False
    if not loopback:
        pytest.skip("the host name does not resolve to a loopback address, so Gloo would listen on a network")
    port = free_loopback_port()
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]  # noqa: SIM115 (closed below)
    children = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multi_process.py"), str(i), "2", str(port), str(tmp_path)],
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        codes = [child.wait(timeout=max(1.0, deadline - time.monotonic())) for child in children]
    finally:
        for child in children:  # on a timeout or an error: no process outlives the test
            if child.poll() is None:
                child.kill()
                child.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    results = [result_line(output) for output in outputs]
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["local_devices"] == 4 for r in results)
    assert results[0]["losses"] == results[1]["losses"]
    # Tensor parallel over 4 devices and ZeRO-1 over 2 processes: each device holds ~1/8 of the state.
    full_state_bytes = sum(leaf.nbytes for path, leaf in reference.items() if path.startswith("['state']"))
    assert all(r["per_device_state_bytes"][0] * 8 < 1.25 * full_state_bytes for r in results)
    assert_equals_reference(tmp_path / "multi_process.npz", reference)


def test_state_shardings_rules(single_host):
    _, result = single_host
    assert result["helper_rules"] == {
        "data": {  # "data" has 2 devices
            "scalar": "P()",
            "first_divisible": "P(None, 'data', None)",  # 3 cannot be split in 2; 16 can
            "indivisible": "P(None, None)",
            "on_model": "P('data', 'model')",
        },
        "data_and_model": {  # 8 devices
            "scalar": "P()",
            "first_divisible": "P(None, ('data', 'model'), None)",
            "indivisible": "P(None, None)",
            "on_model": "P(None, 'model')",  # already split over one of the axes: kept
        },
    }


def test_sharding_helpers_explain_bad_input():
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    with pytest.raises(ValueError, match="not \\['model'\\]"):
        state_shardings({"w": jnp.zeros(2)}, mesh, "model")
    with pytest.raises(ValueError, match="no param has a NamedSharding; pass mesh="):
        init_shardings(kopt.Adam(), {"w": jnp.zeros(2)})
    shardings = init_shardings(kopt.Adam(), {"w": jnp.zeros(2)}, mesh=mesh)  # unplaced params: replicated
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))
