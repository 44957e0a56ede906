"""``inferd chat`` with no message: an interactive conversation in the terminal.

The conversation (the history of turns) is sent with each question, so the model sees
what was said before; answers stream as they are generated. Commands:

    /system TEXT   set the system prompt (``/system`` alone shows it, ``/system -`` clears it)
    /reset         forget the conversation (the system prompt stays)
    /history       show the conversation so far
    /exit          leave (Ctrl-D too)

A line ending in ``\\`` continues on the next line, and a block between two lines of
``\"\"\"`` is one message (Ollama's convention), for multi-line input. Ctrl-C while an
answer streams stops that answer (the call is cancelled, so the server stops generating)
and returns to the prompt; Ctrl-C at the prompt clears the line.

The session keeps one event loop and one client; the prompt is a plain blocking ``input()``
(line editing and arrow-key history from ``readline``) and each answer is one task on the
loop. While an answer runs, SIGINT is routed to cancelling that task (which cancels the
gRPC stream), never raised as ``KeyboardInterrupt`` inside the loop's machinery; at the
prompt Python's default handler is back.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROMPT = ">>> "
CONTINUE = "... "
HELP = ("commands: /system TEXT (set; '/system' shows, '/system -' clears), /reset, /history, /exit; "
        "end a line with \\ or wrap lines in \"\"\" for multi-line input; Ctrl-C stops an answer")


@dataclass
class Conversation:
    system: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)  # (role, content)

    def messages(self) -> list[tuple[str, str]]:
        return ([("system", self.system)] if self.system else []) + self.turns


def read_message(read: Callable[[str], str]) -> str:
    """One message from the user: a line, ``\\``-continued lines, or a ``\"\"\"`` block."""
    first = read(PROMPT)
    if first.strip() == '"""' or (first.lstrip().startswith('"""') and not first.rstrip().endswith('"""', 3)):
        lines = [first.lstrip()[3:]] if first.strip() != '"""' else []
        while True:
            line = read(CONTINUE)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read(CONTINUE))
    return "\n".join(lines)


def command(text: str, conv: Conversation, out: Any) -> bool:
    """Run a ``/command``; False means leave."""
    name, _, arg = text.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/system":
        if arg == "-":
            conv.system = ""
            print("system prompt cleared", file=out)
        elif arg:
            conv.system = arg
            print("system prompt set", file=out)
        else:
            print(f"system prompt: {conv.system or '(none)'}", file=out)
    elif name == "/reset":
        conv.turns.clear()
        print("conversation cleared", file=out)
    elif name == "/history":
        for role, content in conv.messages():
            print(f"[{role}] {content}", file=out)
        if not conv.messages():
            print("(empty)", file=out)
    else:
        print(HELP, file=out)
    return True


async def _answer(client: Any, conv: Conversation, args: argparse.Namespace, write: Callable[[str], None]) -> str:
    from inferd.proto import backend_pb2 as pb

    request = pb.PredictOptions(Messages=[pb.Message(role=r, content=c) for r, c in conv.messages()],
                                UseTokenizerTemplate=True, Tokens=args.max_tokens, Temperature=args.temperature)
    parts: list[str] = []
    try:
        async for reply in client.predict_stream(request, timeout=args.timeout):
            text = "".join(d.content for d in reply.chat_deltas) if reply.chat_deltas else reply.message.decode()
            parts.append(text)
            write(text)
    finally:
        conv.turns.append(("assistant", "".join(parts)))  # what was shown stays, stopped or not
    return "".join(parts)


def _run_stoppable(loop: asyncio.AbstractEventLoop, make_coro: Callable[[], Any]) -> bool:
    """Run ``make_coro()`` to its end; Ctrl-C cancels it. True if it finished, False if stopped.

    The Ctrl-C handler is in place before the task exists: a Ctrl-C typed the instant the answer
    starts must stop that answer, not raise KeyboardInterrupt out of ``create_task``.
    """
    task: asyncio.Task[Any] | None = None
    stop_requested = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True
        if task is not None:
            loop.call_soon_threadsafe(task.cancel)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        task = loop.create_task(make_coro())
        if stop_requested:
            task.cancel()
        loop.run_until_complete(task)
        return True
    except asyncio.CancelledError:
        return False
    finally:
        signal.signal(signal.SIGINT, previous)


def repl(args: argparse.Namespace, make_client: Callable[[], Any]) -> int:
    """The loop: read a message or command, stream the answer, repeat until /exit or EOF."""
    from inferd.client import RpcError

    try:
        import readline  # noqa: F401 - line editing and arrow-key history for input()
    except ImportError:  # not on every platform
        pass
    conv = Conversation(system=args.system)
    out = sys.stdout
    print(f"inferd chat with {args.addr} ({HELP})", file=out, flush=True)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    async def build() -> Any:
        return make_client()  # a channel belongs to the loop it is created on

    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(build())
    try:
        while True:
            try:
                text = read_message(input)
            except EOFError:
                print(file=out)
                return 0
            except KeyboardInterrupt:
                print("^C (/exit or Ctrl-D leaves)", file=out, flush=True)
                continue
            if not text.strip():
                continue
            if text.lstrip().startswith("/"):
                if not command(text, conv, out):
                    return 0
                continue
            try:
                conv.turns.append(("user", text))
                finished = _run_stoppable(loop, lambda: _answer(client, conv, args, write))
            except KeyboardInterrupt:  # Ctrl-C before the answer's own handler was in place
                finished = False
            except RpcError as exc:
                del conv.turns[-2:]  # the question was not answered: do not send it again
                print(f"\ninferd: chat failed: {exc.code.name}: {exc.details}", file=sys.stderr, flush=True)
                continue
            if conv.turns and conv.turns[-1][0] == "user":  # stopped before the answer began
                conv.turns.append(("assistant", ""))
            print("" if finished else "\n[stopped]", file=out, flush=True)
    finally:
        loop.run_until_complete(client.close())
        loop.close()
