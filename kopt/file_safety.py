"""Reading files from strangers: bounded JSON, bounded zip members, no special files.

The one place that knows how kopt reads untrusted bytes; :mod:`kopt.checkpoint`
and :mod:`kopt.keras_io.files` use it, and ``docs/threat_model.md`` states what it
promises. Every check runs *before* the bytes it guards are read, so a file
that declares more than its reader needs is refused at the cost of reading its
metadata, not its data. The helpers raise plain ``ValueError`` saying what
differs; the callers prefix the file's path and raise their own documented
subclass (:class:`kopt.CheckpointCorruptedError`, :class:`kopt.KerasFileError`).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import re
import reprlib
import stat
import struct
import zipfile
from collections.abc import Iterator
from typing import IO, Any, cast

import numpy as np

#: Deepest JSON nesting accepted (arrays and objects). tf_keras' saved configs nest 7 levels; kopt's
#: checkpoint headers 6. Far below Python's recursion limit, so no parser or walker can overflow.
MAX_DEPTH = 64

#: JSON text allowed for a file whose params have ``n`` leaves: ``JSON_BASE + JSON_PER_LEAF * n`` bytes.
#: A Keras model config grows with its layers (a few KiB each), a checkpoint header with its leaves
#: (about 100 bytes of path, shape and dtype each).
JSON_BASE = 256 << 10
JSON_PER_LEAF = 4 << 10

#: Compression methods read from zip archives: the two ``zipfile`` implements without extra libraries,
#: and whose output is bounded by what is read (``ZIP_DEFLATED`` expands at most ~1000x per input byte).
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}

_CHUNK = 1 << 20

#: The longest reason :func:`failures_as` repeats from a library's error (h5py's may quote names from the file).
MESSAGE_LIMIT = 2000

# A JSON string, or an unterminated one up to the end of the text (so that no quote is scanned twice:
# linear time whatever the text), and any run of characters that are not brackets.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


class _ShortRepr(reprlib.Repr):
    """``reprlib`` that never formats a long string or a huge integer whole (their repr would be the attack)."""

    def repr1(self, x: Any, level: int) -> str:
        if isinstance(x, (str, bytes)) and type(x) not in (str, bytes):  # np.str_ etc.: reprlib would repr it whole
            x = str(x[: self.maxstring + 1]) if isinstance(x, str) else bytes(x[: self.maxstring + 1])
        if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 64:
            return f"<an integer of {x.bit_length()} bits>"  # repr of 4300+ digits raises, and costs quadratic time
        return super().repr1(x, level)


_SHORT = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8
_SHORT.maxlevel = 4


def shorten(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters (cut, ending in ``...``).

    Values from a file or a config (names, keys, whole configs) go into messages only through this:
    long strings, long lists and deep nesting are cut *before* they are formatted (``reprlib``), so
    a 100 MB name costs a 200-character message, not a 100 MB one.
    """
    return clip(_SHORT.repr(value), limit)


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, the cut marked ``...``."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


@contextlib.contextmanager
def failures_as(error_class: type[ValueError], prefix: str, suffix: str = "") -> Iterator[None]:
    """Any exception in the block but ``error_class`` itself as ``error_class(prefix + what + suffix)``.

    Untrusted bytes make h5py, zipfile, zlib, json and NumPy's ``.npy`` parser raise all kinds of
    errors (``OSError``, ``KeyError``, ``SyntaxError``, ``zipfile.BadZipFile`` ...): each reader turns them
    into its one documented ``ValueError`` subclass. ``what`` is a ``ValueError``'s message (kopt's own
    checks say what differs) or ``"<type>: <message>"`` for anything else, cut to ``MESSAGE_LIMIT``.
    """
    try:
        yield
    except error_class:
        raise
    except Exception as error:
        what = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        raise error_class(f"{prefix}{clip(what, MESSAGE_LIMIT)}{suffix}") from error


def json_limit(leaves: int) -> int:
    """The most bytes of JSON a reader accepts for params with ``leaves`` leaves."""
    return JSON_BASE + JSON_PER_LEAF * leaves


def regular_file_size(path: str) -> int:
    """The size of ``path``, which must be a regular file (a FIFO or device would block or never end).

    A missing file stays ``FileNotFoundError``: the caller named it, the file did not.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file (a folder, FIFO, socket or device)")
    return info.st_size


def check_json_depth(text: str, limit: int = MAX_DEPTH) -> None:
    """Raises ``ValueError`` if ``text`` nests arrays/objects deeper than ``limit``.

    Strings are cut out and the brackets left are summed, all in C loops
    (a regex substitution, ``bytes.translate``, a cumulative sum): linear time, without
    recursion, cheaper than parsing. Text that is not JSON may pass;
    ``json.loads`` then refuses it, and can no longer recurse deeply.
    """
    brackets = _STRING.sub("", text).encode("utf-8", "replace").translate(None, _NOT_BRACKETS)
    depth = int(np.cumsum(_STEP[np.frombuffer(brackets, np.uint8)], dtype=np.int32).max(initial=0))
    if depth > limit:
        raise ValueError(f"JSON nested {depth} levels deep, more than the {limit} allowed")


def load_json(data: bytes | bytearray | str, max_bytes: int) -> Any:
    """``json.loads(data)`` after checking its size and nesting depth; every failure a ``ValueError``.

    ``NaN`` / ``Infinity`` and numbers beyond float range (``1e999`` is ``inf``)
    parse as floats: the optimizer's own checks refuse them where a finite
    number is required. Integers of more than 4300 digits are refused by
    Python itself (a ``ValueError``), before their quadratic conversion.
    """
    if len(data) > max_bytes:
        raise ValueError(f"JSON of {len(data)} bytes, more than the {max_bytes} allowed")
    text = data if isinstance(data, str) else bytes(data).decode("utf-8")  # UnicodeDecodeError is a ValueError
    check_json_depth(text)
    return json.loads(text)


def open_zip(path: str, max_members: int | None = None) -> zipfile.ZipFile:
    """The archive at ``path``, with each member name present once (a repeated name is two different files)
    and, if given, at most ``max_members`` members. Linear in the number of members."""
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    try:
        if max_members is not None and len(names) > max_members:
            raise ValueError(f"{len(names)} members, more than the {max_members} expected")
        repeated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
        if repeated:
            more = f" (and {len(repeated) - 8} more)" if len(repeated) > 8 else ""
            listed = ", ".join(shorten(name, 80) for name in repeated[:8])
            raise ValueError(f"member(s) {listed}{more} appear more than once")
    except ValueError:
        archive.close()
        raise
    return archive


def read_member(archive: zipfile.ZipFile, name: str, max_bytes: int) -> bytearray:
    """The bytes of member ``name``, refused before reading if it declares more than ``max_bytes``.

    The declared (uncompressed) size is checked first, then exactly that
    many bytes are read into one buffer: ``zipfile`` never returns more than
    a member declares, and checks its CRC at the end. Encrypted members and
    compression methods other than stored/deflated are refused. Messages
    do not repeat ``name``: the caller says which file and member it read.
    """
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ValueError("missing from the archive") from None
    if info.flag_bits & 0x1:
        raise ValueError("encrypted")
    if info.compress_type not in _METHODS:
        raise ValueError(f"compression method {info.compress_type}; only stored (0) or deflated (8) are read")
    if info.file_size > max_bytes:
        raise ValueError(f"declares {info.file_size} bytes, more than the {max_bytes} expected")
    if info.compress_type == zipfile.ZIP_STORED:  # then the buffer below is no larger than the archive
        if info.compress_size != info.file_size:
            raise ValueError(f"stored, but {info.compress_size} bytes on disk for {info.file_size} declared")
        if info.header_offset + info.file_size > getattr(archive, "start_dir", math.inf):
            raise ValueError(f"declares {info.file_size} bytes, past the end of the archive's data")
    buffer = bytearray(info.file_size)  # writable, so arrays viewing it are too
    view, filled = memoryview(buffer), 0
    # (a zipfile.ZipExtFile, which typeshed gives as IO[bytes], without readinto)
    with cast(io.BufferedIOBase, archive.open(info)) as member:
        while filled < len(buffer):
            # In slices: zipfile's readinto reads into a temporary bytes object of the slice's size first.
            count = member.readinto(view[filled : filled + _CHUNK])
            if not count:
                raise ValueError(f"ends after {filled} of the {len(buffer)} bytes it declares")
            filled += count
        if member.read(1):  # pragma: no cover - zipfile stops at the declared size
            raise ValueError(f"holds more than the {len(buffer)} bytes it declares")
    return buffer


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of an open file as a read-only, seekable file of their own."""

    def __init__(self, file: io.BufferedIOBase, start: int, size: int):
        super().__init__()
        self._file, self._start, self._size, self._position = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("seek before the start of the member")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        if not count:
            return 0
        self._file.seek(self._start + self._position)
        count = self._file.readinto(memoryview(buffer)[:count])
        self._position += count
        return count


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we do not need, name and extra lengths


@contextlib.contextmanager
def member_file(path: str, archive: zipfile.ZipFile, name: str, max_bytes: int) -> Iterator[IO[bytes]]:
    """Member ``name`` of the zip at ``path`` as a seekable file, for a reader that reads only what it needs.

    A stored (uncompressed) member, as Keras writes ``model.weights.h5``, is
    read in place through a window on the archive file: nothing is loaded, so
    its size needs no bound (its range must lie inside the file). A deflated
    member is inflated into memory by :func:`read_member`, refused past
    ``max_bytes``.
    """
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ValueError("missing from the archive") from None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        yield io.BytesIO(read_member(archive, name, max_bytes))
        return
    if info.compress_size != info.file_size:
        raise ValueError(f"stored, but {info.compress_size} bytes on disk for {info.file_size} declared")
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        header = file.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise ValueError("its local header lies past the end of the archive")
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != b"PK\x03\x04":
            raise ValueError("its local header is damaged (no zip signature)")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > os.fstat(file.fileno()).st_size:
            raise ValueError(f"declares {info.file_size} bytes, past the end of the archive")
        yield io.BufferedReader(_Window(file, start, info.file_size))
