#!/usr/bin/env bash
# Long-context and in-context-learning probes of the default teacher and its converted,
# untrained SUPRA model: the plots and tables in docs/results/eval.md. Hours on two cores; each
# probe journals its prompts and windows as they finish and is skipped once its JSON exists:
# rerun to continue after an interruption.
#
#   scripts/results/probes.sh [OUT=docs/results/eval] [CONVERTED=runs/eval-full/converted]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-docs/results/eval}
CONVERTED=${2:-runs/eval-full/converted}
mkdir -p "$OUT"
cargo build --release --quiet
S=$(mktemp -d)/supra
trap 'rm -rf "$(dirname "$S")"' EXIT
cp target/release/supra "$S"
[ -f "$CONVERTED/config.json" ] || "$S" convert --out "$CONVERTED"
MODELS=("$(target/release/supra fetch 2>/dev/null | tail -1 | awk '{print $NF}')" "$CONVERTED")
probe() {
  local name=$1; shift
  [ -f "$OUT/$name.json" ] && { echo "$name: done"; return; }
  local t0=$SECONDS resume=()
  [ -f "$OUT/$name.json.partial.jsonl" ] && resume=(--resume)
  "$S" probe "$@" "${MODELS[@]}" --names teacher,supra-untrained "${resume[@]}" \
    --png "$OUT/$name.png" --json "$OUT/$name.json" | tee "$OUT/$name.md.partial"
  mv "$OUT/$name.md.partial" "$OUT/$name.md"
  echo "$name: $((SECONDS - t0)) s (this run)" | tee -a "$OUT/wall_times.txt"
}
probe recall recall
probe passkey passkey --trials 1
probe position position
probe needle needle --trials 1
