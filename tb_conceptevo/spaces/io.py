"""One versioned file per fitted space (shared by every space kind).

A space file is an uncompressed ``.npz`` (a zip archive, whose per-member CRC catches
corruption on read) holding:

* ``__header__``: uint8 UTF-8 JSON ``{"format": "tb_conceptevo.space", "kind": ...,
  "version": ..., "probe_hash": ..., "params": {...}, ...}``;
* any number of named numeric arrays (loaded with ``allow_pickle=False``);
* optionally a :class:`~tb_conceptevo.spaces.layout.StableLayout`, stored under the
  ``layout.`` prefix (its UMAP model pickled into a uint8 array, see
  :meth:`StableLayout.state`; only load space files you trust, as with any pickle).

Example::

    >>> import numpy as np, tempfile, os
    >>> from tb_conceptevo.spaces import io as space_io
    >>> path = os.path.join(tempfile.mkdtemp(), "space.npz")
    >>> space_io.save_space_file(path, kind="demo", version=1, header={"probe_hash": "ab"},
    ...                          arrays={"vectors": np.zeros((2, 3), "float32")})
    >>> header, arrays, layout = space_io.load_space_file(path, kind="demo", version=1)
    >>> header["probe_hash"], arrays["vectors"].shape, layout
    ('ab', (2, 3), None)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import zipfile
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

FORMAT_NAME = "tb_conceptevo.space"
HEADER_KEY = "__header__"
LAYOUT_PREFIX = "layout."


class SpaceFileError(ValueError):
    """A space file is corrupted, of another kind, or of an unsupported version."""


def save_space_file(
    path,
    kind: str,
    version: int,
    header: Mapping,
    arrays: Mapping[str, np.ndarray],
    layout=None,
) -> None:
    """Write ``header`` (JSON-able), ``arrays`` and an optional fitted ``layout`` to
    ``path`` atomically (temporary file + rename, so a crash never leaves half a file).
    The path is used as given (no ``.npz`` suffix is appended)."""
    full = dict(header)
    full.update({"format": FORMAT_NAME, "kind": str(kind), "version": int(version)})
    members: Dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name == HEADER_KEY or name.startswith(LAYOUT_PREFIX):
            raise ValueError(f"array name {name!r} is reserved")
        array = np.asarray(array)
        if array.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; store numeric arrays only")
        members[name] = array
    if layout is not None:
        layout_header, layout_arrays = layout.state()
        full["layout"] = layout_header
        for name, array in layout_arrays.items():
            members[LAYOUT_PREFIX + name] = np.asarray(array)
    try:
        encoded = json.dumps(full, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"space header is not JSON-serialisable: {exc}") from None
    members[HEADER_KEY] = np.frombuffer(encoded, dtype=np.uint8)

    path = os.fspath(path)
    if is_url(path):  # an object store: one upload (objects appear whole, never half)
        buffer = io.BytesIO()
        np.savez(buffer, **members)
        with _remote(path, "write"):
            with _gfile().GFile(path, "wb") as stream:
                stream.write(buffer.getvalue())
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=".space-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **members)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def read_header(path) -> Dict:
    """The JSON header of a space file (kind, version, probe hash, parameters...)
    without loading the arrays; :class:`SpaceFileError` if it is not a space file."""
    with _open(path) as archive:
        return _header(archive, path)


def load_space_file(path, kind: str, version: int) -> Tuple[Dict, Dict[str, np.ndarray], Optional[object]]:
    """Read a file written by :func:`save_space_file`.

    Returns ``(header, arrays, layout)`` (``layout`` None when none was stored).
    Raises FileNotFoundError for a missing file and :class:`SpaceFileError` (a
    ValueError) when the file is not a space file, is corrupted, holds another kind
    of space or another format version."""
    with _open(path) as archive:
        header = _header(archive, path)
        if header.get("kind") != kind:
            raise SpaceFileError(
                f"{path} holds a {header.get('kind')!r} space, not a {kind!r} space; load it "
                f"with the matching class"
            )
        stored = header.get("version")
        if stored != version:
            hint = "upgrade tb_conceptevo" if isinstance(stored, int) and stored > version else "refit the space"
            raise SpaceFileError(
                f"{path} is a {kind!r} space file of version {stored!r}; this tb_conceptevo "
                f"reads version {version}: {hint}"
            )
        arrays: Dict[str, np.ndarray] = {}
        layout_arrays: Dict[str, np.ndarray] = {}
        try:
            for name in archive.files:
                if name == HEADER_KEY:
                    continue
                if name.startswith(LAYOUT_PREFIX):
                    layout_arrays[name[len(LAYOUT_PREFIX):]] = archive[name]
                else:
                    arrays[name] = archive[name]
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise SpaceFileError(f"{path} is corrupted ({exc}); re-save or refit the space") from None
    layout = None
    if "layout" in header:
        from .layout import StableLayout

        try:
            layout = StableLayout.from_state(header["layout"], layout_arrays)
        except ValueError as exc:
            raise SpaceFileError(f"{path}: {exc}") from None
    return header, arrays, layout


def require(arrays: Mapping[str, np.ndarray], names, path="space file") -> None:
    """SpaceFileError naming the missing arrays, if any."""
    missing = [name for name in names if name not in arrays]
    if missing:
        raise SpaceFileError(f"{path} is incomplete: missing arrays {missing}; re-save or refit the space")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
    """Whether ``path`` names a remote file (``s3://...``, ``gs://...``), read and
    written through TensorBoard's file layer like the logs, never as a local path."""
    return bool(_URL.match(os.fspath(path)))


def _gfile():
    from tensorboard.compat import tf

    return tf.io.gfile


@contextlib.contextmanager
def _remote(path: str, what: str):
    """Errors of the remote file layer as one clear message (never a local folder
    named after the URL)."""
    try:
        yield
    except (ImportError, ValueError, NotImplementedError) as exc:
        raise ValueError(
            f"cannot {what} {path}: {exc}. Remote space files go through TensorBoard's file layer "
            "(s3:// needs s3fs or boto3 installed, gs:// needs TensorFlow or gcsfs); or use a local path"
        ) from None


def _open(path):
    path = os.fspath(path)
    if is_url(path):
        with _remote(path, "read"):
            if not _gfile().exists(path):
                raise FileNotFoundError(f"no space file at {path}")
            with _gfile().GFile(path, "rb") as stream:
                data = stream.read()
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise SpaceFileError(f"{path} is not a readable space file ({exc}); it may be truncated or corrupted") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"no space file at {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise SpaceFileError(f"{path} is not a readable space file ({exc}); it may be truncated or corrupted") from None


def _header(archive, path) -> Dict:
    if HEADER_KEY not in getattr(archive, "files", ()):
        raise SpaceFileError(f"{path} is not a tb_conceptevo space file (no header)")
    try:
        header = json.loads(archive[HEADER_KEY].tobytes().decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, OSError) as exc:
        raise SpaceFileError(f"{path} has a corrupted header ({exc}); re-save or refit the space") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise SpaceFileError(f"{path} is not a tb_conceptevo space file")
    return header
