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
of writing three arrays per leaf. The ``j``-th leaf of each shape goes to the
``j``-th buffer, so a model of repeated blocks gets one buffer per block, laid
out alike: the slicing kernels of every block are identical and XLA compiles
each distinct kernel once (offsets baked in per leaf would make every kernel
distinct and compilation slow).

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
from kopt.tree import check_params, check_updates

#: Leaves of at least this many elements keep a buffer of their own: their kernels are long enough that
#: launching them costs nothing, and packing them would only copy them (XLA:CPU concatenates slowly).
ALONE = 1 << 16


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every leaf of a params tree sits in the flat buffers (static: part of the tree structure).

    Leaf ``k`` (in ``jax.tree.flatten`` order) lives in buffer ``buffers[k]``
    from ``starts[k]``. A buffer holds leaves of one dtype. The tree is taken
    to repeat a block ``B`` times, ``B`` the most common number of leaves of
    one (dtype, shape); a shape held ``n`` times has ``r = n // B`` leaves
    per block, and its ``j``-th leaf goes to buffer ``j // r`` (leftovers to
    the last). A model of repeated blocks thus gets one buffer per block,
    laid out alike, so the kernels that cut the updates back into leaves are
    the same few kernels for every block and XLA compiles each once. A leaf
    of :data:`ALONE` elements or more is a buffer by itself (a free reshape).
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    buffers: tuple[str, ...]
    starts: tuple[int, ...]

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.treedef, self.shapes, self.buffers, self.starts))

    def __hash__(self) -> int:  # jit hashes the state's structure on every call: once per layout is enough
        return self._hash

    @classmethod
    def of(cls, params: Params) -> Layout:
        """The layout of ``params`` (real floating-point leaves, ``None`` allowed)."""
        dtypes = check_params(params)
        leaves, treedef = jax.tree.flatten(params)
        shapes = tuple(tuple(jnp.shape(leaf)) for leaf in leaves)
        kinds = [(jnp.dtype(dtype).name, shape) for dtype, shape in zip(dtypes, shapes, strict=True)]
        small = collections.Counter(kind for kind in kinds if math.prod(kind[1]) < ALONE)
        # The number of blocks: the most common count of a small (dtype, shape), the smallest on a tie.
        counts = collections.Counter(small.values())
        blocks = max(counts, key=lambda n: (counts[n], -n), default=1)
        seen: collections.Counter = collections.Counter()
        filled: dict[str, int] = {}
        buffers, starts = [], []
        for index, kind in enumerate(kinds):
            if kind in small:  # a kind held r times per block: its j-th leaf is in block j // r
                per_block = max(1, small[kind] // blocks)
                buffer = f"{kind[0]}_{min(seen[kind] // per_block, blocks - 1)}"
                seen[kind] += 1
            else:
                buffer = f"{kind[0]}_leaf{index}"
            buffers.append(buffer)
            starts.append(filled.get(buffer, 0))
            filled[buffer] = starts[-1] + math.prod(kind[1])
        return cls(treedef, shapes, tuple(buffers), tuple(starts))

    def pack(self, tree: Any, what: str = "updates") -> PackedArrays:
        """``tree`` (structured like the params) as flat buffers; a buffer whose leaves differ in dtype
        (integer gradients, say) is formed in their common dtype."""
        (check_updates if what == "updates" else check_params)(tree)
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise ValueError(
                f"{what} has structure {treedef}, but the optimizer state was built for {self.treedef}; "
                "pass a tree with the structure of the params given to init"
            )
        members: dict[str, list[jax.Array]] = {}
        for index, (leaf, shape, buffer) in enumerate(zip(leaves, self.shapes, self.buffers, strict=True)):
            if jnp.shape(leaf) != shape:
                path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(tree)[0][index][0])
                raise ValueError(f"{what}{path} has shape {jnp.shape(leaf)}, but its param has shape {shape}")
            members.setdefault(buffer, []).append(jnp.ravel(leaf))
        return PackedArrays({buffer: jnp.concatenate(arrays) for buffer, arrays in members.items()}, self)

    def unpack(self, packed: PackedArrays) -> Any:
        """The params-shaped tree of ``packed``."""
        leaves = [
            jax.lax.slice(packed.buffers[buffer], (start,), (start + math.prod(shape),)).reshape(shape)
            for shape, buffer, start in zip(self.shapes, self.buffers, self.starts, strict=True)
        ]
        return self.treedef.unflatten(leaves)


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
    """State of :func:`packed`: the params' :class:`Layout` (no arrays) and the inner state, whose
    slots are :class:`PackedArrays`."""

    layout: Layout
    inner_state: OptState


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


def packed(inner: GradientTransformation) -> GradientTransformation:
    """Runs ``inner`` on flat buffers of the leaves and keeps its state packed between steps.

    Same numbers as ``inner`` (to the last bit or two, see the module
    docstring), far fewer kernels on trees of many small leaves: on 2000
    leaves an Adam step launches ~2200 kernels instead of ~6000. Updates
    come back leaf by leaf, so ``apply_updates``, optax and training loops are
    unchanged; :func:`kopt.get_slot` / :func:`kopt.set_slot` read and write
    slots leaf by leaf. Every alias takes ``packed=True`` for this. Use it for
    trees of many small leaves; for a few big ones packing only adds a copy.

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

    def init(params: Params) -> PackedState:
        layout = Layout.of(params)
        return PackedState(layout, inner.init(layout.pack(params, "params")))

    @compiled_when_eager
    @expects(PackedState)
    def update(updates: Updates, state: PackedState, params: Params | None = None, **extra_args):
        layout = state.layout
        flat_params = None if params is None else layout.pack(params, "params")
        new, inner_state = inner.update(layout.pack(updates), state.inner_state, flat_params, **keep(extra_args))
        return layout.unpack(new), PackedState(layout, inner_state)

    return GradientTransformation(init, update)
