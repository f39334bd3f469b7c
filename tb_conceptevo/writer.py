"""``ConceptWriter``: a ``SummaryWriter`` that also logs what every neuron has learned.

::

    from tb_conceptevo import ConceptWriter, probes
    writer = ConceptWriter("runs/baseline", probe=probes.ConceptShapes(n=1024))
    for epoch in range(epochs):
        train_one_epoch(model)
        writer.add_scalar("train/loss", loss, epoch)
        writer.add_concepts(model, step=epoch)

Everything is written through TensorBoard's protos (no TensorFlow).  Tags and
payloads are documented in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from .format import metadata
from .event_files import NullFileWriter, use_native_crc
from .observation import Observation
from .metrics.anchors import interpretable_counts, interpretable_fraction
from .metrics.snapshot import anchor_vectors, embedding_metrics, whole_model
from .image_links import DEFAULT_LINKS, ImageLinksRecorder, attach_links
from .format.payloads import (anchors_payload, detection_payload, embedding_payload, image_links_payload, probe_payload,
                       stimuli_payload)
from .recording import rank_and_world, record
from .spaces.io import is_url
from .format.summary import payload_summary

#: Default ``max_queue`` of the event writer: room for every event of a snapshot.
SNAPSHOT_QUEUE = 1024

#: Default ``rotate_bytes`` for logdirs at URLs (object stores re-upload a file at every flush).
REMOTE_ROTATE_BYTES = 2**20


class ConceptWriter(SummaryWriter):
    """``SummaryWriter`` with :meth:`add_concepts`.

    Args:
        log_dir: the run's directory (as for ``SummaryWriter``).
        probe: the :class:`~tb_conceptevo.probes.ProbeSet` every snapshot is recorded on
            (use the same one for every run you want to compare).
        layers: module names or modules (default: every ``nn.Conv2d``).
        k: stimuli kept per neuron.
        spaces: semantic spaces to place neurons in at every snapshot
            (:class:`~tb_conceptevo.spaces.ConceptEvoSpace`, :class:`~tb_conceptevo.spaces.TextSpace`).
        detectors: concept detectors to run besides those the spaces need.
        batch_size: probe images per forward pass.
        reduce: ``"max"`` or ``"mean"`` spatial reduction of a channel's map.
        thumbnail_size: longest side of the logged probe thumbnails (default 64, or 32
            above 4,096 images).
        keep_previous_weights: keep a CPU copy of the weights at the last snapshot so
            :meth:`add_concept_importance` can compare with "the last snapshot".
        progress: tqdm progress bars.
        rotate_bytes: start a new event file after a snapshot once the current one holds
            this many bytes of concept payloads.  Object stores (``s3://``) have no append:
            every flush re-uploads the whole file, so without rotation a run's upload cost
            grows with the square of its length.  Default: 1 MiB for URL logdirs, never
            for local ones (``0`` or ``None`` turns it off).
        image_links: per probe image and layer, how many most responsive channels to
            log (ConceptEvo's indirect image embeddings, Step 2.1); 0 = none.
        **kwargs: passed to ``SummaryWriter`` (``max_queue`` defaults to
            :data:`SNAPSHOT_QUEUE` here: a snapshot's events are queued at once, then flushed).

    Under ``torch.distributed`` create the writer on every rank and call
    :meth:`add_concepts` on every rank (it is collective); only rank 0 writes.
    """

    def __init__(self, log_dir: Optional[str] = None, probe=None, layers=None, k: int = 10, *,
                 spaces: Sequence = (), detectors: Sequence = (), batch_size: int = 64,
                 reduce: str = "max", thumbnail_size: Optional[int] = None,
                 keep_previous_weights: bool = False, progress: bool = True,
                 image_links: int = DEFAULT_LINKS, rotate_bytes="auto", **kwargs):
        for space in spaces:
            metadata.check_name(space.name, "space name")
        self._is_writer_rank = rank_and_world()[0] == 0
        # A snapshot writes its events in one burst (104 on mobilenet_v3_small) and then
        # flushes, so a queue that holds them all does not hold more than the snapshot
        # already does; with SummaryWriter's 10 the training thread waited for the
        # writing thread ten events at a time (measured: 18.7 -> 13.5 ms a snapshot).
        kwargs.setdefault("max_queue", SNAPSHOT_QUEUE)
        super().__init__(log_dir, **kwargs)
        _warn_unservable_run_name(self.log_dir)
        self.probe = probe
        self.layers = layers
        self.k = k
        self.spaces = list(spaces)
        self.detectors = list(detectors)
        self.batch_size = batch_size
        self.reduce = reduce
        self.thumbnail_size = thumbnail_size
        self.keep_previous_weights = keep_previous_weights
        self.progress = progress
        self.image_links = int(image_links)
        self._snapshots: List[tuple] = []  # [(step, CPU state_dict)], at most two
        self._probe_written = False
        self._anchors_written = set()
        self._previous_vectors: Dict[tuple, tuple] = {}
        self._staged: Optional[List] = None  # writes held back until a snapshot is complete
        if rotate_bytes == "auto":
            rotate_bytes = REMOTE_ROTATE_BYTES if is_url(self.log_dir) else None
        self.rotate_bytes = int(rotate_bytes) if rotate_bytes else None
        self._bytes_in_file = 0
        if self._is_writer_rank:
            _say_when_unlabelled(self.all_detectors(), probe)

    def _get_file_writer(self):
        if not getattr(self, "_is_writer_rank", True):
            if self.file_writer is None:
                self.file_writer = NullFileWriter(self.log_dir)
            return self.file_writer
        opened = self.file_writer
        file_writer = super()._get_file_writer()
        if file_writer is not opened:  # a new event file
            use_native_crc(file_writer)
        return file_writer

    # ------------------------------------------------------------------ public
    def all_detectors(self) -> List:
        """Detectors run at each snapshot: those given plus those the spaces need."""
        found = []
        for detector in list(self.detectors) + [s.detector for s in self.spaces if s.detector is not None]:
            if all(d is not detector for d in found):
                if any(d.name == detector.name for d in found):
                    raise ValueError(f"two different detectors are named {detector.name!r}; give them distinct names")
                found.append(detector)
        return found

    def add_concepts(self, model: torch.nn.Module, step: int, layers=None) -> Observation:
        """Record the model's neurons on the probe set and log everything for ``step``.

        Logs, per layer: the top-k stimuli; per detector: each neuron's top concepts
        and the interpretable-neuron counts; per space: embedding, 2-D layout and the
        metrics (differential entropy, evolution speed, ``d_anchor``) as scalars.
        Returns the :class:`~tb_conceptevo.observation.Observation`.

        Nothing is written unless the whole snapshot was computed; hooks are removed and
        the model's mode restored even when it raises.
        """
        if self.probe is None:
            raise ValueError("ConceptWriter needs a probe set: ConceptWriter(log_dir, probe=probes.ConceptShapes())")
        step = check_step(step)
        for space in self.spaces:  # before the costly pass: a mismatch is a setup error
            space.check_probe(self.probe.hash)
        detectors = self.all_detectors()
        layer_spec = layers if layers is not None else self.layers
        layer_names = servable_layers(model, layer_spec)
        consumers = [d.consumer(self.probe, layer_names) for d in detectors]
        # image -> most responsive channels, for ConceptEvo's indirect embeddings
        links = [ImageLinksRecorder(self.image_links)] if self.image_links > 0 else []
        observation = record(model, self.probe, layer_names, k=self.k, batch_size=self.batch_size,
                             reduce=self.reduce, consumers=consumers + links, step=step, progress=self.progress)
        if links:
            attach_links(observation, links[0].result())
        detections = {d.name: c.result() for d, c in zip(detectors, consumers)}
        embeddings = {}
        for space in self.spaces:
            detection_of = detections.get(space.detector.name) if space.detector is not None else None
            for name, layer_obs in observation.items():
                detection = detection_of.get(name) if detection_of is not None else None
                embeddings[(space.name, name)] = space.embed(layer_obs, detection)
        if self._is_writer_rank:
            self._write_snapshot(observation, detections, embeddings, step)
        if self.keep_previous_weights:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            # Two snapshots: importance "since the last snapshot" may be asked before or
            # after this step's add_concepts.
            self._snapshots = [s for s in self._snapshots if s[0] != step][-1:] + [(step, state)]
        return observation

    def add_concept_importance(self, model: torch.nn.Module, class_index: int, images, step: int, *,
                               from_model: Optional[torch.nn.Module] = None, from_step: Optional[int] = None,
                               layers=None, labels=None, max_images: Optional[int] = 128,
                               revert: bool = False, class_name: Optional[str] = None, seed: int = 0):
        """Log the importance of every neuron's concept evolution for ``class_index``
        (ConceptEvo Eq. 7-9) from ``from_model`` (epoch t) to ``model`` (epoch t' = ``step``),
        and optionally the revert evaluation (Sec. 4.4).

        Without ``from_model`` the writer needs ``keep_previous_weights=True`` and uses the
        last snapshot taken before ``step``.  ``images`` is a probe set / dataset (filtered
        by its labels), a tensor with ``labels``, or a DataLoader (see
        :func:`tb_conceptevo.importance.concept_evolution_importance`).

        Returns ``(ImportanceResult, RevertResult or None)``.

        Example:
            >>> import tempfile, torch
            >>> from tb_conceptevo import probes
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            ...                             torch.nn.Flatten(), torch.nn.Linear(8, 6))
            >>> probe = probes.ConceptShapes(n=64, size=16)
            >>> writer = ConceptWriter(tempfile.mkdtemp(), probe=probe, keep_previous_weights=True, progress=False)
            >>> _ = writer.add_concepts(model, step=1)
            >>> with torch.no_grad():                  # "training" between the snapshots
            ...     _ = model[0].weight.mul_(2)
            >>> result, revert = writer.add_concept_importance(model, class_index=3, images=probe, step=2,
            ...                                                revert=True)
            >>> list(result.layers), revert.bin_labels
            (['0'], ['0-25%', '25-50%', '50-75%', '75-100%'])
            >>> writer.close()
        """
        import copy

        from .importance import concept_evolution_importance, revert_evaluation
        from .format.payloads import importance_payloads, revert_payload

        step = check_step(step)
        if from_model is None:
            earlier = [s for s in self._snapshots if s[0] < step]
            if not earlier:
                raise ValueError(
                    "no earlier snapshot to compare with: pass from_model=<model at epoch t> (and from_step), "
                    "or create the writer with keep_previous_weights=True and call add_concepts at an earlier step"
                )
            from_step, state = earlier[-1]
            from_model = copy.deepcopy(model)
            from_model.load_state_dict(state)
        layer_spec = layers if layers is not None else self.layers
        if class_name is None and self.probe is not None and self.probe.class_names is not None:
            names = self.probe.class_names
            class_name = names[class_index] if 0 <= class_index < len(names) else None
        common = dict(labels=labels, max_images=max_images, seed=seed, class_name=class_name,
                      from_step=from_step, to_step=step)
        result = concept_evolution_importance(from_model, model, images, class_index, layer_spec,
                                              self.batch_size, self.progress, **common)
        reverted = None
        if revert:
            reverted = revert_evaluation(from_model, model, images, class_index, result, layer_spec,
                                         batch_size=self.batch_size, progress=self.progress, **common)
        if self._is_writer_rank:
            with self._all_or_nothing():
                for tag, (header, arrays) in importance_payloads(result).items():
                    self.add_payload(tag, header, arrays, step)
                if reverted is not None:
                    header, arrays = revert_payload(reverted)
                    self.add_payload(metadata.revert_tag(class_index), header, arrays, step)
        return result, reverted

    # ------------------------------------------------------------------ writing
    def add_payload(self, tag: str, header: Dict, arrays: Dict[str, np.ndarray], step: int) -> None:
        """Write one plugin payload (see ``docs/FORMAT.md``)."""
        summary = payload_summary(tag, header, arrays)
        step = check_step(step)

        def write():
            self._get_file_writer().add_summary(summary, step)
            self._bytes_in_file += summary.ByteSize()

        if self._staged is not None:
            self._staged.append(write)
        else:
            write()

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """Stage every payload and scalar written inside the block and write them only
        when the whole block succeeded: a failure half-way through a snapshot leaves the
        event files as they were, and the writer's memory of earlier snapshots (for
        evolution speed) unchanged."""
        if self._staged is not None:  # already inside one
            yield
            return
        saved = (dict(self._previous_vectors), set(self._anchors_written), self._probe_written)
        self._staged = []
        try:
            yield
            staged = self._staged
        except BaseException:
            self._previous_vectors, self._anchors_written, self._probe_written = saved
            raise
        finally:
            self._staged = None
        for write in staged:
            write()
        if self.rotate_bytes and self._bytes_in_file >= self.rotate_bytes:
            self._rotate_event_file()  # closing flushes
        else:
            self.flush()

    def _rotate_event_file(self) -> None:
        """Close the event file; the next write opens a new one in the same run.

        Both loaders read a run's event files in name order, and the name starts with
        the creation time in whole seconds: wait for the next second so the new file
        sorts after the old one."""
        if self.file_writer is None or not self._is_writer_rank:
            return
        name = os.path.basename(getattr(getattr(self.file_writer, "event_writer", None), "_file_name", "") or "")
        self.file_writer.close()
        self.file_writer = None
        self.all_writers = None
        self._bytes_in_file = 0
        match = re.match(r"events\.out\.tfevents\.(\d+)\.", name)
        if match:
            while int(time.time()) <= int(match.group(1)):
                time.sleep(0.05)

    def add_observation(self, observation: Observation, step: int) -> None:
        """Write the stimuli of every layer of ``observation`` (e.g. recorded elsewhere)."""
        with self._all_or_nothing():
            self._write_probe_once(step)
            n_invalid = 0
            for name, layer_obs in observation.items():
                header, arrays = stimuli_payload(layer_obs)
                self.add_payload(metadata.stimuli_tag(name), header, arrays, step)
                n_invalid += int(layer_obs.invalid.sum())
                if layer_obs.image_links is not None:
                    self.add_payload(metadata.image_links_tag(name), *image_links_payload(layer_obs), step)
            self._scalar(metadata.scalar_tag("invalid_neurons", "stimuli", "all"), n_invalid, step)

    def add_space_embedding(self, space, layer: str, embedding, step: int, probe_hash: str = "") -> Dict[str, float]:
        """Write one layer's embedding in ``space`` and its per-layer metrics; returns them."""
        header, arrays = embedding_payload(space.name, layer, embedding, probe_hash)
        self.add_payload(metadata.space_tag(space.name, layer), header, arrays, step)
        anchors = space.anchors()
        if anchors is not None and space.name not in self._anchors_written:
            a_header, a_arrays = anchors_payload(space.name, anchors)
            self.add_payload(metadata.anchors_tag(space.name), a_header, a_arrays, step)
            self._anchors_written.add(space.name)
        return self._log_metrics(space, layer, (embedding.vectors, embedding.layout, embedding.placed), step)

    def set_previous_embedding(self, space_name: str, layer: Optional[str], embedding) -> None:
        """The embedding evolution speed of the next ``add_space_embedding`` of ``layer``
        (``None``: the whole model, all layers concatenated in order) is measured against
        (used when back-filling after already placed steps)."""
        self._previous_vectors[(space_name, layer)] = (embedding.vectors, embedding.placed)

    def add_detection(self, detector_name: str, detection, step: int) -> None:
        fraction = interpretable_fraction(detection)
        header, arrays = detection_payload(detector_name, detection, interpretable_counts(detection), fraction)
        self.add_payload(metadata.detector_tag(detector_name, detection.layer), header, arrays, step)
        self._scalar(metadata.scalar_tag("interpretable_fraction", detector_name, detection.layer), fraction, step)

    def _write_snapshot(self, observation, detections, embeddings, step) -> None:
        with self._all_or_nothing():
            self.add_observation(observation, step)
            for detector_name, per_layer in detections.items():
                for detection in per_layer.values():
                    self.add_detection(detector_name, detection, step)
            for space in self.spaces:
                self.add_space_embeddings(space, {name: embeddings[(space.name, name)] for name in observation},
                                          step, observation.probe_hash)

    def add_space_embeddings(self, space, embeddings: Dict[str, object], step: int, probe_hash: str = "") -> None:
        """Write every layer's embedding in ``space`` at ``step``, with per-layer and
        whole-model (``all``) metrics.  Used live by :meth:`add_concepts` and by
        ``tb-conceptevo project`` to back-fill (call it in ascending step order)."""
        with self._all_or_nothing():
            for name, embedding in embeddings.items():
                self.add_space_embedding(space, name, embedding, step, probe_hash)
            self._whole_model_metrics(space, list(embeddings.items()), step)

    def _whole_model_metrics(self, space, layer_items, step) -> None:
        self._log_metrics(space, None, whole_model([e for _, e in layer_items]), step)

    def _log_metrics(self, space, layer: Optional[str], placement, step: int) -> Dict[str, float]:
        """Log the metrics of one layer's (or, ``layer=None``, the whole model's)
        placement against the previous one of the same key; returns them."""
        vectors, layout, placed = placement
        metrics = embedding_metrics(vectors, layout, placed, self._previous_vectors.get((space.name, layer)),
                                    anchor_vectors(space.anchors()))
        self._previous_vectors[(space.name, layer)] = (vectors, placed)
        for metric, value in metrics.items():
            self._scalar(metadata.scalar_tag(metric, space.name, layer or "all"), value, step)
        return metrics

    def _write_probe_once(self, step: int) -> None:
        # At the first snapshot's step, so the tag's steps only ever ascend.
        if self._probe_written or self.probe is None:
            return
        header, arrays = probe_payload(self.probe, self.thumbnail_size)
        self.add_payload(metadata.probe_tag(), header, arrays, step)
        self._probe_written = True

    def _scalar(self, tag: str, value, step: int) -> None:
        value = float(value)
        if not math.isfinite(value):
            return
        if self._staged is not None:
            self._staged.append(lambda: self.add_scalar(tag, value, step))
        else:
            self.add_scalar(tag, value, step)


#: The largest step the plugin serves (``/map?step=`` accepts up to 2**62).
MAX_STEP = 2**62


def check_step(step) -> int:
    """``step`` as an int the event format and the plugin both accept (0..2**62)."""
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if not 0 <= int(step) <= MAX_STEP:
        raise ValueError(f"step must be between 0 and 2**62 (the plugin serves those), got {int(step)}")
    return int(step)


def servable_layers(model: torch.nn.Module, layers=None) -> List[str]:
    """Names of the chosen layers that the plugin can serve (letters, digits, ``_-.``).

    Explicitly chosen layers with other names are refused; among the default layers
    (every conv) they are skipped with a warning, so one odd ``ModuleDict`` key does not
    stop the rest of the model being recorded."""
    import warnings

    from .recording import resolve_layers

    names = [name for name, _ in resolve_layers(model, layers)]
    bad = []
    for name in names:
        try:
            metadata.check_name(name, "layer name")
        except ValueError:
            bad.append(name)
    if bad and layers is not None:
        raise ValueError(
            f"layer names {bad[:5]} cannot be logged: tags and the plugin's URLs allow 1-200 letters, digits, "
            "'_', '-', '.'; rename those submodules (e.g. ModuleDict keys) or record other layers")
    if bad:
        warnings.warn(f"skipping layers whose names cannot be logged (only letters, digits, '_', '-', '.'): "
                      f"{bad[:5]}{' ...' if len(bad) > 5 else ''}", RuntimeWarning, stacklevel=3)
        names = [n for n in names if n not in bad]
        if not names:
            raise ValueError("no layer of the model has a name that can be logged; pass layers=[...]")
    return names


def labels_notice(detectors: Sequence, probe) -> Optional[str]:
    """One line saying why a run will have no concept labels and how to get them, or None.

    No detector at all, or only detectors that say their labels mean nothing
    (``Detector.unlabelled_reason``, e.g. CLIP-Dissect with random weights)."""
    how = ('to get labels see the README section "Your own data" (NetDissect(vocabulary=probe) for a probe '
           'set with concept masks, CLIPDissect(pretrained=<checkpoint file or open_clip tag>) for any images)')
    if not detectors:
        masks = " and its probe set has no concept masks" if probe is not None and not getattr(
            probe, "has_masks", False) else ""
        return f"tb_conceptevo: no concept labels in this run: no detector is given{masks}; {how}"
    reasons = [getattr(d, "unlabelled_reason", None) for d in detectors]
    if all(reasons):
        return f"tb_conceptevo: no meaningful concept labels in this run: {'; '.join(reasons)}; {how}"
    return None


def _say_when_unlabelled(detectors: Sequence, probe) -> None:
    import logging

    notice = labels_notice(detectors, probe)
    if notice is not None:
        logging.getLogger("tb_conceptevo").warning(notice)


def _warn_unservable_run_name(log_dir) -> None:
    """TensorBoard's data server (rustboard, the default ``--load_fast=auto``) cannot read
    runs whose names hold quotes, backslashes or control characters."""
    import os
    import warnings

    parts = [p for p in os.path.normpath(os.fspath(log_dir)).split(os.sep) if p][-3:]
    bad = [p for p in parts if metadata.rustboard_unreadable(p)]
    if bad:
        warnings.warn(
            f"log_dir {os.fspath(log_dir)!r}: a run name with quotes, backslashes or control characters "
            f"({bad[0]!r}) cannot be read by TensorBoard's data server (--load_fast); rename it, or serve "
            "with tensorboard --load_fast=false", RuntimeWarning, stacklevel=3)
