"""The ``conceptevo`` TensorBoard plugin: routes of ``docs/http_api.md``.

Handlers are thin: validate parameters (:mod:`.web`), read through
``context.data_provider`` (:mod:`.store`), shape the answer (:mod:`.views`).
Per-step answers are immutable once logged, so they carry an ETag derived from the
data's ``(step, wall_time)`` and are memoised in the store's bounded LRU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Dict, List, Optional

from tensorboard import errors as tb_errors
from tensorboard import plugin_util
from tensorboard.plugins import base_plugin

from ..format import metadata
from ..reading import DataNotFound, newest_per_step, read_all_scalars
from ..format.summary import PayloadError, plugin_content_version
from . import views, web
from .web import BadRequest, route
from .store import READ_AHEAD_THREADS, Store, datum_key

logger = logging.getLogger(__name__)

#: Shipped frontend files (the only directory static routes ever read).
STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
_STATIC_TYPES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".map": "application/json",
    ".json": "application/json", ".png": "image/png", ".svg": "image/svg+xml", ".wasm": "application/wasm",
    ".woff2": "font/woff2", ".txt": "text/plain",
}
_STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}){0,3}")
#: Rows per scalar series read for ``/metrics`` (the loaders keep 1,000 by default).
MAX_SCALAR_POINTS = 100_000


class ConceptEvoPlugin(base_plugin.TBPlugin):
    """Serves concept maps, neuron stories, labels and metrics of the logdir."""

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context, cache_bytes: Optional[int] = None):
        # The Python loader serves the first datum of a rewritten step; read the newest.
        self._provider = newest_per_step(context.data_provider, getattr(context, "multiplexer", None))
        self._store = Store(self._provider, **({} if cache_bytes is None else {"cache_bytes": cache_bytes}))

    # ------------------------------------------------------------------ TensorBoard hooks
    def is_active(self):
        # TensorBoard marks the tab active when the data provider lists data of
        # data_plugin_names() (cheap); nothing else can make it active.
        return False

    def data_plugin_names(self):
        return (metadata.PLUGIN_NAME,)

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js", tab_name="Concept Evolution")

    def get_plugin_apps(self):
        return {
            "/static/*": self._serve_static,
            "/runs": self._serve_runs,
            "/probe": self._serve_probe,
            "/atlas": self._serve_atlas,
            "/patch": self._serve_patch,
            "/map": self._serve_map,
            "/labels": self._serve_labels,
            "/neuron": self._serve_neuron,
            "/metrics": self._serve_metrics,
            "/categories": self._serve_categories,
            "/anchors": self._serve_anchors,
            "/importance": self._serve_importance,
            "/revert": self._serve_revert,
        }

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _ctx(request):
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)

    def _datum(self, ctx, eid, run, tag, step, what):
        return self._store.datum_at(ctx, eid, run, tag, step, what)

    def _cached_answer(self, request, key, content_type, encode):
        """Answer immutable data named by ``key``: 304 when the client has it, else the
        encoded answer, computed once and kept in the store's LRU.  ``encode`` returns
        the body, or ``(body, extra headers)``."""
        etag = web.etag_of(*key)
        if web.not_modified(request, etag):
            return web.respond(request, b"", content_type, etag=etag)
        answer = self._store.memo(key, encode)
        body, headers = answer if isinstance(answer, tuple) else (answer, ())
        return web.respond(request, body, content_type, etag=etag, headers=headers)

    def _json_answer(self, request, ctx, eid, run, tag, datum, shape, names=None, **read):
        """The cached JSON answer ``shape(header, arrays)`` of one datum (arrays ``names``,
        all when None; ``read``: the store's ``optional`` / ``layout_key``)."""
        def encode():
            header, arrays = self._store.payload(ctx, datum, names, **read)
            return web.dumps(shape(header, arrays))

        return self._cached_answer(request, (shape.__name__, eid, run, tag) + datum_key(datum), web.JSON, encode)

    def _layer_datum(self, request, ctx, eid, qualifier: str, make_tag):
        """``(run, tag, datum)`` of a per-layer route: ``run``, ``<qualifier>`` (a space or
        detector name), ``layer`` and ``step`` parameters."""
        run = web.run_param(request)
        name = web.name_param(request, qualifier)
        layer = web.name_param(request, "layer")
        step = web.int_param(request, "step")
        tag = make_tag(name, layer)
        return run, tag, self._datum(ctx, eid, run, tag, step, f"{qualifier} {name!r} for layer {layer!r}")

    # ------------------------------------------------------------------ static
    @route
    def _serve_static(self, request):
        marker = f"/plugin/{metadata.PLUGIN_NAME}/static/"  # robust to --path_prefix and experiment ids
        path = request.path
        index = path.find(marker)
        name = path[index + len(marker):] if index >= 0 else ""
        files = _static_files()
        if not _STATIC_NAME.fullmatch(name) or ".." in name or name not in files:
            raise DataNotFound(f"no static file {name!r}; shipped files: {sorted(files)}")
        full = files[name]
        with open(full, "rb") as handle:  # a shipped package file, never a logdir path
            content = handle.read()
        content_type = _STATIC_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
        etag = web.etag_of("static", name, hashlib.sha1(content).hexdigest())
        return web.respond(request, content, content_type, etag=etag)

    # ------------------------------------------------------------------ /runs
    @route
    def _serve_runs(self, request):
        ctx, eid = self._ctx(request)
        warnings: List[str] = []
        listed = self._store.list_series(ctx, eid)
        newer = set()
        for run, tags in listed.items():
            for tag, series in tags.items():
                version = plugin_content_version(getattr(series, "plugin_content", b""))
                if version is not None and version > metadata.FORMAT_VERSION:
                    newer.add((run, tag))
                    warnings.append(
                        f"run {run!r}: tag {tag!r} has format version {version}, newer than this "
                        f"tb_conceptevo understands ({metadata.FORMAT_VERSION}); upgrade tb_conceptevo")
        data = self._store.refresh(ctx, eid, force=True)  # the menu is always read fresh
        runs = {}
        for run in sorted(data, key=views.natural_key):
            tags = {t: d for t, d in data[run].items() if (run, t) not in newer and d}
            if tags:
                runs[run] = tags
        self._prefetch_probe_headers(ctx, runs)
        summaries = []
        for run, tags in runs.items():
            # One run the data server cannot read must not take the others down with it.
            try:
                probe_hash = self._probe_hash(ctx, run, tags, warnings)
            except tb_errors.PublicError as exc:
                warnings.append(_unreadable_run_message(run, exc))
                continue
            summaries.append(views.run_summary(run, tags, probe_hash))
        return web.respond(request, views.runs_answer(summaries, warnings), web.JSON)

    def _prefetch_probe_headers(self, ctx, runs: Dict[str, Dict[str, list]]) -> None:
        """Read every run's probe header in one concurrent batch (one round trip on rustboard)."""
        data = [tags[metadata.probe_tag()][-1] for tags in runs.values() if metadata.probe_tag() in tags]
        try:
            self._store.payloads(ctx, data, [])
        except (PayloadError, tb_errors.PublicError):
            pass  # _probe_hash reads them one by one and reports the unreadable ones

    def _probe_hash(self, ctx, run: str, tags: Dict[str, list], warnings: List[str]) -> Optional[str]:
        """The run's probe hash: from the probe payload, else from any stimuli/space header."""
        candidates = [metadata.probe_tag()] + sorted(
            t for t in tags if (metadata.parse_tag(t) or ("",))[0] in (metadata.STIMULI, metadata.SPACE))
        for tag in candidates:
            data = tags.get(tag)
            if not data:
                continue
            try:
                value = self._store.header(ctx, data[-1]).get("probe_hash")
            except PayloadError as exc:
                warnings.append(f"run {run!r}: tag {tag!r} cannot be read: {exc}")
                continue
            if value:
                return str(value)
        return None

    # ------------------------------------------------------------------ probe images
    def _probe(self, ctx, eid, run, names=(), optional=()):
        datum = self._datum(ctx, eid, run, metadata.probe_tag(), None, "probe set")
        header, arrays = self._store.payload(ctx, datum, list(names), optional=optional)
        return datum, header, arrays

    @route
    def _serve_probe(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        datum, header, arrays = self._probe(ctx, eid, run, optional=["labels"])
        return self._cached_answer(request, ("probe", eid, run) + datum_key(datum), web.JSON,
                                   lambda: web.dumps(views.probe_answer(header, arrays)))

    @route
    def _serve_atlas(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        index = web.int_param(request, "index")
        datum, header, _ = self._probe(ctx, eid, run)
        n_atlases = int(header.get("n_atlases", 0))
        if index >= n_atlases:
            raise DataNotFound(f"run {run!r} has {n_atlases} thumbnail atlases; index must be < {n_atlases}")
        return self._cached_answer(request, ("atlas", eid, run, index) + datum_key(datum), web.PNG,
                                   lambda: self._store.payload(ctx, datum, [f"atlas_{index}"])[1][f"atlas_{index}"].tobytes())

    @route
    def _serve_patch(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        image = web.int_param(request, "image")
        box = [web.number_param(request, name) for name in ("x0", "y0", "x1", "y1")]
        datum, header, _ = self._probe(ctx, eid, run)
        n_images = int(header.get("n_images", 0))
        if image >= n_images:
            raise DataNotFound(f"run {run!r}: probe set has {n_images} images; image must be < {n_images}")
        height, width = header["image_size"]
        x0, y0, x1, y1 = box
        if not (x0 < x1 <= width and y0 < y1 <= height):
            raise BadRequest(f"box ({x0}, {y0}, {x1}, {y1}) must satisfy 0 <= x0 < x1 <= {width} and "
                             f"0 <= y0 < y1 <= {height} (input pixels, as returned by /neuron)")
        grid = int(header.get("atlas_grid", 16))
        atlas_index = image // (grid * grid)
        if atlas_index >= int(header.get("n_atlases", 0)):
            raise DataNotFound(f"run {run!r} logged no thumbnails for image {image}")

        def decoded_atlas():
            _, arrays = self._store.payload(ctx, datum, [f"atlas_{atlas_index}"])
            return views.decode_png(arrays[f"atlas_{atlas_index}"])

        def encode():
            atlas = self._store.memo(("atlas-pixels", eid, run, atlas_index) + datum_key(datum), decoded_atlas)
            thumbnail = views.patch_cell(atlas, image, grid, header["thumbnail_size"])
            return views.encode_png(views.crop_box(thumbnail, box, (height, width)))

        return self._cached_answer(request, ("patch", eid, run, image, tuple(box)) + datum_key(datum), web.PNG, encode)

    # ------------------------------------------------------------------ /map
    @route
    def _serve_map(self, request):
        ctx, eid = self._ctx(request)
        run, tag, datum = self._layer_datum(request, ctx, eid, "space", metadata.space_tag)

        def encode():
            _, arrays = self._store.payload(ctx, datum, ["layout"], optional=["groups"], layout_key=(eid, run, tag))
            layout = arrays["layout"]
            try:
                body = views.map_bytes(layout, arrays.get("groups"))
            except ValueError as exc:
                raise PayloadError(str(exc)) from None
            return body, [("X-Conceptevo-Unplaced", str(views.unplaced_count(layout)))]

        series = self._store.series(ctx, eid, run, tag)
        # Whoever opens a layer's map usually scrubs through its steps next.
        self._store.read_ahead(("map", eid, run, tag, len(series), series[-1].wall_time),
                               lambda: self._store.payloads(ctx, series, ["layout"], optional=["groups"],
                                                            layout_key=(eid, run, tag), threads=READ_AHEAD_THREADS))
        return self._cached_answer(request, ("map", eid, run, tag) + datum_key(datum), web.BINARY, encode)

    # ------------------------------------------------------------------ /labels, /categories
    @route
    def _serve_labels(self, request):
        ctx, eid = self._ctx(request)
        run, tag, datum = self._layer_datum(request, ctx, eid, "detector", metadata.detector_tag)
        return self._json_answer(request, ctx, eid, run, tag, datum, views.labels_answer, views.LABEL_ARRAYS,
                                 optional=views.LABEL_OPTIONAL_ARRAYS, layout_key=(eid, run, tag))

    @route
    def _serve_categories(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        detector = web.name_param(request, "detector")
        step = web.int_param(request, "step")
        tags = self._store.run_tags(ctx, eid, run)
        found = {}
        for tag, data in tags.items():
            kind, quals, layer = metadata.parse_tag(tag)
            if kind != metadata.DETECTOR or quals[0] != detector:
                continue
            try:
                found[layer] = (tag, self._store.datum(data, step))
            except DataNotFound:
                continue
        read = self._store.payloads(ctx, [datum for _, datum in found.values()], [])
        headers = {layer: header for layer, (header, _) in zip(found, read)}
        keys = [(tag,) + datum_key(datum) for tag, datum in found.values()]
        if not headers:
            raise DataNotFound(f"run {run!r} has no detector {detector!r} data at step {step}; "
                               "see /runs for its detectors and steps")
        etag = web.etag_of("categories", eid, run, detector, step, tuple(sorted(keys)))
        return web.respond(request, views.categories_answer(headers), web.JSON, etag=etag)

    # ------------------------------------------------------------------ /neuron
    @route
    def _serve_neuron(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        layer = web.name_param(request, "layer")
        channel = web.int_param(request, "channel")
        step = web.int_param(request, "step")
        space = web.name_param(request, "space", required=False)
        detector = web.name_param(request, "detector", required=False)

        stimuli_tag = metadata.stimuli_tag(layer)
        datum = self._datum(ctx, eid, run, stimuli_tag, step, f"stimuli for layer {layer!r}")
        stimuli_series = self._store.series(ctx, eid, run, stimuli_tag)
        space_series = detector_series = []
        space_tag = detector_tag = None
        if space is not None:
            space_tag = metadata.space_tag(space, layer)
            space_series = self._store.series(ctx, eid, run, space_tag, f"space {space!r} for layer {layer!r}")
        if detector is not None:
            detector_tag = metadata.detector_tag(detector, layer)
            detector_series = self._store.series(ctx, eid, run, detector_tag,
                                                 f"detector {detector!r} for layer {layer!r}")
        etag = web.etag_of("neuron", eid, run, layer, channel, step, space, detector,
                            tuple(datum_key(d) for d in stimuli_series),
                            tuple(datum_key(d) for d in space_series),
                            tuple(datum_key(d) for d in detector_series))
        if web.not_modified(request, etag):
            return web.respond(request, b"", web.JSON, etag=etag)

        stimuli_names = ["image_ids", "activations", "positions"]
        header, arrays = self._store.payload(ctx, datum, stimuli_names, optional=["invalid"],
                                             layout_key=(eid, run, stimuli_tag))
        n_neurons = int(arrays["image_ids"].shape[0])
        if channel >= n_neurons:
            raise DataNotFound(f"layer {layer!r} of run {run!r} has {n_neurons} neurons; channel must be < {n_neurons}")

        def every_step(series, names, tag, optional=()):  # one concurrent batch per tag (cached afterwards)
            read = self._store.payloads(ctx, series, names, optional=optional, layout_key=(eid, run, tag))
            return [(int(d.step), h, a) for d, (h, a) in zip(series, read)]

        story = views.neuron_story(
            run, layer, channel, step, header, arrays,
            stimuli_steps=every_step(stimuli_series, stimuli_names, stimuli_tag),
            space_steps=every_step(space_series, ["layout"], space_tag),
            label_steps=every_step(detector_series, views.LABEL_ARRAYS, detector_tag,
                                   optional=views.LABEL_OPTIONAL_ARRAYS))
        return web.respond(request, story, web.JSON, etag=etag)

    # ------------------------------------------------------------------ /metrics
    @route
    def _serve_metrics(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        if self._provider is None:
            raise DataNotFound(f"unknown run {run!r}: TensorBoard has no data provider")
        runs = {r.run_name for r in self._provider.list_runs(ctx, experiment_id=eid)}
        if run not in runs:
            shown = ", ".join(repr(r) for r in sorted(runs)[:20])
            raise DataNotFound(f"unknown run {run!r}; runs: {shown or 'none'}")
        series = read_all_scalars(self._provider, ctx, eid, run, downsample=MAX_SCALAR_POINTS)
        return web.respond(request, views.scalars_answer(series), web.JSON)

    # ------------------------------------------------------------------ /anchors
    @route
    def _serve_anchors(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        space = web.name_param(request, "space")
        tag = metadata.anchors_tag(space)
        datum = self._datum(ctx, eid, run, tag, None, f"anchors of space {space!r}")
        return self._json_answer(request, ctx, eid, run, tag, datum, views.anchors_answer, ["layout"])

    # ------------------------------------------------------------------ /importance, /revert
    @route
    def _serve_importance(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        class_index = web.int_param(request, "class", maximum=2**31 - 1)
        layer = web.name_param(request, "layer")
        step = web.int_param(request, "step", required=False)
        tag = metadata.importance_tag(class_index, layer)
        return self._table(request, ctx, eid, run, tag, step, views.importance_answer,
                           f"importance of class {class_index} for layer {layer!r}")

    @route
    def _serve_revert(self, request):
        ctx, eid = self._ctx(request)
        run = web.run_param(request)
        class_index = web.int_param(request, "class", maximum=2**31 - 1)
        step = web.int_param(request, "step", required=False)
        tag = metadata.revert_tag(class_index)
        return self._table(request, ctx, eid, run, tag, step, views.revert_answer,
                           f"revert evaluation of class {class_index}")

    def _table(self, request, ctx, eid, run, tag, step, shape, what):
        datum = self._datum(ctx, eid, run, tag, step, what)
        return self._json_answer(request, ctx, eid, run, tag, datum, shape)


def _unreadable_run_message(run: str, exc: Exception) -> str:
    hint = ""
    if metadata.rustboard_unreadable(run):
        hint = (" TensorBoard's data server (--load_fast, rustboard) cannot read runs whose names hold quotes, "
                "backslashes or control characters: rename the run directory, or start tensorboard with "
                "--load_fast=false.")
    return f"run {run!r} cannot be read and is not shown: {exc}.{hint}"


def _static_files() -> Dict[str, str]:
    """``{relative name: absolute path}`` of the shipped static files (the whitelist)."""
    files = {}
    if not os.path.isdir(STATIC_DIR):
        return files
    for root, _dirs, names in os.walk(STATIC_DIR):
        for name in names:
            full = os.path.join(root, name)
            relative = os.path.relpath(full, STATIC_DIR).replace(os.sep, "/")
            if os.path.isfile(full) and not os.path.islink(full):
                files[relative] = full
    return files
