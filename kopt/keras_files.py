"""The optimizer of a saved tf.keras model: config and state from ``.h5`` and ``.keras`` files.

``model.save("m.h5")`` (HDF5) keeps the optimizer config in the root attribute
``training_config`` and its weights in the group ``optimizer_weights`` (in the
order of its ``weight_names``). ``model.save("m.keras")`` (a zip) keeps it in
``config.json`` (``compile_config.optimizer``) and ``model.weights.h5``
(``optimizer/vars/0..``). Both are read with ``json`` and ``h5py`` only: no
code from the file runs (a custom optimizer or schedule class is an error, not
an import), and no array can be an object.

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

``h5py`` is needed (``pip install kopt[keras]`` or ``pip install h5py``); kopt
does not depend on it otherwise.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from kopt.base import OptState, Params
from kopt.keras_weights import from_keras_weights
from kopt.optimizers import Optimizer
from kopt.serialization import deserialize

__all__ = ["load_keras_optimizer"]


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading Keras model files needs h5py: pip install h5py (or kopt[keras]); kopt does not require it"
        ) from None
    return h5py


def _optimizer_config(config: Any, path: str) -> dict[str, Any]:
    if not isinstance(config, Mapping) or "class_name" not in config:
        raise ValueError(f"{path}: the model was saved without an optimizer (compile the model before saving)")
    return dict(config)


def _read_h5(path: str) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    h5py = _h5py()
    with h5py.File(path, "r") as file:
        raw = file.attrs.get("training_config")
        if raw is None:
            raise ValueError(f"{path}: the model was saved without a training config (compile it before saving)")
        training = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        config = _optimizer_config(training.get("optimizer_config"), path)
        if "optimizer_weights" not in file:
            return config, None
        group = file["optimizer_weights"]
        names = [name.decode() if isinstance(name, bytes) else str(name) for name in group.attrs["weight_names"]]
        return config, [np.asarray(group[name][()]) for name in names]


def _read_keras(path: str) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    h5py = _h5py()
    with zipfile.ZipFile(path) as archive:
        model = json.loads(archive.read("config.json"))
        config = _optimizer_config((model.get("compile_config") or {}).get("optimizer"), path)
        weights = archive.read("model.weights.h5")
    with h5py.File(io.BytesIO(weights), "r") as file:
        group = file.get("optimizer/vars")
        if group is None or not len(group):
            return config, None
        return config, [np.asarray(group[str(index)][()]) for index in range(len(group))]


def load_keras_optimizer(
    path: str | os.PathLike, params: Params, *, m_schedule: float | str = "replay"
) -> tuple[Optimizer, OptState]:
    """``(opt, state)``: the optimizer of a saved tf.keras model, ready to continue its training.

    ``path`` is a ``model.save(...)`` file: HDF5 (``.h5``) or the zip format
    (``.keras``), told apart by content. ``params`` are the model's trainable
    weights in ``model.trainable_weights`` order (a list does it); the state is
    :func:`kopt.from_keras_weights` of the saved optimizer weights, so a wrong
    count or shape is a ``ValueError`` naming what differs. The optimizer is
    :func:`kopt.deserialize` of the saved config (TensorFlow's meaning of every
    key); an optimizer kopt does not know is a ``ValueError`` naming it.
    ``m_schedule`` is passed on for a Nadam whose file lacks it.

    Example:
        >>> params = [w.numpy() for w in model.trainable_weights]  # doctest: +SKIP
        >>> opt, state = kopt.load_keras_optimizer("m.h5", params)  # doctest: +SKIP
    """
    path = os.fspath(path)
    reader = _read_keras if zipfile.is_zipfile(path) else _read_h5
    config, weights = reader(path)
    try:
        opt = deserialize(config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if weights is None:
        warnings.warn(
            f"{path} holds no optimizer state ({config['class_name']} in this format is saved without it): "
            "the optimizer starts at step 0, as tf_keras.models.load_model does",
            UserWarning,
            stacklevel=2,
        )
        return opt, opt.init(params)
    try:
        nadam = {"m_schedule": m_schedule} if opt.class_name == "Nadam" and opt.flavor == "tf_keras" else {}
        return opt, from_keras_weights(opt, params, weights, **nadam)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
