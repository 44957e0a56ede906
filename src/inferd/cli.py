"""The ``inferd`` command: run a backend server, or act as a client of one.

    inferd serve --backend NAME [--model PATH] [--addr HOST:PORT]   run a server
    inferd call RPC [JSON]        any rpc with a JSON request; prints JSON replies
    inferd health | status        short human summaries
    inferd backends               list the registered backends
    inferd up | ps | stop         the supervisor (see inferd.supervisor)
    inferd quantize | finetune    model-operation jobs, on a server (--addr) or in-process
    inferd ray deploy | shutdown  models.yaml as Ray Serve deployments (inferd[ray])
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from google.protobuf import json_format

from inferd.settings import Settings, SettingsError


def _client_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default="127.0.0.1:50051", help="backend HOST:PORT [default 127.0.0.1:50051]")
    p.add_argument("--api-key", default=None,
                   help="credential sent as 'authorization: Bearer KEY' [env GRPC_API_KEY or LOCALAI_GRPC_AUTH_TOKEN]")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-file", default="", help="CA certificate to trust (self-signed servers)")
    p.add_argument("--cert-file", default="", help="client certificate (mTLS)")
    p.add_argument("--key-file", default="", help="client key (mTLS)")
    p.add_argument("--server-name", default="", help="TLS server name override")
    p.add_argument("--timeout", type=float, default=None, help="per-call deadline in seconds")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="extra call metadata, repeatable (e.g. application=MODEL for a Ray Serve cluster)")
    p.add_argument("--retries", type=int, default=0,
                   help="retry UNAVAILABLE on idempotent calls up to N more times (inferd.client.retry) [0]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferd", description="Serve AI models over gRPC (LocalAI's Backend protocol).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a backend server")
    Settings.add_arguments(serve)

    call = sub.add_parser("call", help="call any rpc with a JSON request (protobuf JSON mapping)")
    call.add_argument("rpc", help="rpc name, e.g. Predict, PredictStream, Status")
    call.add_argument("json", nargs="?", default="{}", help="request as JSON ('-' reads stdin)")
    _client_parser(call)

    for name, text in (("health", "is the backend alive?"), ("status", "backend state and memory")):
        _client_parser(sub.add_parser(name, help=text))

    chat = sub.add_parser("chat", help="stream a chat reply (PredictStream with the model's chat template)")
    chat.add_argument("message", nargs="?", default=None,
                      help="the user message; without it, an interactive session (see inferd.chat_repl)")
    chat.add_argument("--system", default="", help="optional system prompt")
    chat.add_argument("--max-tokens", type=int, default=128, help="Tokens limit [128]")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    _client_parser(chat)

    sub.add_parser("backends", help="list registered backends and their capabilities")

    from inferd.supervisor.cli import add_supervisor_commands

    add_supervisor_commands(sub)
    from inferd.model_ops_cli import add_model_ops_commands

    add_model_ops_commands(sub)
    from inferd.scale.cli import add_ray_commands

    add_ray_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # LocalAI starts backends as `<entry> --addr HOST:PORT`: treat a bare flag list as `serve`.
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv = ["serve", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "backends":
        return _backends()
    if args.command == "chat" and args.message is None:
        from inferd.chat_repl import repl

        return repl(args, lambda: _make_client(args))
    if args.command in ("call", "health", "status", "chat"):
        return asyncio.run(_client_command(args))
    return args.handler(args)


# ---- serve ---------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    from dataclasses import fields

    flags: list[str] = []
    for f in fields(Settings):
        v = getattr(args, f.name, None)
        if v is not None:
            flags += [f.metadata["flag"], str(v)]
    try:
        settings = Settings.load(flags)
    except SettingsError as exc:
        print(f"inferd: invalid setting: {exc}", file=sys.stderr)
        return 2
    from inferd.observability.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from inferd.server.main import run_server

    try:
        return asyncio.run(run_server(settings))
    except SettingsError as exc:
        print(f"inferd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _backends() -> int:
    from inferd.backends.registry import BACKENDS, resolve_backend_class

    for name in sorted(BACKENDS):
        try:
            caps = ", ".join(resolve_backend_class(name).capabilities())
        except Exception as exc:  # noqa: BLE001 - show why a backend is unavailable
            caps = f"unavailable: {exc}"
        print(f"{name:22s} {caps}")
    return 0


# ---- client commands -------------------------------------------------------------
def _make_client(args: argparse.Namespace) -> Any:
    import os

    from inferd.client import ChannelOptions, RetryPolicy, new_client

    metadata = []
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"inferd: --metadata expects KEY=VALUE, got {item!r}")
        metadata.append((key.strip().lower(), value))
    if not 0 <= args.retries <= 99:
        raise SystemExit(f"inferd: --retries must be 0-99, got {args.retries}")
    retry = RetryPolicy(max_attempts=args.retries + 1) if args.retries else None
    key = args.api_key or os.environ.get("GRPC_API_KEY") or os.environ.get("LOCALAI_GRPC_AUTH_TOKEN") or ""
    opts = ChannelOptions(
        api_key=key,
        tls=args.tls or bool(args.ca_file),
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        server_name=args.server_name,
        metadata=tuple(metadata),
    )
    return new_client(args.addr, parallel=True, options=opts, retry=retry)


def _to_json(message: Any) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False)


async def _client_command(args: argparse.Namespace) -> int:
    from inferd.client import RpcError
    from inferd.protocol import RPCS

    client = _make_client(args)
    try:
        if args.command == "health":
            ok = await client.health_check(timeout=args.timeout or 5.0)
            print(f"{args.addr}: {'OK' if ok else 'not answering'}")
            return 0 if ok else 1
        if args.command == "status":
            st = await client.status(timeout=args.timeout or 10.0)
            print(format_status(args.addr, st))
            return 0
        if args.command == "chat":
            return await _chat(client, args)
        rpc = RPCS.get(args.rpc)
        if rpc is None:
            print(f"inferd: unknown rpc {args.rpc!r}; one of: {', '.join(RPCS)}", file=sys.stderr)
            return 2
        raw = sys.stdin.read() if args.json == "-" else args.json
        try:
            request = json_format.Parse(raw, rpc.request())
        except json_format.ParseError as exc:
            print(f"inferd: request is not a valid {rpc.request.__name__} JSON: {exc}", file=sys.stderr)
            return 2
        if rpc.streaming:
            async for reply in client.call_stream(rpc.name, request, args.timeout):
                print(_to_json(reply), flush=True)
        else:
            print(_to_json(await client.call(rpc.name, request, args.timeout)))
        return 0
    except RpcError as exc:
        print(f"inferd: {args.command} failed: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    finally:
        await client.close()


async def _chat(client: Any, args: argparse.Namespace) -> int:
    """Print the reply as it streams: chat_deltas content when the backend parses it."""
    from inferd.proto import backend_pb2 as pb

    messages = [pb.Message(role="system", content=args.system)] if args.system else []
    messages.append(pb.Message(role="user", content=args.message))
    request = pb.PredictOptions(
        Messages=messages, UseTokenizerTemplate=True, Tokens=args.max_tokens, Temperature=args.temperature
    )
    async for reply in client.predict_stream(request, timeout=args.timeout):
        text = "".join(d.content for d in reply.chat_deltas) if reply.chat_deltas else reply.message.decode()
        print(text, end="", flush=True)
    print()
    return 0


def format_status(addr: str, st: Any) -> str:
    from inferd.proto import backend_pb2 as pb

    state = pb.StatusResponse.State.Name(st.state)
    lines = [f"{addr}: {state}", f"  memory: {human_bytes(st.memory.total)} total"]
    for key in sorted(st.memory.breakdown):
        lines.append(f"    {key:12s} {human_bytes(st.memory.breakdown[key])}")
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    """Bytes for people: 1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
