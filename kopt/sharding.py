"""Where optimizer state lives on a device mesh.

Two helpers return a pytree of shardings with the structure of an optimizer
state, ready for ``jax.jit(..., out_shardings=...)`` or ``jax.device_put``:

- :func:`init_shardings` puts every per-parameter slot where its parameter is
  and replicates the rest (counts, hyperparameters). Under an explicit-axes
  mesh (``jax.make_mesh`` + ``jax.set_mesh``) a plain ``jax.jit(opt.init)``
  already does this; under an auto-axes ``jax.sharding.Mesh`` it does not
  (slots are made from zeros, which depend on no input, so XLA puts them on
  one device) and the jitted init needs these ``out_shardings``. With
  ``axis=`` it also splits the slots over that mesh axis (ZeRO-1).
- :func:`state_shardings` splits every slot of an existing state (or of its
  ``jax.eval_shape``) along its first dimension divisible by the size of a
  mesh axis, so each device of a data-parallel step holds 1/N of the state.

Example (8 devices, params replicated, state split 8 ways)::

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    shardings = kopt.init_shardings(opt, params, axis="data")
    state = jax.jit(opt.init, out_shardings=shardings)(params)
    step = jax.jit(train_step, out_shardings=(params_shardings, shardings))
"""

from __future__ import annotations

from typing import Any, cast

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from kopt.base import GradientTransformation, OptState, Params
from kopt.packing import PackedArrays, PackedState, is_packed

MeshAxes = str | tuple[str, ...]

__all__ = ["init_shardings", "state_shardings"]


def _axis_size(mesh: Mesh, axis: MeshAxes) -> int:
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    unknown = [name for name in names if name not in mesh.shape]
    if unknown:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {unknown}")
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def _spec_on(leaf: Any, mesh: Mesh) -> list:
    """The leaf's partition spec on ``mesh`` as a list of ``ndim`` entries (all ``None`` if it has none there)."""
    sharding = getattr(leaf, "sharding", None)
    spec: list = [None] * len(leaf.shape)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        spec[: len(sharding.spec)] = list(sharding.spec)
    return spec


def _mesh_names(spec: list) -> set[str]:
    names: set[str] = set()
    for entry in spec:
        if entry is not None:
            names.update((entry,) if isinstance(entry, str) else entry)
    return names


def state_shardings(state: OptState, mesh: Mesh, axis: MeshAxes) -> OptState:
    """A ``NamedSharding`` for every leaf of ``state`` that splits it over the mesh ``axis``.

    Each array is split along its first dimension that is divisible by the
    size of ``axis`` (a mesh axis name or a tuple of names) and not already
    split; an array with no such dimension, and every scalar (counts,
    hyperparameters), is replicated over ``axis``. A leaf that already has a
    ``NamedSharding`` on ``mesh`` keeps its split over the other axes, so this
    composes with tensor parallelism; one already split over ``axis`` (or over
    any of its names) is kept as it is. ``state`` may be the state itself or ``jax.eval_shape`` of it.

    Used as the state's ``out_shardings`` of a jitted data-parallel step, this
    is ZeRO-1: XLA computes each slot's shard on its own device and gathers
    the updated (replicated) parameters, so per-device state memory drops by
    about the axis size.

    Example:
        >>> import jax, jax.numpy as jnp, kopt
        >>> from kopt.sharding import state_shardings
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> state = kopt.Adam().init({"w": jnp.zeros((4, 3))})
        >>> state_shardings(state, mesh, "data")[0].m["w"].spec
        P('data', None)
    """
    size = _axis_size(mesh, axis)
    names = {axis} if isinstance(axis, str) else set(axis)

    def shard(leaf: Any) -> NamedSharding:
        spec = _spec_on(leaf, mesh)
        if not names & _mesh_names(spec):
            for dim, length in enumerate(leaf.shape):
                if spec[dim] is None and length >= size and length % size == 0:
                    spec[dim] = axis
                    break
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(shard, state)


def _find_mesh(params: Params) -> Mesh:
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return cast(Mesh, sharding.mesh)  # a placed array's (the stubs also allow an AbstractMesh)
    raise ValueError("init_shardings: no param has a NamedSharding; pass mesh=")


def init_shardings(
    opt: GradientTransformation, params: Params, mesh: Mesh | None = None, axis: MeshAxes | None = None
) -> OptState:
    """The shardings of ``opt.init(params)``: each slot where its param is, all else replicated.

    A state leaf is a slot of a param when its path in the state ends with the
    param's path in ``params`` and it has the param's shape (this holds for
    kopt's and optax's states alike: ``state[0].m['w']`` is the slot of
    ``params['w']``; in kopt's default packed layout, a leaf alone in its
    buffer is its param's slot and a buffer of several leaves is no one's).
    It gets that param's ``NamedSharding``; every other leaf
    (counts, hyperparameters), and the slot of a param without a
    ``NamedSharding``, is replicated on ``mesh`` (default: the mesh of the
    params' shardings). With ``axis``, the result is further split by
    :func:`state_shardings` (ZeRO-1). Nothing is computed: the state's shapes
    come from ``jax.eval_shape``.

    Example:
        >>> import jax, jax.numpy as jnp, kopt
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from kopt.sharding import init_shardings
        >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("model",))
        >>> params = {"w": jax.device_put(jnp.zeros((4, 2)), NamedSharding(mesh, P(None, "model")))}
        >>> opt = kopt.Adam()
        >>> state = jax.jit(opt.init, out_shardings=init_shardings(opt, params))(params)
        >>> state[0].m["w"].sharding.spec
        P(None, 'model')
    """
    mesh = _find_mesh(params) if mesh is None else mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def own(leaf: Any) -> Sharding:
        sharding = getattr(leaf, "sharding", None)
        return sharding if isinstance(sharding, NamedSharding) else replicated

    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    by_path = {tuple(path): (tuple(leaf.shape), own(leaf)) for path, leaf in flat_params}

    def slot_sharding(path: tuple, shape: tuple[int, ...]) -> Sharding:
        for start in range(len(path) + 1):  # the longest matching suffix wins
            found = by_path.get(tuple(path[start:]))
            if found is not None and found[0] == shape:
                return found[1]
        return replicated

    def packed_sharding(state: PackedState) -> PackedState:
        # A leaf alone is its param's array: it goes where its param is. A buffer of several leaves has no
        # one param's sharding to follow: replicated (split by ``axis`` below).
        layout = state.layout
        mine = layout.shapes == tuple(tuple(leaf.shape) for _, leaf in flat_params)
        per_leaf = [own(leaf) for _, leaf in flat_params] if mine else [replicated] * len(layout.shapes)
        buffers = {b: per_leaf[k[0]] if len(k) == 1 else replicated for b, k in layout.members.items()}
        return jax.tree.map(
            lambda x: PackedArrays(buffers, layout) if is_packed(x) else replicated, state, is_leaf=is_packed
        )

    def sharding_of(path: tuple, node: Any) -> Any:
        return packed_sharding(node) if isinstance(node, PackedState) else slot_sharding(path, tuple(node.shape))

    shapes = jax.eval_shape(opt.init, params)
    shardings = jax.tree_util.tree_map_with_path(
        sharding_of, shapes, is_leaf=lambda node: isinstance(node, PackedState)
    )
    if axis is None:
        return shardings
    placed = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), shapes, shardings)
    return state_shardings(placed, mesh, axis)
