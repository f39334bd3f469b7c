"""What ``ConceptEvoSpace`` reads from observations: the neuron rows of each layer,
their stimuli (the first ``k`` valid top images inside the sampled image subset) and
the checks on the observations ``fit`` is given."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..observation import LayerObservation, Observation


class BaseStimuli(NamedTuple):
    """The base neurons (all layers = one neuron set) and their stimuli."""

    ids: np.ndarray              # int64 [N, K] recorded top image ids (-1 = none)
    invalid: np.ndarray          # bool [N] flagged by the recorder
    valid_neurons: np.ndarray    # bool [N] with at least one stimulus
    neuron_of_entry: np.ndarray  # int64 [E] one (neuron, stimulus) entry each
    image_of_entry: np.ndarray   # int64 [E]
    n_images: int                # probe images any observation refers to


def base_observations(observations, indirect_observations
                      ) -> Tuple[List[LayerObservation], List[LayerObservation], str]:
    """``(base layers, indirect layers, probe hash)``; all from one probe set."""
    layers = _layer_list(observations, "observations")
    probe_hash = _common_probe_hash(layers)
    extra = _layer_list(indirect_observations, "indirect_observations", allow_empty=True)
    for obs in extra:
        if probe_hash and obs.probe_hash and obs.probe_hash != probe_hash:
            raise ValueError(
                f"indirect observation of layer {obs.layer!r} comes from probe set "
                f"{obs.probe_hash[:12]}... but the base from {probe_hash[:12]}...; use the same probe set"
            )
    return layers, extra, probe_hash


def base_stimuli(layers: List[LayerObservation], extra: List[LayerObservation], k: int,
                 sample_fraction: Optional[float], seed: int) -> BaseStimuli:
    """The stimuli of the base neurons (``layers``); the image count covers every id
    and link of the base and the indirect observations (``extra``)."""
    ids = np.concatenate([_row_ids(obs) for obs in layers], axis=0)
    invalid = np.concatenate([np.asarray(obs.invalid, dtype=bool).reshape(-1) for obs in layers])
    stimulus = stimulus_mask(ids, k, sample_fraction, seed) & ~invalid[:, None]
    valid_neurons = stimulus.any(axis=1)
    if valid_neurons.sum() < 3:
        raise ValueError(
            f"only {int(valid_neurons.sum())} of {ids.shape[0]} base neurons have valid stimuli; "
            "fit needs at least 3 (check the observations' invalid flags and image ids)"
        )
    all_ids = [ids] + [_row_ids(obs) for obs in extra]
    n_images = int(max(int(a.max(initial=-1)) for a in all_ids)) + 1
    # images recorded with links may lie beyond every neuron's top-k
    n_images = max([n_images] + [obs.image_links.shape[0] for obs in layers + extra
                                 if obs.image_links is not None])
    neuron_of_entry, image_of_entry = np.nonzero(stimulus)
    image_of_entry = ids[neuron_of_entry, image_of_entry].astype(np.int64)
    return BaseStimuli(ids, invalid, valid_neurons, neuron_of_entry, image_of_entry, n_images)


def stimulus_mask(ids: np.ndarray, k: int, sample_fraction: Optional[float], seed: int) -> np.ndarray:
    """bool ``[N, K]``: the (at most ``k``) first valid ids of each row that lie in
    the sampled image subset (all images when ``sample_fraction`` is None)."""
    eligible = ids >= 0
    if sample_fraction is not None:
        eligible &= _in_sample(ids, sample_fraction, seed)
    return eligible & (np.cumsum(eligible, axis=1) <= k)


def _in_sample(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic pseudo-random subset of image ids (same at fit and embed time,
    independent of the probe size): a splitmix64 hash of the id compared to fraction."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _row_ids(obs: LayerObservation) -> np.ndarray:
    ids = np.asarray(obs.image_ids)
    if ids.ndim != 2:
        raise ValueError(f"layer {obs.layer!r}: image_ids must be [N, k], got shape {ids.shape}")
    return ids.astype(np.int64)


def _layer_list(observations, what: str, allow_empty: bool = False) -> List[LayerObservation]:
    if isinstance(observations, Observation):
        layers = list(observations.layers.values())
    elif isinstance(observations, LayerObservation):
        layers = [observations]
    else:
        try:
            layers = []
            for item in observations:
                if isinstance(item, Observation):
                    layers.extend(item.layers.values())
                else:
                    layers.append(item)
        except TypeError:
            raise TypeError(
                f"{what} must be an Observation, a LayerObservation or a list of them, "
                f"got {type(observations).__name__}"
            ) from None
    for item in layers:
        if not isinstance(item, LayerObservation):
            raise TypeError(f"{what} must contain LayerObservation objects, got {type(item).__name__}")
    if not layers and not allow_empty:
        raise ValueError(f"{what} is empty; pass the base model's observations")
    return layers


def _common_probe_hash(layers: Sequence[LayerObservation]) -> str:
    hashes = {obs.probe_hash for obs in layers if obs.probe_hash}
    if len(hashes) > 1:
        raise ValueError(
            f"the base observations come from {len(hashes)} different probe sets; fit on "
            "observations recorded with one probe set"
        )
    return hashes.pop() if hashes else ""
