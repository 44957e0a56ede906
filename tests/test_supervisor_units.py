"""The watchdog's bookkeeping (with a fake clock) and the models.yaml parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.supervisor.config import ConfigError, load_config, parse_duration
from inferd.supervisor.watchdog import Watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw: object) -> tuple[Watchdog, Clock, list[tuple[str, str, str]]]:
    clock = Clock()
    actions: list[tuple[str, str, str]] = []
    wd = Watchdog(
        on_busy=lambda m, r: actions.append(("busy", m, r)),
        on_idle=lambda m, r: actions.append(("idle", m, r)),
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )
    return wd, clock, actions


def test_busy_timeout_follows_the_oldest_call_in_flight() -> None:
    wd, clock, actions = make(busy_timeout=10.0)
    wd.add("a:1", "a")
    wd.mark("a:1")
    clock.now += 6
    wd.mark("a:1")  # a second, overlapping call
    wd.unmark("a:1")  # LIFO: the newer one ends, the first is still running
    clock.now += 5  # first call is 11 s old
    wd.check()
    assert actions and actions[0][:2] == ("busy", "a") and "busy timeout 10s" in actions[0][2]
    wd.check()
    assert len(actions) == 1  # acted once; the address is forgotten until re-added


def test_short_calls_never_trip_the_busy_timeout() -> None:
    wd, clock, actions = make(busy_timeout=10.0)
    wd.add("a:1", "a")
    for _ in range(5):
        wd.mark("a:1")
        clock.now += 4
        wd.unmark("a:1")
        wd.check()
    assert actions == []


def test_idle_timeout_counts_from_the_last_call_and_not_during_one() -> None:
    wd, clock, actions = make(idle_timeout=5.0)
    wd.add("a:1", "a")
    clock.now += 4
    wd.mark("a:1")
    clock.now += 100  # a long call is not idleness
    wd.check()
    assert actions == []
    wd.unmark("a:1")
    clock.now += 4.9
    wd.check()
    assert actions == []
    clock.now += 0.2
    wd.check()
    assert actions == [("idle", "a", "idle for 5.1s > idle timeout 5s")]


def test_marks_for_unknown_addresses_are_ignored() -> None:
    wd, clock, actions = make(busy_timeout=1.0, idle_timeout=1.0)
    wd.mark("gone:1")
    wd.unmark("gone:1")
    clock.now += 10
    wd.check()
    assert actions == [] and wd.busy_since("gone:1") is None


def test_status_probe_counts_calls_not_made_through_our_clients() -> None:
    busy = {"a:1": False}
    wd, clock, actions = make(busy_timeout=10.0, idle_timeout=5.0, status_probe=lambda addr: busy[addr])
    wd.add("a:1", "a")
    clock.now += 3
    busy["a:1"] = True  # someone else's call
    wd.check()
    assert wd.busy_since("a:1") == 1003.0
    clock.now += 8  # would be idle, is busy
    wd.check()
    assert actions == []
    busy["a:1"] = False
    wd.check()
    assert wd.idle_since("a:1") == 1011.0 and wd.busy_since("a:1") is None
    clock.now += 11
    busy["a:1"] = True
    wd.check()  # seen busy now: not idle
    clock.now += 11
    wd.check()
    assert [a[:2] for a in actions] == [("busy", "a")]


def test_disabled_watchdog_starts_no_thread() -> None:
    wd, _, _ = make()
    wd.start()
    assert not wd.enabled and wd._thread is None


@pytest.mark.parametrize(("text", "seconds"), [
    (30, 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("2.5s", 2.5), ("off", None), (None, None), (0, None),
])
def test_durations(text: object, seconds: float | None) -> None:
    assert parse_duration(text, "x") == seconds


def test_bad_duration_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="watchdog.busy_timeout"):
        parse_duration("soon", "watchdog.busy_timeout")


def test_models_yaml(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"x")
    p = tmp_path / "models.yaml"
    p.write_text(
        "max_loaded: 2\n"
        "watchdog: {busy_timeout: 5m, idle_timeout: 900}\n"
        "models:\n"
        "  - name: chat\n"
        "    backend: llama-cpp\n"
        "    model: ./m.gguf\n"
        "    options: {ContextSize: 2048, Options: ['use_jinja:true']}\n"
        "    env: {INFERD_LOG_LEVEL: debug}\n"
    )
    cfg = load_config(p)
    assert cfg.max_loaded == 2 and cfg.busy_timeout == 300 and cfg.idle_timeout == 900
    opts = cfg.spec("chat").model_options()
    assert opts.ContextSize == 2048 and list(opts.Options) == ["use_jinja:true"]
    assert opts.Model == str(tmp_path / "m.gguf") and opts.ModelFile == str(tmp_path / "m.gguf")


@pytest.mark.parametrize(("doc", "message"), [
    ("models: [{name: a, backend: x, colour: red}]", "unknown key"),
    ("models: [{name: a}]", "'backend' is required"),
    ("models: [{name: a, backend: x}, {name: a, backend: y}]", "duplicate model names"),
    ("models: [{name: a, backend: x, options: {NoSuchField: 1}}]", "not a valid ModelOptions"),
    ("watchdog: {busy_timeout: later}", "watchdog.busy_timeout"),
])
def test_models_yaml_errors(tmp_path: Path, doc: str, message: str) -> None:
    p = tmp_path / "models.yaml"
    p.write_text(doc)
    with pytest.raises(ConfigError, match=message):
        load_config(p)
