"""Network Dissection: IoU of each neuron's top-quantile activation region with concept masks.

For neuron ``k`` and concept ``c`` (Bau et al., 2017)::

    T_k      = the activation exceeded by the top (1 - quantile) of all activations of k
               over every probe image and every position of its activation map
    M_k(x)   = bilinear_upsample(A_k(x), mask size) >= T_k          (activation mask)
    IoU_k,c  = sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|     (over the whole probe set)

``T_k`` is a quantile over *all* images, so the masks ``M_k`` of the first images can
only be known once every image has been seen.  This is done in the recording pass
itself, without keeping the activation maps:

* **one pass (default)** -- each neuron keeps its *candidates*: every cell that can
  still be among its top ``m = ceil((1 - quantile) * n_images * H * W)`` activations,
  i.e. every cell at or above a running lower bound ``R_k`` (the ``m``-th largest
  activation seen so far, which can only rise towards ``T_k``).  With each candidate go
  its 8 neighbours' activations, which is all bilinear upsampling needs around a cell
  that passes.  After the pass, ``T_k`` is the exact ``m``-th largest candidate and
  the IoUs follow from the candidates alone.  Memory: about ``3 m`` slots of 44 bytes
  per neuron (12 for maps at the masks' size, which need no neighbours), never the maps
  themselves: 92 MiB for 1,024 ConceptShapes images at 64 px and 32-64-128-128 channels,
  whose maps take 928 MiB.
* **two passes** -- when those candidates would exceed ``memory_bytes`` (large probe
  sets, huge maps, or massive ties at the threshold), a layer keeps only candidate
  *values* (at most ``m + batch`` per neuron) to find ``T_k`` exactly in pass 0, and
  pass 1 finds the cells that pass in the maps again.  ``passes`` tells the recorder.

Why the running bound: sorting every activation (the first version of this detector)
or copying all maps to select from them later (the second) cost 4x and 3x the
recording pass; with the bound each batch is read once and only ~0.5 % of it is kept.
The bound starts from a sample of the first batch (verified by counting, exact
fallback) and rises after every batch.  On CPU the screening and counting run as
compiled loops (``_kernels.py``; ``NetDissect(compiled=False)`` runs the torch ops
instead); other devices use torch ops; both give identical results.

The intersections are counted per pixel *pattern* (the set of concepts covering a
mask pixel; see :class:`.masks.MaskPatterns`), so every neuron x concept count is one
bincount and one small matmul, on the model's device.

Ties: ``>= T_k`` keeps every position at the threshold (saturating units whose top
activations are all equal keep their whole active region); when ``T_k`` equals the
unit's minimum (a mostly silent ReLU unit) ``> T_k`` is used instead, so a unit never
covers the whole probe set.  Units with NaN/Inf activations get NaN rows.

Under ``torch.distributed`` each rank screens its shard; the thresholds come from
the union of all ranks' candidates and the counts are summed, so the result equals a
single process exactly.

Example:
    >>> from tb_conceptevo import probes, record
    >>> probe = probes.ConceptShapes(n=256, size=32)
    >>> detector = NetDissect(vocabulary=probe)          # ConceptShapes' 26 concepts
    >>> consumer = detector.consumer(probe, ["features.0"])
    >>> record(model, probe, ["features.0"], consumers=[consumer])   # doctest: +SKIP
    >>> detection = consumer.result()["features.0"]                  # doctest: +SKIP
    >>> detection.concepts[detection.top()[0][0]]                    # doctest: +SKIP
    'red'

Rooms of this package: :mod:`.detector` (the :class:`NetDissect` detector and its
options), :mod:`.consumer` (the recording consumer: screening, thresholds, counts,
chance level), :mod:`.candidates` (the per-neuron candidate store), :mod:`.masks`
(mask pattern tables), :mod:`.upsample` (bilinear tables and the upsampled pixels
around passing cells), :mod:`.caches` (what a detector keeps between logged steps)
and :mod:`._kernels` (the compiled CPU loops).
"""

from .candidates import Candidates, loosened
from .consumer import NetDissectConsumer, _null_image_maps
from .detector import NetDissect
from .masks import MaskPatterns, ProbeMasks

#: the names these had when NetDissect was one module
_Candidates, _loosened, _MaskPatterns = Candidates, loosened, MaskPatterns

__all__ = ["NetDissect", "NetDissectConsumer", "ProbeMasks", "MaskPatterns", "Candidates"]
