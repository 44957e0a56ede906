"""``inferd chat`` without a message, in a real terminal (a pty) against a real SmolLM2 server.

The session is driven as a person would: a system prompt, a multi-line question, the
history, Ctrl-C in the middle of a long answer (the answer stops, the session goes on),
/reset and /exit. Plus the input parsing (continuation lines, triple-quote blocks).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from inferd.chat_repl import Conversation, _run_stoppable, command, read_message
from tests.helpers import inferd_env, spawned_server
from tests.terminal import Terminal


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    pytest.importorskip("llama_cpp")
    with spawned_server("--backend", "llama-cpp", "--model-options", '{"Threads": 1, "ContextSize": 2048}',
                        timeout=120) as (_, address):
        wait_loaded(address)
        yield address


def wait_loaded(address: str, timeout: float = 120.0) -> None:
    """The server listens before its model is loaded: wait for Status READY."""
    import asyncio

    from inferd.client import new_client
    from inferd.proto import backend_pb2 as pb

    async def poll() -> None:
        client = new_client(address)
        try:
            deadline = time.monotonic() + timeout
            while (await client.status(timeout=5)).state != pb.StatusResponse.State.READY:
                assert time.monotonic() < deadline, "the model did not load"
                await asyncio.sleep(0.2)
        finally:
            await client.close()

    asyncio.run(poll())


def test_interactive_session_in_a_terminal(server: str) -> None:
    env = {**inferd_env(), "TERM": "dumb"}
    term = Terminal([sys.executable, "-m", "inferd.cli", "chat", "--addr", server, "--max-tokens", "200"], env)
    try:
        term.expect(r"inferd chat with .*\n")
        term.expect(">>> ")
        term.send("/system Answer in one short sentence.\n")
        term.expect("system prompt set")
        term.send("What is the capital \\\n")  # continued on the next line
        term.expect(r"\.\.\. ")
        term.send("of France?\n")
        answer = term.expect(r"(?s)(.*?)>>> ").group(1)
        assert "Paris" in answer
        term.send("/history\n")
        history = term.expect(r"(?s)(.*?)>>> ").group(1)
        assert "[system] Answer in one short sentence." in history
        assert "[user] What is the capital \nof France?" in history
        assert re.search(r"\[assistant\] .*Paris", history)
        # Ctrl-C stops a long answer, not the session
        term.send("Write a very long story about a dragon and a knight, at least 1000 words.\n")
        term.expect(r"1000 words\.\n")  # the echo of the typed line
        term.expect(r"\w+ \w+ \w+ \w+")  # the story is streaming
        started = time.monotonic()
        term.send("\x03")
        term.expect(r"\[stopped\]\n>>> ", timeout=15)
        assert time.monotonic() - started < 10
        term.send("/history\n")
        history = term.expect(r"(?s)(.*?)>>> ").group(1)
        assert history.count("[user]") == 2 and history.count("[assistant]") == 2  # the partial story stays
        term.send("/reset\n")
        term.expect("conversation cleared\n>>> ")
        term.send('"""\nSay hello\nin French.\n"""\n')  # a triple-quoted block is one message
        term.expect(r"(?s)(.+?)>>> ")
        term.send("/history\n")
        history = term.expect(r"(?s)(.*?)>>> ").group(1)
        assert "[user] Say hello\nin French." in history and history.count("[user]") == 1
        term.send("Count from one to one hundred in words.\n")
        term.expect(r"in words\.\n")
        term.send("\x03")  # Ctrl-C as soon as the answer starts: still a clean stop
        stopped = term.expect(r"(?s)(.*?)\[stopped\]\n>>> ", timeout=15).group(1)
        assert "Traceback" not in stopped and "Exception" not in stopped
        term.send("\x03")  # at the prompt: a hint, not an exit
        term.expect(r"/exit or Ctrl-D leaves")
        term.send("/exit\n")
        assert term.wait() == 0
    finally:
        term.close()


def test_eof_leaves_and_the_server_error_is_shown(server: str) -> None:
    env = {**inferd_env(), "TERM": "dumb"}
    term = Terminal([sys.executable, "-m", "inferd.cli", "chat", "--addr", server, "--max-tokens", "-5"], env)
    try:
        term.expect(">>> ")
        term.send("hi\n")
        term.expect(r"chat failed: INVALID_ARGUMENT: .*Tokens")
        term.send("/history\n")
        term.expect(r"\(empty\)\n>>> ")  # the unanswered question is not kept
        term.send("\x04")  # Ctrl-D at the prompt (readline reads it; a ^D typed earlier would be lost)
        assert term.wait() == 0
    finally:
        term.close()


def test_reading_messages_and_commands() -> None:
    def feed(*lines: str):  # noqa: ANN202
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(feed("hello")) == "hello"
    assert read_message(feed("one \\", "two\\", "three")) == "one \ntwo\nthree"
    assert read_message(feed('"""', "a", "", "b", '"""')) == "a\n\nb"
    assert read_message(feed('"""first', 'last"""')) == "first\nlast"
    assert read_message(feed('"""inline"""')) == '"""inline"""'  # a one-line block is just text
    conv = Conversation(turns=[("user", "q"), ("assistant", "a")])
    out = open(os.devnull, "w")
    assert command("/system be brief", conv, out) and conv.system == "be brief"
    assert conv.messages()[0] == ("system", "be brief")
    assert command("/system -", conv, out) and conv.system == ""
    assert command("/reset", conv, out) and conv.turns == []
    assert command("/nonsense", conv, out)
    assert not command("/exit", conv, out) and not command("/quit", conv, out)


def test_ctrl_c_the_instant_an_answer_starts_stops_that_answer() -> None:
    # CI caught a Ctrl-C that landed while the answer's task was being created, before the
    # REPL's handler was installed: KeyboardInterrupt ended the whole session.
    loop = asyncio.new_event_loop()
    started: list[bool] = []

    async def answer() -> None:
        started.append(True)
        await asyncio.sleep(30)

    def ctrl_c_then_answer():
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, before the task exists
        return answer()

    try:
        assert _run_stoppable(loop, ctrl_c_then_answer) is False  # stopped, no KeyboardInterrupt
        assert started == []
        assert _run_stoppable(loop, lambda: asyncio.sleep(0)) is True  # the next answer runs
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        loop.close()
