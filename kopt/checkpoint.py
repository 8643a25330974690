"""Checkpoints of optimizer states: a safe file format, atomic writes, checked loads.

:func:`save_state` writes any pytree of arrays (an optimizer state, or
``{"params": params, "opt_state": state}``) to one file; :func:`load_state`
reads it back into the structure, dtypes and shardings of a ``like`` tree:

    >>> import os, tempfile, jax.numpy as jnp, kopt
    >>> path = os.path.join(tempfile.mkdtemp(), "adam.ckpt")
    >>> opt = kopt.Adam(lr=1e-3)
    >>> state = opt.init({"w": jnp.zeros(3)})
    >>> kopt.save_state(path, state, config=kopt.serialize(opt))
    >>> state = kopt.load_state(path, like=opt.init({"w": jnp.zeros(3)}))

**Format** (``format_version`` 1). The file is a NumPy ``.npz`` (an
uncompressed zip written by ``np.savez``) with the members

* ``header``: a uint8 array holding a UTF-8 JSON object::

      {"format": "kopt-checkpoint", "format_version": 1, "kopt_version": "0.1.0",
       "config": {"class_name": "Adam", "config": {...}} or null,
       "leaves": [{"path": "[0].m['w']", "shape": [3], "dtype": "float32", "stored_as": "float32"}, ...],
       "sha256": "<64 hex digits>"}

* ``leaf_0`` ... ``leaf_{n-1}``: the leaves, in the order of
  ``jax.tree_util.tree_flatten_with_path(state)``; ``path`` is that leaf's
  ``jax.tree_util.keystr``. ``None`` leaves are not leaves (they hold no
  data); they come back from ``like``.

Dtypes NumPy cannot store natively (``bfloat16``, the float8 types, ...) are
stored as unsigned integers of the same width (``stored_as``, e.g.
``"uint16"``) and viewed back, so every bit survives. ``sha256`` covers, leaf
after leaf, the path, dtype, shape and stored bytes.

**Reading files from strangers** (``docs/threat_model.md``). Loading uses
``zipfile``, NumPy's ``.npy`` header parser and ``json``: reading a file never
runs code (no pickle, no object dtype). Each member is checked before it is
read: only ``header.npy`` and ``leaf_<i>.npy`` (once each), stored (as
``np.savez`` writes them: a compressed member is refused, so every byte read
is a byte on disk), unencrypted, each leaf at least a ``.npy`` header long;
the header may declare at most :func:`header_limit` bytes of JSON
(64 KiB + 1 KiB per leaf) nested at most 64 deep, and each leaf member at
most its header record's bytes plus 64 KiB, with a ``.npy`` header that must
give the recorded dtype and shape; nothing else is allocated.

**Atomic writes.** The file is written to a temporary file in the same folder
(``.<name>.<random>.tmp``), flushed and ``fsync``-ed, renamed over ``path``
with ``os.replace`` and the folder is ``fsync``-ed, so ``path`` always holds
either the previous checkpoint or the new one, never a mix. A writer killed
mid-write leaves its temporary file behind (never ``path`` itself).

Arrays are read with ``np.asarray``: sharded arrays must be fully addressable
by this process (single-host); multi-host checkpoints are out of scope.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import math
import os
import re
import secrets
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kopt import file_safety, packing
from kopt.tree import TreeDef

FORMAT = "kopt-checkpoint"
FORMAT_VERSION = 1
_HEADER = "header"

__all__ = ["CheckpointCorruptedError", "load_state", "read_checkpoint_header", "save_state"]


class CheckpointCorruptedError(ValueError):
    """The file is not a readable kopt checkpoint: truncated, damaged, or something else entirely."""


# --------------------------------------------------------------------------- dtypes


def _resolve_dtype(name: str) -> np.dtype:
    """The numeric dtype called ``name``: a NumPy builtin or an ``ml_dtypes`` scalar type.

    Names come from a file, so they are looked up, never evaluated, and only
    plain numeric dtypes pass (an object dtype here would let raw bytes become
    Python pointers). Raises ``TypeError`` for anything else.
    """
    candidate = getattr(ml_dtypes, name, None)
    if isinstance(candidate, type) and issubclass(candidate, np.generic):
        dtype = np.dtype(candidate)
        if dtype.kind == "V" and not dtype.hasobject and dtype.names is None and dtype.itemsize in (1, 2, 4, 8):
            return dtype
    dtype = np.dtype(name)  # TypeError for names NumPy does not know
    if dtype.kind not in "biufc" or dtype.name != name:
        raise TypeError(f"not a numeric dtype name: {name!r}")
    return dtype


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """How a leaf of ``dtype`` is stored: natively, or as raw unsigned integers of its width.

    NumPy's ``.npy`` format has no code for the ``ml_dtypes`` types (bfloat16,
    float8, int4 ...): it would store them as opaque ``void`` data that
    ``allow_pickle=False`` loading cannot turn back into numbers.
    """
    if dtype.kind in "biufc":
        return dtype
    return np.dtype(f"uint{8 * dtype.itemsize}")


def _dtype_of(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


# --------------------------------------------------------------------------- checksum


def _digest(records: list[dict[str, Any]], stored: list[np.ndarray]) -> str:
    """SHA-256 over each leaf's path, dtype, shape and stored bytes, length-prefixed (no ambiguity)."""
    sha = hashlib.sha256()
    for record, array in zip(records, stored, strict=True):
        meta = json.dumps([record["path"], record["dtype"], record["shape"]]).encode()
        data = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        sha.update(len(meta).to_bytes(8, "little"))
        sha.update(meta)
        sha.update(data.nbytes.to_bytes(8, "little"))
        sha.update(data)  # type: ignore[arg-type]  # an ndarray is a buffer; NumPy's stubs lack __buffer__
    return sha.hexdigest()


# --------------------------------------------------------------------------- config


def _normalized_config(config: Any) -> dict[str, Any] | None:
    """``config`` (a :func:`kopt.serialize` dict, or an optimizer) as plain JSON data."""
    if config is None:
        return None
    from kopt.keras_io.configs import serialize
    from kopt.optimizers import Optimizer  # kopt.optimizers does not import this module: no cycle

    if isinstance(config, Optimizer):
        config = serialize(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict from kopt.serialize(opt) or a kopt optimizer, got {config!r}")
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"config must hold only JSON values (numbers, bools, strings): {error}") from None


def _without_layout(config: Any) -> Any:
    """``config`` without ``packed``: a layout, not an option (files hold states leaf by leaf either way)."""
    if isinstance(config, dict) and isinstance(config.get("config"), dict):
        return {**config, "config": {k: v for k, v in config["config"].items() if k != "packed"}}
    return config


def _first_config_difference(stored: Any, given: Any, where: str = "config") -> str | None:
    short = file_safety.shorten  # the stored config comes from the file: no value is repeated whole
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in list(given) + [k for k in stored if k not in given]:
            if key not in stored:
                return f"{where}[{short(key)}] is {short(given[key])} in the given config but absent from the file"
            if key not in given:
                return f"{where}[{short(key)}] is {short(stored[key])} in the file but absent from the given config"
            difference = _first_config_difference(stored[key], given[key], f"{where}[{short(key)}]")
            if difference:
                return difference
        return None
    if stored != given or isinstance(stored, bool) != isinstance(given, bool):
        return f"{where} is {short(stored)} in the file but {short(given)} in the given config"
    return None


# --------------------------------------------------------------------------- writing


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` through a temporary file in its folder: flush, fsync, ``os.replace``, fsync the folder."""
    directory = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
        try:
            # O_EXCL: never reuse someone else's file; mode 0o666 lets the umask decide, as open() would.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 64 random bits
        raise FileExistsError(f"could not create a temporary file next to {path}")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Makes the rename durable: the folder entry itself must reach the disk (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems cannot fsync a folder; the rename is still atomic
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def save_state(path: str | os.PathLike[str], state: Any, *, config: Any = None) -> None:
    """Writes ``state`` (any pytree of arrays) to ``path`` atomically.

    ``path`` is used as given (no ``.npz`` is appended) and replaced if it
    exists. ``config`` (optional) is the optimizer's ``kopt.serialize(opt)``
    dict, or the optimizer itself; it is stored in the header, where
    :func:`read_checkpoint_header` and ``load_state(..., config=...)`` find
    it. Leaves may be JAX arrays (fetched from their devices), NumPy arrays or
    Python numbers; ``None`` leaves are allowed. The file format is in the
    module docstring. Raises ``ValueError`` for a leaf that is not numeric.
    A packed state (``packed=True``) is written leaf by leaf, as the same
    optimizer without packing holds it, so a file loads into either.

    Example:
        >>> import os, tempfile, jax.numpy as jnp, kopt
        >>> opt, path = kopt.Adam(), os.path.join(tempfile.mkdtemp(), "opt.ckpt")
        >>> kopt.save_state(path, opt.init({"w": jnp.zeros(3)}), config=opt)
    """
    path = os.fspath(path)
    if packing.holds_packed(state):  # written leaf by leaf: the file does not depend on packing
        state = packing.leaf_by_leaf(state)
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    paths = [jax.tree_util.keystr(key_path) for key_path, _ in flat]
    for leaf_path, (_, leaf) in zip(paths, flat, strict=True):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(f"leaf {leaf_path} is not fully addressable by this process (multi-host arrays)")
    host = jax.device_get([leaf for _, leaf in flat])  # one transfer for all leaves
    records, stored = [], []
    for leaf_path, value in zip(paths, host, strict=True):
        array = np.asarray(value)
        try:
            _resolve_dtype(array.dtype.name)
        except TypeError:
            raise ValueError(
                f"leaf {leaf_path} has dtype {array.dtype}; checkpoints hold numeric arrays only"
            ) from None
        storage = _storage_dtype(array.dtype)
        records.append(
            {"path": leaf_path, "shape": list(array.shape), "dtype": array.dtype.name, "stored_as": storage.name}
        )
        stored.append(np.asarray(array, order="C").view(storage) if storage != array.dtype else array)

    import kopt  # at call time: kopt/__init__ may import this module before defining __version__

    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kopt_version": kopt.__version__,
        "config": _normalized_config(config),
        "leaves": records,
        "sha256": _digest(records, stored),
    }
    members = {_HEADER: np.frombuffer(json.dumps(header).encode(), np.uint8)}
    members.update((f"leaf_{index}", array) for index, array in enumerate(stored))
    _atomic_write(path, lambda file: np.savez(file, allow_pickle=False, **members))


# --------------------------------------------------------------------------- reading


def _corrupted(path: str, what: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"{path}: {_NOT_READABLE}{what}{_DAMAGED}")


_NOT_READABLE, _DAMAGED = "not a readable kopt checkpoint (", "); the file is truncated or damaged"


def _guarded(path: str) -> contextlib.AbstractContextManager[None]:
    """Any failure in the block but a CheckpointCorruptedError (damaged JSON, unknown dtype names, zip
    CRC errors, NumPy's ``.npy`` parser's SyntaxError, short reads ...) reported as one."""
    return file_safety.failures_as(CheckpointCorruptedError, f"{path}: {_NOT_READABLE}", _DAMAGED)


#: Bytes a member may hold beyond its array: the ``.npy`` header (64 bytes as ``np.savez`` writes it; NumPy
#: reads headers up to 10000 bytes).
_NPY_ALLOWANCE = 65536
#: The fewest bytes a leaf member holds: its ``.npy`` header alone (NumPy pads headers to 64 bytes).
_NPY_MINIMUM = 64

#: The JSON header of a checkpoint of ``n`` leaves holds at most ``HEADER_BASE + HEADER_PER_LEAF * n`` bytes:
#: a leaf's record (path, shape, dtype, stored_as) is about 100 bytes, 1 KiB leaves room for deep paths;
#: the base holds the format fields, the checksum and the optimizer config: any config ``deserialize``
#: accepts (at most ``serialization.MAX_CONFIG_VALUES`` = 20000 values, ~30 bytes each in JSON) fits, so
#: a checkpoint ``save_state`` writes always loads.
HEADER_BASE = 1 << 20
HEADER_PER_LEAF = 1 << 10


def header_limit(leaves: int) -> int:
    """The most bytes of JSON a checkpoint header of ``leaves`` leaves may hold."""
    return HEADER_BASE + HEADER_PER_LEAF * leaves


_MEMBER = re.compile(r"(header|leaf_(0|[1-9][0-9]*))\.npy")


def _read_npy(archive: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...] | int) -> np.ndarray:
    """Array member ``name``: its declared size, then its ``.npy`` header, must give ``dtype`` and ``shape``.

    An int ``shape`` means any 1-d array of at most that many elements (the
    header). The member is refused before it is read if it declares more
    bytes than the array needs (plus a ``.npy`` header); no pickle, no object
    dtype, and no allocation beyond the declared (checked) size.
    """
    elements = shape if isinstance(shape, int) else math.prod(shape)
    data = file_safety.read_member(archive, name, elements * dtype.itemsize + _NPY_ALLOWANCE)
    stream = io.BytesIO(bytes(data[:_NPY_ALLOWANCE]))
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        stored_shape, fortran, stored = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        stored_shape, fortran, stored = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version}; kopt writes 1.0")
    if stored.newbyteorder("=") != dtype.newbyteorder("=") or stored.hasobject:
        raise ValueError(f"holds dtype {stored}, expected {dtype}")
    if len(stored_shape) != 1 if isinstance(shape, int) else tuple(stored_shape) != shape:
        raise ValueError(f"holds shape {stored_shape}, expected {'1-d' if isinstance(shape, int) else shape}")
    offset = stream.tell()
    if len(data) - offset != math.prod(stored_shape) * dtype.itemsize:
        raise ValueError(f"holds {len(data) - offset} data bytes for a {stored}{list(stored_shape)} array")
    array = np.frombuffer(data, stored, offset=offset).reshape(stored_shape, order="F" if fortran else "C")
    return array if stored.isnative else array.astype(dtype)


def _parse_header(archive: zipfile.ZipFile, path: str, leaves: int) -> dict[str, Any]:
    """The JSON header (for about ``leaves`` leaves), checked for the fields and types this module relies on."""
    limit = header_limit(leaves)
    with file_safety.failures_as(CheckpointCorruptedError, f"{path}: {_NOT_READABLE}member 'header.npy': ", _DAMAGED):
        raw = _read_npy(archive, _HEADER + ".npy", np.dtype(np.uint8), limit)
        header = file_safety.load_json(raw.tobytes(), limit)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _corrupted(path, "header does not name the kopt-checkpoint format")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointCorruptedError(
            f"{path}: checkpoint format_version {version!r}; this kopt reads versions 1..{FORMAT_VERSION}"
        )
    records, digest = header.get("leaves"), header.get("sha256")
    if not isinstance(records, list) or not isinstance(digest, str):
        raise _corrupted(path, "header lacks leaves or sha256")
    for record in records:
        ok = (
            isinstance(record, dict)
            and isinstance(record.get("path"), str)
            and isinstance(record.get("shape"), list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in record["shape"])
            and isinstance(record.get("dtype"), str)
            and isinstance(record.get("stored_as"), str)
        )
        if not ok:
            raise _corrupted(path, f"malformed leaf record {file_safety.shorten(record)}")
        dtype = _resolve_dtype(record["dtype"])  # TypeError for unknown names: caught as corruption
        if _storage_dtype(dtype).name != record["stored_as"]:
            raise _corrupted(
                path,
                f"leaf {file_safety.shorten(record['path'])} stored as {file_safety.shorten(record['stored_as'])}, "
                f"expected {dtype.name}",
            )
    expected = {_HEADER + ".npy"} | {f"leaf_{index}.npy" for index in range(len(records))}
    if set(archive.namelist()) != expected:
        raise _corrupted(
            path,
            f"members {file_safety.shorten(sorted(archive.namelist())[:10])} do not match the {len(records)} leaves "
            "of the header",
        )
    return header


def _first_leaf_difference(records: list[dict[str, Any]], like_flat: list) -> str | None:
    """A sentence naming the first difference between the file's leaves and ``like``'s, or None."""
    file_paths = [record["path"] for record in records]
    like_paths = [jax.tree_util.keystr(key_path) for key_path, _ in like_flat]
    short = functools.partial(file_safety.clip, limit=200)  # paths and dtypes from the file, printed as they are
    if file_paths != like_paths:
        in_file, in_like = set(file_paths), set(like_paths)
        for index in range(max(len(file_paths), len(like_paths))):
            mine = file_paths[index] if index < len(file_paths) else None
            theirs = like_paths[index] if index < len(like_paths) else None
            if mine == theirs:
                continue
            if theirs is not None and theirs not in in_file:
                return f"missing leaf {theirs}: `like` has it, the file does not"
            if mine is not None and mine not in in_like:
                return f"extra leaf {short(mine)}: the file has it, `like` does not"
            return f"leaf order differs at position {index}: {short(str(mine))} in the file, {theirs} in `like`"
    for record, (_, leaf) in zip(records, like_flat, strict=True):
        shape, dtype = tuple(np.shape(leaf)), _dtype_of(leaf)
        if tuple(record["shape"]) != shape:
            stored = file_safety.shorten(tuple(record["shape"]))
            return f"leaf {record['path']} has shape {stored} in the file but {shape} in `like`"
        if record["dtype"] != dtype.name:
            return f"leaf {record['path']} has dtype {record['dtype']} in the file but {dtype.name} in `like`"
    return None


def _read_leaves(archive: zipfile.ZipFile, header: dict[str, Any], path: str) -> list[np.ndarray]:
    """Every leaf, checked against its record and the checksum, in its real dtype."""
    records = header["leaves"]
    stored = []
    for index, record in enumerate(records):
        where = f"{path}: {_NOT_READABLE}member 'leaf_{index}.npy' (leaf {file_safety.shorten(record['path'])}): "
        with file_safety.failures_as(CheckpointCorruptedError, where, _DAMAGED):
            stored.append(
                _read_npy(archive, f"leaf_{index}.npy", _resolve_dtype(record["stored_as"]), tuple(record["shape"]))
            )
    if _digest(records, stored) != header["sha256"]:
        raise _corrupted(path, "SHA-256 checksum mismatch")
    return [
        array.view(_resolve_dtype(record["dtype"])) if record["dtype"] != record["stored_as"] else array
        for record, array in zip(records, stored, strict=True)
    ]


def _place(value: np.ndarray, like_leaf: Any) -> Any:
    """``value`` where ``like_leaf`` lives: its sharding for JAX arrays, NumPy otherwise."""
    if isinstance(like_leaf, jax.Array):
        return jax.device_put(value, like_leaf.sharding)
    if isinstance(like_leaf, jax.ShapeDtypeStruct):
        sharding = getattr(like_leaf, "sharding", None)
        return jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)
    return np.asarray(value)


@contextlib.contextmanager
def _checkpoint_archive(path: str) -> Iterator[zipfile.ZipFile]:
    """The checkpoint's zip, its members checked (no stranger, each once, stored, leaves at least a ``.npy``
    header long); open failures are corruption."""
    try:
        file_safety.regular_file_size(path)  # a missing (or unpermitted) file stays an OSError
    except ValueError as error:
        raise _corrupted(path, str(error)) from None
    with _guarded(path):  # any parse failure of untrusted bytes means "not a checkpoint"
        archive = file_safety.open_zip(path)
    with archive:
        names = archive.namelist()
        if _HEADER + ".npy" not in names or not all(_MEMBER.fullmatch(name) for name in names):
            strangers = [name for name in names if not _MEMBER.fullmatch(name)] or names
            raise _corrupted(path, f"members {file_safety.shorten(sorted(strangers[:10]))} are not a header and leaves")
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:  # np.savez stores: then each byte read is one on disk
                raise _corrupted(
                    path, f"member {info.filename!r} is compressed (method {info.compress_type}); kopt stores them"
                )
            if info.filename != _HEADER + ".npy" and info.file_size < _NPY_MINIMUM:
                raise _corrupted(
                    path, f"member {info.filename!r} holds {info.file_size} bytes, too few for a .npy header"
                )
        yield archive


def read_checkpoint_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of the checkpoint at ``path`` (format, kopt version, config, leaves).

    Reads no leaf data and verifies no checksum (:func:`load_state` does).
    Useful to rebuild the optimizer before loading:
    ``opt = kopt.deserialize(read_checkpoint_header(path)["config"])``.
    Raises :class:`CheckpointCorruptedError` for an unreadable file. The file
    may come from a stranger: the header is read within :func:`header_limit`
    of the archive's leaf members (a bound checked before reading; members
    are stored, each at least a ``.npy`` header long, so the bound is at most
    16 times the file's size plus 64 KiB), never runs code, and every failure
    is a :class:`CheckpointCorruptedError` naming the file and the member.
    """
    path = os.fspath(path)
    # No `like` says how many leaves to expect: the archive's own members do (each stored, >= 64 bytes on disk).
    with _checkpoint_archive(path) as archive, _guarded(path):
        return _parse_header(archive, path, len(archive.namelist()) - 1)


def load_state(path: str | os.PathLike[str], like: Any, *, config: Any = None) -> Any:
    """Reads the checkpoint at ``path`` into the structure of ``like``.

    ``like`` is a tree with the structure, shapes and dtypes of the saved one,
    typically ``opt.init(params)`` (or ``jax.eval_shape(opt.init, params)``,
    whose ``ShapeDtypeStruct`` leaves cost no memory). Each loaded leaf is a
    ``jax.Array`` placed with ``jax.device_put(value, like_leaf.sharding)``
    when ``like``'s leaf is a ``jax.Array`` (so a sharded state loads onto the
    same shardings) or a ``ShapeDtypeStruct`` (its sharding, if any), and a
    NumPy array otherwise. ``None`` leaves come from ``like``. Bits are exact.
    A packed ``like`` reads the file leaf by leaf and packs it as ``like`` is
    packed, so a checkpoint of the per-leaf optimizer loads into the packed
    one and back.

    With ``config`` (a :func:`kopt.serialize` dict or an optimizer), the
    optimizer config stored in the file must equal it (this catches options
    the state does not show, such as SGD's ``nesterov``). Note that the
    hyperparameters (``lr``, ...) are part of the state, so they are the
    saved ones.

    Raises ``ValueError`` naming the first difference between file and
    ``like`` (a missing or extra leaf path, a shape, a dtype) or config, and
    :class:`CheckpointCorruptedError` (a ``ValueError``) for a truncated,
    damaged or foreign file, including any checksum mismatch; it never
    returns numbers other than those saved. A missing file is
    ``FileNotFoundError``. The file may come from a stranger: every member
    is checked against what ``like`` needs before it is read (the header
    within :func:`header_limit` of ``like``'s leaf count,
    each leaf within its recorded size plus 64 KiB), so memory stays
    proportional to ``like`` and reading never runs code
    (``docs/threat_model.md``).

    Example:
        >>> import os, tempfile, jax.numpy as jnp, kopt
        >>> opt, params, path = kopt.Adam(), {"w": jnp.ones(3)}, os.path.join(tempfile.mkdtemp(), "opt.ckpt")
        >>> kopt.save_state(path, opt.init(params), config=opt)
        >>> state = kopt.load_state(path, like=opt.init(params), config=opt)
        >>> int(kopt.iterations(state))
        0
    """
    path = os.fspath(path)
    packed_like = like if packing.holds_packed(like) else None
    if packed_like is not None:  # files hold states leaf by leaf (see save_state)
        like = jax.tree.map(  # only the packed states: other leaves (Python numbers, say) stay as given
            lambda node: jax.eval_shape(packing.leaf_by_leaf, node) if isinstance(node, packing.PackedState) else node,
            like,
            is_leaf=lambda node: isinstance(node, packing.PackedState),
        )
    treedef: TreeDef
    like_flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    given_config = _normalized_config(config)
    with _checkpoint_archive(path) as archive:
        with _guarded(path):
            header = _parse_header(archive, path, len(like_flat))
        difference = _first_leaf_difference(header["leaves"], like_flat)
        if difference:
            raise ValueError(f"checkpoint {path} does not match `like`: {difference}")
        if given_config is not None:
            if header.get("config") is None:
                raise ValueError(f"checkpoint {path} holds no optimizer config to compare with the given one")
            difference = _first_config_difference(_without_layout(header["config"]), _without_layout(given_config))
            if difference:
                raise ValueError(f"checkpoint {path} was saved with another optimizer config: {difference}")
        with _guarded(path):
            values = _read_leaves(archive, header, path)
    if packed_like is not None:
        state = packing.packed_like(packed_like, treedef.unflatten(values))
        placed = [
            _place(value, leaf)
            for value, leaf in zip(jax.tree.leaves(state), jax.tree.leaves(packed_like), strict=True)
        ]
        packed_treedef: TreeDef = jax.tree.structure(packed_like)
        return packed_treedef.unflatten(placed)
    placed = [_place(value, leaf) for value, (_, leaf) in zip(values, like_flat, strict=True)]
    return treedef.unflatten(placed)
