"""The :class:`NetDissect` detector: its parameters, vocabulary and the state it keeps
between logged steps (the method is explained in the package docstring)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ...probes.base import ConceptVocabulary, ProbeSet
from ..base import Detector
from ..vocabulary import make_vocabulary, probe_vocabulary
from .caches import BoundedCache, BufferPool
from .consumer import NetDissectConsumer

#: most memory the candidate arrays kept between logged steps may take
_POOL_BYTES = 256 << 20
#: bilinear tables kept (one per layer size and axis: a network has few)
_MAX_TABLES = 64


class NetDissect(Detector):
    """Network Dissection detector (IoU with the concept masks of a probe set).

    Args:
        vocabulary: the concepts to score: None (the probe set's own vocabulary, taken
            when :meth:`consumer` is called), a :class:`ProbeSet` (its vocabulary), a
            :class:`ConceptVocabulary` or a list of words; every word must be one of
            the probe set's masked concepts.
        quantile: per-neuron activation quantile giving the threshold ``T_k``
            (0.995 = top 0.5 %, as in Network Dissection).
        threshold: tau; a neuron is interpretable when its best IoU exceeds it
            (0.04 as in Network Dissection).
        memory_bytes: memory allowed for the candidates of the one-pass mode (see the
            module docstring); layers that need more use two passes; 0 forces two.
        name: detector name used in tags.
        progress: tqdm bar for the IoU stage after the pass.
        compiled: use the numba loops on CPU (default); False runs the torch reference
            path there too (the one of other devices; identical results, slower).  Not
            part of :meth:`config`: it changes how, not what, is computed.

    Between logged steps the detector keeps the pattern table of the last probe set
    (``pattern_tables``), the bilinear tables (``bilinear_tables``) and up to 256 MiB
    of candidate arrays (``buffers``), so re-dissecting the same probe set at every
    step neither re-reads its masks nor allocates its stores afresh
    (``detector.buffers.clear()`` frees the arrays).
    """

    #: IoU scores span ~0-0.3, so the text space needs a sharper softmax than the
    #: paper's 0.1 (which was set for soft-WPMI scores) to tell concepts apart.
    default_temperature = 0.02

    def __init__(self, vocabulary=None, quantile: float = 0.995, threshold: float = 0.04,
                 memory_bytes: int = 1 << 30, name: str = "netdissect", progress: bool = True,
                 compiled: bool = True):
        if not 0.0 < float(quantile) < 1.0:
            raise ValueError(f"quantile must be in (0, 1), e.g. 0.995 for the top 0.5 %; got {quantile!r}")
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        from ..._names import check_name

        self.name = check_name(name, "detector name")
        self.quantile = float(quantile)
        self.threshold = float(threshold)
        self.memory_bytes = int(memory_bytes)
        self.progress = bool(progress)
        self.compiled = bool(compiled)
        #: the pattern table of the last probe set (one: the masks of one probe set at a time)
        self.pattern_tables = BoundedCache(1)
        self.bilinear_tables = BoundedCache(_MAX_TABLES)
        self.buffers = BufferPool(_POOL_BYTES)
        self._vocabulary: Optional[ConceptVocabulary] = None
        if isinstance(vocabulary, ProbeSet) or (vocabulary is not None and hasattr(vocabulary, "masks")):
            self._vocabulary = probe_vocabulary(vocabulary, "NetDissect(vocabulary=[...])")
        elif vocabulary is not None:
            self._vocabulary = make_vocabulary(vocabulary, what="NetDissect vocabulary")

    # -------------------------------------------------------------- vocabulary
    @property
    def vocabulary(self) -> ConceptVocabulary:
        if self._vocabulary is None:
            raise ValueError(
                "NetDissect(vocabulary=None) takes its concepts from the probe set when it is first "
                "run; pass NetDissect(vocabulary=probe) to know them before"
            )
        return self._vocabulary

    @property
    def concepts(self) -> List[str]:
        return list(self.vocabulary.names)

    @property
    def categories(self) -> List[str]:
        return list(self.vocabulary.categories)

    def config(self) -> Dict:
        """JSON-able parameters (stored in space files; see :func:`detector_from_config`)."""
        return {"kind": "netdissect", "name": self.name, "quantile": self.quantile,
                "threshold": self.threshold, "memory_bytes": self.memory_bytes,
                "concepts": list(self.vocabulary.names) if self._vocabulary is not None else None,
                "categories": list(self.vocabulary.categories) if self._vocabulary is not None else None}

    @property
    def cpu_kernels(self):
        """The compiled loops for CPU tensors (module :mod:`._kernels`), or None
        (``compiled=False``: the torch code)."""
        if not self.compiled:
            return None
        from . import _kernels

        return _kernels

    def mask_channels(self, probe) -> Optional[torch.Tensor]:
        """Indices of this detector's concepts among the probe's mask channels (None = all, same order)."""
        if not getattr(probe, "has_masks", False):
            raise ValueError(
                f"NetDissect needs concept masks but the probe set {type(probe).__name__} has none; "
                "use probes.ConceptShapes (or a probe set with masks), or CLIPDissect for unlabelled images"
            )
        probe_vocab = probe_vocabulary(probe, "NetDissect(vocabulary=[...])")
        if self._vocabulary is None:
            self._vocabulary = probe_vocab
        if tuple(self._vocabulary.names) == tuple(probe_vocab.names):
            return None
        index = {name: i for i, name in enumerate(probe_vocab.names)}
        missing = [w for w in self._vocabulary.names if w not in index]
        if missing:
            raise ValueError(
                f"NetDissect concepts {missing[:10]} have no masks in {type(probe).__name__} "
                f"(masked concepts: {list(probe_vocab.names)[:30]}); remove them from the vocabulary"
            )
        return torch.tensor([index[w] for w in self._vocabulary.names], dtype=torch.long)

    def consumer(self, probe, layers: Sequence[str]) -> NetDissectConsumer:
        return NetDissectConsumer(self, probe, list(layers))

    def __repr__(self) -> str:
        n = len(self._vocabulary) if self._vocabulary is not None else "probe's"
        return f"NetDissect(concepts={n}, quantile={self.quantile}, threshold={self.threshold})"
