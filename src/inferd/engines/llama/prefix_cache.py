"""Prefix caching: reuse KV cells of tokens a slot (or another slot) already computed.

Why: a chat client re-sends the whole conversation every turn, and concurrent requests often
share a system prompt. Recomputing those tokens is most of a turn's time to first token.

What is cached: each llama.cpp sequence (= slot) keeps the KV cells of the tokens it decoded
after its request ends (``tokens[slot]`` mirrors them exactly). A new request is placed as
llama-server does with ``cache_prompt``, plus cross-slot sharing:

* on the free slot whose cached tokens share the longest prefix with its prompt (ties and
  no match: the least recently used slot, so recent conversations survive longest); the
  slot's cells past that prefix are dropped (``llama_memory_seq_rm``);
* if ANOTHER slot (idle or active) holds a longer prefix, those cells are copied into the
  new slot (``llama_memory_seq_cp``): with the unified KV layout this only tags the same
  cells with a second sequence id (no memory, no compute); with one KV stream per slot
  llama.cpp copies the stream. When the other slot is still prefilling that prefix, the new
  request waits for it instead of computing it again, so a system prompt shared by
  concurrent requests is processed once.

At least one prompt token is always left to decode (the logits of the last one are needed).
Reused cells hold exactly what a fresh prefill would compute (same tokens, same positions),
so a cache hit never changes output (tested with greedy decoding).

Bound: the tokens held by idle slots are capped (``max_tokens``); past it, idle caches are
dropped least recently used first. A KV cache that runs full also evicts idle caches before
any request fails. ``max_tokens=0`` turns caching off (every slot is cleared when it ends).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import llama_cpp


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    # compare in blocks first: most prefixes are long and equal
    step = 256
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _runs(slots: set[int]) -> int:
    """How many runs of consecutive numbers ``slots`` holds ({0, 1, 3} -> 2)."""
    return sum(1 for s in slots if s - 1 not in slots)


@dataclass
class Placement:
    """Where a request goes and what it reuses."""

    slot: int
    keep: int  # tokens reused from the slot's own cache
    source_slot: int = -1  # another slot to copy from (-1: none)
    source_tokens: int = 0  # how many tokens the copy covers
    source_request: Any = None  # the active request in source_slot (copy once it has prefilled them)


class PrefixCache:
    """Slot token mirrors, placement, LRU bound. Used only on the scheduler thread."""

    def __init__(self, memory: Any, slots: int, unified: bool, max_tokens: int, min_copy: int = 16) -> None:
        self.memory = memory
        self.unified = unified
        self.max_tokens = max_tokens
        self.min_copy = min_copy
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.last_used = [0.0] * slots
        self.idle: set[int] = set(range(slots))
        self.hits = 0  # requests that reused at least one token
        self.reused_tokens = 0
        self.copies = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_tokens > 0

    # ---- placement -------------------------------------------------------------------------
    def place(self, prompt: list[int], free: list[int], active: list[Any],
              busy: set[int] | None = None) -> Placement:
        """Pick a free slot for ``prompt`` (``free`` non-empty) and what it can reuse.

        ``active``: requests whose prompts may be copied from; ``busy``: every slot in use
        (default: the slots of ``active``).
        """
        if busy is None:
            busy = {r.slot for r in active if r.slot >= 0}
        limit = len(prompt) - 1  # leave one token to decode
        if not self.enabled or limit <= 0:
            return Placement(self._fresh_slot(free, busy, {}), 0)
        keeps = {s: min(common_prefix(self.tokens[s], prompt), limit) for s in free}
        if self.unified:
            # the longest cached prefix; ties and no match: empty, then least recently used
            best = max(keeps.values())
            slot = self._fresh_slot([s for s in free if keeps[s] == best], busy, keeps)
        else:
            slot = self._fresh_slot(free, busy, keeps)
        placement = Placement(slot, keeps[slot])
        if not self.unified:
            # the slot was chosen for contiguity: copy a longer prefix another idle slot holds
            src = max(free, key=lambda s: keeps[s])
            if src != slot and keeps[src] > placement.keep + self.min_copy:
                placement.source_slot, placement.source_tokens = src, keeps[src]
        # A longer prefix in an active request: copy its cells, or wait for them while it is
        # still prefilling that prefix.
        for req in active:
            if req.slot < 0:
                continue
            n = min(common_prefix(req.prompt, prompt), limit)
            if n > max(placement.keep, placement.source_tokens) + self.min_copy:
                placement.source_slot, placement.source_tokens = req.slot, n
                placement.source_request = req
        return placement

    def _fresh_slot(self, candidates: list[int], busy: set[int], keeps: dict[int, int]) -> int:
        """The best of ``candidates`` when no prefix decides (unified) or before prefixes (separate).

        With one KV stream per slot, llama.cpp decodes only runs of consecutive sequence ids in
        one graph, so the slot that keeps the busy slots in the fewest runs comes first (4 streams
        on slots 0-3 are one graph per step, on slots 0, 2, 5, 7 four: a whole pass over the
        weights each); a longer prefix from another slot is copied instead. Then the slot's own
        reusable prefix, then an empty slot, then the least recently used one, so recent
        conversations survive longest.
        """

        def key(s: int) -> tuple[int, int, bool, float]:
            runs = 0 if self.unified else _runs(busy | {s})
            return runs, -keeps.get(s, 0), len(self.tokens[s]) > 0, self.last_used[s]

        return min(candidates, key=key)

    def claim(self, placement: Placement) -> int:
        """Take the slot: drop what it does not reuse. Returns the tokens reused now."""
        slot = placement.slot
        self.idle.discard(slot)
        keep = placement.keep
        if placement.source_slot >= 0:
            keep = 0  # the copy (now or once the source has prefilled) replaces the slot's cache
        self.truncate(slot, keep)
        self.last_used[slot] = time.monotonic()
        if keep:
            self.hits += 1
            self.reused_tokens += keep
        return keep

    def copy(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold the first ``n`` cells of ``src`` (dst is empty)."""
        if self.unified:
            llama_cpp.llama_memory_seq_cp(self.memory, src, dst, 0, n)
        else:
            # across KV streams llama.cpp copies whole streams only (it asserts on a range)
            llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
            llama_cpp.llama_memory_seq_rm(self.memory, dst, n, -1)
        self.tokens[dst] = self.tokens[src][:n]
        self.copies += 1
        self.hits += 1
        self.reused_tokens += n

    # ---- bookkeeping ---------------------------------------------------------------------------
    def truncate(self, slot: int, keep: int) -> None:
        if keep <= 0:
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            self.tokens[slot] = []
            return
        if not llama_cpp.llama_memory_seq_rm(self.memory, slot, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)  # partial removal refused
            self.tokens[slot] = []
            return
        del self.tokens[slot][keep:]

    def release(self, slot: int, keep_cache: bool) -> None:
        """A request left ``slot``: keep its cells for reuse (or drop them), then apply the bound."""
        if not (keep_cache and self.enabled):
            self.truncate(slot, 0)
        self.last_used[slot] = time.monotonic()
        self.idle.add(slot)
        self._enforce_bound()

    def cached_tokens(self) -> int:
        return sum(len(self.tokens[s]) for s in self.idle)

    def _enforce_bound(self) -> None:
        while self.cached_tokens() > self.max_tokens and self.evict_one():
            pass

    def evict_one(self) -> bool:
        """Drop the least recently used idle cache; False when there is none."""
        candidates = [s for s in self.idle if self.tokens[s]]
        if not candidates:
            return False
        self.truncate(min(candidates, key=lambda s: self.last_used[s]), 0)
        self.evictions += 1
        return True

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_reused_tokens": self.reused_tokens, "cache_copies": self.copies,
                "cache_evictions": self.evictions, "cache_tokens": self.cached_tokens(),
                "cache_max_tokens": self.max_tokens}
