#!/usr/bin/env bash
# llama.cpp's server under the load of scripts/bench/serve_batch.sh, for the side-by-side table
# in docs/results/inference.md: for each N in $CLIENTS (default 1 4 8) a server started with
# `-np N` (N slots, each with room for a 4,000-token prompt and its answer) and 2 threads,
# then N streaming clients at each prompt length in $PROMPTS (default 100 and 4000).
#
#   scripts/bench/llama_server_batch.sh WORK/build/bin/llama-server WORK/smollm2-135m-q8_0.gguf
#
# LLAMA_SERVER: the llama-server binary, GGUF: the model at the weights to compare. Both come
# from scripts/llamacpp_compare.sh (WORK=/tmp/supra-llamacpp by default): it builds llama.cpp
# from the llama-cpp-python 0.3.36 sdist and writes WORK/smollm2-135m-q8_0.gguf, the default
# model's Q4_1 values requantized to Q8_0 (the values supra's `--weights q8_0` computes from
# the same weights, with f16 scales where supra keeps f32). Run it on quiet cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/serve_common.sh
BIN=${1:?usage: scripts/bench/llama_server_batch.sh LLAMA_SERVER GGUF}
GGUF=${2:?usage: scripts/bench/llama_server_batch.sh LLAMA_SERVER GGUF}
OUT=${OUT:-runs/bench/serve}
PORT=${PORT:-18081}
mkdir -p "$OUT"
for n in ${CLIENTS:-1 4 8}; do
  "$BIN" -m "$GGUF" -np "$n" -c $((n * 4200)) -t 2 -tb 2 --port "$PORT" > "$OUT/llama-server.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null' EXIT
  wait_for "$OUT/llama-server.log" $SERVER "listening on"
  CLIENTS=$n load "http://127.0.0.1:$PORT" "${NAME:-$(basename "$GGUF" .gguf)}-llama.cpp"
  kill $SERVER
  wait $SERVER 2>/dev/null || true
done
