#!/usr/bin/env bash
# The figures of docs/results/inference.md: `supra bench infer` (teacher and linear, f32 and
# Q8_0, 512 to 32k/64k tokens of context; table, CSV, PNG), the linear model again with five
# decode runs per context, the llama.cpp comparison and a bounded load on `supra serve`. About
# an hour on two cores, most of it the teacher's prefill to 32k (quadratic attention); run it on
# an otherwise idle machine. PARTS picks some of bench,linear,llamacpp,load.
#
#   [PARTS=bench,linear,llamacpp,load] scripts/results/inference.sh [OUT=docs/results/inference]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-docs/results/inference}
PARTS=${PARTS:-bench,linear,llamacpp,load}
mkdir -p "$OUT"
cargo build --release --quiet
S=target/release/supra
TMP=$(mktemp -d)
SERVER=
trap '[ -n "$SERVER" ] && kill $SERVER 2>/dev/null; rm -rf "$TMP"' EXIT
want() { [[ ",$PARTS," == *",$1,"* ]]; }
# The converted model (untrained φ: its speed is that of a trained one).
"$S" convert --out "$TMP/supra" >/dev/null

if want bench; then
  t0=$SECONDS
  "$S" bench infer --gen 64 --csv "$OUT/bench_infer.csv" --png "$OUT/bench_infer.png" \
    | tee "$OUT/bench_infer.md"
  echo "bench infer: $((SECONDS - t0)) s" | tee "$OUT/wall_times.txt"
fi
if want linear; then
  "$S" bench infer "$TMP/supra" --names supra --gen 64 --repeats 5 \
    --csv "$OUT/bench_infer_linear.csv" | tee "$OUT/bench_infer_linear.md"
fi
if want llamacpp; then
  scripts/llamacpp_compare.sh | tee "$OUT/llamacpp.md"
fi
if want load; then
  # The server on loopback with Q8_0 weights: one generation at a time, a queue of 16.
  PORT=18080
  for m in teacher supra; do
    model=()
    [ $m = supra ] && model=("$TMP/supra")
    "$S" serve "${model[@]}" --port $PORT --weights q8_0 --queue 16 2>"$TMP/serve.log" &
    SERVER=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
    echo "### $m"
    scripts/serve_load.py --url "http://127.0.0.1:$PORT" --requests 32 --clients 4 --max-tokens 32
    scripts/serve_load.py --url "http://127.0.0.1:$PORT" --requests 32 --clients 4 --max-tokens 32 \
      --chat --shared-prefix
    kill $SERVER; wait $SERVER 2>/dev/null || true
    SERVER=
  done | tee "$OUT/load.txt"
fi
