"""Prefix caching: multi-turn time to first token, and a system prompt shared by concurrent requests.

Issue 11's targets, measured in one run on the same model, threads and slots:

* multi-turn chat: turn 2 re-sends turn 1 (~1,500 tokens of history) plus a short question;
  TTFT of turn 2 <= 0.25x turn 1, and <= llama-server's turn 2 (``cache_prompt: true``);
* 4 concurrent requests sharing a ~1,500-token system prompt: the prompt is processed once
  (prompt tokens computed, from GetMetrics) and the time until every stream has its first token,
  with the prefix cache on (default) and off (``cache_prompt:false``).

Each round uses a fresh history (a session number up front), so turn 1 is always a miss.

    python bench/prefix_cache.py [--threads N] [--rounds 3] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_throughput import InferdServer, LlamaServer, engine_stats, llama_server_binary  # noqa: E402
from plot import add_plot_argument, bar_chart  # noqa: E402

from inferd.client import new_client  # noqa: E402
from inferd.engines.llama import default_model_path  # noqa: E402
from inferd.engines.llama.config import default_threads  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402

SLOTS = 4
CTX = 4096
REPLY_TOKENS = 16
FACTS = 110  # ~1,500 tokens of history (--facts)


def history(session: int) -> str:
    facts = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(FACTS))
    return f"Session {session}. Remember these facts. {facts}"


def turns(session: int) -> tuple[list[dict[str, str]], str]:
    return [{"role": "system", "content": history(session)}, {"role": "user", "content": "Is 7 odd?"}], "And is 8 odd?"


# ---- inferd ----------------------------------------------------------------------------------
async def inferd_chat(client, messages: list[dict[str, str]]) -> tuple[float, str, int]:
    """(TTFT s, reply text, prompt tokens) of one streamed greedy chat."""
    req = pb.PredictOptions(UseTokenizerTemplate=True, Temperature=0, Tokens=REPLY_TOKENS,
                            Messages=[pb.Message(role=m["role"], content=m["content"]) for m in messages])
    t0 = time.perf_counter()
    ttft = 0.0
    parts = []
    prompt_tokens = 0
    async for reply in client.predict_stream(req):
        if reply.message and not ttft:
            ttft = time.perf_counter() - t0
        parts.append(reply.message.decode())
        prompt_tokens = reply.prompt_tokens
    return ttft, "".join(parts), prompt_tokens


async def inferd_multi_turn(address: str, rounds: int, first_session: int,
                            anchor_port: int | None = None) -> dict[str, float]:
    """Median turn 1 / turn 2 TTFT; with ``anchor_port``, each round is followed by the same round
    on llama-server (its own sessions), so a drifting load hits both alike."""
    client = new_client(address, parallel=True)
    t1s, t2s, prompt = [], [], 0
    a1s, a2s = [], []
    for r in range(rounds):
        if anchor_port is not None:
            a1, a2 = await asyncio.to_thread(server_round, anchor_port, first_session + 200 + r)
            a1s.append(a1)
            a2s.append(a2)
        msgs, question = turns(first_session + r)
        t1, reply, prompt = await inferd_chat(client, msgs)
        t2, _, _ = await inferd_chat(client, msgs + [{"role": "assistant", "content": reply},
                                                     {"role": "user", "content": question}])
        t1s.append(t1)
        t2s.append(t2)
    await client.close()
    out = {"turn1": statistics.median(t1s), "turn2": statistics.median(t2s), "prompt_tokens": prompt}
    if a1s:
        out.update(anchor_turn1=statistics.median(a1s), anchor_turn2=statistics.median(a2s))
    return out


async def inferd_shared(address: str, session: int) -> dict[str, float]:
    client = new_client(address, parallel=True)
    before = await engine_stats(client)
    t0 = time.perf_counter()
    questions = ["Is 3 odd?", "Is 4 even?", "Is 10 odd?", "Is 11 even?"]
    results = await asyncio.gather(*(inferd_chat(client, [{"role": "system", "content": history(session)},
                                                          {"role": "user", "content": q}]) for q in questions))
    wall = time.perf_counter() - t0
    after = await engine_stats(client)
    await client.close()
    return {"all_first_tokens": max(t for t, _, _ in results), "wall": wall,
            "prompt_tokens": sum(p for _, _, p in results),
            "computed": after["prompt_tokens_processed"] - before["prompt_tokens_processed"]}


def run_inferd(model: str, threads: int, options: list[str], rounds: int, session: int,
               anchor_port: int | None = None) -> dict[str, object]:
    server = InferdServer(model, threads, SLOTS, CTX, options)
    try:
        asyncio.run(server.wait_ready())

        async def warm() -> None:
            client = new_client(server.address, parallel=True)
            await inferd_chat(client, [{"role": "user", "content": "Hi"}])
            await client.close()

        asyncio.run(warm())
        multi = asyncio.run(inferd_multi_turn(server.address, rounds, session, anchor_port))
        shared = asyncio.run(inferd_shared(server.address, session + 1000))
        return {"multi": multi, "shared": shared}
    finally:
        server.close()


# ---- llama-server ---------------------------------------------------------------------------------
def server_chat(port: int, messages: list[dict[str, str]]) -> tuple[float, str]:
    body = json.dumps({"messages": messages, "max_tokens": REPLY_TOKENS, "temperature": 0, "stream": True,
                       "cache_prompt": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft = 0.0
    parts = []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                if text and not ttft:
                    ttft = time.perf_counter() - t0
                parts.append(text)
    return ttft, "".join(parts)


def server_round(port: int, session: int) -> tuple[float, float]:
    """(turn 1 TTFT, turn 2 TTFT) of one two-turn chat on llama-server."""
    msgs, question = turns(session)
    t1, reply = server_chat(port, msgs)
    t2, _ = server_chat(port, msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": question}])
    return t1, t2


def main() -> int:
    global FACTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-server", default="")
    add_plot_argument(ap)
    ap.add_argument("--facts", type=int, default=FACTS, help="history size (110 facts ~ 1,500 tokens)")
    args = ap.parse_args()
    FACTS = args.facts
    model = default_model_path()
    threads = args.threads or default_threads()
    print(f"SmolLM2-135M Q4_1, threads {threads}, slots {SLOTS}, ctx {CTX}/slot, {REPLY_TOKENS}-token greedy "
          f"replies, median of {args.rounds} (llama-server rounds interleaved with inferd's); load average {os.getloadavg()[0]:.2f}", flush=True)
    found = llama_server_binary(args.llama_server)
    llama_server = LlamaServer(*found, model, threads, SLOTS, CTX) if found else None
    try:
        if llama_server is not None:
            server_chat(llama_server.port, [{"role": "user", "content": "Hi"}])  # warm-up
        on = run_inferd(model, threads, [], args.rounds, 1, llama_server and llama_server.port)
    finally:
        if llama_server is not None:
            llama_server.close()
    off = run_inferd(model, threads, ["cache_prompt:false"], args.rounds, 100)
    on_multi = on["multi"]
    assert isinstance(on_multi, dict)
    anchor = ({"turn1": on_multi["anchor_turn1"], "turn2": on_multi["anchor_turn2"]}
              if llama_server is not None else None)

    print()
    print("| engine | turn 1 TTFT ms | turn 2 TTFT ms | turn 2 / turn 1 |")
    print("| --- | --- | --- | --- |")
    rows = [("inferd, prefix cache (default)", on["multi"]), ("inferd, cache_prompt:false", off["multi"])]
    if anchor:
        rows.append(("llama-server, cache_prompt:true", anchor))
    for name, m in rows:
        assert isinstance(m, dict)
        print(f"| {name} | {m['turn1'] * 1000:.0f} | {m['turn2'] * 1000:.0f} | {m['turn2'] / m['turn1']:.2f}x |")
    multi = on["multi"]
    assert isinstance(multi, dict)
    print(f"\nturn 1 prompt: {multi['prompt_tokens']} tokens")
    print(f"inferd turn 2 / turn 1: {multi['turn2'] / multi['turn1']:.2f}x (target <= 0.25x)")
    if anchor:
        print(f"inferd turn 2 / llama-server turn 2: {multi['turn2'] / anchor['turn2']:.2f}x (target <= 1.0x)")
    else:
        print("llama-server skipped: no binary (--llama-server PATH or INFERD_LLAMA_SERVER)")
    print("\n4 concurrent requests sharing the system prompt:")
    print("| inferd | prompt tokens sent | prompt tokens computed | all first tokens ms |")
    print("| --- | --- | --- | --- |")
    for name, res in (("prefix cache (default)", on["shared"]), ("cache_prompt:false", off["shared"])):
        assert isinstance(res, dict)
        print(f"| {name} | {res['prompt_tokens']} | {res['computed']} | {res['all_first_tokens'] * 1000:.0f} |")
    if args.plot:
        bar_chart(args.plot, "Time to first token by turn, with and without the prefix cache", "TTFT ms",
                  ["turn 1 (new history)", "turn 2 (history re-sent + question)"],
                  {name: [m["turn1"] * 1000, m["turn2"] * 1000] for name, m in rows},  # type: ignore[index]
                  note=f"SmolLM2-135M Q4_1, {threads} threads, {multi['prompt_tokens']}-token turn 1, "
                       f"median of {args.rounds}")
    print(f"load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
