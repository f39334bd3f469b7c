"""TF-free summary protos and the payload container used by every plugin tag.

A payload is a *blob sequence* (``DATA_CLASS_BLOB_SEQUENCE``): blob 0 is a UTF-8
JSON header, blobs 1..n are raw little-endian arrays whose names, dtypes and shapes
the header lists under ``"arrays"``.  Both TensorBoard loaders (Python and rustboard)
return blob sequences, and the plugin can fetch one array without decoding the rest.
See ``docs/FORMAT.md``.
"""

from __future__ import annotations

import json
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from . import metadata

#: dtypes allowed in payloads (explicit little-endian, fixed width).
ALLOWED_DTYPES = {"<f4", "<f2", "<i4", "<i2", "<u2", "|u1", "|i1", "<i8", "<f8"}


def pack(header: Mapping, arrays: Mapping[str, np.ndarray]) -> List[bytes]:
    """Encode a JSON-able header and named arrays into a list of blobs."""
    specs = []
    blobs: List[bytes] = []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder not in "|<" else array.dtype
        array = array.astype(dtype, copy=False)
        if dtype.str not in ALLOWED_DTYPES:
            raise TypeError(f"array {name!r} has unsupported dtype {array.dtype}")
        specs.append({"name": name, "dtype": dtype.str, "shape": list(array.shape)})
        blobs.append(array.tobytes())
    full = dict(header)
    full["arrays"] = specs
    full.setdefault("version", metadata.FORMAT_VERSION)
    head = json.dumps(full, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return [head] + blobs


class PayloadError(ValueError):
    """A payload could not be decoded (truncated, wrong version, inconsistent)."""


def unpack_header(blob0: bytes) -> Dict:
    try:
        header = json.loads(blob0.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError(f"payload header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise PayloadError("payload header has no 'arrays' list")
    bad = [spec for spec in header["arrays"] if not isinstance(spec, dict) or not isinstance(spec.get("name"), str)]
    if bad:
        raise PayloadError(f"payload header lists array specs that are not objects with a name: {bad[:3]!r}")
    version = header.get("version")
    if not isinstance(version, int) or version > metadata.FORMAT_VERSION:
        raise PayloadError(
            f"payload format version {version!r} is newer than this tb_conceptevo "
            f"understands ({metadata.FORMAT_VERSION}); upgrade tb_conceptevo"
        )
    return check_header_fields(header)


def _int(value, low=0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _ints(count, low=1):
    return lambda v: isinstance(v, list) and len(v) == count and all(_int(x, low) for x in v)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _counts(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _int(n) for k, n in v.items())


def _number_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


#: The header fields readers rely on, per payload kind: ``{kind: {field: (required, check)}}``.
#: Fields not listed pass through unchecked (see docs/FORMAT.md for every field).
HEADER_FIELDS = {
    "probe": {"n_images": (True, _int), "image_size": (True, _ints(2)), "thumbnail_size": (True, _ints(2)),
              "atlas_grid": (False, lambda v: _int(v, 1)), "n_atlases": (False, _int)},
    "stimuli": {"map_size": (True, _ints(2)), "input_size": (True, _ints(2))},
    "detector": {"concepts": (True, _strings), "categories": (False, _strings),
                 "interpretable_counts": (False, _counts), "threshold": (False, _number_or_none)},
    "anchors": {"words": (True, _strings), "point_kind": (False, _strings)},
    "revert": {"bin_labels": (False, _strings), "layers": (False, _strings)},
}


def check_header_fields(header: Mapping) -> Mapping:
    """Raise :class:`PayloadError` naming the first header field a reader relies on
    that is missing or of the wrong type (by the payload's ``kind``)."""
    for field, (required, check) in HEADER_FIELDS.get(header.get("kind"), {}).items():
        if field not in header:
            if required:
                raise PayloadError(f"{header.get('kind')} payload header lacks {field!r}")
            continue
        if not check(header[field]):
            raise PayloadError(f"{header.get('kind')} payload header has a malformed {field!r}: {header[field]!r:.80}")
    return header


def decode_array(spec: Mapping, blob: bytes) -> np.ndarray:
    if not isinstance(spec, Mapping):
        raise PayloadError(f"bad array spec {spec!r}")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    if dtype not in ALLOWED_DTYPES or not isinstance(shape, list) or not all(_int(d) for d in shape):
        raise PayloadError(f"bad array spec {spec!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(blob) != expected:
        raise PayloadError(f"array {spec.get('name')!r}: {len(blob)} bytes, expected {expected}")
    return np.frombuffer(blob, dtype=np.dtype(dtype)).reshape(shape)


def unpack(blobs: Sequence[bytes]) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """Inverse of :func:`pack`: ``(header, {name: array})`` (arrays are read-only views)."""
    if not blobs:
        raise PayloadError("empty payload")
    header = unpack_header(blobs[0])
    specs = header["arrays"]
    if len(specs) != len(blobs) - 1:
        raise PayloadError(f"payload lists {len(specs)} arrays but carries {len(blobs) - 1}")
    arrays = {spec["name"]: decode_array(spec, blob) for spec, blob in zip(specs, blobs[1:])}
    return header, arrays


def plugin_content() -> bytes:
    """The summary metadata's ``plugin_data.content``: the format version as JSON."""
    return json.dumps({"version": metadata.FORMAT_VERSION}).encode("utf-8")


def plugin_content_version(content: bytes) -> Optional[int]:
    """The format version in a series' ``plugin_content`` (None when it names none).

    >>> plugin_content_version(plugin_content()) == metadata.FORMAT_VERSION
    True
    >>> plugin_content_version(b"not json") is None
    True
    """
    try:
        value = json.loads(bytes(content or b"{}").decode("utf-8")).get("version")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def blob_sequence_summary(tag: str, blobs: Sequence[bytes], description: str = "") -> summary_pb2.Summary:
    """A ``Summary`` holding ``blobs`` as a string tensor with our plugin's metadata."""
    plugin_data = summary_pb2.SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=plugin_content())
    smd = summary_pb2.SummaryMetadata(
        plugin_data=plugin_data,
        summary_description=description,
        data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
    )
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        string_val=list(blobs),
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(blobs))]
        ),
    )
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=smd, tensor=tensor)])


def payload_summary(tag: str, header: Mapping, arrays: Mapping[str, np.ndarray]) -> summary_pb2.Summary:
    return blob_sequence_summary(tag, pack(header, arrays))
