"""Logged concept data, read only through TensorBoard's ``DataProvider``, with a cache.

Nothing here opens a file or builds a path: runs, tags and blobs are named by the data
provider, so the Python loader, rustboard (``--load_fast``) and remote logdirs behave
alike.  Decoded headers and arrays are kept in a bounded, thread-safe LRU keyed by
``(blob key, wall time)``: a datum never changes once written, and a step rewritten
after a restart gets a new wall time, so a stale entry can never be served.

Example (inside a request handler)::

    store = Store(context.data_provider)
    series = store.series(ctx, eid, "baseline", "conceptevo/space/text/features.0")
    datum = store.datum(series, step=3)
    header, arrays = store.payload(ctx, datum, ["layout"])
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
from tensorboard.data import provider as tb_provider

from .. import metadata
from ..reading import MAX_STEPS, DataNotFound, _summarise_steps
from ..summary import PayloadError, decode_array, unpack_header

#: Default byte budget of the cache (decoded arrays, headers, encoded answers).
DEFAULT_CACHE_BYTES = 256 * 2**20


class LRUCache:
    """Thread-safe least-recently-used cache bounded by the total size of its values.

    >>> cache = LRUCache(max_bytes=10)
    >>> cache.get_or_compute("a", lambda: b"12345678")
    b'12345678'
    >>> _ = cache.get_or_compute("b", lambda: b"1234")   # evicts "a" (12 bytes > 10)
    >>> "a" in cache, "b" in cache
    (False, True)
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._items: "collections.OrderedDict[Hashable, Tuple[object, int]]" = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key, default=None):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return default
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key, value) -> None:
        size = _size_of(value)
        if size > self.max_bytes:
            return  # larger than the whole budget: serve it, do not keep it
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted

    def get_or_compute(self, key, compute: Callable[[], object]):
        # Computed outside the lock: two threads may both compute a missing value once,
        # which is cheaper than serialising every reader behind one slow read.
        sentinel = _MISSING
        value = self.get(key, sentinel)
        if value is sentinel:
            value = compute()
            self.put(key, value)
        return value


_MISSING = object()


def _size_of(value) -> int:
    if isinstance(value, (bytes, bytearray, str)):
        return len(value) + 64
    if isinstance(value, np.ndarray):
        return value.nbytes + 128
    if isinstance(value, tuple):
        return sum(_size_of(v) for v in value) + 64
    if isinstance(value, dict):
        return sum(_size_of(v) + 64 for v in value.values()) + 256
    if isinstance(value, list):
        return sum(_size_of(v) for v in value) + 64
    return 64


class Store:
    """Reads this plugin's payloads through a ``DataProvider``; shared by all requests."""

    def __init__(self, data_provider, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.provider = data_provider
        self.cache = LRUCache(cache_bytes)

    # -- listing
    def list_series(self, ctx, eid: str) -> Dict[str, Dict[str, object]]:
        """``{run: {tag: BlobSequenceTimeSeries}}`` for the plugin's tags (metadata only)."""
        if self.provider is None:
            return {}
        found = self.provider.list_blob_sequences(ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME)
        return {run: {t: s for t, s in tags.items() if metadata.parse_tag(t)} for run, tags in (found or {}).items()}

    def read_all(self, ctx, eid: str, run: Optional[str] = None) -> Dict[str, Dict[str, List[object]]]:
        """``{run: {tag: [datum sorted by step]}}`` of every plugin tag (blob keys, not blobs)."""
        if self.provider is None:
            return {}
        run_filter = tb_provider.RunTagFilter(runs=[run]) if run is not None else None
        found = self.provider.read_blob_sequences(
            ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME,
            downsample=MAX_STEPS, run_tag_filter=run_filter,
        )
        return {
            r: {t: sorted(data, key=lambda d: d.step) for t, data in tags.items() if metadata.parse_tag(t)}
            for r, tags in (found or {}).items()
        }

    def series(self, ctx, eid: str, run: str, tag: str, what: str = "") -> List[object]:
        """Data of one run/tag sorted by step; :class:`DataNotFound` says what is missing."""
        found = {}
        if self.provider is not None:
            found = self.provider.read_blob_sequences(
                ctx, experiment_id=eid, plugin_name=metadata.PLUGIN_NAME, downsample=MAX_STEPS,
                run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=[tag]),
            ) or {}
        data = found.get(run, {}).get(tag)
        if not data:
            raise DataNotFound(self._missing_message(ctx, eid, run, tag, what))
        return sorted(data, key=lambda d: d.step)

    def unknown_run_message(self, ctx, eid: str, run: str, runs=None) -> str:
        runs = self.list_series(ctx, eid) if runs is None else runs
        names = sorted(r for r, tags in runs.items() if tags)
        shown = ", ".join(repr(r) for r in names[:20]) + (", ..." if len(names) > 20 else "")
        return f"unknown run {run!r}; runs with concept data: {shown or 'none'}"

    def _missing_message(self, ctx, eid: str, run: str, tag: str, what: str) -> str:
        runs = self.list_series(ctx, eid)
        if run not in runs or not runs[run]:
            return self.unknown_run_message(ctx, eid, run, runs)
        kind, quals, layer = metadata.parse_tag(tag)
        similar = sorted(t for t in runs[run] if (metadata.parse_tag(t) or ("",))[0] == kind)
        shown = ", ".join(similar[:20]) + (", ..." if len(similar) > 20 else "")
        return f"run {run!r} has no {what or kind} data ({tag}); its {kind} tags: {shown or 'none'}"

    @staticmethod
    def datum(series: Sequence[object], step: Optional[int]):
        """The datum at ``step`` (None = the last one)."""
        if not series:
            raise DataNotFound("no data")
        if step is None:
            return series[-1]
        # series is sorted by step: bisect instead of scanning every step.
        steps = [d.step for d in series]
        index = int(np.searchsorted(steps, step))
        if index < len(steps) and steps[index] == step:
            while index + 1 < len(steps) and steps[index + 1] == step:
                index += 1  # the last one wins if a step was written twice
            return series[index]
        raise DataNotFound(f"no data at step {step}; logged steps: {_summarise_steps(steps)}")

    # -- payloads
    def header(self, ctx, datum) -> Dict:
        blobs = datum.values
        if not blobs:
            raise PayloadError("empty payload")
        key = ("header", blobs[0].blob_key, datum.wall_time)

        def read():
            header = unpack_header(self.provider.read_blob(ctx, blob_key=blobs[0].blob_key))
            if len(header["arrays"]) != len(blobs) - 1:
                raise PayloadError(f"payload lists {len(header['arrays'])} arrays but carries {len(blobs) - 1}")
            return header

        return self.cache.get_or_compute(key, read)

    def payload(self, ctx, datum, names: Optional[Sequence[str]] = None, optional: Sequence[str] = ()
                ) -> Tuple[Dict, Dict[str, np.ndarray]]:
        """``(header, arrays)``: the arrays in ``names`` (all when None) plus those of
        ``optional`` that the payload has.  A missing required array is a PayloadError."""
        header = self.header(ctx, datum)
        wanted = None if names is None else set(names) | set(optional)
        arrays = {}
        for spec, ref in zip(header["arrays"], datum.values[1:]):
            name = spec.get("name")
            if wanted is not None and name not in wanted:
                continue
            key = ("array", ref.blob_key, datum.wall_time)
            arrays[name] = self.cache.get_or_compute(
                key, lambda: _readonly(decode_array(spec, self.provider.read_blob(ctx, blob_key=ref.blob_key))))
        if names is not None:
            missing = set(names) - set(arrays)
            if missing:
                raise PayloadError(f"payload {header.get('kind', '')!r} has no arrays {sorted(missing)}")
        return header, arrays

    def memo(self, key: Hashable, compute: Callable[[], object]):
        """Cache a derived value (an encoded answer) under ``key``."""
        return self.cache.get_or_compute(("memo",) + tuple(key), compute)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def datum_key(datum) -> Tuple[int, float]:
    """What identifies a datum's content for caching and ETags."""
    return (int(datum.step), float(datum.wall_time))
