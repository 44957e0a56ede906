#!/usr/bin/env bash
# `make run`: start inferd with the packaged default model and show real calls to it.
# The server keeps running in the foreground afterwards (Ctrl-C stops it gracefully);
# set DEMO_EXIT=1 to stop after the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
BACKEND="${INFERD_BACKEND:-llama-cpp}"
ADDR="${INFERD_DEMO_ADDR:-127.0.0.1:50051}"
INFERD="$VENV/bin/inferd"
LOG="$(mktemp -t inferd-demo.XXXXXX.log)"

"$INFERD" serve --backend "$BACKEND" --addr "$ADDR" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT INT TERM

echo "inferd: starting backend '$BACKEND' on $ADDR (log: $LOG)"
for _ in $(seq 1 120); do
  if grep -q "model loaded" "$LOG"; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then echo "server failed:"; cat "$LOG"; exit 1; fi
  sleep 0.5
done
grep -q "model loaded" "$LOG" || { echo "model did not load in 60 s:"; cat "$LOG"; exit 1; }

echo; echo "\$ inferd health --addr $ADDR"; "$INFERD" health --addr "$ADDR"
echo; echo "\$ inferd status --addr $ADDR"; "$INFERD" status --addr "$ADDR"
if [ "$BACKEND" = "llama-cpp" ]; then
  echo; echo "\$ inferd chat --addr $ADDR 'What is the capital of France?'"
  "$INFERD" chat --addr "$ADDR" "What is the capital of France? Answer in one sentence."
fi
echo
if [ "${DEMO_EXIT:-0}" = "1" ]; then exit 0; fi
echo "inferd is serving on $ADDR; Ctrl-C to stop."
wait $SERVER
