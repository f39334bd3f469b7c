"""The event files a ``ConceptWriter`` opens: checksummed with the C CRC32C where the
``google-crc32c`` package is there (records byte-identical to TensorBoard's), and a
stand-in that writes nothing on ranks other than 0."""

from __future__ import annotations

import struct


def _native_masked_crc32c():
    """google-crc32c's C CRC32C, masked as TensorBoard's records need (None when the
    package is missing).  TensorBoard's own is pure Python: ~0.7 s per 5 MB written."""
    try:
        import google_crc32c
    except ImportError:  # pragma: no cover - optional speed-up
        return None

    def masked_crc32c(data: bytes) -> int:
        crc = google_crc32c.value(bytes(data))
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    return masked_crc32c


NATIVE_MASKED_CRC32C = _native_masked_crc32c()


def use_native_crc(file_writer) -> bool:
    """Make this one event file's record writer checksum with the C CRC32C.

    Scoped to the files a ``ConceptWriter`` opens (other writers in the process keep
    TensorBoard's code); the records are byte-identical (``tests/test_writer.py``).
    Returns False, changing nothing, when the package is missing or TensorBoard's
    writer internals are not the expected ones.
    """
    record = getattr(getattr(getattr(file_writer, "event_writer", None), "_async_writer", None), "_writer", None)
    sink = getattr(record, "_writer", None)
    if NATIVE_MASKED_CRC32C is None or sink is None or not callable(getattr(record, "write", None)):
        return False
    crc = NATIVE_MASKED_CRC32C

    def write(data: bytes) -> None:  # TensorBoard's RecordWriter.write, with the C checksum
        header = struct.pack("<Q", len(data))
        sink.write(header + struct.pack("<I", crc(header)) + data + struct.pack("<I", crc(data)))

    record.write = write
    return True


class NullFileWriter:
    """Stands in for the event file on ranks other than 0: they record, never write."""

    def __init__(self, log_dir):
        self._log_dir = log_dir

    def get_logdir(self):
        return self._log_dir

    def add_event(self, *a, **k):
        pass

    def add_summary(self, *a, **k):
        pass

    def add_graph(self, *a, **k):
        pass

    def add_onnx_graph(self, *a, **k):
        pass

    def flush(self):
        pass

    def close(self):
        pass

    def reopen(self):
        pass
