"""Read logged concept data back as numpy arrays, through TensorBoard's data provider.

Going through ``DataProvider`` (never ``open()`` on event files) is what makes the
same code work with the Python loader, with rustboard (``fast=True``) and with any
logdir TensorBoard can read (gs://, s3://, ...).  Tests, the CLI and the plugin
share the low-level functions here; :class:`ConceptReader` wraps them for scripts::

    from tb_conceptevo import ConceptReader
    with ConceptReader("runs") as logs:
        obs = logs.observation("baseline")          # last logged step, all layers
        print(obs["features.0"].image_ids[:3])
"""

from __future__ import annotations

import base64
import bisect
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .format import metadata
from .format.payloads import layer_observation
from .format.summary import PayloadError, decode_array, unpack_header
from .observation import Observation

#: Enough for any realistic number of logged steps; rustboard needs an explicit bound.
MAX_STEPS = 1_000_000


class DataNotFound(KeyError):
    """The requested run / tag / step is not in the logs."""

    def __str__(self):  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- low level

def list_series(provider, ctx, experiment_id: str, run: Optional[str] = None) -> Dict[str, Dict[str, object]]:
    """``{run: {tag: BlobSequenceTimeSeries}}`` of this plugin's tags (metadata only)."""
    if provider is None:
        return {}
    found = provider.list_blob_sequences(
        ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME, run_tag_filter=_run_filter(run)
    )
    return {r: {t: s for t, s in tags.items() if metadata.parse_tag(t)} for r, tags in (found or {}).items()}


def read_all(provider, ctx, experiment_id: str, run: Optional[str] = None,
             tag: Optional[str] = None) -> Dict[str, Dict[str, List[object]]]:
    """``{run: {tag: [BlobSequenceDatum sorted by step]}}`` of this plugin's tags (no blob
    contents), for every run or one (and one tag)."""
    if provider is None:
        return {}
    found = provider.read_blob_sequences(
        ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME,
        downsample=MAX_STEPS, run_tag_filter=_run_filter(run, tag),
    )
    return {
        r: {t: sorted(data, key=lambda d: d.step) for t, data in tags.items() if metadata.parse_tag(t) and data}
        for r, tags in (found or {}).items()
    }


def read_series(provider, ctx, experiment_id: str, run: str, tag: str) -> List[object]:
    """All ``BlobSequenceDatum`` of one run/tag, sorted by step (one small read per tag)."""
    data = read_all(provider, ctx, experiment_id, run, tag).get(run, {}).get(tag)
    if not data:
        raise DataNotFound(f"run {run!r} has no tag {tag!r}")
    return data


def _run_filter(run: Optional[str], tag: Optional[str] = None):
    from tensorboard.data import provider as tb_provider

    if run is None:
        return None
    return tb_provider.RunTagFilter(runs=[run], tags=None if tag is None else [tag])


def datum_at(series: Sequence[object], step: Optional[int]):
    """The datum at ``step`` (None = the last one) of a step-sorted series; the last
    one wins if a step was written twice."""
    if not series:
        raise DataNotFound("no data")
    if step is None:
        return series[-1]
    steps = [d.step for d in series]
    index = bisect.bisect_right(steps, step) - 1
    if index >= 0 and steps[index] == step:
        return series[index]
    raise DataNotFound(f"no data at step {step}; logged steps: {_summarise_steps(steps)}")


def _summarise_steps(steps: Sequence[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:4]))}, ..., {', '.join(map(str, steps[-3:]))}"


def read_header(provider, ctx, datum) -> Dict:
    blobs = datum.values
    if not blobs:
        raise PayloadError("empty payload")
    header = unpack_header(provider.read_blob(ctx, blob_key=blobs[0].blob_key))
    if len(header["arrays"]) != len(blobs) - 1:
        raise PayloadError(f"payload lists {len(header['arrays'])} arrays but carries {len(blobs) - 1}")
    return header


def read_payload(provider, ctx, datum, names: Optional[Sequence[str]] = None) -> Tuple[Dict, Dict[str, np.ndarray]]:
    """``(header, arrays)`` of one datum; only the arrays in ``names`` when given."""
    header = read_header(provider, ctx, datum)
    arrays = {}
    for spec, ref in zip(header["arrays"], datum.values[1:]):
        if names is None or spec["name"] in names:
            arrays[spec["name"]] = decode_array(spec, provider.read_blob(ctx, blob_key=ref.blob_key))
    if names is not None:
        missing = set(names) - set(arrays)
        if missing:
            raise PayloadError(f"payload has no arrays {sorted(missing)}")
    return header, arrays


# ----------------------------------------------------------------------------- providers

def open_provider(logdir: str, fast: bool = False, reload_interval: float = 0):
    """``(data_provider, close)`` for a logdir, loading every step of this plugin.

    ``fast=True`` uses rustboard (TensorBoard's ``--load_fast``) as a subprocess.
    """
    if not fast and not ("://" in str(logdir)) and not os.path.isdir(logdir):
        raise FileNotFoundError(f"logdir {logdir!r} does not exist")
    samples = {metadata.PLUGIN_NAME: 0}
    if fast:
        from tensorboard.data import server_ingester
        from tensorboard.util import grpc_util

        binary = server_ingester.get_server_binary()
        ingester = server_ingester.SubprocessServerDataIngester(
            binary, str(logdir), reload_interval=reload_interval,
            channel_creds_type=grpc_util.ChannelCredsType.LOCAL, samples_per_plugin=samples,
        )
        ingester.start()
        provider = ingester.data_provider
        # rustboard loads asynchronously; wait until it has seen the logdir once.
        _wait_for_rustboard(provider)

        def close():
            # The data server runs with --die-after-stdin: closing its stdin stops it.
            handle = getattr(ingester, "_stdin_handle", None)
            if handle is not None and not handle.closed:
                handle.close()

        return provider, close
    from tensorboard.backend.event_processing import data_ingester, data_provider, plugin_event_multiplexer

    guidance = dict(data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE)
    guidance.update(samples)
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE, tensor_size_guidance=guidance,
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return newest_per_step(data_provider.MultiplexerDataProvider(multiplexer, str(logdir)), multiplexer), lambda: None


class NewestPerStep:
    """A Python-loader ``DataProvider`` whose blob sequences keep the *newest* datum per step.

    TensorBoard's ``MultiplexerDataProvider`` answers with the first event it read for
    a step, so after a restart that rewrites step 2 (with or without ``purge_step``:
    the accumulator ignores the first ``SessionLog.START`` it sees) the old data would be
    served until TensorBoard restarts.  rustboard keeps the newest; this wrapper makes
    the Python loader agree.  It reads the multiplexer's in-memory events only (no file
    is opened) and hands out its own blob keys, which name the datum's wall time, so a
    key of the old datum never resolves to the new one.  Everything else is delegated.
    """

    _KEY_PREFIX = "n"

    def __init__(self, provider, multiplexer):
        self._inner = provider
        self._multiplexer = multiplexer

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def read_blob_sequences(self, ctx=None, *, experiment_id, plugin_name, downsample=None, run_tag_filter=None):
        from tensorboard.data import provider as tb_provider

        listed = self._inner.list_blob_sequences(ctx, experiment_id=experiment_id, plugin_name=plugin_name,
                                                 run_tag_filter=run_tag_filter)
        result = {}
        for run, tags in listed.items():
            result[run] = {}
            for tag in tags:
                newest = {}
                for event in self._multiplexer.Tensors(run, tag):
                    newest[event.step] = event  # later events overwrite earlier ones
                data = []
                for step in sorted(newest):
                    event = newest[step]
                    dims = event.tensor_proto.tensor_shape.dim
                    count = int(dims[0].size) if dims else 0
                    keys = [self._key(experiment_id, plugin_name, run, tag, step, event.wall_time, i)
                            for i in range(count)]
                    data.append(tb_provider.BlobSequenceDatum(
                        step=step, wall_time=event.wall_time,
                        values=tuple(tb_provider.BlobReference(blob_key=k) for k in keys)))
                result[run][tag] = data if downsample is None else _keep_evenly(data, downsample)
        return result

    def read_blob(self, ctx=None, *, blob_key):
        from tensorboard import errors
        from tensorboard.util import tensor_util

        if not blob_key.startswith(self._KEY_PREFIX):
            return self._inner.read_blob(ctx, blob_key=blob_key)
        try:
            _, _, run, tag, step, wall_time, index = json.loads(
                base64.urlsafe_b64decode(blob_key[len(self._KEY_PREFIX):] + "=="))
        except (ValueError, TypeError) as error:
            raise errors.NotFoundError(f"malformed blob key {blob_key!r}") from error
        try:
            events = self._multiplexer.Tensors(run, tag)
        except KeyError as error:
            raise errors.NotFoundError(f"no run {run!r} / tag {tag!r}") from error
        event = next((e for e in reversed(events) if e.step == step and e.wall_time == wall_time), None)
        if event is None:
            raise errors.NotFoundError(f"no datum of {run!r}/{tag!r} at step {step} written at {wall_time}")
        return tensor_util.make_ndarray(event.tensor_proto)[index]

    def _key(self, *fields) -> str:
        text = json.dumps(list(fields), separators=(",", ":"))
        return self._KEY_PREFIX + base64.urlsafe_b64encode(text.encode()).decode("ascii").rstrip("=")


def _keep_evenly(data: List[object], count: int) -> List[object]:
    """At most ``count`` items, evenly spaced, always with the last (like TensorBoard's downsampling)."""
    if count <= 0:
        return []
    if len(data) <= count:
        return data
    picks = np.linspace(0, len(data) - 1, count).round().astype(int)
    return [data[i] for i in np.unique(picks)]


def newest_per_step(provider, multiplexer=None):
    """``provider`` reading the newest datum per step (see :class:`NewestPerStep`).

    Only TensorBoard's in-process Python loader needs it; any other provider (rustboard,
    a remote one) is returned unchanged.
    """
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider

    if not isinstance(provider, MultiplexerDataProvider):
        return provider
    multiplexer = multiplexer if multiplexer is not None else getattr(provider, "_multiplexer", None)
    return provider if multiplexer is None else NewestPerStep(provider, multiplexer)


def is_in_process(provider) -> bool:
    """Whether reads are CPU work in this process (Python loader) rather than round trips."""
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider

    return isinstance(provider, (MultiplexerDataProvider, NewestPerStep))


def _wait_for_rustboard(provider, timeout: float = 60.0) -> None:
    import time

    from tensorboard import context as tb_context

    deadline = time.time() + timeout
    ctx = tb_context.RequestContext()
    while time.time() < deadline:
        # The data server answers with no runs until its first load completes.
        if provider.list_runs(ctx, experiment_id=""):
            time.sleep(0.5)  # let the first load finish reading every file
            return
        time.sleep(0.2)


# ----------------------------------------------------------------------------- ConceptReader

class ConceptReader:
    """Read a logdir's concept data (stimuli, embeddings, probe) as numpy arrays.

    Args:
        logdir: directory (or URL TensorBoard understands) with one sub-directory per run.
        fast: read through rustboard instead of the Python loader.
        provider: an existing TensorBoard ``DataProvider`` (then ``logdir`` is ignored).
    """

    def __init__(self, logdir: Optional[str] = None, fast: bool = False, provider=None, experiment_id: str = ""):
        from tensorboard import context as tb_context

        if provider is None:
            if logdir is None:
                raise ValueError("give a logdir or a data provider")
            provider, self._close = open_provider(logdir, fast=fast)
        else:
            self._close = lambda: None
        self.provider = provider
        self.ctx = tb_context.RequestContext()
        self.experiment_id = experiment_id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._close()

    # -- listing
    def series(self, run: Optional[str] = None) -> Dict[str, Dict[str, object]]:
        return list_series(self.provider, self.ctx, self.experiment_id, run)

    def runs(self) -> List[str]:
        """Runs that have concept data, sorted."""
        return sorted(r for r, tags in self.series().items() if tags)

    def layers(self, run: str) -> List[str]:
        tags = self._tags(run)
        return sorted(p[2] for p in map(metadata.parse_tag, tags) if p and p[0] == metadata.STIMULI)

    def steps(self, run: str, layer: Optional[str] = None) -> List[int]:
        """Steps with stimuli logged (for ``layer``, or the union over layers)."""
        layers = [layer] if layer else self.layers(run)
        steps = set()
        for name in layers:
            steps.update(d.step for d in self._series(run, metadata.stimuli_tag(name)))
        return sorted(steps)

    def _tags(self, run: str) -> Dict[str, object]:
        tags = self.series(run).get(run)
        if not tags:
            raise DataNotFound(f"run {run!r} has no tb_conceptevo data; runs with data: {self.runs()}")
        return tags

    def _series(self, run: str, tag: str):
        return read_series(self.provider, self.ctx, self.experiment_id, run, tag)

    # -- payloads
    def payload(self, run: str, tag: str, step: Optional[int] = None, names=None):
        datum = datum_at(self._series(run, tag), step)
        return read_payload(self.provider, self.ctx, datum, names)

    def observation(self, run: str, step: Optional[int] = None, layers: Optional[Sequence[str]] = None) -> Observation:
        """Stimuli of ``layers`` (default all) at ``step`` (default: the last logged step)."""
        layers = list(layers) if layers else self.layers(run)
        if not layers:
            raise DataNotFound(f"run {run!r} has no stimuli logged")
        if step is None:
            step = self.steps(run, layers[0])[-1]
        obs = Observation(step=step)
        for layer in layers:
            header, arrays = self.payload(run, metadata.stimuli_tag(layer), step)
            obs.layers[layer] = layer_observation(header, arrays, step)
            obs.probe_hash = obs.layers[layer].probe_hash
            obs.layers[layer].image_links = self._image_links(run, layer, step)
        return obs

    def _image_links(self, run: str, layer: str, step: int) -> Optional[np.ndarray]:
        """``image_links`` of ``layer`` at ``step``, or None (logs without them)."""
        tag = metadata.image_links_tag(layer)
        if tag not in self._tags(run):
            return None
        series = [d for d in self._series(run, tag) if d.step == step]
        if not series:
            return None
        _header, arrays = read_payload(self.provider, self.ctx, series[-1], ("neurons",))
        links = arrays["neurons"].astype(np.int32)
        if arrays["neurons"].dtype == np.uint16:
            links[arrays["neurons"] == 65535] = -1
        return links

    def observations(self, run: str, layers: Optional[Sequence[str]] = None) -> Iterator[Observation]:
        """Every logged step of ``run``, in ascending order."""
        for step in self.steps(run, (list(layers) if layers else self.layers(run) or [None])[0]):
            yield self.observation(run, step, layers)

    def embedding(self, run: str, space: str, layer: str, step: Optional[int] = None):
        from .spaces.base import Embedding

        header, arrays = self.payload(run, metadata.space_tag(space, layer), step)
        groups = arrays.get("groups")
        return Embedding(
            vectors=arrays["vectors"].astype(np.float32), layout=arrays["layout"].astype(np.float32),
            placed=arrays["placed"].astype(bool), groups=None if groups is None else groups.astype(np.int32),
        )

    def space_steps(self, run: str, space: str, layer: str) -> List[int]:
        try:
            return [d.step for d in self._series(run, metadata.space_tag(space, layer))]
        except DataNotFound:
            return []

    def scalars(self, run: str) -> Dict[str, List[Tuple[int, float]]]:
        """``{tag: [(step, value), ...]}`` of every scalar series of ``run``."""
        return read_all_scalars(self.provider, self.ctx, self.experiment_id, run)

    def probe(self, run: str) -> Tuple[Dict, Dict[str, np.ndarray]]:
        """Header (hash, sizes, labels, vocabulary) and thumbnail atlases of the run's probe set."""
        return self.payload(run, metadata.probe_tag(), None)


#: The former name of :class:`ConceptReader` (kept so existing scripts keep working).
LogReader = ConceptReader


def read_all_scalars(provider, ctx, experiment_id: str, run: str,
                     downsample: int = MAX_STEPS) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar series of ``run`` (ours under ``concepts/`` and the user's own)."""
    run_filter = _run_filter(run)
    listed = provider.list_scalars(ctx, experiment_id=experiment_id, plugin_name="scalars",
                                   run_tag_filter=run_filter).get(run, {})
    if not listed:
        return {}
    found = provider.read_scalars(ctx, experiment_id=experiment_id, plugin_name="scalars",
                                  downsample=downsample, run_tag_filter=run_filter)
    return {tag: [(d.step, d.value) for d in data] for tag, data in found.get(run, {}).items()}
