"""ConceptEvo Step 2.1 (Park et al., CIKM 2023, Sec. 3.2): image embeddings.

* :func:`solve_image_embeddings`: the images some base neuron has among its stimuli
  ("covered") get embeddings such that each base neuron's embedding is the mean of its
  stimuli's (Eq. 4-6), as one sparse ridge or minimum-norm least-squares solve.
* :func:`indirect_embeddings`: the other images get embeddings by a skip-gram over
  image pairs linked through a shared neuron, the covered ones held fixed (Step 2.1,
  last paragraph).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..observation import LayerObservation
from ._neuron_embedding import _uniform_init, cooccurrence_pairs, skipgram_batch_size, train_skipgram
from ._stimuli import _in_sample, _row_ids


def solve_image_embeddings(neuron_of_entry: np.ndarray, image_of_entry: np.ndarray,
                           neuron_embeddings: np.ndarray, valid_neurons: np.ndarray,
                           ridge: float) -> Tuple[np.ndarray, np.ndarray, float]:
    """Eq. 4-6 as one sparse least-squares problem, solved directly.

    With ``A[n, x] = 1 / |X_n|`` for every stimulus x of base neuron n (rows:
    neurons with stimuli, columns: covered images) and ``U`` the Step 1.3
    embeddings, J2 (Eq. 5) is ``0.5 ||A V - U||^2``.  There are usually more
    covered images than neurons, so J2 has infinitely many minimisers.  The
    paper's gradient descent (Eq. 6) converges to the one nearest its random
    start: the minimum-norm solution ``A^+ U`` plus the start's component in the
    null space of ``A``, i.e. a solution that depends on the initial noise.  We
    solve instead for the start-independent part:

    * ``ridge > 0`` (default 1e-4): ``V = A^T (A A^T + lam I)^-1 U`` with
      ``lam = ridge * mean diag(A A^T)``, one sparse LU of the smaller Gram matrix
      for all ``dim`` right-hand sides; it tends to the minimum-norm solution as
      ``ridge -> 0`` and stays well-posed for near-collinear neurons (almost
      identical stimuli, different embeddings);
    * ``ridge = 0``: the minimum-norm least-squares solution itself (LSMR).

    Measured downstream (``benchmarks/bench_space.py --ridge``: 960 neurons, 5,000
    images, a later model with fresh noise, 3 seeds): ridge 1e-3 / 1e-4 / 0 give
    reconstruction errors 0.0026 / 0.0003 / 0.0000, mean image norms 2.578 /
    2.595 / 2.597 (the 1e-3 ridge shrinks them by 0.7 %; on the demo ~8 %),
    identical 5-NN purity (0.957 base, 0.965 later), evolution speed 0.580 / 0.584
    / 0.585, map entropy 3.320 / 3.301 / 3.328 (seed noise), solve 0.17 / 0.23 /
    2.1 s.  Hence the default 1e-4: within 0.1 % of the minimum-norm solution at a
    tenth of its cost.

    Returns ``(covered image ids, their embeddings, relative RMS error of Eq. 4)``.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    rows_used = np.flatnonzero(valid_neurons)
    row_of_neuron = np.full(valid_neurons.size, -1, dtype=np.int64)
    row_of_neuron[rows_used] = np.arange(rows_used.size)
    covered, column = np.unique(image_of_entry, return_inverse=True)
    row = row_of_neuron[neuron_of_entry]
    stimuli_count = np.bincount(row, minlength=rows_used.size)
    A = sp.csr_matrix(
        (1.0 / stimuli_count[row], (row, column)), shape=(rows_used.size, covered.size)
    )
    U = neuron_embeddings[rows_used]
    lam = ridge * float(np.mean(1.0 / stimuli_count))
    if lam == 0.0:
        # minimum-norm least squares (what plain gradient descent on J2 from 0 converges to)
        from scipy.sparse.linalg import lsmr

        V = np.stack([lsmr(A, U[:, j], atol=1e-12, btol=1e-12, maxiter=20 * A.shape[0])[0]
                      for j in range(U.shape[1])], axis=1)
    elif covered.size <= rows_used.size:
        gram = (A.T @ A + lam * sp.identity(covered.size)).tocsc()
        V = splu(gram, permc_spec="MMD_AT_PLUS_A").solve(np.asarray(A.T @ U))
    else:
        gram = (A @ A.T + lam * sp.identity(rows_used.size)).tocsc()
        V = np.asarray(A.T @ splu(gram, permc_spec="MMD_AT_PLUS_A").solve(U))
    residual = A @ V - U
    error = math.sqrt(float((residual ** 2).sum()) / max(float((U ** 2).sum()), 1e-30))
    return covered, V, error


def indirect_embeddings(
    image_embeddings: np.ndarray,
    status: np.ndarray,
    observations: Sequence[LayerObservation],
    *,
    sample_fraction: Optional[float],
    random_state: int,
    repetitions: int,
    negatives: int,
    lr: float,
    epochs: int,
    batch_size: Optional[int],
    rng: np.random.Generator,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> np.ndarray:
    """Skip-gram over image pairs linked through a shared neuron (Sec. 3.2, Step
    2.1, last paragraph), covered images (``status`` 1) held fixed.  Writes the new
    rows of ``image_embeddings`` in place and returns the ids of the uncovered images
    that received an embedding.

    A neuron groups its recorded top images and, where the observation carries
    ``image_links`` (each probe image's most responsive channels), the uncovered
    images that respond most to it: the paper's link from an uncovered image to
    its most activated neurons, and through them to their covered stimuli."""
    groups, members = _linked_images(observations, status, sample_fraction, random_state)
    # only neurons that link an uncovered image to something else matter
    uncovered_entry = status[members] == 0
    useful_groups = np.unique(groups[uncovered_entry])
    keep = np.isin(groups, useful_groups)
    pairs = cooccurrence_pairs(groups[keep], members[keep], repetitions, rng)
    if pairs.shape[0]:
        pairs = pairs[(status[pairs[:, 0]] == 0) | (status[pairs[:, 1]] == 0)]
    if pairs.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    reachable = _reachable_from_covered(pairs, status == 1)
    pairs = pairs[reachable[pairs[:, 0]] & reachable[pairs[:, 1]]]
    targets = np.flatnonzero(reachable & (status == 0))
    if targets.size == 0:
        return targets

    n_images, dim = status.size, image_embeddings.shape[1]
    table_np = np.where(np.isnan(image_embeddings), 0.0, image_embeddings)
    table = torch.as_tensor(table_np, device=device, dtype=dtype)
    table[torch.as_tensor(targets, device=device)] = _uniform_init(targets.size, dim, generator).to(
        device=device, dtype=dtype)
    trainable = torch.zeros(n_images, dtype=torch.bool, device=device)
    trainable[torch.as_tensor(targets, device=device)] = True
    pool = torch.as_tensor(np.flatnonzero(reachable), device=device)
    train_skipgram(
        table, torch.as_tensor(pairs, device=device), pool, negatives=negatives,
        lr=lr, epochs=epochs, batch_size=skipgram_batch_size(batch_size, targets.size),
        generator=generator, trainable=trainable, progress=progress,
        desc="ConceptEvo indirect images (step 2.1)",
    )
    image_embeddings[targets] = table[torch.as_tensor(targets, device=device)].cpu().numpy()
    return targets


def _linked_images(observations: Sequence[LayerObservation], status: np.ndarray,
                   sample_fraction: Optional[float], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(groups, members)``: one entry per (neuron, image) link, neurons numbered
    across all ``observations``: each neuron's recorded top images, plus the
    uncovered images whose ``image_links`` name the neuron."""
    groups, members, offset = [], [], 0
    for obs in observations:
        ids = _row_ids(obs)
        invalid = np.asarray(obs.invalid, dtype=bool).reshape(-1)
        usable = (ids >= 0) & ~invalid[:, None]
        if sample_fraction is not None:
            usable &= _in_sample(ids, sample_fraction, seed)
        neuron, column = np.nonzero(usable)
        groups.append(neuron + offset)
        members.append(ids[neuron, column].astype(np.int64))
        if obs.image_links is not None:
            links = np.asarray(obs.image_links, dtype=np.int64)
            linked = (links >= 0) & (links < ids.shape[0])
            image, column = np.nonzero(linked)
            channel = links[image, column]
            # only uncovered images need the forward links; covered ones are
            # already in their neurons' lists
            keep = (status[image] == 0) & ~invalid[channel]
            if sample_fraction is not None:
                keep &= _in_sample(image, sample_fraction, seed)
            groups.append(channel[keep] + offset)
            members.append(image[keep])
        offset += ids.shape[0]
    return np.concatenate(groups), np.concatenate(members)


def _reachable_from_covered(pairs: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """bool per image: in a connected component (of the pair graph) holding a covered image."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n = covered.size
    graph = sp.coo_matrix((np.ones(pairs.shape[0]), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    good_labels = np.unique(label[covered])
    return np.isin(label, good_labels)

