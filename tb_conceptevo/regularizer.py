"""Concept-diversity regularizer (Concept-Monitor Sec. 4): a differentiable ``d_anchor``.

On each training mini-batch (the batch is the probe set)::

    r[b, n]   = spatial mean of the chosen layer's activation map, image b, neuron n
    c[b, k]   = concept activation of image b for concept k (from a pluggable source)
    sim[n, k] = cos^3(r[:, n], c[:, k])         (centre over the batch, cube, L2-normalise, dot)
    u_n       = softmax(sim[n] / T) . f(w)      (f(w): frozen text vectors of the concepts)
    loss      = mean_i min_n || u_n - f(a_i) ||_2                       (Eq. 3)

Add it to the task loss: ``L = CE + beta * loss`` (the paper uses beta = 1, T = 0.01).
Gradients flow into the model through ``r``; text vectors and concept activations
are constants.

Concept-activation sources (any callable ``source(images=..., indices=...) -> [B, K]``):

* :class:`GroundTruthConcepts` -- a data set's annotations (``concept_presence``,
  e.g. ConceptShapes): offline and exact.
* :class:`CLIPConcepts` -- cosine similarity of the batch images with the concept
  words under a (frozen) open_clip model, as CLIP-Dissect.

Example:
    >>> from tb_conceptevo import probes
    >>> from tb_conceptevo.regularizer import ConceptDiversityLoss, GroundTruthConcepts
    >>> train = probes.ConceptShapes(n=4000, seed=1)
    >>> reg = ConceptDiversityLoss(text_space, source=GroundTruthConcepts(train))   # doctest: +SKIP
    >>> handle = reg.attach(model, "features.6")                                     # doctest: +SKIP
    >>> logits = model(images)                                                       # doctest: +SKIP
    >>> loss = F.cross_entropy(logits, labels) + 1.0 * reg(indices=batch_indices)    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .detectors.similarity import cube_normalise


class ConceptDiversityLoss(nn.Module):
    """Differentiable anchor distance with cos^3 similarities on the mini-batch.

    Args:
        anchors: a :class:`~tb_conceptevo.spaces.TextSpace` (its anchor and concept
            vectors are used) or anchor vectors ``[A, d]``.
        concept_vectors: text vectors ``[K, d]`` of the concepts (not needed with a
            TextSpace).
        temperature: softmax temperature T (0.01 in the paper for cos^3).
        source: callable giving the batch's concept activations ``[B, K]`` from
            ``images=`` / ``indices=`` (see :class:`GroundTruthConcepts`,
            :class:`CLIPConcepts`); optional when ``concept_activations`` is passed.
        reduce: spatial reduction of the activation maps, ``"mean"`` or ``"max"``.
    """

    def __init__(self, anchors, concept_vectors=None, temperature: float = 0.01,
                 source: Optional[Callable] = None, reduce: str = "mean"):
        super().__init__()
        self.concepts: Optional[Sequence[str]] = None
        if hasattr(anchors, "anchor_vectors") and hasattr(anchors, "concept_vectors"):
            space = anchors
            anchors = space.anchor_vectors
            concept_vectors = space.concept_vectors if concept_vectors is None else concept_vectors
            self.concepts = list(space.concepts)
        if concept_vectors is None:
            raise ValueError("concept_vectors [K, d] are required unless a TextSpace is given")
        anchor_tensor = torch.as_tensor(np.asarray(anchors), dtype=torch.float32)
        concept_tensor = torch.as_tensor(np.asarray(concept_vectors), dtype=torch.float32)
        if anchor_tensor.dim() != 2 or concept_tensor.dim() != 2 or anchor_tensor.shape[0] == 0:
            raise ValueError("anchors must be [A, d] with A >= 1 and concept_vectors [K, d]")
        if anchor_tensor.shape[1] != concept_tensor.shape[1]:
            raise ValueError(f"anchors are {anchor_tensor.shape[1]}-d but concept vectors {concept_tensor.shape[1]}-d; "
                             "embed both with the same text encoder")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        self.register_buffer("anchor_vectors", anchor_tensor)
        self.register_buffer("concept_vectors", concept_tensor)
        self.temperature = float(temperature)
        self.source = source
        self.reduce = reduce
        self._captured: Optional[torch.Tensor] = None

    # ------------------------------------------------------------ pieces
    def responses(self, activations: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` per-image neuron responses from ``[B, N, H, W]`` (or ``[B, N]``)."""
        if activations.dim() == 4:
            return activations.mean(dim=(2, 3)) if self.reduce == "mean" else activations.amax(dim=(2, 3))
        if activations.dim() == 2:
            return activations
        raise ValueError(f"activations must be [B, C, H, W] or [B, C], got shape {tuple(activations.shape)}")

    def similarity(self, activations: torch.Tensor, concept_activations: torch.Tensor) -> torch.Tensor:
        """cos^3 similarity ``[N, K]`` of neurons and concepts over the batch."""
        responses = self.responses(activations)
        concept_activations = concept_activations.to(device=responses.device, dtype=responses.dtype)
        if concept_activations.shape != (responses.shape[0], self.concept_vectors.shape[0]):
            raise ValueError(
                f"concept activations must be [batch={responses.shape[0]}, concepts={self.concept_vectors.shape[0]}], "
                f"got {tuple(concept_activations.shape)}"
            )
        if responses.shape[0] < 2:
            raise ValueError("the batch needs at least 2 images (similarities are centred over the batch)")
        return cube_normalise(responses).t() @ cube_normalise(concept_activations)

    def neuron_vectors(self, similarity: torch.Tensor) -> torch.Tensor:
        """``u_n = softmax(sim_n / T) . f(w)`` ``[N, d]``."""
        weights = torch.softmax(similarity / self.temperature, dim=1)
        return weights @ self.concept_vectors.to(similarity.dtype)

    def anchor_distance(self, neuron_vectors: torch.Tensor) -> torch.Tensor:
        """Differentiable Eq. 2: mean over anchors of the distance to the closest neuron."""
        anchors = self.anchor_vectors.to(neuron_vectors.dtype)
        squared = ((anchors * anchors).sum(1, keepdim=True) + (neuron_vectors * neuron_vectors).sum(1)[None, :]
                   - 2.0 * anchors @ neuron_vectors.t())
        closest = squared.min(dim=1).values
        return closest.clamp(min=1e-12).sqrt().mean()

    # ------------------------------------------------------------ use
    def forward(self, activations: Optional[torch.Tensor] = None, concept_activations: Optional[torch.Tensor] = None,
                *, images: Optional[torch.Tensor] = None, indices=None) -> torch.Tensor:
        """The regularizer (a scalar with grad).

        ``activations`` default to those captured by :meth:`attach` in the last
        forward pass; ``concept_activations`` default to ``source(images=..., indices=...)``.
        """
        if activations is None:
            activations = self._captured
            if activations is None:
                raise ValueError("no activations: pass them, or call attach(model, layer) and run the model first")
        if concept_activations is None:
            if self.source is None:
                raise ValueError("no concept activations: pass concept_activations=... or give source=...")
            concept_activations = self.source(images=images, indices=indices)
        similarity = self.similarity(activations, torch.as_tensor(concept_activations))
        return self.anchor_distance(self.neuron_vectors(similarity))

    def attach(self, model: nn.Module, layer: str):
        """Capture ``layer``'s units (with grad) at every forward pass of ``model``, read
        at the same point as the recorder (a conv after the norm and activation that
        follow it; ``"<name>.raw"`` for its own output); returns a handle
        (``handle.remove()`` to stop)."""
        from .recording import register_point_hooks, resolve_points

        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be a module name, got {layer!r}; tb_conceptevo.list_layers(model) lists them")
        (point,) = resolve_points(model, [layer])   # close-match suggestions on a typo

        def hook(_module, _inputs, output):
            self._captured = output

        return _Handles(register_point_hooks(model, [point], lambda _point: hook))


class _Handles:
    """What :meth:`ConceptDiversityLoss.attach` returns: ``remove()`` stops the capture
    (the hooks stay registered as long as the model lives, as with ``register_forward_hook``)."""

    def __init__(self, handles):
        self._handles = list(handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class GroundTruthConcepts:
    """Concept activations from a data set's annotations: ``dataset.concept_presence(indices)``.

    Args:
        dataset: e.g. :class:`~tb_conceptevo.probes.ConceptShapes` (the training set).
        concepts: the loss's concept order (e.g. ``text_space.concepts``); columns are
            reordered/selected to match (default: the data set's own order).
    """

    def __init__(self, dataset, concepts: Optional[Sequence[str]] = None):
        if not hasattr(dataset, "concept_presence"):
            raise ValueError(f"{type(dataset).__name__} has no concept_presence(indices); use CLIPConcepts instead")
        self.dataset = dataset
        self.columns = None
        if concepts is not None:
            names = list(dataset.vocabulary.names)
            missing = [c for c in concepts if c not in names]
            if missing:
                raise ValueError(f"concepts {missing[:10]} are not annotated in {type(dataset).__name__}")
            self.columns = torch.tensor([names.index(c) for c in concepts])

    def __call__(self, images=None, indices=None) -> torch.Tensor:
        if indices is None:
            raise ValueError("GroundTruthConcepts needs indices=... (the batch's data-set indices)")
        presence = torch.as_tensor(self.dataset.concept_presence(indices)).float()
        return presence if self.columns is None else presence[:, self.columns.to(presence.device)]


class CLIPConcepts:
    """Concept activations as CLIP image-text cosine similarities of the batch images.

    Args:
        detector: a :class:`~tb_conceptevo.detectors.CLIPDissect` (its model, concepts
            and cached text features are reused).
        input_mean, input_std: the normalisation applied to the training images, undone
            before CLIP's own (None = images are in [0, 1]).
    """

    def __init__(self, detector, input_mean=None, input_std=None):
        self.detector = detector
        self.input_mean = None if input_mean is None else torch.tensor(input_mean, dtype=torch.float32)[None, :, None, None]
        self.input_std = None if input_std is None else torch.tensor(input_std, dtype=torch.float32)[None, :, None, None]

    def __call__(self, images=None, indices=None) -> torch.Tensor:
        if images is None:
            raise ValueError("CLIPConcepts needs images=... (the batch images)")
        detector = self.detector
        with torch.no_grad():
            batch = images.detach().float().to(detector.device)
            if self.input_std is not None:
                batch = batch * self.input_std.to(batch.device) + self.input_mean.to(batch.device)
            features = detector.encode_images(batch.clamp(0, 1))
            similarity = features @ detector.text_features().to(features.device).t()
        return similarity.to(images.device)
