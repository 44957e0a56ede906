"""The rows of a store: keys, their per-row scan data, values, and exact-key lookup.

Layout, chosen for Find speed: keys live in one contiguous float32 matrix (rows grown by
doubling, deletes move the last row into the hole) with, per row, the float64 norm used
by every reported similarity (``similarity``), a float32 1/norm for the float32 scan, and
(when the int8 scan is on) the row's int8 codes, scale and quantization error (``scan``).
Nothing is rebuilt per query. A dict from the key's hash to its row gives O(1) exact-key
lookups without keeping a second copy of every key as bytes. Rows move on delete, so each
entry also has a stable id (the ANN index's label) and an id -> row map.

Not thread-safe: the store's lock guards every call.
"""

from __future__ import annotations

import numpy as np

from inferd.engines.store import similarity
from inferd.engines.store.scan import quantize


def key_hash(row: np.ndarray) -> int:
    return hash(row.tobytes())


class KeyTable:
    """See the module docstring. ``with_codes``: keep int8 codes for the int8 scan."""

    def __init__(self, with_codes: bool) -> None:
        self.with_codes = with_codes
        self.reset()

    def reset(self) -> None:
        """Empty, and the dimension open again."""
        self.dim = -1
        self.n = 0
        self.keys = np.empty((0, 0), dtype=np.float32)
        self.norms = np.empty(0, dtype=np.float64)
        self.inv32 = np.empty(0, dtype=np.float32)
        self.codes = np.empty((0, 0), dtype=np.int8)
        self.steps = np.empty(0, dtype=np.float64)
        self.qerr_max = 0.0  # an upper bound on every row's quantization error (never lowered)
        self.ids = np.empty(0, dtype=np.int64)  # row -> stable id
        self.row_of_id = np.empty(0, dtype=np.int64)  # id -> row, -1 when gone
        self.next_id = 0
        self.values: list[bytes] = []
        self.value_bytes = 0
        self._buckets: dict[int, int | list[int]] = {}

    # ---- lookups -------------------------------------------------------------------------
    def find_row(self, key: np.ndarray, h: int | None = None) -> int:
        b = self._buckets.get(key_hash(key) if h is None else h)
        if b is None:
            return -1
        if isinstance(b, int):
            return b if np.array_equal(self.keys[b], key) else -1
        for r in b:
            if np.array_equal(self.keys[r], key):
                return r
        return -1

    def cosine(self, rows: np.ndarray, query_unit: np.ndarray) -> np.ndarray:
        """Exact similarities of ``rows`` with a float64 unit query (``similarity.cosine_rows``)."""
        return similarity.cosine_rows(self.keys[rows], self.norms[rows], query_unit)

    def unit32(self, rows: np.ndarray) -> np.ndarray:
        """float32 unit vectors of ``rows`` (what the ANN index stores)."""
        return similarity.unit(self.keys[rows], self.norms[rows]).astype(np.float32)

    # ---- writes --------------------------------------------------------------------------
    def upsert(self, mat: np.ndarray, vals: list[bytes], hashes: list[int] | None = None,
               row_norms: np.ndarray | None = None) -> tuple[int, int]:
        """Upsert a validated, de-duplicated batch; returns the (start, end) rows appended."""
        if self.dim < 0:
            self.dim = mat.shape[1]
        if hashes is None:
            hashes = [key_hash(row) for row in mat]
        new_rows: list[int] = []
        new_hashes: list[int] = []
        for i, h in enumerate(hashes):
            r = self.find_row(mat[i], h) if h in self._buckets else -1
            if r >= 0:
                self.value_bytes += len(vals[i]) - len(self.values[r])
                self.values[r] = vals[i]  # same key, same vector: only the value changes
            else:
                new_rows.append(i)
                new_hashes.append(h)
        start = self.n
        if not new_rows:
            return start, start
        whole = len(new_rows) == len(mat)
        add = mat if whole else mat[new_rows]
        add_norms = similarity.norms(add) if row_norms is None else (row_norms if whole else row_norms[new_rows])
        self._reserve(len(new_rows))
        end = start + len(new_rows)
        self.keys[start:end] = add
        self.norms[start:end] = add_norms
        self.inv32[start:end] = 1.0 / add_norms
        if self.with_codes:
            for s in range(0, len(add), similarity.CHUNK_ROWS):
                chunk = slice(s, s + similarity.CHUNK_ROWS)
                codes, steps, err = quantize(similarity.unit(add[chunk], add_norms[chunk]))
                self.codes[start + s : start + s + len(codes)] = codes
                self.steps[start + s : start + s + len(codes)] = steps
                self.qerr_max = max(self.qerr_max, float(err.max()))
        ids = self._new_ids(len(new_rows))
        self.ids[start:end] = ids
        self.row_of_id[ids] = np.arange(start, end)
        for j, i in enumerate(new_rows):
            self.values.append(vals[i])
            self.value_bytes += len(vals[i])
            self._bucket_add(new_hashes[j], start + j)
        self.n = end
        return start, end

    def delete(self, mat: np.ndarray) -> list[int]:
        """Remove the keys of ``mat`` that are present; returns the removed entries' ids."""
        removed: list[int] = []
        for key in mat:
            h = key_hash(key)
            r = self.find_row(key, h)
            if r < 0:
                continue
            last = self.n - 1
            self.value_bytes -= len(self.values[r])
            removed.append(int(self.ids[r]))
            self.row_of_id[self.ids[r]] = -1
            self._bucket_replace(h, r, None)
            if r != last:
                moved_h = key_hash(self.keys[last])
                self._move(last, r)
                self._bucket_replace(moved_h, last, r)
            self.values.pop()
            self.n = last
        if self.n == 0:
            self.reset()
        return removed

    # ---- internals -----------------------------------------------------------------------
    def _move(self, src: int, dst: int) -> None:
        for col in (self.keys, self.norms, self.inv32, self.ids):
            col[dst] = col[src]
        if self.with_codes:
            self.codes[dst] = self.codes[src]
            self.steps[dst] = self.steps[src]
        self.values[dst] = self.values[src]
        self.row_of_id[self.ids[dst]] = dst

    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        if self.keys.shape[1] != self.dim:  # only when empty: the dimension was (re)opened
            self.keys = np.empty((0, self.dim), dtype=np.float32)
            self.codes = np.empty((0, self.dim if self.with_codes else 0), dtype=np.int8)
        cap = self.keys.shape[0]
        if need <= cap:
            return
        # Doubling: every reallocation touches fresh pages, and page faults are costly in a VM.
        new_cap = max(need, cap * 2, 1024)
        n = self.n

        def grow(col: np.ndarray, width: int | None = None) -> np.ndarray:
            shape = (new_cap, width) if width is not None else (new_cap,)
            out = np.empty(shape, dtype=col.dtype)
            out[:n] = col[:n]
            return out

        self.keys = grow(self.keys, self.dim)
        self.norms = grow(self.norms)
        self.inv32 = grow(self.inv32)
        self.ids = grow(self.ids)
        if self.with_codes:
            self.codes = grow(self.codes, self.dim)
            self.steps = grow(self.steps)

    def _new_ids(self, count: int) -> np.ndarray:
        start = self.next_id
        self.next_id += count
        if self.next_id > len(self.row_of_id):
            grown = np.full(max(self.next_id, len(self.row_of_id) * 2, 1024), -1, dtype=np.int64)
            grown[: len(self.row_of_id)] = self.row_of_id
            self.row_of_id = grown
        return np.arange(start, start + count, dtype=np.int64)

    def _bucket_add(self, h: int, row: int) -> None:
        b = self._buckets.get(h)
        if b is None:
            self._buckets[h] = row
        elif isinstance(b, int):
            self._buckets[h] = [b, row]
        else:
            b.append(row)

    def _bucket_replace(self, h: int, old: int, new: int | None) -> None:
        b = self._buckets[h]
        if isinstance(b, int):
            if new is None:
                del self._buckets[h]
            else:
                self._buckets[h] = new
            return
        b.remove(old)
        if new is not None:
            b.append(new)
        if len(b) == 1:
            self._buckets[h] = b[0]


__all__ = ["KeyTable", "key_hash"]
