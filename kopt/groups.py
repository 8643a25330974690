"""Per-parameter groups: apply a transformation to some leaves only, or different ones to different leaves.

A group is chosen by a pytree of labels (bools for :func:`masked`, any
hashable labels for :func:`partition`) with the structure of the params, or
a prefix of it (a label then covers a whole subtree), or by a function of the
params returning such a tree. Leaves outside a group reach its
transformation as ``None``, so they hold no state there and are never
touched: kopt transformations carry ``None`` leaves through unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import jax

from kopt.base import GradientTransformation, OptState, Params, Updates, accepted_extra_args, expects
from kopt.packing import refuse_packed
from kopt.tree import TreeDef

Labels = Any  # a pytree (or prefix) of labels, or a function params -> such a pytree


def _resolve(labels: Labels, params: Params | None, who: str) -> Any:
    if callable(labels):
        if params is None:
            raise ValueError(f"{who}: the labels are a function of params, so update needs params")
        return labels(params)
    return labels


def _groups(tree: Any, labels: Any) -> tuple[list[Any], list[Hashable], Any]:
    """``tree`` cut at the structure of ``labels``: (subtrees, their labels, the labels' treedef)."""
    treedef: TreeDef
    flat_labels, treedef = jax.tree.flatten(labels)
    try:
        subtrees = treedef.flatten_up_to(tree)
    except ValueError as error:
        raise ValueError(f"labels {treedef} do not match the tree {jax.tree.structure(tree)}: {error}") from None
    return subtrees, flat_labels, treedef


def _only(tree: Any, labels: Any, label: Hashable) -> Any:
    """``tree`` with every subtree whose label is not ``label`` replaced by ``None`` leaves."""
    if tree is None:
        return None
    subtrees, flat_labels, treedef = _groups(tree, labels)
    hidden = [
        sub if lab == label else jax.tree.map(lambda _: None, sub)
        for sub, lab in zip(subtrees, flat_labels, strict=True)
    ]
    return treedef.unflatten(hidden)


def _merge(labels: Any, parts: Mapping[Hashable, Any], default: Any) -> Any:
    """Each subtree from ``parts[its label]``, or from ``default`` where no part has that label."""
    default_subtrees, flat_labels, treedef = _groups(default, labels)
    cut = {label: treedef.flatten_up_to(part) for label, part in parts.items()}
    chosen = [cut[lab][index] if lab in cut else default_subtrees[index] for index, lab in enumerate(flat_labels)]
    return treedef.unflatten(chosen)


class MaskedState(NamedTuple):
    inner_state: OptState


def masked(inner: GradientTransformation, mask: Labels) -> GradientTransformation:
    """Applies ``inner`` to the leaves where ``mask`` is True; the others pass through unchanged.

    ``mask`` is a pytree of Python bools (or a prefix of the params' structure)
    or a function ``params -> mask``. Masked-out leaves hold no state.

    Example:
        >>> import kopt
        >>> no_bias_decay = kopt.masked(kopt.add_decayed_weights(1e-4), lambda p: {k: k != "b" for k in p})
    """
    keep = accepted_extra_args(inner.update)

    def init(params: Params) -> MaskedState:
        refuse_packed("masked", params)
        labels = _resolve(mask, params, "masked")
        return MaskedState(inner.init(_only(params, labels, True)))

    @expects(MaskedState)
    def update(
        updates: Updates, state: MaskedState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, MaskedState]:
        refuse_packed("masked", updates)
        labels = _resolve(mask, params, "masked")
        inner_updates, inner_state = inner.update(
            _only(updates, labels, True), state.inner_state, _only(params, labels, True), **keep(extra_args)
        )
        return _merge(labels, {True: inner_updates}, updates), MaskedState(inner_state)

    return GradientTransformation(init, update)


class PartitionState(NamedTuple):
    inner_states: dict[Hashable, OptState]


def partition(transforms: Mapping[Hashable, GradientTransformation], labels: Labels) -> GradientTransformation:
    """Applies ``transforms[label]`` to the leaves labelled ``label``.

    ``labels`` is a pytree of labels (or a prefix of the params' structure) or
    a function ``params -> labels``; every label used must have a transform.
    Each inner state sees only its own leaves (the others are ``None``), and
    is reachable as ``state.inner_states[label]``.

    Example:
        >>> import kopt
        >>> opt = kopt.partition(
        ...     {"body": kopt.Adam(lr=1e-3), "embedding": kopt.Adam(lr=1e-2)},
        ...     lambda params: {k: "embedding" if k == "embed" else "body" for k in params})
    """
    transforms = dict(transforms)
    filters = {label: accepted_extra_args(t.update) for label, t in transforms.items()}

    def checked_labels(params: Params | None) -> Any:
        refuse_packed("partition", params)
        resolved = _resolve(labels, params, "partition")
        unknown = {lab for lab in jax.tree.leaves(resolved)} - transforms.keys()
        if unknown:
            raise ValueError(
                f"partition: labels [{', '.join(sorted(map(repr, unknown)))}] have no transform; "
                f"known: [{', '.join(sorted(map(repr, transforms)))}]"
            )
        return resolved

    def init(params: Params) -> PartitionState:
        resolved = checked_labels(params)
        return PartitionState({label: t.init(_only(params, resolved, label)) for label, t in transforms.items()})

    @expects(PartitionState)
    def update(
        updates: Updates, state: PartitionState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, PartitionState]:
        refuse_packed("partition", updates)
        resolved = checked_labels(params)
        new_updates, new_states = {}, {}
        for label, transform in transforms.items():
            new_updates[label], new_states[label] = transform.update(
                _only(updates, resolved, label),
                state.inner_states[label],
                _only(params, resolved, label),
                **filters[label](extra_args),
            )
        return _merge(resolved, new_updates, updates), PartitionState(new_states)

    return GradientTransformation(init, update)
