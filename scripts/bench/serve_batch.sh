#!/usr/bin/env bash
# Continuous batching under load: `supra serve` on MODEL at WEIGHTS (default q8_0), N streaming
# clients for N in $CLIENTS (default 1 2 4 8), prompts of about $PROMPTS tokens (default 100 and
# 4000), each client sending 2 requests of max_tokens $MAX_TOKENS (default 64). Prints one line
# per run (aggregate generated tokens/s, time to first token, inter-token latency p50/p99) and
# keeps each run's JSON under OUT (default runs/bench/serve). Run it on quiet cores.
#
#   scripts/bench/serve_batch.sh MODEL [extra serve flags...]
set -euo pipefail
cd "$(dirname "$0")/../.."
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
until grep -q "listening" "$OUT/serve.log"; do
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log" >&2; exit 1; }
  sleep 0.5
done
name=$(basename "$MODEL")
for p in ${PROMPTS:-100 4000}; do
  for n in ${CLIENTS:-1 2 4 8}; do
    json="$OUT/$name-$WEIGHTS-p$p-n$n.json"
    python3 scripts/serve_load.py --url "http://127.0.0.1:$PORT" --stream --clients "$n" \
      --requests $((2 * n)) --max-tokens "${MAX_TOKENS:-64}" --prompt-tokens "$p" \
      --json "$json" > "$json.txt"
    python3 - "$json" "$p" "$n" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"prompt ~{sys.argv[2]} (mean {f.get('prompt_tokens_mean') or 0:.0f}), {sys.argv[3]} clients: "
      f"{f['generated_tokens_per_s']:.1f} generated tokens/s, TTFT p50 {f['ttft_p50_s']:.2f} s, "
      f"ITL p50 {1000 * f['itl_p50_s']:.0f} ms p99 {1000 * f['itl_p99_s']:.0f} ms")
PY
  done
done
