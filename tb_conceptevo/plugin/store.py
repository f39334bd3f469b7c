"""Logged concept data, read only through TensorBoard's ``DataProvider``, with a cache.

Nothing here opens a file or builds a path: runs, tags and blobs are named by the data
provider, so the Python loader, rustboard (``--load_fast``) and remote logdirs behave
alike.  Decoded headers and arrays are kept in a bounded, thread-safe LRU keyed by
``(blob key, wall time)``: a datum never changes once written, and a step rewritten
after a restart gets a new wall time, so a stale entry can never be served.

Example (inside a request handler)::

    store = Store(context.data_provider)
    datum = store.datum_at(ctx, eid, "baseline", "conceptevo/space/text/features.0", step=3)
    header, arrays = store.payload(ctx, datum, ["layout"])
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from ..format import metadata
from .. import reading
from ..reading import DataNotFound, is_in_process
from ..format.summary import PayloadError, decode_array, unpack_header

logger = logging.getLogger(__name__)

#: Blob reads in flight for a read-ahead job (foreground requests use ``fetch_threads``).
READ_AHEAD_THREADS = 4

#: Default byte budget of the cache (decoded arrays, headers, encoded answers).
DEFAULT_CACHE_BYTES = 256 * 2**20

#: Experiments whose index (steps, wall times, blob keys) is kept at once.  The
#: experiment id is chosen by the client (TensorBoard routes any
#: ``/experiment/<id>/data/plugin/...``), so per-experiment state must be bounded: the
#: least recently used experiment's index is dropped (and re-read if asked again).
DEFAULT_MAX_EXPERIMENTS = 8

#: Array-layout templates kept (one per run/tag read; a few names each).
MAX_TEMPLATES = 4096


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
    """Reads this plugin's payloads through a ``DataProvider``; shared by all requests.

    Two caches keep requests off the data provider (each rustboard gRPC call costs
    ~40 ms on loopback, whatever its size):

    * the *index* (every run/tag's datums: steps, wall times, blob keys, never blob
      contents), read in one call for the whole experiment (``/runs`` re-reads it each
      time).  A run's part is refreshed in the background once older than ``index_ttl``
      seconds (the stale copy is served meanwhile), and synchronously -- at most every
      ``min_refresh`` seconds -- when a request names a tag or step it does not know yet
      (an unknown run re-reads the whole index, rate-limited the same way);
    * the LRU of decoded headers / arrays / encoded answers (immutable data).

    Blobs missing from the LRU are fetched concurrently; the array layout of the
    previous step of the same tag is used to fetch a payload's header and arrays in
    one round trip.
    """

    def __init__(self, data_provider, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 index_ttl: float = 5.0, min_refresh: float = 0.5, fetch_threads: int = 16,
                 max_experiments: int = DEFAULT_MAX_EXPERIMENTS):
        if max_experiments < 1:
            raise ValueError("max_experiments must be >= 1")
        self.provider = data_provider
        self.cache = LRUCache(cache_bytes)
        self.index_ttl = index_ttl
        self.min_refresh = min_refresh
        self.max_experiments = int(max_experiments)
        # eid -> run -> (monotonic time read, {tag: [datum]}); least recently used first
        self._indexes: "collections.OrderedDict[str, Dict[str, Tuple[float, Dict[str, List[object]]]]]" = \
            collections.OrderedDict()
        self._full_refresh: Dict[str, float] = {}
        self._refreshing: set = set()
        self._index_lock = threading.Lock()
        self._templates: "collections.OrderedDict[Hashable, List[str]]" = collections.OrderedDict()
        self._fetch_threads = fetch_threads
        self._pool = None
        # Each read of rustboard / a remote provider is a round trip worth overlapping;
        # the in-process multiplexer's reads are CPU work under the GIL, where threads only add cost.
        self.remote = data_provider is not None and not is_in_process(data_provider)
        self._ahead_keys: set = set()
        self._ahead_pool = None

    # -- listing
    def list_series(self, ctx, eid: str) -> Dict[str, Dict[str, object]]:
        """``{run: {tag: BlobSequenceTimeSeries}}`` for the plugin's tags (metadata only)."""
        return reading.list_series(self.provider, ctx, eid)

    def read_all(self, ctx, eid: str, run: Optional[str] = None) -> Dict[str, Dict[str, List[object]]]:
        """``{run: {tag: [datum sorted by step]}}`` of every plugin tag, read now."""
        return reading.read_all(self.provider, ctx, eid, run)

    def _experiment(self, eid: str, create: bool = False):
        """The cached index of ``eid`` (call with ``_index_lock`` held), marked as most
        recently used; ``create`` adds an empty one, evicting the least recently used
        experiment beyond ``max_experiments``."""
        runs = self._indexes.get(eid)
        if runs is not None:
            self._indexes.move_to_end(eid)
        elif create:
            runs = self._indexes[eid] = {}
            while len(self._indexes) > self.max_experiments:
                evicted, _ = self._indexes.popitem(last=False)
                self._full_refresh.pop(evicted, None)
        return runs

    @property
    def n_experiments(self) -> int:
        """Experiments whose index is cached now (at most ``max_experiments``)."""
        return len(self._indexes)

    def index(self, ctx, eid: str) -> Dict[str, Dict[str, List[object]]]:
        """``{run: {tag: [datum]}}`` as cached (read once if nothing is cached yet)."""
        with self._index_lock:
            runs = self._experiment(eid)
        if runs is None:
            return self.refresh(ctx, eid, force=True)
        return {run: entry[1] for run, entry in list(runs.items())}

    def refresh(self, ctx, eid: str, force: bool = False) -> Dict[str, Dict[str, List[object]]]:
        """Re-read every run's index now (unless done less than ``min_refresh`` s ago)."""
        with self._index_lock:
            last = self._full_refresh.get(eid)
        if not force and last is not None and time.monotonic() - last < self.min_refresh:
            return self.index(ctx, eid)
        started = time.monotonic()
        data = self.read_all(ctx, eid)
        with self._index_lock:
            runs = self._experiment(eid, create=True)
            for run in list(runs):
                if run not in data and runs[run][0] <= started:
                    del runs[run]
            for run, tags in data.items():
                if run not in runs or runs[run][0] <= started:
                    runs[run] = (started, tags)
            self._full_refresh[eid] = started
        return data

    def refresh_run(self, ctx, eid: str, run: str, force: bool = False) -> Dict[str, List[object]]:
        """Re-read one run's index (unless done less than ``min_refresh`` s ago)."""
        with self._index_lock:
            entry = (self._experiment(eid) or {}).get(run)
        if not force and entry is not None and time.monotonic() - entry[0] < self.min_refresh:
            return entry[1]
        started = time.monotonic()
        tags = self.read_all(ctx, eid, run).get(run, {})
        with self._index_lock:
            runs = self._experiment(eid, create=True)
            current = runs.get(run)
            if current is None or current[0] <= started:
                if tags:
                    runs[run] = (started, tags)
                else:
                    runs.pop(run, None)
        return tags

    def _background_refresh_run(self, ctx, eid: str, run: str) -> None:
        try:
            self.refresh_run(ctx, eid, run, force=True)
        except Exception:  # the next request retries; never kill the server over it
            logger.warning("conceptevo: background index refresh failed", exc_info=True)
        finally:
            with self._index_lock:
                self._refreshing.discard((eid, run))

    def run_tags(self, ctx, eid: str, run: str) -> Dict[str, List[object]]:
        """``{tag: [datum]}`` of one run, refreshed in the background once older than
        ``index_ttl``; :class:`DataNotFound` for an unknown run."""
        with self._index_lock:
            runs = self._experiment(eid)
            entry = None if runs is None else runs.get(run)
        if runs is None:
            self.refresh(ctx, eid, force=True)
        if entry is None:
            # Unknown run: one full re-read (rate-limited), not one read per name asked for.
            tags = self.refresh(ctx, eid).get(run)
            if not tags:
                raise DataNotFound(self.unknown_run_message(run, self.index(ctx, eid)))
            return tags
        if time.monotonic() - entry[0] > self.index_ttl:
            with self._index_lock:
                start = (eid, run) not in self._refreshing
                self._refreshing.add((eid, run))
            if start:
                threading.Thread(target=self._background_refresh_run, args=(ctx, eid, run), daemon=True,
                                 name="conceptevo-index").start()
        return entry[1]

    def series(self, ctx, eid: str, run: str, tag: str, what: str = "") -> List[object]:
        """Data of one run/tag sorted by step; :class:`DataNotFound` says what is missing."""
        tags = self.run_tags(ctx, eid, run)
        data = tags.get(tag)
        if not data:
            tags = self.refresh_run(ctx, eid, run)
            data = tags.get(tag)
        if not data:
            raise DataNotFound(self._missing_message(tags, run, tag, what))
        return data

    def datum_at(self, ctx, eid: str, run: str, tag: str, step: Optional[int], what: str = ""):
        """The datum of ``run``/``tag`` at ``step`` (None = last), re-reading the run's
        index once when the step is not known yet."""
        try:
            return self.datum(self.series(ctx, eid, run, tag, what), step)
        except DataNotFound:
            self.refresh_run(ctx, eid, run)
            return self.datum(self.series(ctx, eid, run, tag, what), step)

    @staticmethod
    def unknown_run_message(run: str, index: Dict[str, Dict[str, list]]) -> str:
        names = sorted(r for r, tags in index.items() if tags)
        shown = ", ".join(repr(r) for r in names[:20]) + (", ..." if len(names) > 20 else "")
        return f"unknown run {run!r}; runs with concept data: {shown or 'none'}"

    @staticmethod
    def _missing_message(tags, run: str, tag: str, what: str) -> str:
        kind, _quals, _layer = metadata.parse_tag(tag)
        similar = sorted(t for t in tags if (metadata.parse_tag(t) or ("",))[0] == kind)
        shown = ", ".join(similar[:20]) + (", ..." if len(similar) > 20 else "")
        return f"run {run!r} has no {what or kind} data ({tag}); its {kind} tags: {shown or 'none'}"

    datum = staticmethod(reading.datum_at)

    # -- payloads
    def _fetch(self, ctx, refs: Sequence[object], threads: Optional[int] = None) -> List[bytes]:
        """Raw blobs, concurrently: the calls wait on the data server, not on the CPU.

        One long-lived pool (starting threads per request costs more CPU than the reads);
        a batch keeps at most ``threads`` reads in flight, so a request reading hundreds
        of blobs leaves workers free for the next request's three.
        """
        if len(refs) <= 1 or not self.remote:
            return [self.provider.read_blob(ctx, blob_key=ref.blob_key) for ref in refs]
        pool = self._fetch_pool()
        read = lambda ref: self.provider.read_blob(ctx, blob_key=ref.blob_key)  # noqa: E731
        step = max(1, threads or self._fetch_threads)
        out: List[bytes] = []
        for start in range(0, len(refs), step):
            out.extend(pool.map(read, refs[start:start + step]))
        return out

    def _fetch_pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            with self._index_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(2 * self._fetch_threads, thread_name_prefix="conceptevo-blob")
        return self._pool

    def header(self, ctx, datum) -> Dict:
        return self.payload(ctx, datum, [])[0]

    def payload(self, ctx, datum, names: Optional[Sequence[str]] = None, optional: Sequence[str] = (),
                layout_key: Optional[Hashable] = None) -> Tuple[Dict, Dict[str, np.ndarray]]:
        """``(header, arrays)``: the arrays in ``names`` (all when None) plus those of
        ``optional`` that the payload has.  A missing required array is a PayloadError.

        ``layout_key`` (e.g. ``(eid, run, tag)``) names payloads that share an array
        layout, so header and arrays of a new step are fetched in one round trip.
        """
        return self.payloads(ctx, [datum], names, optional, layout_key)[0]

    def payloads(self, ctx, data: Sequence[object], names: Optional[Sequence[str]] = None,
                 optional: Sequence[str] = (), layout_key: Optional[Hashable] = None,
                 threads: Optional[int] = None) -> List[Tuple[Dict, Dict[str, np.ndarray]]]:
        """:meth:`payload` of several datums (e.g. every step of a tag), in at most two
        concurrent rounds of blob reads (headers plus guessed arrays, then the rest) with
        up to ``threads`` reads in flight."""
        wanted = None if names is None else set(names) | set(optional)
        for datum in data:
            if not datum.values:
                raise PayloadError("empty payload")
        template = self._templates.get(layout_key) if layout_key is not None else None

        # Round 1: missing headers, and the arrays the previous layout says we need.
        headers: List[Optional[Dict]] = []
        raw: Dict[Tuple[int, int], bytes] = {}
        round1: List[Tuple[int, int]] = []
        for d, datum in enumerate(data):
            header = self.cache.get(("header", datum.values[0].blob_key, float(datum.wall_time)))
            headers.append(header)
            if header is None:
                round1.append((d, 0))
                if template is not None:
                    round1.extend((d, i) for i, name in enumerate(template, start=1)
                                  if (wanted is None or name in wanted) and i < len(datum.values)
                                  and not self._has_array(datum, i))
        raw.update(zip(round1, self._fetch(ctx, [data[d].values[i] for d, i in round1], threads)))
        for d, datum in enumerate(data):
            if headers[d] is None:
                header = unpack_header(raw[(d, 0)])
                if len(header["arrays"]) != len(datum.values) - 1:
                    raise PayloadError(
                        f"payload lists {len(header['arrays'])} arrays but carries {len(datum.values) - 1}")
                self.cache.put(("header", datum.values[0].blob_key, float(datum.wall_time)), header)
                if layout_key is not None:
                    self._remember_template(layout_key, [spec.get("name") for spec in header["arrays"]])
                headers[d] = header

        # Round 2: arrays still missing (first step of a tag, or a changed layout).
        results: List[Tuple[Dict, Dict[str, np.ndarray]]] = []
        round2: List[Tuple[int, int]] = []
        plans = []
        for d, datum in enumerate(data):
            specs = [(i, spec) for i, spec in enumerate(headers[d]["arrays"], start=1)
                     if wanted is None or spec.get("name") in wanted]
            arrays = {}
            for i, spec in specs:
                cached = self.cache.get(("array", datum.values[i].blob_key, float(datum.wall_time)))
                if cached is not None:
                    arrays[spec["name"]] = cached
                elif (d, i) not in raw:
                    round2.append((d, i))
            plans.append((specs, arrays))
        raw.update(zip(round2, self._fetch(ctx, [data[d].values[i] for d, i in round2], threads)))
        for d, datum in enumerate(data):
            specs, arrays = plans[d]
            for i, spec in specs:
                if spec["name"] not in arrays:
                    array = _readonly(decode_array(spec, raw[(d, i)]))
                    self.cache.put(("array", datum.values[i].blob_key, float(datum.wall_time)), array)
                    arrays[spec["name"]] = array
            if names is not None:
                missing = set(names) - set(arrays)
                if missing:
                    raise PayloadError(f"payload {headers[d].get('kind', '')!r} has no arrays {sorted(missing)}")
            results.append((headers[d], arrays))
        return results

    def _remember_template(self, key: Hashable, names: List[str]) -> None:
        with self._index_lock:
            self._templates[key] = names
            self._templates.move_to_end(key)
            while len(self._templates) > MAX_TEMPLATES:
                self._templates.popitem(last=False)

    def _has_array(self, datum, index: int) -> bool:
        return ("array", datum.values[index].blob_key, float(datum.wall_time)) in self.cache

    def read_ahead(self, key: Hashable, job: Callable[[], object]) -> bool:
        """Run ``job`` (e.g. read every step of the tag just opened) in the background,
        once per ``key``, for remote providers only, one job at a time (read-ahead must
        not starve the requests being served).  Returns whether it was scheduled."""
        if not self.remote:
            return False
        with self._index_lock:
            if key in self._ahead_keys:
                return False
            if len(self._ahead_keys) > 100_000:
                self._ahead_keys.clear()
            self._ahead_keys.add(key)
            if self._ahead_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="conceptevo-ahead")

        def run():
            try:
                job()
            except Exception:  # a foreground request will report the problem properly
                logger.debug("conceptevo: read-ahead failed", exc_info=True)

        self._ahead_pool.submit(run)
        return True

    def memo(self, key: Hashable, compute: Callable[[], object]):
        """Cache a derived value (an encoded answer) under ``key``."""
        return self.cache.get_or_compute(("memo",) + tuple(key), compute)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def datum_key(datum) -> Tuple[int, float]:
    """What identifies a datum's content for caching and ETags."""
    return (int(datum.step), float(datum.wall_time))
