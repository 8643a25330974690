"""Packed state: a few flat buffers instead of one array per leaf.

XLA launches at least one kernel per array it writes, so a step over a tree
of thousands of small leaves is dominated by per-kernel overhead, not by
memory traffic. :func:`packed` keeps the optimizer's slots in flat buffers
(:class:`PackedArrays`, laid out by :class:`Layout`) and runs the inner
transformation's per-array math once per buffer:

    g_b = concat(ravel(g_i) for the leaves i of buffer b)   # one kernel per buffer
    u_b, slots_b = inner.update(g_b, slots_b)                # a few kernels per buffer
    u_i = u_b[start_i : start_i + size_i]                    # fuses into params + u_i

An Adam step then writes each param once and each slot buffer once, instead
of writing three arrays per leaf. XLA compiles one kernel per distinct
computation, so the cut ``u_b[start_i : start_i + size_i]`` must not bake in a
per-leaf offset: leaves of one shape sit side by side as the rows of a group,
and the row is a scalar carried in the state as data (see :class:`Layout`).
All leaves of a shape then share one kernel, whatever the order of the tree,
and compile time follows the number of distinct shapes.

A tree is the same tree when it holds the same leaves: the params given to
``init`` may wrap their arrays in other nodes than the updates (Flax NNX
inits with ``Param`` variables and updates with plain arrays), and updates
come back in the structure they were given.

The math is the same function of the same numbers, element by element, so
every elementwise rule (all Keras optimizers, ``clipvalue``, schedules, decay,
weight decay, the wrappers) gives the per-leaf results, usually bit for bit
(XLA may compile a flat buffer's expression differently, moving the last
bit); ``clipnorm``'s global norm sums the same squares in a different order
(an ulp or two in the clip factor). Transformations whose math is per leaf (``clip_by_norm``, ``masked``,
``partition``, a masked ``add_decayed_weights``) refuse packed input with a
``ValueError``: put them outside :func:`packed`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kopt.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    accepted_extra_args,
    compiled_when_eager,
    expects,
)
from kopt.tree import TreeDef, check_params, check_updates, complex_for_real

#: Leaves of at least this many elements keep a buffer of their own: their kernels are long enough that
#: launching them costs nothing, and packing them would only copy them (XLA:CPU concatenates slowly).
ALONE = 1 << 16

#: A buffer is closed at this many elements, so offsets inside it stay int32.
BUFFER_LIMIT = 1 << 30

#: A buffer of several leaves is padded with zeros to a multiple of this many elements, so that ZeRO-1
#: (``kopt.init_shardings(..., axis=)``) can split it evenly over any power of two up to 128 devices. The
#: padding's gradient is zero, and every rule kopt has maps a zero gradient on a zero slot to a zero update.
PAD_TO = 128

#: ... or at this many leaves: XLA's compile time per leaf grows with the number of leaves cut out of one
#: buffer (and a concatenation of many operands runs slowly), so buffers of 128 leaves compiled fastest
#: on the trees of benchmarks/ (64 and 256 were slower, one buffer per dtype far slower).
LEAVES_PER_BUFFER = 128


def _split_across_devices(leaf: Any) -> bool:
    """Whether ``leaf``'s type says it is split across devices (an explicit-axes mesh): packing it would
    gather it. Only the type counts, never a concrete array's placement: a jitted ``init`` sees tracers,
    and eager and jitted ``init`` must lay out the same params the same way (under auto axes a tracer's
    type carries no split, so there a small leaf is packed wherever it lives)."""
    typed = getattr(getattr(leaf, "aval", None), "sharding", None)
    return any(axis is not None for axis in getattr(typed, "spec", ()))


def _has_metadata(node: Any) -> bool:
    return callable(getattr(node, "get_metadata", None))  # a Flax NNX Variable (Param, ...)


def _outline(tree: Any) -> Any:
    """``tree``'s structure with each variable (a node carrying metadata) as one leaf: the params given to
    ``init`` and the updates then agree whether or not they wrap their arrays in variables (a variable
    holding no array, as ``kopt.partition`` leaves one it hides, is no leaf: ``None``)."""
    tree = jax.tree.map(
        lambda node: None if _has_metadata(node) and not jax.tree.leaves(node) else node, tree, is_leaf=_has_metadata
    )
    return jax.tree.structure(tree, is_leaf=_has_metadata)


def _asks_own_sharding(node: Any) -> bool:
    """Whether ``node`` is a variable whose metadata names a sharding for it (Flax NNX's ``out_sharding``,
    Linen's ``sharding``/``sharding_names``): packing would discard it, so it keeps its own buffer."""
    metadata = node.get_metadata() if _has_metadata(node) else {}
    return any(metadata.get(key) for key in ("out_sharding", "sharding", "sharding_names"))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every leaf of a params tree sits in the flat buffers (static: part of the tree structure).

    Leaf ``k`` (in ``jax.tree.flatten`` order) is row ``rows[k]`` of its
    group in buffer ``buffers[k]``: the group of the leaves of one (dtype,
    shape) starts at ``starts[k]``, so the leaf's elements are
    ``buffer[starts[k] + rows[k] * size : ... + size]``. One buffer holds
    the small leaves of one dtype, grouped by shape in order of appearance;
    a leaf of :data:`ALONE` elements or more, one whose type splits it across
    devices (an explicit-axes mesh), or one whose variable metadata asks for a
    sharding (Flax NNX, Linen) is a buffer by itself (a free reshape).

    Why groups and rows: XLA compiles one kernel per distinct computation,
    and a slice at a baked-in offset is a distinct computation per leaf. The
    update cuts a leaf out at ``start + row * size`` with ``row`` a scalar
    carried in the state as data (:class:`PackedState` ``.rows``), so every
    leaf of one shape uses the same kernel: compile time follows the number
    of distinct shapes, not the number of leaves, whatever their order.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    buffers: tuple[str, ...]
    starts: tuple[int, ...]
    rows: tuple[int, ...]
    outline: Any = None  # the params' structure with variables (NNX ``Param``, ...) as leaves: see leaves_of
    # each param's dtype; not part of the structure, so float32 and float64 params have equal layouts
    dtypes: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.treedef, self.shapes, self.buffers, self.starts, self.rows, self.outline))

    def __hash__(self) -> int:  # jit hashes the state's structure on every call: once per layout is enough
        return self._hash

    @functools.cached_property
    def members(self) -> dict[str, tuple[int, ...]]:
        """The leaves of each buffer, in buffer order."""
        order = sorted(range(len(self.shapes)), key=lambda k: (self.buffers[k], self.starts[k], self.rows[k]))
        members: dict[str, list[int]] = {}
        for k in order:
            members.setdefault(self.buffers[k], []).append(k)
        return {buffer: tuple(leaves) for buffer, leaves in members.items()}

    @functools.cached_property
    def padding(self) -> dict[str, int]:
        """The zeros after the leaves of each buffer of several leaves (see :data:`PAD_TO`)."""
        return {
            buffer: -sum(math.prod(self.shapes[k]) for k in leaves) % PAD_TO
            for buffer, leaves in self.members.items()
            if len(leaves) > 1
        }

    @functools.cached_property
    def row_count(self) -> int:
        """How many row scalars the state carries: the size of the largest group of leaves sharing a shape."""
        return max(self.rows, default=-1) + 1 if any(self.rows) else 0

    @classmethod
    def of(cls, params: Params) -> Layout:
        """The layout of ``params`` (real floating-point leaves, ``None`` allowed)."""
        dtypes = check_params(params)
        leaves, treedef = jax.tree.flatten(params)
        shapes = tuple(tuple(jnp.shape(leaf)) for leaf in leaves)
        own = [
            _asks_own_sharding(node)
            for node in jax.tree.leaves(params, is_leaf=_has_metadata)
            for _ in jax.tree.leaves(node)
        ]
        groups: dict[tuple, list[int]] = {}
        alone: dict[int, str] = {}
        for k, (leaf, dtype, shape) in enumerate(zip(leaves, dtypes, shapes, strict=True)):
            name = jnp.dtype(dtype).name
            if math.prod(shape) >= ALONE or _split_across_devices(leaf) or own[k]:
                alone[k] = f"leaf{k}"
            else:
                groups.setdefault((name, shape), []).append(k)
        buffers, starts, rows = [""] * len(leaves), [0] * len(leaves), [0] * len(leaves)
        for k, buffer in alone.items():
            buffers[k] = buffer
        filled: collections.Counter = collections.Counter()  # elements per buffer
        held: collections.Counter = collections.Counter()  # leaves per buffer
        opened: collections.Counter = collections.Counter()  # buffers per dtype, less one
        # Named by the dtype's order of appearance, not the dtype: the same params in float64 have the same
        # structure of state, so shardings computed for one dtype fit the other.
        kinds = {name: f"buffer{index}" for index, name in enumerate(dict.fromkeys(name for name, _ in groups))}
        for (name, shape), members in groups.items():
            size = math.prod(shape)

            def full(buffer: str, size: int = size) -> bool:
                return held[buffer] >= LEAVES_PER_BUFFER or filled[buffer] + size > BUFFER_LIMIT

            buffer, start, row = "", 0, 0
            for k in members:
                if not buffer or full(buffer):  # the group starts, or goes on in the next buffer from row 0
                    buffer = f"{kinds[name]}_{opened[name]}"
                    while full(buffer):
                        opened[name] += 1
                        buffer = f"{kinds[name]}_{opened[name]}"
                    start, row = filled[buffer], 0
                buffers[k], starts[k], rows[k] = buffer, start, row
                filled[buffer] += size
                held[buffer] += 1
                row += 1
        names = tuple(jnp.dtype(dtype).name for dtype in dtypes)
        return cls(treedef, shapes, tuple(buffers), tuple(starts), tuple(rows), _outline(params), names)

    def leaves_of(self, tree: Any, what: str) -> list:
        """The leaves of ``tree``, checked against the params' shapes; the tree may wrap them in other
        nodes (Flax NNX's ``Param``, say) than the params given to ``init`` did."""
        if self.outline is not None and _outline(tree) != self.outline:  # same leaves under other keys, say
            raise ValueError(
                f"{what} has structure {jax.tree.structure(tree)}, but the optimizer state was built for "
                f"{self.treedef}; pass {what} with the structure of the params given to init"
            )
        leaves = jax.tree.leaves(tree)
        if len(leaves) != len(self.shapes):
            raise ValueError(
                f"{what} has {len(leaves)} array leaves, but the optimizer state was built for params with "
                f"{len(self.shapes)} ({self.treedef}); pass a tree holding the leaves of the params given to init"
            )
        for index, (leaf, shape) in enumerate(zip(leaves, self.shapes, strict=True)):
            if jnp.shape(leaf) != shape:
                path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(tree)[0][index][0])
                raise ValueError(f"{what}{path} has shape {jnp.shape(leaf)}, but its param has shape {shape}")
        return leaves

    def pack(self, tree: Any, what: str = "updates", rows: tuple | None = None) -> PackedArrays:
        """``tree`` (holding the params' leaves) as flat buffers; a buffer whose leaves differ in dtype
        (integer gradients, say) is formed in their common dtype.

        ``rows`` are :class:`PackedState` ``.rows``: given (inside an update), a buffer of 16-bit floats is
        written leaf by leaf at data-dependent offsets, see :func:`_written_in_place`.
        """
        (check_updates if what == "updates" else check_params)(tree)
        leaves = self.leaves_of(tree, what)
        for index, leaf in enumerate(leaves):  # a buffer of real params would drop the imaginary part
            if jnp.iscomplexobj(leaf) and not self.dtypes[index].startswith("complex"):
                path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(tree)[0][index][0])
                raise complex_for_real(f"{what}{path}")
        return PackedArrays(
            {  # a leaf alone stays as it is: no copy, and it keeps its sharding
                buffer: jnp.asarray(leaves[members[0]]) if len(members) == 1 else self._joined(leaves, buffer, rows)
                for buffer, members in self.members.items()
            },
            self,
        )

    def _joined(self, leaves: list, buffer: str, rows: tuple | None) -> jax.Array:
        members = self.members[buffer]
        parts = [leaves[k] for k in members]
        dtype = jnp.result_type(*parts)
        if rows is not None and dtype in _HALF_BITS and jax.default_backend() == "cpu":
            offsets = [
                self.starts[k] + (rows[self.rows[k]] * math.prod(self.shapes[k]) if self.row_count else 0)
                for k in members
            ]
            return _written_in_place(parts, offsets, self.padding[buffer], dtype)
        return _concatenated(parts, self.padding[buffer])

    def unpack(self, packed: PackedArrays, rows: tuple | None = None, treedef: Any = None) -> Any:
        """The params-shaped tree of ``packed`` (in ``treedef``, by default the params' own).

        ``rows`` are :class:`PackedState` ``.rows``: given (inside an update), a leaf is cut out at a
        data-dependent offset, so leaves of one shape share one kernel; without them, at a static one.
        """
        leaves = []
        whole = {name: _whole(flat) for name, flat in packed.buffers.items() if len(self.members[name]) > 1}
        for shape, buffer, start, row in zip(self.shapes, self.buffers, self.starts, self.rows, strict=True):
            size, flat = math.prod(shape), whole.get(buffer, packed.buffers[buffer])
            if len(self.members[buffer]) == 1 or isinstance(flat, jax.sharding.Sharding):
                leaf = flat  # a leaf alone is its buffer, as it is; a leaf of a tree of shardings is its buffer's
            elif rows and self.row_count:
                leaf = jax.lax.dynamic_slice(flat, (start + rows[row] * size,), (size,)).reshape(shape)
            else:
                leaf = jax.lax.slice(flat, (start + row * size,), (start + (row + 1) * size,)).reshape(shape)
            leaves.append(leaf)
        return (treedef or self.treedef).unflatten(leaves)


def _whole(flat: Any) -> Any:
    """``flat`` gathered onto every device when its type splits it (ZeRO-1 under an explicit-axes mesh):
    JAX does not cut leaves out of a split dimension, and the params the leaves update are whole anyway."""
    if isinstance(flat, jax.sharding.Sharding) or not _split_across_devices(flat):
        return flat
    mesh = jax.typeof(flat).sharding.mesh
    return jax.sharding.reshard(flat, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None)))


def _concatenated(leaves: list, padding: int) -> jax.Array:
    parts = [jnp.ravel(leaf) for leaf in leaves]
    dtype = jnp.result_type(*parts)
    if dtype in _HALF_BITS:
        # XLA:CPU concatenates 16-bit floats in float32 (its float normalization): a buffer twice their size.
        # Their bit patterns, joined as integers, make the same buffer at their own size, on every backend.
        bits = [jax.lax.bitcast_convert_type(part.astype(dtype), _HALF_BITS[dtype]) for part in parts]
        return jax.lax.bitcast_convert_type(_concatenated(bits, padding), dtype)
    return jnp.concatenate([*parts, jnp.zeros(padding, dtype)] if padding else parts)


def _written_in_place(parts: list, offsets: list, padding: int, dtype: Any) -> jax.Array:
    """The buffer of 16-bit float ``parts``, each written into it in place at its (traced) offset.

    On CPU only. A concatenation holds every part as an operand at once, and XLA:CPU converts each 16-bit
    part to its integer bits in a buffer of its own first: one more copy of those gradients (the default
    held 1.33 gradient-sized buffers more than per leaf on bf16 + f32 leaves, 1.01 written in place).
    Written one at a time, a part's conversion fuses into its write; at data-dependent offsets
    (``start + row * size``, see :class:`PackedState`) the writes of one shape's leaves are one kernel, as
    ``unpack``'s slices are. GPUs concatenate 16-bit floats at their size in one kernel, where a write a
    leaf would be a launch a leaf.
    """
    bits = _HALF_BITS[dtype]
    buffer = jnp.zeros(sum(part.size for part in parts) + padding, bits)
    for part, offset in zip(parts, offsets, strict=True):
        part_bits = jax.lax.bitcast_convert_type(jnp.ravel(part).astype(dtype), bits)
        buffer = jax.lax.dynamic_update_slice(buffer, part_bits, (offset,))
    return jax.lax.bitcast_convert_type(buffer, dtype)


_HALF_BITS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


@jax.tree_util.register_pytree_with_keys_class
class PackedArrays:
    """A params-shaped pytree stored as flat buffers (``buffers``, by name; see :class:`Layout`).

    Its leaves are the buffers, so ``jax.tree.map`` and kopt's per-array math
    treat each buffer as one array; the :class:`Layout` is static structure.
    ``unpack()`` gives the per-leaf tree (what :func:`kopt.get_slot` returns).
    """

    def __init__(self, buffers: dict[str, Any], layout: Layout):
        self.buffers = buffers
        self.layout = layout

    def unpack(self) -> Any:
        return self.layout.unpack(self)

    def tree_flatten_with_keys(self):
        keys = tuple(sorted(self.buffers))
        return [(jax.tree_util.DictKey(k), self.buffers[k]) for k in keys], (keys, self.layout)

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: Any) -> PackedArrays:
        keys, layout = aux
        return cls(dict(zip(keys, children, strict=True)), layout)

    def __repr__(self) -> str:
        return f"PackedArrays({self.buffers!r}, {len(self.layout.shapes)} leaves)"


# The layout travels in the state as structure only (no leaves): jit, checkpoints and shardings ignore it.
jax.tree_util.register_pytree_node(Layout, lambda layout: ((), layout), lambda layout, _: layout)


class PackedState(NamedTuple):
    """State of :func:`packed`: the params' :class:`Layout` (no arrays), the inner state, whose
    slots are :class:`PackedArrays`, and ``rows``: the int32 scalars ``0, 1, ...`` as data, one per
    row of the largest group of same-shaped leaves (see :class:`Layout`; not a slot)."""

    layout: Layout
    inner_state: OptState
    rows: tuple[jax.Array, ...] = ()


def _rows(layout: Layout) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(row, jnp.int32) for row in range(layout.row_count))


def _is_packed_state(node: Any) -> bool:
    return isinstance(node, PackedState)


def holds_packed(state: Any) -> bool:
    """Whether ``state`` holds a :class:`PackedState` anywhere."""
    return any(map(_is_packed_state, jax.tree.leaves(state, is_leaf=_is_packed_state)))


def leaf_by_leaf(state: OptState) -> OptState:
    """``state`` as the same optimizer without :func:`packed` holds it: each :class:`PackedState`
    becomes its inner state with every :class:`PackedArrays` cut back into the params' leaves.

    Checkpoints are written this way, so their leaf paths do not depend on packing (see
    :func:`kopt.save_state`); :func:`packed_like` is the way back.
    """

    def per_leaf(node: Any) -> Any:
        if not _is_packed_state(node):
            return node
        return jax.tree.map(lambda x: x.unpack() if is_packed(x) else x, node.inner_state, is_leaf=is_packed)

    return jax.tree.map(per_leaf, state, is_leaf=_is_packed_state)


def packed_like(like: OptState, per_leaf: OptState) -> OptState:
    """``per_leaf`` (structured as ``leaf_by_leaf(like)``) packed as ``like`` is: its layouts and rows."""
    outer_treedef: TreeDef
    outer, outer_treedef = jax.tree.flatten(like, is_leaf=_is_packed_state)
    parts = outer_treedef.flatten_up_to(per_leaf)

    def pack(node: Any, part: Any) -> Any:
        if not _is_packed_state(node):
            return part
        inner_treedef: TreeDef
        inner, inner_treedef = jax.tree.flatten(node.inner_state, is_leaf=is_packed)
        slots = inner_treedef.flatten_up_to(part)
        packed_slots = [
            x.layout.pack(slot, "params") if is_packed(x) else slot for x, slot in zip(inner, slots, strict=True)
        ]
        return PackedState(node.layout, inner_treedef.unflatten(packed_slots), _rows(node.layout))

    return outer_treedef.unflatten([pack(node, part) for node, part in zip(outer, parts, strict=True)])


def is_packed(tree: Any) -> bool:
    """Whether ``tree`` (updates or params) is a :class:`PackedArrays`."""
    return isinstance(tree, PackedArrays)


def refuse_packed(transform: str, tree: Any) -> None:
    """A ``ValueError`` for a transformation whose math is per leaf, given packed leaves."""
    if is_packed(tree):
        raise ValueError(
            f"{transform} works leaf by leaf, but inside kopt.packed the leaves are packed into flat buffers "
            f"(one per block of leaves); put {transform} outside kopt.packed(...), or do not pack"
        )


def packed(inner: GradientTransformation, *, auto: bool = False) -> GradientTransformation:
    """Runs ``inner`` on flat buffers of the leaves and keeps its state packed between steps.

    Same numbers as ``inner`` (to the last bit or two, see the module
    docstring), far fewer kernels on trees of many small leaves: on 2000
    leaves an Adam step launches ~2200 kernels instead of ~6000. Updates
    come back leaf by leaf, so ``apply_updates``, optax and training loops are
    unchanged; :func:`kopt.get_slot` / :func:`kopt.set_slot` read and write
    slots leaf by leaf. Every alias takes ``packed=True`` for this. Use it for
    trees of many small leaves; for a few big ones packing only adds a copy.

    With ``auto=True`` (the aliases' ``packed=None``) ``init`` decides from the
    params: when no two leaves would share a buffer (every leaf big, split
    across devices by its type or asking for its own sharding), it keeps ``inner``'s own
    per-leaf state, with the per-leaf path's exact numbers; otherwise it packs.

    Example:
        >>> import jax.numpy as jnp, kopt
        >>> opt = kopt.packed(kopt.chain(kopt.scale_by_adam(), kopt.scale_by_learning_rate(1e-3)))
        >>> params = {"a": jnp.ones(2), "b": jnp.ones((2, 2))}
        >>> state = opt.init(params)
        >>> updates, state = opt.update(params, state)
        >>> kopt.get_slot(state, "m")["b"].shape
        (2, 2)
    """
    keep = accepted_extra_args(inner.update)

    def init(params: Params) -> PackedState | OptState:
        layout = Layout.of(params)
        if auto and all(len(members) == 1 for members in layout.members.values()):
            return inner.init(params)  # nothing to pack: the per-leaf state, as without packing
        return PackedState(layout, inner.init(layout.pack(params, "params")), _rows(layout))

    @compiled_when_eager
    def update(
        updates: Updates, state: PackedState | OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]:
        if auto and not isinstance(state, PackedState):
            return inner.update(updates, state, params, **extra_args)
        return packed_update(updates, state, params, **extra_args)

    @expects(PackedState)
    def packed_update(
        updates: Updates, state: PackedState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, PackedState]:
        layout = state.layout
        flat_params = None if params is None else layout.pack(params, "params", state.rows)
        new, inner_state = inner.update(
            layout.pack(updates, rows=state.rows), state.inner_state, flat_params, **keep(extra_args)
        )
        # Updates come back in the caller's tree: NNX, say, inits with Param-wrapped leaves, updates with arrays.
        return layout.unpack(new, state.rows, jax.tree.structure(updates)), PackedState(layout, inner_state, state.rows)

    return GradientTransformation(init, update)


def as_asked(transform: GradientTransformation, option: bool | None) -> GradientTransformation:
    """``transform`` laid out as the aliases' ``packed=option`` asks: ``None`` (the default) packs where
    ``init`` finds leaves to pack (:func:`packed` with ``auto=True``), ``True`` always packs, ``False`` keeps
    the per-leaf state."""
    if option is not None and not isinstance(option, bool):
        raise ValueError(f"packed must be True, False or None, got {option!r}")
    return transform if option is False else packed(transform, auto=option is None)
