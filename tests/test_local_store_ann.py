"""local-store ANN life cycle: the early probe, the low-priority builder, Finds during a build."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from inferd.engines.store import StoreConfig, VectorStore
from inferd.engines.store.ann_lifecycle import lower_thread_priority
from tests.test_local_store import clustered


def test_lower_priority_is_per_thread() -> None:
    if not hasattr(os, "setpriority"):
        pytest.skip("no setpriority on this platform")
    seen: dict[str, int] = {}

    def worker() -> None:
        lower_thread_priority(19)
        seen["worker"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = threading.Thread(target=lambda: seen.__setitem__(
            "child", os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        child.start()
        child.join()

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"worker": 19, "child": 19}  # threads it starts (hnswlib's) inherit it
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller is untouched


def test_probe_skips_the_full_build_on_random_data() -> None:
    pytest.importorskip("hnswlib")
    rng = np.random.default_rng(5)
    data = rng.standard_normal((6000, 128)).astype(np.float32)  # random: the worst case
    s = VectorStore(None, StoreConfig(ann_threshold=6000, ann_background=False, ann_probe_size=2000))
    t0 = time.perf_counter()
    s.set(data, [b"x"] * len(data))
    st = s.stats()
    assert st["ann_ef"] is None and "full index not built" in st["ann"], st
    assert "predicted at full size" in st["ann"]
    assert s.find(data[7], 1).method == "exact"
    assert time.perf_counter() - t0 < 30


def test_probe_lets_clustered_data_build() -> None:
    pytest.importorskip("hnswlib")
    data = clustered(6000, 32, seed=4)
    s = VectorStore(None, StoreConfig(ann_threshold=6000, ann_background=False, ann_probe_size=2000,
                                      ann_time_ratio=1e9))
    s.set(data, [b"%d" % i for i in range(len(data))])
    st = s.stats()
    assert st["ann_ef"] is not None, st
    r = s.find(data[10], 10)
    assert r.method == "ann" and r.values[0] == b"10"


def test_finds_answer_exactly_while_a_low_priority_build_runs() -> None:
    pytest.importorskip("hnswlib")
    data = clustered(1500, 32, seed=6)
    s = VectorStore(None, StoreConfig(ann_threshold=1500, ann_probe_size=0, ann_time_ratio=1e9))
    s.set(data, [b"%d" % i for i in range(len(data))])  # starts the background build
    answered = 0
    while s.stats()["ann"].startswith("building") and answered < 200:
        i = answered % len(data)
        r = s.find(data[i], 3)
        assert r.method == "exact" and r.values[0] == b"%d" % i
        answered += 1
    assert answered > 0
    assert s.wait_for_index(120)
    assert s.stats()["ann_ef"] is not None, s.stats()
    assert s.find(data[5], 3).method == "ann"
    s.close()


@pytest.mark.parametrize("scan", ["int8", "float32"])
def test_thread_options_give_the_same_answers(scan: str) -> None:
    """scan_threads and ann_build_threads above 1 run for real and change nothing in the answers."""
    pytest.importorskip("hnswlib")
    data = clustered(3000, 32, seed=8)
    one = VectorStore(None, StoreConfig(ann="off", scan=scan))
    two = VectorStore(None, StoreConfig(scan=scan, scan_threads=2, ann_build_threads=2, ann_threshold=3000,
                                        ann_background=False, ann_probe_size=0, ann_time_ratio=1e9))
    for s in (one, two):
        s.set(data, [b"%d" % i for i in range(len(data))])
    assert two.stats()["ann_ef"] is not None, two.stats()
    for i in range(0, 3000, 150):
        a, b = one.find(data[i], 10), two.exact_find(data[i], 10)
        assert a.values == b.values and np.array_equal(a.similarities, b.similarities)
        assert two.find(data[i], 1).values == [b"%d" % i]
