"""tb_conceptevo: see what every neuron learns, and how it changes while it trains,
in TensorBoard.

Public API (imported lazily, so TensorBoard's plugin loader, which imports this
package, stays light and starts even where torch is slow to import)::

    from tb_conceptevo import ConceptWriter, probes
    writer = ConceptWriter("runs/baseline", probe=probes.ConceptShapes(n=1024))
    writer.add_concepts(model, step=epoch)

* :class:`ConceptWriter` - ``SummaryWriter`` with ``add_concepts`` / ``add_concept_importance``.
* :func:`record`, :func:`list_layers` - streaming top-k stimuli of every conv channel.
* :class:`ConceptReader` - logged data back as numpy arrays (both TensorBoard loaders).
* :mod:`probes` - ``ConceptShapes`` (embedded default), dataset and folder adapters.
* :mod:`spaces` - ``ConceptEvoSpace`` (ConceptEvo), ``TextSpace`` (Concept-Monitor).
* :mod:`detectors` - ``NetDissect``, ``CLIPDissect``, text encoders, vocabularies.
* :mod:`metrics` - differential entropy, evolution speed, ``d_anchor``, category counts.
* :mod:`importance` - importance of concept evolutions for a class, revert evaluation.
* :class:`ConceptDiversityLoss` - differentiable concept-diversity regularizer.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConceptWriter": "tb_conceptevo.writer",
    "record": "tb_conceptevo.recording",
    "list_layers": "tb_conceptevo.recording",
    "RecordingConsumer": "tb_conceptevo.recording",
    "TokenLayout": "tb_conceptevo.recording",
    "Observation": "tb_conceptevo.observation",
    "LayerObservation": "tb_conceptevo.observation",
    "ConceptReader": "tb_conceptevo.reading",
    "LogReader": "tb_conceptevo.reading",  # former name of ConceptReader
    "ConceptEvoSpace": "tb_conceptevo.spaces",
    "TextSpace": "tb_conceptevo.spaces",
    "NetDissect": "tb_conceptevo.detectors",
    "CLIPDissect": "tb_conceptevo.detectors",
    "ConceptDiversityLoss": "tb_conceptevo.regularizer",
    "concept_evolution_importance": "tb_conceptevo.importance",
    "revert_evaluation": "tb_conceptevo.importance",
}
_SUBMODULES = {"probes", "spaces", "detectors", "metrics", "importance", "regularizer", "recording",
               "reading", "writer", "format", "observation"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'tb_conceptevo' has no attribute {name!r}")


def __dir__():
    return __all__
