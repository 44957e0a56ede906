"""The one arithmetic behind every similarity the store reports.

Why it exists: LocalAI's store semantics reason over returned similarities (e.g. the
triangle inequality), so the similarity of a pair must not depend on which of the two
was the query. With BLAS, ``keys @ query`` sums each row in an order chosen by the kernel
(blocking, SIMD width, alignment, thread split), while the query's own norm came from
another code path, so ``find(a)`` reporting ``b`` and ``find(b)`` reporting ``a`` differed
in the last bits. Here, every reported similarity goes through ``cosine_rows``:

* a vector's unit form is ``x / norm(x)`` in float64, with ``norm`` computed by
  ``norms`` for stored keys and queries alike (same code, same precision);
* the dot product multiplies element-wise (IEEE multiplication is commutative, and the
  product of two float32-derived values is the same whichever is first) and adds the
  products with ``fixed_sum``: a pairwise tree made of element-wise additions, whose
  order depends only on the dimension, never on the kernel, the batch or the memory
  layout. So ``sim(a, b) == sim(b, a)`` bit for bit, and ``sim(-a, b) == -sim(a, b)``
  (negation is exact, and round-to-nearest is symmetric).

Candidates are chosen by a fast approximate scan (``scan``) or the ANN index and only
then re-scored here; the scan's error bound guarantees the re-scored top-k is exact.
"""

from __future__ import annotations

import numpy as np

#: Rows handled per step, so float64 temporaries stay small (cache-sized, and few fresh pages:
#: page faults are expensive in a VM) at any store size.
CHUNK_ROWS = 1024


def fixed_sum(p: np.ndarray) -> np.ndarray:
    """Row sums of ``p`` (m, d), float64, added in a fixed pairwise order. ``p`` is overwritten.

    Each step folds the right half onto the left half with one element-wise addition
    (exactly rounded per element, whatever SIMD numpy uses), so the order of additions is
    a function of ``d`` alone.
    """
    width = p.shape[1]
    while width > 1:
        half = (width + 1) // 2
        p[:, : width - half] += p[:, half:width]
        width = half
    return p[:, 0].copy()


def norms(mat: np.ndarray) -> np.ndarray:
    """Euclidean row norms of float32 ``mat`` (n, d), as float64 (no under/overflow for float32 input)."""
    out = np.empty(len(mat), dtype=np.float64)
    for s in range(0, len(mat), CHUNK_ROWS):
        x = mat[s : s + CHUNK_ROWS].astype(np.float64)
        x *= x
        out[s : s + CHUNK_ROWS] = fixed_sum(x)
    return np.sqrt(out)


def unit(mat: np.ndarray, row_norms: np.ndarray) -> np.ndarray:
    """``mat / row_norms`` in float64: the unit form that both sides of a similarity use."""
    out = mat.astype(np.float64)
    out /= row_norms[:, None]
    return out


def cosine_rows(keys: np.ndarray, key_norms: np.ndarray, query_unit: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of float32 ``keys`` with the float64 unit query, clipped to [-1, 1]."""
    out = np.empty(len(keys), dtype=np.float64)
    for s in range(0, len(keys), CHUNK_ROWS):
        p = unit(keys[s : s + CHUNK_ROWS], key_norms[s : s + CHUNK_ROWS])
        p *= query_unit
        out[s : s + CHUNK_ROWS] = fixed_sum(p)
    return np.clip(out, -1.0, 1.0)


__all__ = ["CHUNK_ROWS", "cosine_rows", "fixed_sum", "norms", "unit"]
