#!/usr/bin/env bash
# The perplexity figures of docs/results/window.md: held-out perplexity (text/test, 512-token
# windows, the first 8,192 tokens of each book) and perplexity by position with the whole
# history (the first 8k tokens of each test book; the first 2k of three, as the issue's
# control figures) for the teacher, window(+sinks)-only controls and the untrained hybrids.
# Restartable: every figure is one JSON file, skipped when it exists. About 45 minutes on two
# cores; it only scores, so it may share the machine (not with benchmarks).
#
#   scripts/results/window.sh [OUT=runs/window]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/window}
DATA=${SUPRA_DATA_DIR:-../shared/data}
mkdir -p "$OUT"
cargo build --release --quiet
# A copy, so that rebuilding while this runs does not touch the running binary.
cp target/release/supra "$OUT/supra-bin"
S="$OUT/supra-bin"
TEACHER=$("$S" fetch)
convert() { # name, convert flags...
  local name=$1; shift
  [ -f "$OUT/$name/config.json" ] || "$S" convert --out "$OUT/$name" "$@" >/dev/null
}
convert w64s0 --window 64 --sinks 0
convert w64 --window 64
convert w128 --window 128
convert relu --window 64 --feature-map relu
convert hedgehog --window 64 --feature-map hedgehog
convert relu-gated --window 64 --feature-map relu --mix gated
convert hedgehog-gated --window 64 --feature-map hedgehog --mix gated
# The first default starting share (0.1 for every hybrid), for the held-out rows marked @0.1.
convert relu@0.1 --window 64 --feature-map relu --mix-share 0.1
convert hedgehog@0.1 --window 64 --feature-map hedgehog --mix-share 0.1
convert relu-gated@0.1 --window 64 --feature-map relu --mix gated --mix-share 0.1
convert hedgehog-gated@0.1 --window 64 --feature-map hedgehog --mix gated --mix-share 0.1

# Held-out perplexity: name, model (- for the teacher), branches.
heldout() {
  local name=$1 model=$2 branches=$3
  [ -f "$OUT/heldout-$name.json" ] && return
  local m=(); [ "$model" = - ] || m=("$OUT/$model")
  local t0=$SECONDS
  "$S" score "${m[@]}" --text "$DATA/text/test" --window 512 --max-tokens 8192 \
    --branches "$branches" --json > "$OUT/heldout-$name.json.tmp"
  mv "$OUT/heldout-$name.json.tmp" "$OUT/heldout-$name.json"
  echo "heldout $name: $(cat "$OUT/heldout-$name.json") ($((SECONDS - t0)) s)"
}
heldout teacher - both
heldout w64s0-window w64s0 window
heldout w64-window w64 window
heldout w128-window w128 window
for h in relu hedgehog relu-gated hedgehog-gated; do
  heldout "$h" "$h" both
  heldout "$h@0.1" "$h@0.1" both
  heldout "$h-linear" "$h" linear
done

# Perplexity by position, the whole history: models and branches side by side.
position() { # file, length, sequences, edges
  [ -f "$OUT/$1.json" ] && return
  local resume=(); [ -f "$OUT/$1.json.partial.jsonl" ] && resume=(--resume)
  "$S" probe position "$TEACHER" "$OUT/w64s0" "$OUT/w64" "$OUT/w128" "$OUT/relu" "$OUT/hedgehog" \
    "$OUT/relu-gated" "$OUT/hedgehog-gated" \
    --branches both,window,window,window,both,both,both,both \
    --names teacher,w64-only,w64+4-only,w128+4-only,relu,hedgehog,relu-gated,hedgehog-gated \
    --text "$DATA/text/test" --length "$2" --sequences "$3" --edges "$4" \
    --png "$OUT/$1.png" --json "$OUT/$1.json" "${resume[@]}" | tee "$OUT/$1.md"
}
position position-2k 2k 3 1k
position position-8k 8k 5 128,512,1k,2k
# The issue's control figures: the first 2k tokens of pg1342, pg13423 and pg2701 (the three books
# whose teacher perplexity at 1k-2k is the issue's 13.77).
if [ ! -f "$OUT/position-2k-three.json" ]; then
  "$S" probe position "$TEACHER" "$OUT/w64" "$OUT/w128" --branches both,window,window \
    --names teacher,w64+4-only,w128+4-only --text "$DATA/text/test/pg1342.txt" \
    --text "$DATA/text/test/pg13423.txt" --text "$DATA/text/test/pg2701.txt" --length 2k \
    --sequences 3 --edges 1k --png "$OUT/position-2k-three.png" \
    --json "$OUT/position-2k-three.json" | tee "$OUT/position-2k-three.md"
fi
