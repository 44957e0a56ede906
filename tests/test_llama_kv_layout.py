"""KV layout: with one KV stream per slot (the default) a decode step must stay ONE graph.

llama.cpp puts only consecutive, increasing sequence ids in one ubatch when each slot has its
own stream (``split_equal(sequential=True)``). Before issue 11's fix the scheduler wrote the
batch in admission order (slots 3, 2, 1, 0) and placed requests on the least recently used
slot, so 8 streams decoded as up to 8 graphs per step: 87-100 tok/s where llama-server got
130-140 with the same library. These tests pin the two halves of the fix: the batch is in slot
order, and placement keeps busy slots in as few runs as it can (copying a cached prefix from
another slot rather than taking a slot that splits the run).
"""

from __future__ import annotations

import queue

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from inferd.engines.llama import (  # noqa: E402
    LlamaModel,
    ModelConfig,
    SamplingParams,
    Scheduler,
    StepOutput,
    default_model_path,
)
from inferd.engines.llama.prefix_cache import PrefixCache, _runs  # noqa: E402

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


class _Busy:
    def __init__(self, slot: int, prompt: list[int] | None = None) -> None:
        self.slot = slot
        self.prompt = prompt or [999, slot]


def _cache(unified: bool) -> PrefixCache:
    cache = PrefixCache(memory=None, slots=8, unified=unified, max_tokens=100_000)
    history = list(range(1, 101))
    cache.tokens[5] = history  # an idle slot holding a conversation
    cache.last_used[5] = 10.0
    return cache


def test_runs_counts_consecutive_groups() -> None:
    assert [_runs(s) for s in ({0}, {0, 1, 2}, {0, 2}, {0, 1, 3, 5, 6}, set())] == [1, 1, 2, 3, 0]


def test_separate_layout_keeps_busy_slots_consecutive_and_copies_the_prefix() -> None:
    cache = _cache(unified=False)
    busy = [_Busy(0), _Busy(1)]
    free = [2, 3, 4, 5, 6, 7]
    placement = cache.place(list(range(1, 101)) + [500, 501], free, busy)
    # slot 2 extends the run {0, 1}; the 100 cached tokens of slot 5 are copied there
    assert (placement.slot, placement.keep) == (2, 0)
    assert (placement.source_slot, placement.source_tokens, placement.source_request) == (5, 100, None)
    # a prefix shorter than min_copy is not worth a stream copy
    short = cache.place([1, 2, 3, 4, 700, 701], free, busy)
    assert (short.slot, short.source_slot) == (2, -1)


def test_separate_layout_reuses_the_slot_itself_when_contiguity_allows() -> None:
    cache = _cache(unified=False)
    # nothing busy: every slot is one run, so the slot holding the conversation wins (no copy)
    placement = cache.place(list(range(1, 101)) + [500], [0, 1, 2, 3, 4, 5, 6, 7], [])
    assert (placement.slot, placement.keep, placement.source_slot) == (5, 100, -1)
    # slot 6 busy: slot 5 extends its run and holds the prefix
    placement = cache.place(list(range(1, 101)) + [500], [0, 1, 2, 3, 4, 5, 7], [_Busy(6)])
    assert (placement.slot, placement.keep) == (5, 100)


def test_unified_layout_takes_the_longest_prefix_whatever_the_slot() -> None:
    cache = _cache(unified=True)
    placement = cache.place(list(range(1, 101)) + [500], [2, 3, 4, 5, 6, 7], [_Busy(0), _Busy(1)])
    assert (placement.slot, placement.keep, placement.source_slot) == (5, 100, -1)


@pytest.fixture(scope="module")
def model():
    m = LlamaModel(ModelConfig(path=default_model_path(), n_ctx=256, slots=4, threads=1))
    yield m
    m.close()


def test_every_decode_batch_is_in_slot_order_and_one_run(model, monkeypatch) -> None:
    assert model.config.kv_unified is False  # the default layout is the one this is about
    real_decode = llama_cpp.llama_decode
    batches: list[list[int]] = []

    def recording_decode(ctx, batch):
        batches.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return real_decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
    sched = Scheduler(model, max_waiting=4)
    try:
        queues = []
        for q in ("Name a fruit.", "What is 3+3?", "Say hi.", "Name an animal."):
            out: queue.Queue[StepOutput] = queue.Queue()
            sched.add(model.tokenize(CHAT.format(q)), SamplingParams(max_tokens=12, temperature=0,
                                                                     ignore_eos=True), out.put)
            queues.append(out)
        for out in queues:
            while out.get(timeout=60).completion is None:
                pass
    finally:
        sched.close()
    assert batches
    for seqs in batches:
        assert seqs == sorted(seqs), seqs  # tokens grouped by slot, slots increasing
    # the generation steps with all four streams decode slots 0-3: one run, one graph
    four = [sorted(set(s)) for s in batches if len(s) == 4 and len(set(s)) == 4]
    assert four and all(s == [0, 1, 2, 3] for s in four), four
