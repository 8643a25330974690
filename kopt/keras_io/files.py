"""The optimizer of a saved tf.keras model: config and state from ``.h5`` and ``.keras`` files.

``model.save("m.h5")`` (HDF5) keeps the optimizer config in the root attribute
``training_config`` and its weights in the group ``optimizer_weights`` (in the
order of its ``weight_names``). ``model.save("m.keras")`` (a zip) keeps it in
``config.json`` (``compile_config.optimizer``) and ``model.weights.h5``
(``optimizer/vars/0..``). Both are read with ``json`` and ``h5py`` only: no
code from the file runs (a custom optimizer or schedule class is an error, not
an import), and no array can be an object.

Files may come from strangers, so everything is checked before it is read
(``docs/threat_model.md``): the optimizer config is read first, and with it
and ``params`` every weight's shape and dtype kind is known; each dataset's
metadata is compared with that before its data is read. No HDF5 soft or
external link, external-storage, virtual or chunked dataset is read; JSON
is bounded in size (:func:`kopt.file_safety.json_limit`) and depth (64); the
``model.weights.h5`` member of a ``.keras`` zip may declare at most
:func:`weights_member_limit` bytes. Every refusal is a
:class:`KerasFileError` (a ``ValueError``) naming the file, the member or
dataset, and what differs.

What TensorFlow 2.21 leaves out, and what kopt does (the same as
``tf_keras.models.load_model`` unless said otherwise):

* A legacy optimizer (``tf.keras.optimizers.legacy.X``) in a ``.keras`` file has
  no saved state: TensorFlow restarts it at step 0, and so does kopt, with a
  ``UserWarning``.
* TF >= 2.11's Nadam does not save its momentum product; TensorFlow's reload
  then multiplies a restarted product once per variable (its continuation
  depends on the number of variables). kopt replays the product from the step
  count instead, which continues the uninterrupted run (``m_schedule=`` as in
  :func:`kopt.from_keras_weights`).
* A loss-scale optimizer (``LossScaleOptimizer``, ``LossScaleOptimizerV3``: what a
  ``mixed_float16`` model compiled with a name such as ``"adam"`` gets) saves its inner
  optimizer's weights only: the loss scale restarts at ``initial_scale`` and its counter at 0.

``h5py`` is needed (``pip install kopt[keras]`` or ``pip install h5py``); kopt
does not depend on it otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from kopt import file_safety
from kopt.base import OptState, Params
from kopt.keras_io.configs import optimizer_from_config
from kopt.keras_io.weights import WeightSpec, from_keras_weights, max_weights_per_leaf, weight_specs
from kopt.optimizers import Optimizer

__all__ = ["KerasFileError", "load_keras_optimizer"]

#: A compressed ``model.weights.h5`` (Keras stores it uncompressed, and it is then read in place, unbounded:
#: nothing is loaded but what HDF5 reads) is inflated into memory, so it may declare at most
#: ``WEIGHTS_FACTOR`` times the bytes its weights need at 8 bytes (float64) an element (the params and up to
#: ``max_weights_per_leaf(opt)`` optimizer weights per param, e.g. 3 for Adam), plus ``DATASET_ALLOWANCE``
#: of HDF5 metadata per such weight and ``WEIGHTS_BASE``. The factor leaves room for non-trainable weights
#: (batch-norm statistics) and metrics.
WEIGHTS_FACTOR = 4
DATASET_ALLOWANCE = 4 << 10
WEIGHTS_BASE = 256 << 10

#: A ``.keras`` zip holds ``metadata.json``, ``config.json``, ``model.weights.h5`` and an ``assets/`` folder
#: (files of preprocessing layers): at most ``MEMBERS_BASE`` members plus one per param.
MEMBERS_BASE = 1024
#: The longest weight name read from ``weight_names`` (Keras' are ``"<layer path>/<variable>:0"``).
MAX_NAME_BYTES = 1 << 10


class KerasFileError(ValueError):
    """A Keras model file kopt refuses: unreadable, damaged, hostile, or not holding what ``params`` need.

    The message names the file, the member or dataset, and what differs
    from what was expected.
    """


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading Keras model files needs h5py: pip install h5py (or kopt[keras]); kopt does not require it"
        ) from None
    return h5py


def _reading(path: str, what: str) -> contextlib.AbstractContextManager[None]:
    """Any failure while reading ``what`` (h5py's OSError or KeyError, zipfile's, json's ...) as a KerasFileError."""
    return file_safety.failures_as(KerasFileError, f"{path}: {what}: ")


def weights_member_limit(opt: Optimizer, params: Params) -> int:
    """The most bytes the ``model.weights.h5`` member of a ``.keras`` file may declare for ``opt`` and ``params``."""
    leaves = jax.tree.leaves(params)
    per_leaf = 1 + max_weights_per_leaf(opt)  # the param itself, then its optimizer weights
    elements = sum(math.prod(np.shape(leaf)) for leaf in leaves)
    return WEIGHTS_FACTOR * 8 * elements * per_leaf + DATASET_ALLOWANCE * len(leaves) * per_leaf + WEIGHTS_BASE


# --------------------------------------------------------------------------- HDF5, checked before reading


def _child(group: Any, name: str) -> Any:
    """``group[name]``, following hard links only (a soft or external link may lead anywhere, other files too)."""
    h5py = _h5py()
    for part in name.split("/"):
        if part in ("", "."):
            raise ValueError(f"{file_safety.shorten(name)} is not a plain path below {group.name!r}")
        link = group.get(part, getlink=True)
        if link is None:
            raise ValueError(f"{group.name!r} has no member {file_safety.shorten(part)}")
        if not isinstance(link, h5py.HardLink):
            raise ValueError(
                f"{group.name!r} member {file_safety.shorten(part)} is a {type(link).__name__}; "
                "only hard links are read"
            )
        group = group[part]
    return group


def _read_strings(attribute: Any, max_bytes: int) -> np.ndarray:
    """The strings of an HDF5 string attribute as ``bytes``, each refused past ``max_bytes``.

    HDF5 converts fixed- and variable-length strings alike into a fixed-length buffer of ``max_bytes + 1``
    bytes a string (cutting longer ones), so nothing longer than that reaches Python: a string that fills
    it is too long. A fixed-length one is refused from its declared size, before reading. A
    variable-length one has no size HDF5 tells before reading it: HDF5 loads it whole from the file's
    heap (at most the file's size; peak memory about 5.5 times that) before converting it.
    """
    h5py = _h5py()
    file_type = attribute.get_type()
    if not file_type.is_variable_str() and file_type.get_size() > max_bytes:
        raise ValueError(f" holds strings of {file_type.get_size()} bytes, more than the {max_bytes} expected")
    memory_type = h5py.h5t.C_S1.copy()
    memory_type.set_size(max_bytes + 1)
    memory_type.set_cset(file_type.get_cset())  # HDF5 converts no charset into another
    memory_type.set_strpad(h5py.h5t.STR_NULLPAD)
    buffer = np.zeros(attribute.shape, f"S{max_bytes + 1}")
    attribute.read(buffer, mtype=memory_type)
    too_long = [index for index, value in enumerate(buffer.reshape(-1)) if len(value) > max_bytes]
    if too_long:
        which = f"[{too_long[0]}]" if buffer.ndim else ""  # messages start with it: "attribute 'x'[3] holds ..."
        raise ValueError(f"{which} holds more than the {max_bytes} bytes expected")
    return buffer


def _string_attribute(obj: Any, name: str, max_bytes: int) -> str | None:
    """The scalar string attribute ``name`` of ``obj`` (None if absent), refused past ``max_bytes``.

    Python never holds more than ``max_bytes + 1`` bytes of it (:func:`_read_strings`); HDF5 itself
    reads a variable-length string whole first (``docs/threat_model.md``, "What is not promised").
    """
    h5py = _h5py()
    if name not in obj.attrs:
        return None
    attribute = obj.attrs.get_id(name)
    if h5py.check_string_dtype(attribute.dtype) is None or attribute.shape not in ((), (1,)):
        raise ValueError(f"attribute {name!r} is {attribute.dtype}{list(attribute.shape)}, expected a string")
    try:
        value = _read_strings(attribute, max_bytes).reshape(()).item()
    except ValueError as error:
        raise ValueError(f"attribute {name!r}{error}") from None
    return value.decode("utf-8")  # UnicodeDecodeError is a ValueError


def _string_list_attribute(obj: Any, name: str, max_count: int) -> list[str]:
    """The 1-d string attribute ``name`` of ``obj`` (Keras' ``weight_names``): at most ``max_count`` strings,
    each at most ``MAX_NAME_BYTES`` long, both checked before the strings reach Python."""
    h5py = _h5py()
    attribute = obj.attrs.get_id(name) if name in obj.attrs else None
    if attribute is None:
        raise ValueError(f"attribute {name!r} is missing")
    if h5py.check_string_dtype(attribute.dtype) is None or len(attribute.shape) != 1:
        raise ValueError(f"attribute {name!r} is {attribute.dtype}{list(attribute.shape)}, expected strings")
    if attribute.shape[0] > max_count:
        raise ValueError(f"attribute {name!r} lists {attribute.shape[0]} weights, more than the {max_count} expected")
    try:
        values = _read_strings(attribute, MAX_NAME_BYTES)
    except ValueError as error:
        raise ValueError(f"attribute {name!r}{error}") from None
    return [value.decode("utf-8") for value in values]


def _checked_dataset(dataset: Any, index: int, spec: WeightSpec) -> np.ndarray:
    """The data of ``dataset``, saved weight ``index``, once its metadata matches ``spec``."""
    h5py = _h5py()
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"weights[{index}] ({spec.what}) is a {type(dataset).__name__}, not a dataset")
    # Storage that lives elsewhere (other files) or that HDF5 assembles through filters is never read.
    if dataset.is_virtual or dataset.external:
        raise ValueError(f"weights[{index}] ({spec.what}) keeps its data in other files; only inline data is read")
    if dataset.chunks is not None:
        raise ValueError(f"weights[{index}] ({spec.what}) is chunked or compressed; Keras writes contiguous data")
    dtype = dataset.dtype
    plain = dtype.names is None and dtype.subdtype is None and h5py.check_enum_dtype(dtype) is None
    if not plain or dtype.kind not in spec.kinds or dtype.itemsize > 8:
        expected = "an integer" if spec.kinds == "iu" else "a floating"
        raise ValueError(f"weights[{index}] ({spec.what}) has dtype {dtype}, expected {expected} dtype")
    if dataset.shape != spec.shape:
        raise ValueError(f"weights[{index}] ({spec.what}) has shape {dataset.shape}, expected {spec.shape}")
    return np.asarray(dataset[()])


def _read_weights(path: str, group: Any, names: list[str], opt: Optimizer, params: Params) -> list[np.ndarray]:
    """The weights ``names`` below ``group``, each checked against what ``opt`` and ``params`` expect."""
    with _reading(path, f"group {group.name!r}"):
        specs = weight_specs(opt, params, len(names))
    arrays = []
    for index, (name, spec) in enumerate(zip(names, specs, strict=True)):
        with _reading(path, f"dataset {file_safety.shorten(group.name.rstrip('/') + '/' + name)}"):
            arrays.append(_checked_dataset(_child(group, name), index, spec))
    return arrays


# --------------------------------------------------------------------------- the two formats


def _optimizer(config: Any, path: str) -> Optimizer:
    if not isinstance(config, Mapping) or "class_name" not in config:
        raise KerasFileError(f"{path}: the model was saved without an optimizer (compile the model before saving)")
    try:
        return optimizer_from_config(dict(config), "the saved optimizer config")
    except ValueError as error:  # deserialize quotes the config only shortened
        raise KerasFileError(f"{path}: {file_safety.clip(str(error), file_safety.MESSAGE_LIMIT)}") from None


def _read_h5(path: str, params: Params) -> tuple[Optimizer, list[np.ndarray] | None]:
    h5py = _h5py()
    with _reading(path, "HDF5 file"):
        file = h5py.File(path, "r")
    with file:
        with _reading(path, "attribute 'training_config'"):
            limit = file_safety.json_limit(len(jax.tree.leaves(params)))
            raw = _string_attribute(file, "training_config", limit)
            if raw is None:
                raise KerasFileError(
                    f"{path}: the model was saved without a training config (compile it before saving)"
                )
            training = file_safety.load_json(raw, limit)
            if not isinstance(training, dict):
                raise ValueError(f"is a JSON {type(training).__name__}, expected an object")
        opt = _optimizer(training.get("optimizer_config"), path)
        with _reading(path, "group 'optimizer_weights'"):
            if "optimizer_weights" not in file:  # even this reads the file's (untrusted) B-trees
                return opt, None
            group = _child(file, "optimizer_weights")
            # Never more names than the largest layout holds: the list is read before it is checked.
            most = max_weights_per_leaf(opt) * max(len(jax.tree.leaves(params)), 1)
            names = _string_list_attribute(group, "weight_names", most)
        return opt, _read_weights(path, group, names, opt, params)


def _read_keras(path: str, params: Params) -> tuple[Optimizer, list[np.ndarray] | None]:
    h5py = _h5py()
    with _reading(path, "zip archive"):
        archive = file_safety.open_zip(path, MEMBERS_BASE + len(jax.tree.leaves(params)))
    with archive:
        with _reading(path, "member 'config.json'"):
            limit = file_safety.json_limit(len(jax.tree.leaves(params)))
            model = file_safety.load_json(file_safety.read_member(archive, "config.json", limit), limit)
            compiled = model.get("compile_config") if isinstance(model, dict) else None
            if not isinstance(compiled, (dict, type(None))):
                raise ValueError(f"compile_config is a JSON {type(compiled).__name__}, expected an object")
        opt = _optimizer((compiled or {}).get("optimizer"), path)
        member = "member 'model.weights.h5'"
        with contextlib.ExitStack() as stack:
            with _reading(path, member):
                weights = stack.enter_context(
                    file_safety.member_file(path, archive, "model.weights.h5", weights_member_limit(opt, params))
                )
                file = stack.enter_context(h5py.File(weights, "r"))
            with _reading(path, "group 'optimizer/vars'"):
                group = _child(file, "optimizer/vars") if "optimizer" in file else None
                count = len(group) if group is not None else 0
                most = max_weights_per_leaf(opt) * max(len(jax.tree.leaves(params)), 1)
                if count > most:  # checked before any name is made, as weight_names in an .h5 file
                    raise ValueError(f"holds {count} weights, more than the {most} expected")
                names = [str(index) for index in range(count)]
            if not names:
                return opt, None
            return opt, _read_weights(path, group, names, opt, params)


def load_keras_optimizer(
    path: str | os.PathLike, params: Params, *, m_schedule: float | str = "replay"
) -> tuple[Optimizer, OptState]:
    """``(opt, state)``: the optimizer of a saved tf.keras model, ready to continue its training.

    ``path`` is a ``model.save(...)`` file: HDF5 (``.h5``) or the zip format
    (``.keras``), told apart by content. ``params`` are the model's trainable
    weights in ``model.trainable_weights`` order (a list does it); the state is
    :func:`kopt.from_keras_weights` of the saved optimizer weights. The optimizer is
    :func:`kopt.deserialize` of the saved config (TensorFlow's meaning of every
    key). ``m_schedule`` is passed on for a Nadam whose file lacks it.

    The file may come from a stranger: reading it never runs code, never
    follows an HDF5 link or reads data kept in another file, and never
    allocates more than the params need times a stated factor; every weight's
    shape and dtype (floating slots, an integer step count) is compared with
    what ``params`` and the optimizer need before it is read
    (``docs/threat_model.md``). Anything wrong with the file (unreadable,
    damaged, an unknown optimizer, a weight count, shape or dtype that does
    not fit ``params``) is a :class:`KerasFileError`, a ``ValueError`` naming
    the file, the member or dataset and what differs. A missing file is
    ``FileNotFoundError``.

    Example:
        >>> params = [w.numpy() for w in model.trainable_weights]  # doctest: +SKIP
        >>> opt, state = kopt.load_keras_optimizer("m.h5", params)  # doctest: +SKIP
    """
    path = os.fspath(path)
    try:
        file_safety.regular_file_size(path)  # a missing file stays FileNotFoundError
    except ValueError as error:
        raise KerasFileError(f"{path}: {error}") from None
    with _reading(path, "file"):
        reader = _read_keras if zipfile.is_zipfile(path) else _read_h5
    opt, weights = reader(path, params)
    if weights is None:
        warnings.warn(
            f"{path} holds no optimizer state ({opt.class_name} in this format is saved without it): "
            "the optimizer starts at step 0, as tf_keras.models.load_model does",
            UserWarning,
            stacklevel=2,
        )
        return opt, opt.init(params)
    try:
        nadam: dict[str, Any] = (
            {"m_schedule": m_schedule} if opt.class_name == "Nadam" and opt.flavor == "tf_keras" else {}
        )
        return opt, from_keras_weights(opt, params, weights, **nadam)
    except ValueError as error:
        raise KerasFileError(f"{path}: {error}") from None
