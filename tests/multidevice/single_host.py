"""kopt on 8 virtual CPU devices in one process: sharded params, shard_map data parallel, ZeRO-1.

Run by ``tests/test_multidevice.py`` in its own process, because the device
count must be fixed before JAX is imported. By hand::

    python tests/multidevice/single_host.py OUT_DIR

Each scenario trains ``common.STEPS`` steps, saves its final params and state
to ``OUT_DIR/<scenario>.npz`` (compared by the parent with the single-device
reference) and reports what it saw of shardings and memory on the last line,
``RESULT {json}``.
"""

import os
import sys

# Set before JAX starts (common imports it too): the device count is fixed then.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kopt
from kopt.sharding import init_shardings, state_shardings

# Tensor parallel over "model"; b2 stays replicated. The batch is split over "data".
PARAM_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
BATCH_SPEC = P("data", None)


def place(tree, shardings):
    return jax.tree.map(jax.device_put, tree, shardings)


def train(step, params, state, mesh, expected):
    """Runs the steps; returns the final (params, state) and every sharding mismatch seen after a step
    (none looked for when ``expected`` is None)."""
    xs, ys = common.make_batches()
    batch = NamedSharding(mesh, BATCH_SPEC)
    mismatches = []
    for x, y in zip(xs, ys, strict=True):
        params, state, _ = step(params, state, jax.device_put(x, batch), jax.device_put(y, batch))
        if expected is not None:
            mismatches += common.sharding_mismatches((params, state), expected)
    return params, state, mismatches


def save(out_dir, name, params, state):
    np.savez(os.path.join(out_dir, f"{name}.npz"), **common.flat_numpy({"params": params, "state": state}))


def expected_init(params, state, mesh):
    """Init shardings written out without kopt.sharding: Adam's slots as their params, all else replicated."""
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda p: p.sharding, params)

    def member(named):
        return type(named)(
            *(
                param_shardings if field in ("m", "v", "vhat") else jax.tree.map(lambda _: replicated, value)
                for field, value in zip(named._fields, named, strict=True)
            )
        )

    return param_shardings, tuple(member(named) for named in state)


def explicit_axes(opt, out_dir):
    """``jax.make_mesh`` (explicit axes) under ``jax.set_mesh``: a plain ``jit(init)`` places every slot."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        params = place(common.make_params(), {k: NamedSharding(mesh, s) for k, s in PARAM_SPECS.items()})
        state = jax.jit(opt.init)(params)
        expected = expected_init(params, state, mesh)
        init_mismatches = common.sharding_mismatches(state, expected[1])
        helper_mismatches = common.sharding_mismatches(state, init_shardings(opt, params))
        step = jax.jit(common.make_step(opt, out_sharding=P("data", None)))
        params, state, step_mismatches = train(step, params, state, mesh, expected)
    save(out_dir, "explicit", params, state)
    return {
        "init_mismatches": init_mismatches,
        "helper_mismatches": helper_mismatches,
        "step_mismatches": step_mismatches,
    }


def auto_axes(opt, out_dir):
    """An auto-axes ``jax.sharding.Mesh``: eager init keeps shardings; a jitted init needs ``init_shardings``."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    params = place(common.make_params(), {k: NamedSharding(mesh, s) for k, s in PARAM_SPECS.items()})
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    eager = opt.init(params)
    eager_slot_mismatches = [
        f"{name}: {mismatch}"
        for name in ("m", "v", "vhat")
        for mismatch in common.sharding_mismatches(kopt.get_slot(eager, name), param_shardings)
    ]
    # What a bare jit(init) does here (JAX's choice; reported, not asserted): slots on one device.
    bare = jax.jit(opt.init)(params)
    bare_devices = sorted({len(leaf.sharding.device_set) for leaf in jax.tree.leaves(kopt.get_slot(bare, "m"))})

    expected = expected_init(params, eager, mesh)
    state = jax.jit(opt.init, out_shardings=init_shardings(opt, params))(params)
    init_mismatches = common.sharding_mismatches(state, expected[1])
    equals_eager = all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(eager), strict=True)
    )
    # No out_shardings on the step: the shardings must survive XLA's propagation from the inputs.
    step = jax.jit(common.make_step(opt))
    params, state, step_mismatches = train(step, params, state, mesh, expected)
    save(out_dir, "auto", params, state)
    return {
        "eager_slot_mismatches": eager_slot_mismatches,
        "bare_jit_init_slot_device_counts": bare_devices,
        "init_mismatches": init_mismatches,
        "init_equals_eager": equals_eager,
        "step_mismatches": step_mismatches,
    }


def shard_map_data_parallel(opt, out_dir):
    """Per-device gradients averaged with ``pmean`` over "data", then one kopt update on every device."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    replicated = NamedSharding(mesh, P())
    params = place(common.make_params(), jax.tree.map(lambda _: replicated, common.make_params()))
    state = jax.device_put(opt.init(params), replicated)

    def local_step(params, state, x, y):
        # Differentiate a per-device copy of the params: an invariant (replicated) input would get its
        # gradient summed over "data" by autodiff already, 8 times the mean.
        local = jax.lax.pcast(params, "data", to="varying")
        loss, grads = jax.value_and_grad(common.loss_fn)(local, x, y)
        grads, loss = jax.lax.pmean((grads, loss), "data")  # the whole batch's mean gradient, on every device
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state, loss

    step = jax.jit(
        jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P(), P()))
    )
    xs, ys = common.make_batches()
    batch = NamedSharding(mesh, P("data"))
    for x, y in zip(xs, ys, strict=True):
        params, state, _ = step(params, state, jax.device_put(x, batch), jax.device_put(y, batch))
    # Every device's copy of every leaf, compared with device 0's.
    different = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path((params, state))[0]
        if not all(np.array_equal(s.data, leaf.addressable_shards[0].data) for s in leaf.addressable_shards)
    ]
    save(out_dir, "shard_map", params, state)
    return {"replicas_differ": different, "devices": len(params["w1"].addressable_shards)}


def zero1(opt, out_dir, prefix=""):
    """Data parallel with the optimizer state split 8 ways (ZeRO-1), against the same step with it replicated."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda _: replicated, common.make_params())
    params = place(common.make_params(), param_shardings)

    def run(name, shardings):
        state = jax.jit(opt.init, out_shardings=shardings)(params)
        held_at_init = common.per_device_bytes(state)
        step = jax.jit(common.make_step(opt), out_shardings=(param_shardings, shardings, replicated))
        new_params, state, mismatches = train(step, params, state, mesh, (param_shardings, shardings))
        save(out_dir, prefix + name, new_params, kopt.packing.leaf_by_leaf(state))  # files: leaf by leaf
        held = common.per_device_bytes(state)
        summary = {
            "per_device_state_bytes": sorted(set(held.values())),
            "devices": len(held),
            "unchanged_by_steps": held == held_at_init,
            "step_mismatches": mismatches,
        }
        return state, summary

    full, replicated_summary = run("replicated", init_shardings(opt, params))
    split, zero1_summary = run("zero1", init_shardings(opt, params, axis="data"))
    return {
        "replicated": replicated_summary,
        "zero1": zero1_summary,
        "full_state_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(full)),
        # The helper applied to an existing replicated state gives the layout init_shardings(axis=) gave.
        "state_shardings_mismatches": common.sharding_mismatches(split, state_shardings(full, mesh, "data")),
        "split_specs": {
            jax.tree_util.keystr(path): str(leaf.sharding.spec)
            for path, leaf in jax.tree_util.tree_flatten_with_path(kopt.get_slot(split, "m"))[0]
        },
    }


def default_layout(out_dir):
    """The default layout (``packed=None``) on the tensor-parallel params and on an explicit-axes ZeRO-1.

    Auto axes: a jitted ``init`` sees tracers that carry no placement, so these small split leaves share one
    buffer; the eager ``init`` must lay them out alike (one state structure, whichever ``init`` the user ran)
    and ``init_shardings`` must fit it. Explicit axes: the types say which leaves are split, so each keeps
    its slots where its param is; with replicated params and ``axis="data"`` the shared buffer is split
    8 ways and the step gathers it to cut the leaves out.
    """
    opt = common.make_opt(packed=None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    params = place(common.make_params(), {k: NamedSharding(mesh, s) for k, s in PARAM_SPECS.items()})
    eager = opt.init(params)
    shardings = init_shardings(opt, params)
    state = jax.jit(opt.init, out_shardings=shardings)(params)
    auto = {
        "packed": kopt.packing.holds_packed(state),
        "eager_structure_equal": jax.tree.structure(eager) == jax.tree.structure(state),
        "init_mismatches": common.sharding_mismatches(state, shardings),
    }
    final_params, final_state, _ = train(jax.jit(common.make_step(opt)), params, state, mesh, None)
    save(out_dir, "default_auto", final_params, kopt.packing.leaf_by_leaf(final_state))

    explicit = {}
    for name, (shape, specs, axis) in {
        "tensor_parallel": ((2, 4), PARAM_SPECS, None),
        "zero1": ((8,), dict.fromkeys(PARAM_SPECS, P()), "data"),
    }.items():
        axes = ("data", "model")[: len(shape)]
        mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * len(shape))
        with jax.set_mesh(mesh):
            params = place(common.make_params(), {k: NamedSharding(mesh, s) for k, s in specs.items()})
            shardings = init_shardings(opt, params, axis=axis)
            state = jax.jit(opt.init, out_shardings=shardings)(params)
            step = jax.jit(common.make_step(opt, out_sharding=P("data", None)))
            final_params, final_state, _ = train(step, params, state, mesh, None)
        save(out_dir, f"default_explicit_{name}", final_params, kopt.packing.leaf_by_leaf(final_state))
        explicit[name] = {
            "packed": kopt.packing.holds_packed(state),
            "init_mismatches": common.sharding_mismatches(state, shardings),
            "specs": {  # of the state's arrays: the leaves' own slots and the shared buffers
                jax.tree_util.keystr(path): str(leaf.sharding.spec)
                for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
                if leaf.ndim
            },
        }
    return {"auto": auto, "explicit": explicit}


def helper_rules():
    """``state_shardings`` on hand-made leaves of a 2 x 4 mesh: which dimension it splits, and what it keeps."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    on_model = jax.device_put(np.zeros((4, 8), np.float32), NamedSharding(mesh, P(None, "model")))
    leaves = {
        "scalar": jax.ShapeDtypeStruct((), np.float32),
        "first_divisible": jax.ShapeDtypeStruct((3, 16, 8), np.float32),
        "indivisible": jax.ShapeDtypeStruct((5, 3), np.float32),
        "on_model": on_model,  # keeps its "model" split, gains "data" on a free dimension
    }
    specs = {
        axes: {name: str(s.spec) for name, s in state_shardings(leaves, mesh, axes).items()}
        for axes in ("data", ("data", "model"))
    }
    return {"data": specs["data"], "data_and_model": specs[("data", "model")]}


def main(out_dir):
    assert jax.device_count() == 8, jax.devices()
    opt = common.make_opt()
    common.report(
        {
            "explicit": explicit_axes(opt, out_dir),
            "auto": auto_axes(opt, out_dir),
            "shard_map": shard_map_data_parallel(opt, out_dir),
            "zero1": zero1(opt, out_dir),
            "default_zero1": zero1(common.make_opt(packed=None), out_dir, prefix="default_"),
            "default_layout": default_layout(out_dir),
            "helper_rules": helper_rules(),
        }
    )


if __name__ == "__main__":
    main(sys.argv[1])
