"""ConceptEvo Steps 1.2-1.3 (Park et al., CIKM 2023, Sec. 3.2): neuron embeddings.

* Step 1.2 (:func:`cooccurrence_pairs`): a multiset of co-activated neuron pairs
  (neurons sharing a stimulus image), by a shuffled sliding window per image.
* Step 1.3 (:func:`train_skipgram`): skip-gram with negative sampling (Eq. 1-3) on
  those pairs, mini-batched and in place on the embedding table; or
  (:func:`sppmi_embeddings`, the default) the matrix factorisation that skip-gram with
  R negatives implicitly performs (Levy and Goldberg, NeurIPS 2014): the top
  eigenvectors of the shifted positive PMI of co-activation counts.

:func:`neuron_pairs` and :func:`neuron_embeddings` run them for the base neurons; the
skip-gram is reused for the indirect image embeddings of Step 2.1
(``_image_embedding.py``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


def neuron_pairs(image_of_entry: np.ndarray, neuron_of_entry: np.ndarray, repetitions: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Step 1.2 for the base neurons: int64 ``[P, 2]`` co-activated pairs from the
    (stimulus ``image_of_entry[e]``, neuron ``neuron_of_entry[e]``) entries; an error
    when no two neurons share a stimulus."""
    pairs = cooccurrence_pairs(image_of_entry, neuron_of_entry, repetitions, rng)
    if pairs.shape[0] == 0:
        raise ValueError(
            "no two base neurons share a stimulus image, so there are no co-activated pairs "
            "to learn from; record the base with a smaller probe set, a larger k, or use "
            "sample_fraction"
        )
    return pairs


def neuron_embeddings(
    pairs: np.ndarray,
    valid_neurons: np.ndarray,
    *,
    dim: int,
    negatives: int,
    lr: float,
    epochs: int,
    batch_size: Optional[int],
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> np.ndarray:
    """Step 1.3 for the base neurons: float64 ``[N, dim]`` embeddings, NaN rows for
    the neurons without stimuli.

    ``valid_neurons`` (bool ``[N]``) are the neurons with at least one stimulus, the
    pool of negative samples; ``generator`` draws the initial table and the
    skip-gram's order and negatives."""
    n_neurons = valid_neurons.size
    table = _uniform_init(n_neurons, dim, generator).to(device=device, dtype=dtype)
    pool = torch.as_tensor(np.flatnonzero(valid_neurons), device=device)
    train_skipgram(
        table, torch.as_tensor(pairs, device=device), pool, negatives=negatives,
        lr=lr, epochs=epochs, batch_size=skipgram_batch_size(batch_size, len(pool)),
        generator=generator, progress=progress, desc="ConceptEvo neurons (step 1.3)",
    )
    embeddings = table.cpu().numpy().astype(np.float64)
    embeddings[~valid_neurons] = np.nan
    return embeddings


def sppmi_embeddings(image_of_entry: np.ndarray, neuron_of_entry: np.ndarray, valid_neurons: np.ndarray,
                     dim: int, negatives: int, generator: torch.Generator, power_iterations: int = 6) -> np.ndarray:
    """Step 1.3 in closed form: float64 ``[N, dim]`` neuron embeddings, NaN rows for the
    neurons without stimuli.

    Skip-gram with ``R = negatives`` negative samples is optimal when ``v_n . v_m =
    PMI(n, m) - log R`` (Levy and Goldberg 2014), PMI taken over the co-activation
    counts ``C[n, m]`` (images that are stimuli of both).  The embeddings are the top
    ``dim`` eigenpairs of the shifted positive PMI ``max(PMI - log R, 0)``,
    ``U sqrt(Lambda)``, found by subspace iteration on the sparse matrix (seeded
    Gaussian start, ``dim + 10`` columns; memory O(nnz + N x dim)).  Neurons with
    stimuli but no co-activated partner keep the paper's uniform initialisation.
    Measured against the per-pair SGD reference (``benchmarks/bench_space.py
    --reference``) in ``ConceptEvoSpace``'s docstring."""
    import scipy.sparse as sparse

    n = valid_neurons.size
    incidence = sparse.csr_matrix(
        (np.ones(image_of_entry.size), (np.asarray(image_of_entry), np.asarray(neuron_of_entry))),
        shape=(int(image_of_entry.max()) + 1 if image_of_entry.size else 0, n))
    counts = (incidence.T @ incidence).tocoo()
    off_diagonal = counts.row != counts.col
    rows, cols, values = counts.row[off_diagonal], counts.col[off_diagonal], counts.data[off_diagonal]
    degree = np.bincount(rows, weights=values, minlength=n)
    shifted = np.log(values * values.sum() / (degree[rows] * degree[cols])) - math.log(negatives)
    keep = shifted > 0
    matrix = sparse.csr_matrix((shifted[keep], (rows[keep], cols[keep])), shape=(n, n))
    width = min(n, dim + 10)
    start = torch.randn(n, width, generator=generator, dtype=torch.float64).numpy()
    with _single_blas_thread():  # tiny dense products: threads only add synchronisation
        basis = np.linalg.qr(start)[0]
        for _ in range(power_iterations):
            basis = np.linalg.qr(matrix @ basis)[0]
        values_, vectors = np.linalg.eigh(basis.T @ (matrix @ basis))
    order = np.argsort(-values_, kind="stable")[:dim]
    embeddings = np.zeros((n, dim))
    found = (basis @ vectors[:, order]) * np.sqrt(np.maximum(values_[order], 0.0))
    embeddings[:, :found.shape[1]] = found
    # an eigenvector's sign is arbitrary: make each column's largest entry positive
    signs = np.sign(embeddings[np.abs(embeddings).argmax(axis=0), np.arange(dim)])
    embeddings *= np.where(signs == 0, 1.0, signs)
    # LAPACK's QR / eigh round differently with each CPU's BLAS kernels (last bits):
    # rounding to float32 makes the result the same on (almost) every machine
    embeddings = embeddings.astype(np.float32).astype(np.float64)
    isolated = valid_neurons & (degree == 0)
    embeddings[isolated] = _uniform_init(int(isolated.sum()), dim, generator).double().numpy()
    embeddings[~valid_neurons] = np.nan
    return embeddings


class _single_blas_thread:
    def __enter__(self):
        try:
            from threadpoolctl import threadpool_limits

            self.limits = threadpool_limits(1)
        except ImportError:  # an optimisation only
            self.limits = None

    def __exit__(self, *exc):
        if self.limits is not None:
            self.limits.unregister()


def skipgram_batch_size(requested: Optional[int], n_rows: int) -> int:
    """``requested``, or by default half the number of trained rows clipped to
    [32, 8192] (see ``ConceptEvoSpace``'s ``batch_size``)."""
    if requested is not None:
        return int(requested)
    return int(min(8192, max(32, n_rows // 2)))


def cooccurrence_pairs(groups: np.ndarray, members: np.ndarray, repetitions: int, rng) -> np.ndarray:
    """Step 1.2, vectorised: int64 ``[P, 2]`` pairs of members sharing a group.

    For each repetition and each group (an image, for neuron pairs), the group's
    members are put in random order and consecutive ones are paired (a sliding
    window of length 2).  Implemented as one lexicographic sort of all
    (repetition, group, random key) entries; a pair is two neighbouring entries of the
    same repetition and group.

    >>> pairs = cooccurrence_pairs(np.array([0, 0, 0, 1]), np.array([5, 6, 7, 8]), 2,
    ...                            np.random.default_rng(0))
    >>> pairs.shape   # 2 repetitions x (3 members - 1) for group 0; group 1 is alone
    (4, 2)
    """
    groups = np.asarray(groups, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64)
    n = groups.size
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    repetition = np.repeat(np.arange(repetitions, dtype=np.int64), n)
    all_groups = np.tile(groups, repetitions)
    all_members = np.tile(members, repetitions)
    order = np.lexsort((rng.random(n * repetitions), all_groups, repetition))
    g, r, m = all_groups[order], repetition[order], all_members[order]
    same = (g[1:] == g[:-1]) & (r[1:] == r[:-1])
    return np.stack([m[:-1][same], m[1:][same]], axis=1)


def train_skipgram(
    table: torch.Tensor,
    pairs: torch.Tensor,
    negative_pool: torch.Tensor,
    negatives: int,
    lr: float,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    trainable: Optional[torch.Tensor] = None,
    progress: bool = True,
    desc: str = "skip-gram",
) -> torch.Tensor:
    """Skip-gram with negative sampling (ConceptEvo Eq. 1-3), in place on ``table``.

    For each pair (n, m): ascend ``log s(v_n.v_m) + sum_r log(1 - s(v_n.v_r)) +
    sum_r log(1 - s(v_m.v_r))`` with R = ``negatives`` rows r drawn uniformly from
    ``negative_pool`` separately for n and for m.  The gradients are Eq. 2-3 for
    v_n, v_m plus the (equally part of J1) gradients of the negative rows.
    Mini-batched SGD: the gradients of a batch are computed from the same table and
    summed into it with ``index_put_(accumulate=True)`` (a row occurring several times in a batch
    receives the sum, as with sequential per-pair updates); the learning rate decays
    linearly to 1e-4 * lr as in word2vec.  Runs single-threaded on CPU (tiny tensors).  ``trainable`` (bool per row) freezes the
    other rows (used for the indirect image embeddings).
    """
    n_pairs = int(pairs.shape[0])
    if n_pairs == 0:
        return table
    with _single_thread_on_cpu(table.device):
        _skipgram_epochs(table, pairs, negative_pool, negatives, lr, epochs, batch_size, generator,
                         trainable, progress, desc)
    return table


def _skipgram_epochs(table, pairs, negative_pool, negatives, lr, epochs, batch_size, generator,
                     trainable, progress, desc):
    n_pairs = int(pairs.shape[0])
    pool_size = int(negative_pool.numel())
    dim = table.shape[1]
    device = table.device
    mask = trainable.to(table.dtype).unsqueeze(1) if trainable is not None else None
    batches_per_epoch = math.ceil(n_pairs / batch_size)
    total = epochs * batches_per_epoch
    bar = _progress_bar(total, desc, progress)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n_pairs, generator=generator).to(device)
        # all negatives of the epoch in one draw (indices into the pool)
        negative_index = torch.randint(pool_size, (n_pairs, 2 * negatives), generator=generator).to(device)
        for start in range(0, n_pairs, batch_size):
            batch = order[start:start + batch_size]
            size = batch.numel()
            a, b = pairs[batch, 0], pairs[batch, 1]
            neg = negative_pool[negative_index[start:start + size]]                    # [B, 2R]
            va, vb = table.index_select(0, a), table.index_select(0, b)
            vneg = table.index_select(0, neg.reshape(-1)).view(size, 2 * negatives, dim)
            vna, vnb = vneg[:, :negatives], vneg[:, negatives:]
            positive = 1.0 - torch.sigmoid((va * vb).sum(-1, keepdim=True))          # [B, 1]
            sa = torch.sigmoid(torch.bmm(vna, va.unsqueeze(2)))                        # [B, R, 1]
            sb = torch.sigmoid(torch.bmm(vnb, vb.unsqueeze(2)))
            rate = lr * max(1e-4, 1.0 - step / total)
            grad_a = positive * vb - (sa * vna).sum(1)                                 # Eq. 2
            grad_b = positive * va - (sb * vnb).sum(1)                                 # Eq. 3
            grad_neg = -torch.cat([sa * va.unsqueeze(1), sb * vb.unsqueeze(1)], 1)     # d/dv_r
            # all gradients come from the table before this batch's update
            for rows, grad in ((a, grad_a), (b, grad_b), (neg.reshape(-1), grad_neg.reshape(-1, dim))):
                grad = grad * rate
                if mask is not None:
                    grad = grad * mask[rows]
                table.index_put_((rows,), grad, accumulate=True)
            step += 1
        bar.update(batches_per_epoch)
    bar.close()


class _single_thread_on_cpu:
    """Run small-tensor CPU work on one thread: the per-batch tensors are tiny, so
    intra-op threads only add synchronisation (measured 15x slower with 2 threads
    on a busy 2-core machine)."""

    def __init__(self, device):
        self.active = torch.device(device).type == "cpu"

    def __enter__(self):
        if self.active:
            self.previous = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.previous)


def _uniform_init(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Paper's initialisation: uniform in [-0.5, 0.5)."""
    return torch.rand(rows, dim, generator=generator) - 0.5


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="batch")
