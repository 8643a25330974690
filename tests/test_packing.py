"""kopt.packed against the plain per-leaf path: same numbers for every optimizer, option and wrapper.

The per-leaf path is itself checked against the NumPy reference (test_reference_*), so agreement
here carries that check over to the packed path. The packed path runs the same math on the same
numbers, so elementwise rules agree to the last bit or two (XLA may fuse a flat buffer differently,
e.g. contract a multiply-add, which moves the last bit); a global norm (clipnorm) sums the same
squares in another order, so it agrees to a few ulps of the clip factor.
"""

from __future__ import annotations

import collections
import json
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import kopt
from benchmarks import zoo
from tests import reference
from tests.matching import CASES, SLOTS, X64

STEPS = 5


def make_params(dtype) -> dict:
    """Three blocks of the same shapes, two leaves of one shape per block (so several buffers, see
    kopt.packing.Layout), scalars, an empty leaf and a None leaf."""
    rng = np.random.default_rng(0)

    def block():
        return {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,)), "g": rng.normal(size=(4,)), "s": rng.normal()}

    tree = {"blocks": [block(), block(), block()], "empty": np.zeros((0, 2))}
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
    params["frozen"] = None
    return params


def make_grads(params, seed: int = 1, scale: float = 1.0) -> list:
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), params) for _ in range(STEPS)
    ]


def trajectory(opt, params, grads_sequence, variant=lambda f: f, **extra):
    @variant
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params, **extra)
        return kopt.apply_updates(params, updates), state

    state = opt.init(params)
    for grads in grads_sequence:
        params, state = step(params, state, grads)
    return params, state


class PackedMatchesPerLeaf(chex.TestCase):
    """Subclasses set ``dtype``, the tolerance of elementwise rules (a few ulps) and the looser one
    of a reordered global-norm sum."""

    __test__ = False
    dtype = np.float32
    rtol, atol, norm_rtol = 5e-7, 1e-8, 1e-5

    def assert_same(self, packed, plain, reordered_sum: bool = False):
        rtol = self.norm_rtol if reordered_sum else self.rtol
        chex.assert_trees_all_close(packed, plain, rtol=rtol, atol=self.atol)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_alias_matches_per_leaf(self, name, config, scale):
        params = make_params(self.dtype)
        grads = make_grads(params, scale=scale)
        plain_params, plain_state = trajectory(getattr(kopt, name)(**config, packed=False), params, grads, self.variant)
        packed_params, packed_state = trajectory(
            getattr(kopt, name)(**config, packed=True), params, grads, self.variant
        )
        reordered = "clipnorm" in config
        self.assert_same(packed_params, plain_params, reordered)
        chex.assert_trees_all_equal_dtypes(packed_params, plain_params)
        self.assertEqual(jax.tree.leaves(packed_params)[0].dtype, self.dtype)  # x64 really on for float64
        self.assertEqual(kopt.slot_names(packed_state), kopt.slot_names(plain_state))
        self.assertEqual(int(kopt.iterations(packed_state)), int(kopt.iterations(plain_state)))
        for slot in SLOTS[name]:
            packed_slot, plain_slot = kopt.get_slot(packed_state, slot), kopt.get_slot(plain_state, slot)
            chex.assert_trees_all_equal_shapes_and_dtypes(packed_slot, plain_slot)
            self.assert_same(packed_slot, plain_slot, reordered)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("skip_nonfinite", lambda inner: kopt.skip_nonfinite(inner, max_consecutive=2)),
        ("accumulate", lambda inner: kopt.accumulate(inner, every_k=2)),
        ("lookahead", lambda inner: kopt.lookahead(inner, sync_period=2, slow_step_size=0.5)),
        ("ema_params", lambda inner: kopt.chain(inner, kopt.ema_params(0.9))),
        ("reduce_on_plateau", lambda inner: kopt.chain(inner, kopt.reduce_on_plateau(factor=0.5, patience=1))),
        (
            "weight_decay_schedule",
            lambda inner: kopt.chain(
                kopt.clip_by_value(0.5),
                kopt.scale_by_adam(amsgrad=True),
                kopt.add_decayed_weights(0.1),
                kopt.scale_by_learning_rate(kopt.cosine_decay(0.1, decay_steps=3, restarts=True)),
            ),
        ),
    )
    def test_wrapper_matches_per_leaf(self, wrap):
        params = make_params(self.dtype)
        grads = make_grads(params)
        grads[2] = jax.tree.map(lambda g: g * jnp.nan, grads[2])  # exercises skip_nonfinite
        extra = {"value": jnp.asarray(3.0, self.dtype)}  # a flat loss: reduce_on_plateau cuts the rate
        plain = trajectory(wrap(kopt.Adam(lr=0.1, amsgrad=True, packed=False)), params, grads, self.variant, **extra)
        per_leaf = kopt.Adam(lr=0.1, amsgrad=True, packed=False)
        inside = trajectory(kopt.packed(wrap(per_leaf)), params, grads, self.variant, **extra)
        outside = trajectory(wrap(kopt.Adam(lr=0.1, amsgrad=True, packed=True)), params, grads, self.variant, **extra)
        for packed_params, _ in (inside, outside):
            self.assert_same(packed_params, plain[0])

    def test_train_step_matches_per_leaf(self):
        params = make_params(self.dtype)

        def loss(params, batch):
            return sum(jnp.sum(jnp.sin(p * batch)) for p in jax.tree.leaves(params))

        results = []
        for packed in (False, True):
            opt = kopt.Nadam(lr=0.01, clipvalue=0.3, packed=packed)
            step = kopt.train_step(loss, opt)
            current, state = jax.tree.map(jnp.copy, params), opt.init(params)
            for batch in (1.0, 2.0, 3.0):
                current, state, value = step(current, state, jnp.asarray(batch, self.dtype))
            results.append((current, value))
        self.assert_same(results[1], results[0])


class TestPackedFloat32(PackedMatchesPerLeaf):
    __test__ = True
    dtype = np.float32
    rtol, atol, norm_rtol = 5e-7, 1e-8, 1e-5


class TestPackedFloat64(X64, PackedMatchesPerLeaf):
    __test__ = True
    dtype = np.float64
    rtol, atol, norm_rtol = 1e-15, 1e-17, 1e-13


# ----------------------------------------------------------------------------- layout and state access


def test_layout_groups_leaves_by_shape_and_cuts_them_at_rows_carried_as_data():
    block = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "s": jnp.ones(())}
    params = {"blocks": [block, block, block], "head": jnp.ones((3, 4))}
    state = kopt.Adam(packed=True).init(params)
    m = state.inner_state[0].m
    assert isinstance(m, kopt.PackedArrays)
    # 3 blocks of 17 elements and a head of 12, padded with zeros to 128 (ZeRO-1 splits it evenly)
    assert {name: int(b.size) for name, b in m.buffers.items()} == {"buffer0_0": 128}
    assert kopt.packing.PAD_TO == 128 and state.layout.padding == {"buffer0_0": 128 - (3 * 17 + 12)}
    # Leaves of one shape form a group: one start, consecutive rows, whatever their order in the tree.
    layout = state.layout
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    ws = [paths.index(f"['blocks'][{k}]['w']") for k in range(3)] + [paths.index("['head']")]
    assert {layout.starts[i] for i in ws} == {layout.starts[ws[0]]}
    assert sorted(layout.rows[i] for i in ws) == [0, 1, 2, 3]
    # The rows are data in the state (int32 scalars), so each shape's slicing kernel is compiled once.
    chex.assert_trees_all_equal(state.rows, tuple(jnp.arange(4, dtype=jnp.int32)))
    chex.assert_trees_all_equal(kopt.get_slot(state, "m"), jax.tree.map(jnp.zeros_like, params))
    assert "rows" not in kopt.slot_names(state)


def test_layout_caps_leaves_per_buffer_and_keeps_big_leaves_alone():
    from kopt import packing

    n = packing.LEAVES_PER_BUFFER
    params = {"norms": [jnp.full(8, float(k)) for k in range(n + 2)], "conv": jnp.ones((3, 3, 8, 8))}
    state = kopt.Adam(packed=True).init(params)
    layout = state.layout
    assert sorted(collections.Counter(layout.buffers).values()) == [3, n]  # conv joins the 2 leftover norms
    packed_params = layout.pack(params, "params")
    chex.assert_trees_all_equal(layout.unpack(packed_params), params)
    chex.assert_trees_all_equal(layout.unpack(packed_params, state.rows), params)
    big = {"big": jnp.ones(1 << 16), "small": jnp.ones(3)}
    assert kopt.Adam(packed=True).init(big).layout.buffers == ("leaf0", "buffer0_0")


def _follows_per_leaf(packed, plain, params, grads, steps: int):
    """Runs both ``steps`` times: the packed updates match the per-leaf ones and their dtypes; the packed state."""
    pk, ps = packed.init(params), plain.init(params)
    for _ in range(steps):
        u_packed, pk = packed.update(grads, pk, params)
        u_plain, ps = plain.update(grads, ps, params)
        chex.assert_trees_all_close(u_packed, u_plain, rtol=5e-7, atol=1e-8)
        chex.assert_trees_all_equal_dtypes(u_packed, u_plain)
    return pk


def test_mixed_dtypes_get_separate_buffers_and_the_per_leaf_dtypes():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float32), "c": jnp.ones(2, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: (p * 0.3).astype(p.dtype), params)
    pk = _follows_per_leaf(kopt.Adam(lr=0.1, packed=True), kopt.Adam(lr=0.1, packed=False), params, grads, 3)
    assert {b.dtype for b in pk.inner_state[0].m.buffers.values()} == {jnp.dtype(jnp.float32)}
    # one buffer per dtype, in order of appearance: a and c (bfloat16) share buffer0, b (float32) is buffer1
    assert pk.layout.buffers == ("buffer0_0", "buffer1_0", "buffer0_0")
    assert pk.layout.dtypes == ("bfloat16", "float32", "bfloat16")


def _compiled_step(opt, params, grads):
    """The compiled, donated ``update`` + ``apply_updates`` of ``opt`` on ``params`` and ``grads``."""

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return kopt.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, opt.init(params), grads).compile()


def _step_bytes(opt, params, grads) -> int:
    """The compiled memory of a donated update + apply: arguments, outputs not aliased to them, temporaries."""
    m = _compiled_step(opt, params, grads).memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def test_bfloat16_leaves_pack_at_one_gradient_buffer_and_per_leaf_numbers():
    # Blocks of bf16 leaves beside f32 ones, shapes repeated. Packing holds the gradients joined once more
    # than per leaf; XLA:CPU's concatenation of 16-bit floats held them twice (1.33 buffers).
    structure = {"bf16": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), zoo.small_leaves(40))}
    structure["f32"] = zoo.small_leaves(40)
    leaves, treedef = jax.tree.flatten(structure)
    params = treedef.unflatten([jnp.full(s.shape, 0.5 + k / 100, s.dtype) for k, s in enumerate(leaves)])
    grads = treedef.unflatten(
        [(0.1 * jnp.cos(jnp.arange(s.size) + k)).reshape(s.shape).astype(s.dtype) for k, s in enumerate(leaves)]
    )
    gradient_bytes = sum(g.size * g.dtype.itemsize for g in jax.tree.leaves(grads))
    extra = _step_bytes(kopt.Adam(), params, grads) - _step_bytes(kopt.Adam(packed=False), params, grads)
    assert extra <= 1.02 * gradient_bytes, extra / gradient_bytes
    # AdamW packs the params too: same numbers and dtypes as per leaf, and the NumPy rule's (tests/reference.py,
    # in float32 from the same values; a bfloat16 param then rounds to within half its ulp, 2**-9 relative).
    opt = kopt.AdamW(lr=0.1, weight_decay=0.1)
    _follows_per_leaf(opt, kopt.AdamW(lr=0.1, weight_decay=0.1, packed=False), params, grads, 2)
    updates, _ = opt.update(grads, opt.init(params), params)
    ref = reference.make("AdamW", lr=0.1, weight_decay=0.1)
    as_f32 = [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(params)]
    expected = ref.step(as_f32, [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)])
    got = jax.tree.leaves(kopt.apply_updates(params, updates))
    for leaf, want in zip(got, expected, strict=True):
        bf16 = leaf.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(leaf, np.float32), want, rtol=2**-8 if bf16 else 1e-6, atol=1e-7)


def test_get_and_set_slot_work_leaf_by_leaf():
    params = make_params(jnp.float32)
    opt = kopt.Adam(lr=0.1, packed=True)
    state = opt.init(params)
    new_m = jax.tree.map(lambda p: jnp.full(p.shape, 0.25, p.dtype), params)
    state = kopt.set_slot(state, "m", new_m)
    chex.assert_trees_all_equal(kopt.get_slot(state, "m"), new_m)
    plain = kopt.set_slot(kopt.Adam(lr=0.1, packed=False).init(params), "m", new_m)
    grads = make_grads(params)[0]
    chex.assert_trees_all_close(
        opt.update(grads, state, params)[0],
        kopt.Adam(lr=0.1, packed=False).update(grads, plain, params)[0],
        rtol=5e-7,
        atol=1e-8,
    )
    with pytest.raises(ValueError, match="slot 'm' has structure"):
        kopt.set_slot(state, "m", {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="cannot replace one of"):
        kopt.set_slot(state, "m", jax.tree.map(lambda p: jnp.zeros((*p.shape, 1)), params))


def test_hyperparams_change_without_recompile():
    params = make_params(jnp.float32)
    opt = kopt.Adam(lr=0.1, packed=True)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        return opt.update(grads, state, params)

    state = opt.init(params)
    grads = make_grads(params)[0]
    _, state = step(params, state, grads)
    state = kopt.set_hyperparams(state, lr=0.01, beta_1=0.5)
    updates, _ = step(params, state, grads)
    assert len(traces) == 1
    per_leaf = kopt.Adam(lr=0.1, packed=False)
    reference = kopt.set_hyperparams(per_leaf.update(grads, per_leaf.init(params))[1], lr=0.01, beta_1=0.5)
    chex.assert_trees_all_close(updates, per_leaf.update(grads, reference, params)[0], rtol=5e-7, atol=1e-8)


def test_serialize_and_checkpoint_round_trip(tmp_path):
    opt = kopt.RMSprop(lr=0.01, clipvalue=1.0, packed=True)
    config = kopt.serialize(opt)
    assert config["config"]["packed"] is True
    again = kopt.deserialize(config)
    assert again.config == opt.config
    params = make_params(jnp.float32)
    _, state = trajectory(opt, params, make_grads(params))
    kopt.save_state(tmp_path / "state.npz", state, config=config)
    loaded = kopt.load_state(tmp_path / "state.npz", again.init(params), config=config)
    chex.assert_trees_all_equal(loaded, state)
    assert kopt.Adam().config.get("packed") is None  # auto by default, and not in the config


@pytest.mark.parametrize(
    "inner, when",
    [
        (lambda: kopt.clip_by_norm(1.0), "update"),
        (lambda: kopt.masked(kopt.scale_by_adam(), {"a": True, "b": False}), "init"),
        (lambda: kopt.add_decayed_weights(0.1, mask={"a": True, "b": False}), "init"),
        (lambda: kopt.partition({0: kopt.Adam(), 1: kopt.SGD()}, {"a": 0, "b": 1}), "init"),
    ],
)
def test_per_leaf_transforms_refuse_packed_leaves(inner, when):
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    opt = kopt.packed(inner())
    if when == "init":
        with pytest.raises(ValueError, match=r"works leaf by leaf.*outside kopt\.packed"):
            opt.init(params)
    else:
        state = opt.init(params)
        with pytest.raises(ValueError, match=r"works leaf by leaf.*outside kopt\.packed"):
            opt.update(params, state, params)


def test_bad_inputs_name_what_is_wrong():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    opt = kopt.Adam(packed=True)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"updates has structure PyTreeDef\(\{'a': \*\}\).*built for"):
        opt.update({"a": jnp.ones(2)}, state)
    with pytest.raises(ValueError, match=r"updates has structure .*'c'.*built for .*'b'"):  # same shapes, other key
        opt.update({"a": jnp.ones(2), "c": jnp.ones(3)}, state)
    with pytest.raises(ValueError, match=re.escape("updates['b'] has shape (4,), but its param has shape (3,)")):
        opt.update({"a": jnp.ones(2), "b": jnp.ones(4)}, state)
    with pytest.raises(TypeError, match=r"updates\['a'\] .*gradients must be floating-point"):
        opt.update({"a": jnp.ones(2, jnp.bool_), "b": jnp.ones(3)}, state)
    with pytest.raises(ValueError, match="keeps a PackedState, but update got a tuple"):
        opt.update(params, kopt.Adam(packed=False).init(params))
    with pytest.raises(ValueError, match="packed must be True, False or None"):
        kopt.SGD(packed="yes")


def _kernels(opt, params) -> int:
    """Array-valued ops of the optimized entry computation of a donated update + apply."""
    hlo = _compiled_step(opt, params, params).as_text()
    entry = hlo[hlo.index("ENTRY") :]
    return len(re.findall(r"= f32\[[0-9,]+\]\{[0-9,]*\} (?:fusion|concatenate|copy)\(", entry))


def _distinct_kernels(opt, params) -> int:
    """The kernels XLA:CPU compiles for a donated update + apply: fused computations told apart by their ops
    and the order of their operands, not by their names (XLA compiles identical ones once)."""
    hlo = _compiled_step(opt, params, jax.tree.map(lambda p: 0.01 * jnp.cos(p), params)).as_text()
    kernels = set()
    for body in re.findall(r"^%fused_computation[.\d]* (\(.*?^\})", hlo, re.S | re.M):
        body = re.sub(r", metadata=\{[^}]*\}", "", body)
        kernels.add(re.sub(r"%[\w.]+|param_[\d.]+", "%", body))  # names out; parameter(k) numbers stay
    return len(kernels)


PER_LEAF_SHARING = {
    "Adam": lambda: kopt.Adam(packed=False),
    "Adam amsgrad": lambda: kopt.Adam(amsgrad=True, packed=False),
    "AdamW": lambda: kopt.AdamW(weight_decay=0.01, packed=False),
    "Adamax": lambda: kopt.Adamax(packed=False),
    "RMSprop": lambda: kopt.RMSprop(packed=False),
    "Adagrad": lambda: kopt.Adagrad(packed=False),
    "SGD nesterov": lambda: kopt.SGD(lr=0.1, momentum=0.9, nesterov=True, packed=False),
    "tf_keras Adam": lambda: kopt.tf_keras.Adam(packed=False),
    "keras AdamW": lambda: kopt.keras.AdamW(packed=False),
    "keras Lion": lambda: kopt.keras.Lion(packed=False),
}


@pytest.mark.parametrize("name", PER_LEAF_SHARING)
def test_per_leaf_kernels_are_shared_by_leaves_of_one_shape(name):
    # Per leaf, the kernels of all leaves of one shape should be one compiled kernel: repeating every
    # shape three times adds no kernel (at most the first leaf of the tree's own, as optax's Adam has).
    # Hyperparameters are runtime operands; written after the array math they made the first leaf of each
    # shape a kernel of its own, and kopt compiled slower than optax on many-shape trees.
    shapes = [(15,), (7, 3), (4, 5, 2), (9,), (2, 11)]

    def tree(copies):
        leaves = [shape for _ in range(copies) for shape in shapes]
        return {f"l{i:02d}": jnp.full(shape, 0.1 * (i + 1)) for i, shape in enumerate(leaves)}

    opt = PER_LEAF_SHARING[name]()
    once, thrice = _distinct_kernels(opt, tree(1)), _distinct_kernels(opt, tree(3))
    assert thrice - once <= 2, (once, thrice)


def test_packing_writes_each_leaf_once():
    # 6 blocks of 5 small leaves: per leaf, Adam writes m, v and the param (3 kernels a leaf); packed
    # writes the param once per leaf plus a handful of kernels per buffer.
    shapes = [(7,), (3, 5), (2, 2, 3), (11,), (4, 4)]
    params = {f"block{i}": {f"p{j}": jnp.ones(s) for j, s in enumerate(shapes)} for i in range(6)}
    leaves = 30
    assert _kernels(kopt.Adam(packed=False), params) >= 3 * leaves
    assert _kernels(kopt.Adam(), params) <= leaves + 6 * 6  # the default packs them
    assert _kernels(kopt.Adam(packed=True), params) <= leaves + 6 * 6


@pytest.mark.parametrize("name", ["Adam", "Nadam", "Adadelta"])
def test_keras_weights_round_trip_through_the_packed_state(name):
    params = make_params(jnp.float32)
    del params["frozen"]  # Keras weights list every param
    _, plain_state = trajectory(getattr(kopt, name)(packed=False), params, make_grads(params))
    weights = kopt.to_keras_weights(getattr(kopt, name)(packed=False), plain_state)
    packed_opt = getattr(kopt, name)(packed=True)
    state = kopt.from_keras_weights(packed_opt, params, weights)
    for expected, got in zip(weights, kopt.to_keras_weights(packed_opt, state), strict=True):
        np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------- transformations of JAX


def test_vmapped_ensemble_matches_per_member_per_leaf_runs():
    members = [make_params(np.float32) for _ in range(3)]
    members = [jax.tree.map(lambda p, k=k: p * (k + 1), m) for k, m in enumerate(members)]
    stacked = jax.tree.map(lambda *ps: jnp.stack(ps), *members)
    grads = [jax.tree.map(lambda *gs: jnp.stack(gs), *[make_grads(m, seed=k + 1)[0] for k, m in enumerate(members)])]
    opt = kopt.Adam(lr=0.1, packed=True)
    state = jax.vmap(opt.init)(stacked)
    updates, state = jax.jit(jax.vmap(opt.update))(grads[0], state, stacked)
    for k, member in enumerate(members):
        plain = kopt.Adam(lr=0.1, packed=False)
        expected, _ = plain.update(make_grads(member, seed=k + 1)[0], plain.init(member), member)
        chex.assert_trees_all_close(jax.tree.map(lambda u, k=k: u[k], updates), expected, rtol=5e-7, atol=1e-8)


def test_scan_loop_matches_per_leaf():
    params = make_params(np.float32)
    grads = make_grads(params)
    stacked = jax.tree.map(lambda *gs: jnp.stack(gs), *grads)

    def run(opt):
        def body(carry, g):
            params, state = carry
            updates, state = opt.update(g, state, params)
            return (kopt.apply_updates(params, updates), state), None

        return jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), stacked)[0][0])(params)

    packed, per_leaf = (kopt.RMSprop(lr=0.01, packed=layout) for layout in (True, False))
    chex.assert_trees_all_close(run(packed), run(per_leaf), rtol=5e-7)


def test_grad_through_an_update_matches_per_leaf():
    params = make_params(np.float32)
    grads = make_grads(params)

    def unrolled(opt):  # d(sum of the squared params after three steps) / d(first gradients)
        def loss(first):
            state, new = opt.init(params), params
            for g in (first, *grads[1:3]):
                updates, state = opt.update(g, state, new)
                new = kopt.apply_updates(new, updates)
            return sum(jnp.sum(p**2) for p in jax.tree.leaves(new))

        return jax.jit(jax.grad(loss))(grads[0])

    chex.assert_trees_all_close(
        unrolled(kopt.Adam(lr=0.1, packed=True)), unrolled(kopt.Adam(lr=0.1, packed=False)), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("saved_packed, loaded_packed", [(False, True), (True, False), (True, True)])
def test_checkpoints_are_leaf_by_leaf_and_load_into_either_layout(tmp_path, saved_packed, loaded_packed):
    """A per-leaf checkpoint loads into a packed state and back, by leaf path; training resumes the same."""
    params = {**make_params(jnp.float32), "big": jnp.linspace(-1.0, 1.0, kopt.packing.ALONE)}
    grads = make_grads(params)
    saved, loaded = (kopt.Adam(lr=0.01, clipnorm=1.0, packed=p) for p in (saved_packed, loaded_packed))
    trained, state = trajectory(saved, params, grads[:2])
    kopt.save_state(tmp_path / "state.ckpt", state, config=saved)
    per_leaf_paths = [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(
            kopt.Adam(lr=0.01, clipnorm=1.0, packed=False).init(params)
        )[0]
    ]
    assert [leaf["path"] for leaf in kopt.read_checkpoint_header(tmp_path / "state.ckpt")["leaves"]] == per_leaf_paths
    for like in (loaded.init(params), jax.eval_shape(loaded.init, params)):
        resumed = kopt.load_state(tmp_path / "state.ckpt", like, config=loaded)
        chex.assert_trees_all_equal_structs(resumed, loaded.init(params))
        for slot in ("m", "v"):
            chex.assert_trees_all_equal(kopt.get_slot(resumed, slot), kopt.get_slot(state, slot))
        assert int(kopt.iterations(resumed)) == 2
        # the next step from the loaded state is the uninterrupted run's
        expected, _ = saved.update(grads[2], state, trained)
        chex.assert_trees_all_close(loaded.update(grads[2], resumed, trained)[0], expected, rtol=1e-6, atol=1e-9)


# The benchmark's trees of real models (benchmarks/zoo.py), narrowed: a mix of leaves packed and left alone.
TREE_ZOO = {
    "resnet50": lambda: zoo.resnet50(0.125),
    "vit_b": lambda: zoo.vit_b(0.125),
    "unet": lambda: zoo.unet(0.125),
    "moe": lambda: zoo.moe(0.125, layers=2),
    "random_order": lambda: zoo.random_order(300),
    "distinct_shapes": lambda: zoo.distinct(300),
}


@pytest.mark.parametrize("name", sorted(TREE_ZOO))
def test_tree_zoo_packed_matches_per_leaf(name):
    shapes = TREE_ZOO[name]()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params) for _ in range(2)]
    layout = kopt.packing.Layout.of(params)
    alone = [i for i, shape in enumerate(layout.shapes) if math.prod(shape) >= kopt.packing.ALONE]
    assert all(len(layout.members[layout.buffers[i]]) == 1 for i in alone)
    assert len(layout.members) < len(layout.shapes)  # the small leaves are packed
    packed, per_leaf = kopt.Adam(lr=0.01, clipnorm=1.0, packed=True), kopt.Adam(lr=0.01, clipnorm=1.0)
    packed_state, per_leaf_state = packed.init(params), per_leaf.init(params)
    for g in grads:
        updates, packed_state = packed.update(g, packed_state, params)
        expected, per_leaf_state = per_leaf.update(g, per_leaf_state, params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_close(kopt.get_slot(packed_state, "v"), kopt.get_slot(per_leaf_state, "v"), rtol=1e-5)


def test_packed_none_packs_only_where_init_finds_leaves_to_pack():
    big = {"w": jnp.linspace(-1.0, 1.0, kopt.packing.ALONE).reshape(256, 256), "b": jnp.ones(kopt.packing.ALONE)}
    small = make_params(jnp.float32)
    auto, per_leaf = kopt.Adam(lr=0.01, clipnorm=1.0, packed=None), kopt.Adam(lr=0.01, clipnorm=1.0, packed=False)
    # nothing to pack: the per-leaf state itself, and the per-leaf numbers bit for bit
    state = auto.init(big)
    chex.assert_trees_all_equal_structs(state, per_leaf.init(big))
    grads = jax.tree.map(lambda p: 0.5 * p, big)
    chex.assert_trees_all_equal(auto.update(grads, state, big)[0], per_leaf.update(grads, per_leaf.init(big), big)[0])
    # small leaves: packed, same numbers as the per-leaf path (to clipnorm's last bits)
    state = auto.init(small)
    assert isinstance(state, kopt.PackedState)
    _, reference = trajectory(per_leaf, small, make_grads(small))
    _, state = trajectory(auto, small, make_grads(small))
    chex.assert_trees_all_close(kopt.get_slot(state, "m"), kopt.get_slot(reference, "m"), rtol=1e-5, atol=1e-8)
    # auto is the default, so its config reads as Keras' own; the explicit per-leaf choice travels in the config
    assert "packed" not in kopt.serialize(auto)["config"]
    assert kopt.serialize(auto) == kopt.serialize(kopt.Adam(lr=0.01, clipnorm=1.0))
    assert kopt.packing.holds_packed(kopt.deserialize(json.loads(json.dumps(kopt.serialize(auto)))).init(small))
    assert kopt.deserialize(json.loads(json.dumps(kopt.serialize(per_leaf)))).config["packed"] is False


@pytest.mark.parametrize("legacy", [True, False])
def test_tf_keras_optimizers_take_packed_and_keep_tensorflows_numbers(legacy):
    # tests/fixtures/tf_keras holds TensorFlow's own numbers for these; here packed must give per-leaf's.
    params = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3), "c": jnp.zeros(4)}
    grads = jax.tree.map(lambda p: jnp.cos(2.0 * p) + 0.5, params)
    for make in (kopt.tf_keras.Adam, kopt.tf_keras.RMSprop, kopt.tf_keras.Nadam):
        per_leaf = make(learning_rate=0.01, global_clipnorm=0.5, is_legacy_optimizer=legacy, packed=False)
        packed = make(learning_rate=0.01, global_clipnorm=0.5, is_legacy_optimizer=legacy, packed=True)
        assert kopt.serialize(packed)["config"]["packed"] is True
        assert kopt.serialize(per_leaf)["config"]["packed"] is False
        assert "packed" not in kopt.serialize(make(learning_rate=0.01, is_legacy_optimizer=legacy))["config"]
        s1, s2, p1, p2 = per_leaf.init(params), packed.init(params), params, params
        assert kopt.packing.holds_packed(s2) and not kopt.packing.holds_packed(s1)
        for _ in range(3):
            u1, s1 = per_leaf.update(grads, s1, p1)
            u2, s2 = packed.update(grads, s2, p2)
            p1, p2 = kopt.apply_updates(p1, u1), kopt.apply_updates(p2, u2)
        chex.assert_trees_all_close(p2, p1, rtol=1e-6, atol=1e-7)


def test_tf_keras_per_variable_clipnorm_keeps_leaves_apart():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"clipnorm=...\) clips each variable on its own norm: it cannot be packed"):
        kopt.tf_keras.Adam(clipnorm=1.0, packed=True)
    auto = kopt.tf_keras.Adam(clipnorm=1.0, packed=None)  # auto: nothing it may pack
    assert not kopt.packing.holds_packed(auto.init(params))
    updates, _ = auto.update({"a": jnp.full(3, 10.0), "b": jnp.full(2, 0.1)}, auto.init(params), params)
    assert float(updates["a"][0]) == pytest.approx(-0.001, rel=1e-3)  # Adam's first step: -lr * sign(g)
