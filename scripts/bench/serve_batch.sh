#!/usr/bin/env bash
# Continuous batching under load: `supra serve` on MODEL at WEIGHTS (default q8_0), N streaming
# clients for N in $CLIENTS (default 1 2 4 8), prompts of about $PROMPTS tokens (default 100 and
# 4000), each client sending 2 requests of max_tokens $MAX_TOKENS (default 64). Prints one line
# per run (aggregate generated tokens/s, time to first token, inter-token latency p50/p99) and
# keeps each run's JSON under OUT (default runs/bench/serve). Run it on quiet cores.
#
#   scripts/bench/serve_batch.sh MODEL [extra serve flags...]
#
# NAME (default the model's directory or file name) names the runs. llama.cpp's server under
# the same load: scripts/bench/llama_server_batch.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/serve_common.sh
MODEL=${1:?usage: scripts/bench/serve_batch.sh MODEL [serve flags...]}
shift
WEIGHTS=${WEIGHTS:-q8_0}
OUT=${OUT:-runs/bench/serve}
PORT=${PORT:-18080}
mkdir -p "$OUT"
cargo build --release --quiet
target/release/supra serve "$MODEL" --weights "$WEIGHTS" --port "$PORT" --max-tokens 100000 \
  --max-prompt-tokens 8000 --queue 64 "$@" 2> "$OUT/serve.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
wait_for "$OUT/serve.log" $SERVER listening
load "http://127.0.0.1:$PORT" "${NAME:-$(basename "$MODEL")}-supra-$WEIGHTS"
