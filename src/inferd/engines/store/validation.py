"""Checks on request vectors and sizes, before anything is applied or logged.

Every refusal is ``InvalidArgument`` naming the request field (``Keys[3]``, ``Key``,
``TopK``, ``Values``), so a bad batch is refused whole and nothing is half-applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inferd.errors import InvalidArgument
from inferd.limits import bounded_int

KeysLike = np.ndarray | Sequence[Sequence[float]]

#: Largest key dimension accepted (the widest embedding models are 4-8k wide).
MAX_DIM = 65_536
#: Largest TopK accepted; a reply must also fit the message limit (see ``check_reply_size``).
MAX_TOP_K = 1_000_000


def key_matrix(keys: KeysLike, field: str, dim: int) -> np.ndarray:
    """Keys as a C-contiguous float32 (n, dim) matrix, checked for shape, size and finiteness.

    ``dim < 0``: the store is empty and any dimension up to ``MAX_DIM`` is accepted.
    """
    if isinstance(keys, np.ndarray):
        mat = keys.astype(np.float32, copy=False)
        if mat.ndim != 2:
            raise InvalidArgument("expected a list of vectors", field)
    else:
        lengths = [len(k) for k in keys]
        first = lengths[0]
        for i, n in enumerate(lengths):
            if n != first:
                raise InvalidArgument(f"key {i} has {n} dimensions but key 0 has {first}", field)
        if first > MAX_DIM:
            raise InvalidArgument(f"key length {first} is above the limit of {MAX_DIM}", field)
        mat = np.array(keys, dtype=np.float32).reshape(len(lengths), first)
    if dim >= 0 and mat.shape[1] != dim:
        raise InvalidArgument(f"key length {mat.shape[1]} does not match the store's dimension {dim}", field)
    if mat.shape[1] == 0:
        raise InvalidArgument("empty key (0 dimensions)", field)
    if mat.shape[1] > MAX_DIM:
        raise InvalidArgument(f"key length {mat.shape[1]} is above the limit of {MAX_DIM}", field)
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidArgument("contains NaN or infinity", _indexed(field, bad))
    # -0.0 and 0.0 are the same key (as in LocalAI's slices.Compare): store +0.0 only.
    return np.ascontiguousarray(mat) + np.float32(0.0)


def check_nonzero(row_norms: np.ndarray, field: str) -> None:
    """Refuse zero vectors: a cosine similarity with them is undefined."""
    zero = row_norms == 0
    if zero.any():
        raise InvalidArgument("zero vector: cosine similarity is undefined", _indexed(field, int(np.flatnonzero(zero)[0])))


def top_k(value: int) -> int:
    return bounded_int(value, "TopK", 1, MAX_TOP_K)


def check_reply_size(entries: int, dim: int, value_bytes: int, limit: int | None) -> None:
    """Refuse a Find whose reply could not be sent (keys + values + framing over ``limit``)."""
    if not limit or entries == 0:
        return
    per_entry = dim * 4 + 16  # a key's floats, its tags and lengths, the similarity
    size = entries * per_entry + value_bytes
    if size > limit:
        fit = max(1, limit // (per_entry + value_bytes // entries))
        raise InvalidArgument(
            f"a reply of {entries} entries would be about {size / 2**20:.1f} MiB, above the "
            f"{limit / 2**20:.1f} MiB message limit; ask for at most about {fit}", "TopK")


def last_wins(mat: np.ndarray, vals: list[bytes]) -> tuple[np.ndarray, list[bytes]]:
    """Drop earlier repeats of a key within one batch (the last value wins, like sequential Sets)."""
    if len(vals) < 2:
        return mat, vals
    view = np.ascontiguousarray(mat).view(np.dtype((np.void, mat.dtype.itemsize * mat.shape[1]))).ravel()
    rev_unique, rev_index = np.unique(view[::-1], return_index=True)
    if len(rev_unique) == len(vals):
        return mat, vals
    keep = np.sort(len(vals) - 1 - rev_index)
    return mat[keep], [vals[i] for i in keep.tolist()]


def _indexed(field: str, i: int) -> str:
    return f"{field}[{i}]" if field == "Keys" else field


__all__ = ["MAX_DIM", "MAX_TOP_K", "check_nonzero", "check_reply_size", "key_matrix", "last_wins", "top_k"]
