"""Compiled per-row kernel of :meth:`StableLayout.transform` (see ``layout.py``).

Everything a row's position depends on is computed inside one loop iteration over
rows (``prange``): its exact neighbour distances, UMAP memberships, initial position
and SGD with its own random stream.  Nothing is shared between rows, so the result
does not depend on the other rows, their order or the thread count.  float64
throughout, no fastmath (no reassociation).  ``cache=True`` keeps the compiled code
on disk, so only the first process after an install pays the compilation.
"""

from __future__ import annotations

import numba
import numpy as np

from .._compiled import parallel_loop

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TOLERANCE = 1e-5  # UMAP's SMOOTH_K_TOLERANCE


@numba.njit(cache=True, inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _row_seeds(bits, seed):
    n, d = bits.shape
    out = np.empty(n, dtype=np.uint64)
    for i in range(n):
        h = _mix(np.uint64(seed) + _GOLDEN)
        for j in range(d):
            h = _mix(h ^ (np.uint64(bits[i, j]) + _GOLDEN * np.uint64(j + 1)))
        out[i] = h
    return out


def row_seeds(rows: np.ndarray, seed: int) -> np.ndarray:
    """uint64 per row: a splitmix64 hash of the row's float32 bits and ``seed``
    (identical rows get identical seeds, whatever their position in the call)."""
    bits = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32)
    return _row_seeds(bits, np.uint64(int(seed) % (1 << 64)))


@parallel_loop
def smallest_columns(products, offsets, c):
    """int64 ``[n, c]``: per row, the columns of the ``c`` smallest scores
    ``offsets[j] - 2 products[i, j]`` (squared distance up to the row's constant), in
    any order; a running insertion list, cheaper than ``argpartition`` for small
    ``c`` and without an ``[n, m]`` temporary."""
    n, m = products.shape
    out = np.empty((n, c), dtype=np.int64)
    for i in numba.prange(n):
        # The c smallest values so far, ascending (ties keep the lower column first);
        # +inf placeholders make the first c columns one case with the rest.
        best = np.full(c, np.inf)
        where = np.full(c, -1, dtype=np.int64)
        for j in range(m):
            value = offsets[j] - 2.0 * products[i, j]
            if value >= best[c - 1]:
                continue
            e = c - 2
            while e >= 0 and best[e] > value:
                best[e + 1] = best[e]
                where[e + 1] = where[e]
                e -= 1
            best[e + 1] = value
            where[e + 1] = j
        out[i] = where
    return out


@numba.njit(cache=True, inline="always")
def _clip(value):
    if value > 4.0:
        return 4.0
    if value < -4.0:
        return -4.0
    return value


@parallel_loop
def _place_rows(queries, candidates, given, metric, reference, layout, seeds, k, n_epochs, a, b, gamma,
                initial_alpha, negative_rate, n_starts, loss_stride):
    # One compiled loop nest per row (neighbours, memberships, init, SGD epochs): long on
    # purpose, since numba would pay a call and array allocations per split-out step.
    n, n_cand = candidates.shape
    d = queries.shape[1]
    n_ref = layout.shape[0]
    target = np.log2(float(k))
    out = np.empty((n, 2))
    for i in numba.prange(n):
        # ---- exact distances of the candidates, top k by (distance, index)
        dist = np.empty(n_cand)
        index = np.empty(n_cand, dtype=np.int64)
        for c in range(n_cand):
            r = candidates[i, c]
            index[c] = r
            if metric == 0:
                s = 0.0
                for t in range(d):
                    diff = queries[i, t] - reference[r, t]
                    s += diff * diff
                dist[c] = np.sqrt(s)
            elif metric == 1:
                dot = 0.0
                qq = 0.0
                rr = 0.0
                for t in range(d):
                    dot += queries[i, t] * reference[r, t]
                    qq += queries[i, t] * queries[i, t]
                    rr += reference[r, t] * reference[r, t]
                same = True
                for t in range(d):
                    if queries[i, t] != reference[r, t]:
                        same = False
                        break
                if same:
                    dist[c] = 0.0
                elif qq == 0.0 or rr == 0.0:
                    dist[c] = 1.0
                else:
                    dist[c] = max(0.0, 1.0 - dot / np.sqrt(qq * rr))
            else:
                dist[c] = given[i, c]
        for c in range(1, n_cand):  # insertion sort: n_cand is small
            dc = dist[c]
            ic = index[c]
            e = c - 1
            while e >= 0 and (dist[e] > dc or (dist[e] == dc and index[e] > ic)):
                dist[e + 1] = dist[e]
                index[e + 1] = index[e]
                e -= 1
            dist[e + 1] = dc
            index[e + 1] = ic
        if dist[0] <= 0.0:  # the row is a reference vector: its fitted position
            out[i, 0] = layout[index[0], 0]
            out[i, 1] = layout[index[0], 1]
            continue
        # ---- UMAP's transform memberships (smooth_knn_dist, rho = 0)
        lo = 0.0
        hi = np.inf
        sigma = 1.0
        for _ in range(64):
            psum = 0.0
            for j in range(1, k):
                if dist[j] > 0.0:
                    psum += np.exp(-(dist[j] / sigma))
                else:
                    psum += 1.0
            if np.fabs(psum - target) < _TOLERANCE:
                break
            if psum > target:
                hi = sigma
                sigma = (lo + hi) / 2.0
            else:
                lo = sigma
                if hi == np.inf:
                    sigma *= 2.0
                else:
                    sigma = (lo + hi) / 2.0
        weight = np.empty(k)
        total = 0.0
        x = 0.0
        y = 0.0
        for j in range(k):
            if dist[j] <= 0.0 or sigma == 0.0:
                weight[j] = 1.0
            else:
                weight[j] = np.exp(-(dist[j] / sigma))
            total += weight[j]
            x += weight[j] * layout[index[j], 0]
            y += weight[j] * layout[index[j], 1]
        x /= total
        y /= total
        if n_epochs == 0:
            out[i, 0] = x
            out[i, 1] = y
            continue
        # ---- UMAP's edge-sampled SGD against the fixed map (move_other=False), from
        # UMAP's start and from the nearest neighbours' positions; the run that ends
        # with the lowest expected loss is kept
        per_sample = np.full(k, -1.0)
        for j in range(k):
            if weight[j] >= 1.0 / n_epochs:  # UMAP's threshold, maximum weight fixed at 1
                per_sample[j] = 1.0 / weight[j]
        per_negative = per_sample / negative_rate
        n_runs = 1 + min(n_starts, k)
        best_loss = np.inf
        for run in range(n_runs):
            if run == 0:  # (x, y) is still UMAP's start: run 0 is first to overwrite it
                rx = x
                ry = y
                state = seeds[i]
            else:
                rx = layout[index[run - 1], 0]
                ry = layout[index[run - 1], 1]
                state = _mix(seeds[i] + _GOLDEN * np.uint64(run))
            rx, ry = _sgd(rx, ry, state, n_epochs, index, per_sample, per_negative, layout, a, b, gamma,
                          initial_alpha)
            loss = 0.0 if n_runs == 1 else _expected_loss(rx, ry, index, weight, layout, a, b, negative_rate,
                                                         loss_stride)
            if run == 0 or loss < best_loss:  # ties keep the earlier start (UMAP's own first)
                best_loss = loss
                x = rx
                y = ry
        out[i, 0] = x
        out[i, 1] = y
    return out


@numba.njit(cache=True)
def _sgd(x, y, state, n_epochs, index, per_sample, per_negative, layout, a, b, gamma,
         initial_alpha):  # pragma: no cover
    """One row's SGD from ``(x, y)`` with the random stream ``state``."""
    n_ref = layout.shape[0]
    next_sample = per_sample.copy()
    next_negative = per_negative.copy()
    for epoch in range(n_epochs):
        alpha = initial_alpha * (1.0 - epoch / n_epochs)
        for j in range(per_sample.shape[0]):
            if per_sample[j] < 0.0 or next_sample[j] > epoch:
                continue
            dx = x - layout[index[j], 0]
            dy = y - layout[index[j], 1]
            d2 = dx * dx + dy * dy
            if d2 > 0.0:
                power = d2 ** b
                coeff = -2.0 * a * b * (power / d2) / (a * power + 1.0)
                x += _clip(coeff * dx) * alpha
                y += _clip(coeff * dy) * alpha
            next_sample[j] += per_sample[j]
            n_negative = int((epoch - next_negative[j]) / per_negative[j])
            for _p in range(n_negative):
                state += _GOLDEN
                # the high 32 bits scaled to [0, n_ref): no 64-bit division per sample
                r = np.int64(((_mix(state) >> np.uint64(32)) * np.uint64(n_ref)) >> np.uint64(32))
                dx = x - layout[r, 0]
                dy = y - layout[r, 1]
                d2 = dx * dx + dy * dy
                if d2 > 0.0:
                    coeff = 2.0 * gamma * b / ((0.001 + d2) * (a * d2 ** b + 1.0))
                    x += _clip(coeff * dx) * alpha
                    y += _clip(coeff * dy) * alpha
            next_negative[j] += n_negative * per_negative[j]
    return x, y


@numba.njit(cache=True)
def _expected_loss(x, y, index, weight, layout, a, b, negative_rate, stride):  # pragma: no cover
    """The fuzzy cross-entropy the SGD above descends, in expectation over its sampling:
    attraction ``-w_j log q_j`` to each neighbour, plus per unit of sampled attraction
    ``negative_rate`` repulsions ``-log(1 - q_r)`` from a uniformly drawn reference
    (averaged over every ``stride``-th reference: the same for every row)."""
    k = weight.shape[0]
    attraction = 0.0
    total = 0.0
    for j in range(k):
        dx = x - layout[index[j], 0]
        dy = y - layout[index[j], 1]
        attraction += weight[j] * np.log(1.0 + a * (dx * dx + dy * dy) ** b)
        total += weight[j]
    repulsion = 0.0
    count = 0
    for r in range(0, layout.shape[0], stride):
        dx = x - layout[r, 0]
        dy = y - layout[r, 1]
        power = a * (dx * dx + dy * dy + 0.001) ** b  # UMAP's repulsion keeps this 0.001 too
        repulsion += np.log(1.0 + power) - np.log(power)
        count += 1
    return attraction + negative_rate * total * repulsion / count


def place_rows(queries, candidates, given, metric, reference, layout, seeds, k, n_epochs, a, b, gamma,
               initial_alpha, negative_rate, n_starts=0, loss_stride=1) -> np.ndarray:
    """float64 ``[n, 2]`` positions (see the module docstring of ``layout.py``)."""
    if queries.shape[0] == 0:
        return np.zeros((0, 2))
    return _place_rows(queries, candidates, given, np.int64(metric), reference, layout, seeds, np.int64(k),
                       np.int64(n_epochs), float(a), float(b), float(gamma), float(initial_alpha),
                       float(negative_rate), np.int64(n_starts), np.int64(max(1, loss_stride)))
