"""kopt.checkpoint: exact round trips, refused mismatches, damaged files, atomic writes, exact resume.

The exact-resume test trains every optimizer 20 steps here and compares, bit
for bit, with 10 steps here + save + load in a new Python process + 10 steps
there. That child process (one for all optimizers) also loads a state onto a
2-device sharding.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kopt
from kopt.checkpoint import CheckpointCorruptedError, load_state, read_checkpoint_header, save_state

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Every optimizer, clipping on some; configs chosen so every slot moves.
CASES = [
    ("sgd_nesterov_decay", "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "decay": 0.01}),
    ("rmsprop_decay", "RMSprop", {"lr": 0.01, "decay": 0.1}),
    ("adagrad", "Adagrad", {"lr": 0.1}),
    ("adadelta_clipvalue", "Adadelta", {"decay": 0.05, "clipvalue": 0.5}),
    ("adam", "Adam", {"lr": 0.01}),
    ("adam_amsgrad_clipnorm", "Adam", {"lr": 0.01, "amsgrad": True, "clipnorm": 1.0}),
    ("adamax_clipnorm", "Adamax", {"clipnorm": 2.0}),
    ("nadam_clipnorm", "Nadam", {"clipnorm": 1.0}),
]
CASE_IDS = [case[0] for case in CASES]
SAVE_AT, TOTAL = 10, 20


def make_params() -> dict:
    """Tiny params: a float32 matrix, a bfloat16 vector, a scalar and a ``None`` (frozen) leaf."""
    return {
        "w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(3, 2),
        "b": jnp.asarray([0.5, -0.25], jnp.bfloat16),
        "s": jnp.asarray(2.0, jnp.float32),
        "frozen": None,
    }


def grads_at(step: int) -> dict:
    """The gradients of step ``step``: the same numbers in every process."""
    rng = np.random.default_rng(1000 + step)
    params = make_params()
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 3.0, p.dtype), params)


def make_step(opt):
    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    return step


def train(step, params, state, steps):
    for i in steps:
        params, state = step(params, state, grads_at(i))
    return params, state


def assert_bitwise_equal(actual, expected):
    """Same structure (``None`` leaves included), dtypes, shapes and bits."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        where = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, a.shape, b.dtype, b.shape)
        assert a.tobytes() == b.tobytes(), (where, a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per case: the optimizer, its 10-step checkpoint, and the uninterrupted 20-step result."""
    folder = tmp_path_factory.mktemp("resume")
    result = {}
    for name, class_name, config in CASES:
        opt = getattr(kopt, class_name)(**config)
        step = make_step(opt)
        params = make_params()
        params, state = train(step, params, opt.init(params), range(SAVE_AT))
        path = folder / f"{name}.ckpt"
        save_state(path, {"params": params, "state": state}, config=kopt.serialize(opt))
        saved = {"params": params, "state": state}
        params, state = train(step, params, state, range(SAVE_AT, TOTAL))
        result[name] = {"opt": opt, "path": path, "saved": saved, "final": {"params": params, "state": state}}
    return folder, result


def like_for(opt):
    params = make_params()
    return {"params": params, "state": opt.init(params)}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", CASE_IDS)
def test_round_trip_is_exact(runs, name):
    _, result = runs
    run = result[name]
    like = like_for(run["opt"])
    loaded = load_state(run["path"], like, config=run["opt"])
    assert_bitwise_equal(loaded, run["saved"])
    assert loaded["params"]["frozen"] is None
    assert loaded["params"]["b"].dtype == jnp.bfloat16
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(like), strict=True):
        assert isinstance(got, jax.Array) and got.sharding == want.sharding
    assert int(kopt.iterations(loaded["state"])) == SAVE_AT


def test_header_holds_structure_dtypes_version_and_config(runs):
    _, result = runs
    run = result["adam_amsgrad_clipnorm"]
    header = read_checkpoint_header(run["path"])
    assert header["format"] == "kopt-checkpoint" and header["format_version"] == 1
    assert header["kopt_version"] == kopt.__version__
    assert header["config"] == kopt.serialize(run["opt"])
    flat = jax.tree_util.tree_flatten_with_path(kopt.packing.leaf_by_leaf(run["saved"]))[0]  # files: leaf by leaf
    assert [leaf["path"] for leaf in header["leaves"]] == [jax.tree_util.keystr(p) for p, _ in flat]
    assert [leaf["shape"] for leaf in header["leaves"]] == [list(np.shape(x)) for _, x in flat]
    b = next(leaf for leaf in header["leaves"] if leaf["path"] == "['params']['b']")
    assert (b["dtype"], b["stored_as"]) == ("bfloat16", "uint16")
    assert len(header["sha256"]) == 64
    assert kopt.deserialize(header["config"]).config == run["opt"].config


def test_special_dtypes_and_bit_patterns_round_trip(tmp_path):
    bf16 = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-40, 3.0], np.float32).astype(ml_dtypes.bfloat16)
    payload_nan = np.array([0x7FC1, 0xFFFF], np.uint16).view(ml_dtypes.bfloat16)  # NaNs with payload bits
    tree = {
        "bf16": jnp.asarray(bf16),
        "bf16_payload": jnp.asarray(payload_nan),
        "bf16_scalar": jnp.asarray(1.5, jnp.bfloat16),
        "f16": jnp.asarray([np.nan, -0.0, 6e-8], jnp.float16),
        "f8": jnp.asarray([0.5, -448.0], ml_dtypes.float8_e4m3fn),
        "i8": jnp.asarray([-128, 127], jnp.int8),
        "u32": jnp.asarray([2**32 - 1], jnp.uint32),
        "bool": jnp.asarray([True, False]),
        "c64": jnp.asarray([1 + 2j], jnp.complex64),
        "empty": jnp.zeros((0, 3), jnp.float32),
        "empty_bf16": jnp.zeros((2, 0), jnp.bfloat16),
        "numpy": np.arange(3, dtype=np.int16),
        "none": None,
    }
    save_state(tmp_path / "t.ckpt", tree)
    loaded = load_state(tmp_path / "t.ckpt", like=tree)
    assert_bitwise_equal(loaded, tree)
    assert isinstance(loaded["numpy"], np.ndarray) and isinstance(loaded["bf16"], jax.Array)


def _wrapped_optimizers():
    labels = {"w": "body", "b": "head", "s": "body", "frozen": None}
    mask = {"w": True, "b": False, "s": True, "frozen": None}
    return {
        "adam_bfloat16_state": kopt.Adam(lr=0.01, state_dtype="bfloat16"),
        "adamw": kopt.AdamW(lr=0.01, amsgrad=True),
        "skip_nonfinite": kopt.skip_nonfinite(kopt.Nadam(), max_consecutive=3),
        "accumulate": kopt.accumulate(kopt.RMSprop(decay=0.1), every_k=2),
        "partition": kopt.partition({"body": kopt.Adam(), "head": kopt.SGD(momentum=0.9)}, labels),
        "masked": kopt.chain(kopt.masked(kopt.clip_by_value(0.1), mask), kopt.Adamax()),
        "lookahead_ema": kopt.chain(kopt.lookahead(kopt.Adagrad(), sync_period=2), kopt.ema_params(0.9)),
        "plateau": kopt.chain(kopt.Adadelta(), kopt.reduce_on_plateau(patience=1)),
    }


@pytest.mark.parametrize("name", list(_wrapped_optimizers()))
def test_wrapper_and_bfloat16_states_round_trip(tmp_path, name):
    opt = _wrapped_optimizers()[name]
    params = make_params()
    state = opt.init(params)
    for i in range(3):  # eager: no compile for one-off optimizers
        updates, state = opt.update(grads_at(i), state, params, value=jnp.asarray(1.0))
        params = kopt.apply_updates(params, updates)
    save_state(tmp_path / "w.ckpt", state)
    loaded = load_state(tmp_path / "w.ckpt", opt.init(make_params()))
    assert_bitwise_equal(loaded, state)
    if name == "adam_bfloat16_state":
        assert kopt.get_slot(loaded, "m")["w"].dtype == jnp.bfloat16


def test_like_may_be_abstract(runs):
    _, result = runs
    run = result["nadam_clipnorm"]
    abstract = jax.eval_shape(lambda: like_for(run["opt"]))
    loaded = load_state(run["path"], abstract)
    assert_bitwise_equal(loaded, run["saved"])


def test_empty_state_round_trips(tmp_path):
    save_state(tmp_path / "e.ckpt", (kopt.EmptyState(), {}, None))
    assert load_state(tmp_path / "e.ckpt", (kopt.EmptyState(), {}, None)) == (kopt.EmptyState(), {}, None)


def test_non_numeric_leaves_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"leaf \['name'\] has dtype <U5"):
        save_state(tmp_path / "s.ckpt", {"name": np.asarray("hello"), "x": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"leaf \[0\] has dtype object"):
        save_state(tmp_path / "s.ckpt", [np.asarray([{}], dtype=object)])
    with pytest.raises(ValueError, match="JSON"):
        save_state(tmp_path / "s.ckpt", jnp.ones(1), config={"class_name": "Adam", "config": {"lr": jnp.ones(2)}})
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- mismatches


def test_extra_leaf_in_file_is_named(runs):
    _, result = runs
    with pytest.raises(ValueError, match=r"extra leaf \['state'\]\[1\]\.vhat\['b'\]: the file has it"):
        load_state(result["adam_amsgrad_clipnorm"]["path"], like_for(kopt.Adam(lr=0.01, clipnorm=1.0)))


def test_missing_leaf_is_named(runs):
    _, result = runs
    like = like_for(kopt.Adam(lr=0.01, amsgrad=True))
    with pytest.raises(ValueError, match=r"missing leaf \['state'\]\[0\]\.vhat\['b'\]: `like` has it"):
        load_state(result["adam"]["path"], like)


def test_renamed_key_and_none_leaf_are_named(runs):
    _, result = runs
    run = result["adagrad"]
    like = like_for(run["opt"])
    like["params"]["kernel"] = like["params"].pop("w")
    with pytest.raises(ValueError, match=r"missing leaf \['params'\]\['kernel'\]"):
        load_state(run["path"], like)
    like = like_for(run["opt"])
    like["params"]["s"] = None  # the file holds an array where `like` holds None
    with pytest.raises(ValueError, match=r"extra leaf \['params'\]\['s'\]"):
        load_state(run["path"], like)


def test_shape_difference_is_named(runs):
    _, result = runs
    run = result["sgd_nesterov_decay"]
    params = make_params()
    params["w"] = params["w"].reshape(2, 3)
    like = {"params": params, "state": run["opt"].init(params)}
    with pytest.raises(ValueError, match=r"leaf \['params'\]\['w'\] has shape \(3, 2\) in the file but \(2, 3\)"):
        load_state(run["path"], like)


def test_dtype_difference_is_named(runs):
    _, result = runs
    run = result["rmsprop_decay"]
    params = make_params()
    params["b"] = params["b"].astype(jnp.float32)
    like = {"params": params, "state": run["opt"].init(params)}
    with pytest.raises(ValueError, match=r"leaf \['params'\]\['b'\] has dtype bfloat16 in the file but float32"):
        load_state(run["path"], like)


def test_config_difference_is_named(runs):
    _, result = runs
    run = result["sgd_nesterov_decay"]
    other = kopt.SGD(lr=0.1, momentum=0.9, nesterov=False, decay=0.01)  # same state layout: only config shows it
    with pytest.raises(ValueError, match=r"config\['config'\]\['nesterov'\] is True in the file but False"):
        load_state(run["path"], like_for(other), config=other)
    with pytest.raises(ValueError, match="clipvalue"):
        load_state(run["path"], like_for(other), config=kopt.SGD(lr=0.1, momentum=0.9, nesterov=True, clipvalue=1.0))


def test_config_requested_but_not_saved(tmp_path):
    save_state(tmp_path / "c.ckpt", {"x": jnp.ones(2)})
    assert read_checkpoint_header(tmp_path / "c.ckpt")["config"] is None
    with pytest.raises(ValueError, match="holds no optimizer config"):
        load_state(tmp_path / "c.ckpt", {"x": jnp.ones(2)}, config=kopt.Adam())


# --------------------------------------------------------------------------- damaged files


@pytest.fixture
def small_checkpoint(tmp_path):
    tree = {"m": jnp.arange(12.0).reshape(3, 4), "b": jnp.asarray([1.0, 2.0], jnp.bfloat16), "n": jnp.asarray(7)}
    path = tmp_path / "small.ckpt"
    save_state(path, tree, config=kopt.Adam())
    return path, tree


@pytest.mark.parametrize("keep", [0, 1, 10, 100, 0.5, -22, -1])
def test_truncated_file_is_refused(small_checkpoint, keep):
    path, tree = small_checkpoint
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointCorruptedError, match="truncated or damaged"):
        load_state(path, tree)


def test_flipped_bytes_never_give_wrong_numbers(small_checkpoint):
    path, tree = small_checkpoint
    data = path.read_bytes()
    refused = 0
    positions = np.linspace(0, len(data) - 1, 120).astype(int)  # (every position passes too: too slow for CI)
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 0x5A
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_state(path, tree)
        except ValueError:
            refused += 1
            continue
        assert_bitwise_equal(loaded, tree)  # the byte was in zip metadata nobody reads: same numbers
    assert refused >= 0.6 * len(positions)  # zip fields nobody reads (timestamps ...) are the rest


def test_checksum_catches_data_changed_inside_a_valid_zip(small_checkpoint):
    path, tree = small_checkpoint
    with np.load(path) as npz:
        members = {name: npz[name] for name in npz.files}
    members["leaf_1"] = members["leaf_1"].copy()
    members["leaf_1"][0, 0] += 1  # the zip's own CRCs are recomputed and fine
    with open(path, "wb") as file:
        np.savez(file, **members)
    with pytest.raises(CheckpointCorruptedError, match="SHA-256 checksum mismatch"):
        load_state(path, tree)


class _Payload:
    """A pickle that would create a file if anyone unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_foreign_files_are_refused_and_never_unpickled(tmp_path, small_checkpoint):
    path, tree = small_checkpoint
    marker = tmp_path / "pwned"
    with np.load(path) as npz:
        members = {name: npz[name] for name in npz.files}
    members["leaf_1"] = np.asarray([_Payload(marker)], dtype=object)  # a valid header, a pickled leaf
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as file:
        np.savez(file, **members)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.arange(3))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(300))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for path in (evil, plain, garbage, empty):
        with pytest.raises(CheckpointCorruptedError):
            load_state(path, tree)
        if path != evil:  # its header is fine
            with pytest.raises(CheckpointCorruptedError):
                read_checkpoint_header(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "absent.ckpt", tree)


def test_newer_format_version_is_refused(small_checkpoint):
    path, tree = small_checkpoint
    with np.load(path) as npz:
        members = {name: npz[name] for name in npz.files}
    header = json.loads(members["header"].tobytes())
    header["format_version"] = 99
    members["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **members)
    with pytest.raises(CheckpointCorruptedError, match="format_version 99"):
        load_state(path, tree)


# --------------------------------------------------------------------------- atomic writes


def test_save_replaces_the_file_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "a.ckpt"
    save_state(path, {"x": jnp.ones(3)})
    save_state(path, {"x": jnp.full(3, 2.0)})
    assert os.listdir(tmp_path) == ["a.ckpt"]
    assert float(load_state(path, {"x": jnp.ones(3)})["x"][0]) == 2.0


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    save_state(path, {"x": jnp.ones(3)})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        save_state(path, {"x": jnp.zeros(3)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["a.ckpt"]  # the temporary file was removed
    assert_bitwise_equal(load_state(path, {"x": jnp.ones(3)}), {"x": jnp.ones(3)})


_WRITER = """
import sys
import numpy as np
from kopt.checkpoint import save_state
data = np.empty(4_000_000, np.float32)  # 16 MB: each write takes a while
k = 0
while True:
    k += 1
    data.fill(k)
    save_state(sys.argv[1], {"k": np.asarray(k), "data": data})
    print(k, flush=True)
"""


def _partial_files(folder: pathlib.Path, complete: int) -> list[pathlib.Path]:
    """Temporary files of save_state that are shorter than a complete checkpoint."""
    found = []
    for path in folder.glob(".big.ckpt.*.tmp"):
        try:
            if 0 < path.stat().st_size < complete:
                found.append(path)
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return found


@pytest.mark.skipif(os.name != "posix", reason="uses SIGSTOP/SIGKILL")
def test_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "big.ckpt"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=_child_env()
    )
    try:
        assert writer.stdout.readline().strip() == "1"  # one complete checkpoint exists
        complete = path.stat().st_size
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "never caught the writer mid-write"
            partial = _partial_files(tmp_path, complete)
            if partial:
                writer.send_signal(signal.SIGSTOP)  # freeze it, then make sure it is still mid-write
                time.sleep(0.01)
                partial = _partial_files(tmp_path, complete)
                if partial:
                    writer.kill()
                    break
                writer.send_signal(signal.SIGCONT)
            time.sleep(0.0005)
    finally:
        writer.kill()
        writer.wait()
    assert partial[0].exists()  # the half-written temporary file is still there ...
    with pytest.raises(CheckpointCorruptedError):
        load_state(partial[0], {"k": np.asarray(0), "data": np.zeros(4_000_000, np.float32)})
    loaded = load_state(path, {"k": np.asarray(0), "data": np.zeros(4_000_000, np.float32)})  # ... path is whole
    k = int(loaded["k"])
    assert k >= 1 and np.all(loaded["data"] == k)


# --------------------------------------------------------------------------- exact resume in a new process

_RESUMER = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import kopt
from kopt.checkpoint import load_state, read_checkpoint_header, save_state
from tests import test_checkpoint as t

folder = sys.argv[1]
for name, _, _ in t.CASES:
    path = f"{folder}/{name}.ckpt"
    opt = kopt.deserialize(read_checkpoint_header(path)["config"])  # rebuilt from the file alone
    tree = load_state(path, t.like_for(opt), config=opt)
    params, state = t.train(t.make_step(opt), tree["params"], tree["state"], range(t.SAVE_AT, t.TOTAL))
    save_state(f"{folder}/{name}.resumed", {"params": params, "state": state})

# Sharded load: the file holds unsharded arrays; `like` is sharded over 2 devices.
report = {"devices": jax.device_count()}
if jax.device_count() >= 2:
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
    # Explicit axes: the arrays' types say which is split, so the default layout keeps w's slots its own.
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",), axis_types=(AxisType.Explicit,))
    jax.set_mesh(mesh)
    opt = kopt.Adam()
    def spec(leaf):
        split = jnp.ndim(leaf) == 2
        return NamedSharding(mesh, PartitionSpec("x") if split else PartitionSpec())
    params = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
    params = jax.tree.map(lambda x: jax.device_put(x, spec(x)), params)
    state = opt.update(params, opt.init(params), params)[1]
    save_state(f"{folder}/sharded.ckpt", state)  # fetched: the file holds whole arrays
    like = jax.tree.map(lambda x: jax.device_put(x, spec(x)), opt.init(params))
    loaded = load_state(f"{folder}/sharded.ckpt", like)
    pairs = list(zip(jax.tree.leaves(loaded), jax.tree.leaves(like), jax.tree.leaves(state)))
    report["same_sharding"] = all(a.sharding == b.sharding for a, b, _ in pairs)
    report["split_leaves"] = sum(a.addressable_shards[0].data.shape != a.shape for a, _, _ in pairs)
    report["same_values"] = all(np.array_equal(np.asarray(a), np.asarray(c)) for a, _, c in pairs)
print(json.dumps(report))
"""


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = jax.default_backend()  # the same backend as here: same compiled code, same bits
    return env


@pytest.fixture(scope="module")
def resumed(runs):
    folder, _ = runs
    env = _child_env()
    # Two host devices for the sharding check; the computation itself runs on one, as here.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    done = subprocess.run(
        [sys.executable, "-c", _RESUMER, str(folder)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CASE_IDS)
def test_resume_in_a_new_process_is_bit_exact(runs, resumed, name):
    folder, result = runs
    run = result[name]
    resumed_tree = load_state(folder / f"{name}.resumed", like_for(run["opt"]))
    assert_bitwise_equal(resumed_tree, run["final"])
    assert int(kopt.iterations(resumed_tree["state"])) == TOTAL


def test_sharded_state_loads_onto_the_shardings_of_like(resumed):
    if resumed["devices"] < 2:
        pytest.skip("the child process has a single device")
    assert resumed["same_sharding"] and resumed["same_values"]
    assert resumed["split_leaves"] == 2  # m['w'] and v['w'] are split over the two devices
