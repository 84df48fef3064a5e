#!/usr/bin/env bash
# Full-set evaluation of the default teacher and of its converted, untrained SUPRA model: the
# tables in docs/results/eval.md. Hours of work on two cores; restartable — run it again and
# each model continues from the answers journaled beside its report.
#
#   scripts/results/eval_full.sh [OUT=runs/eval-full]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/eval-full}
mkdir -p "$OUT"
cargo build --release --quiet
# A copy, so that rebuilding while this runs does not touch the running binary.
cp target/release/supra "$OUT/supra-bin"
S="$OUT/supra-bin"
[ -f "$OUT/converted/config.json" ] || "$S" convert --out "$OUT/converted"
for m in teacher converted; do
  [ -f "$OUT/$m.json" ] && { echo "$m: done ($OUT/$m.json)"; continue; }
  model=()
  [ "$m" = converted ] && model=("$OUT/converted")
  resume=()
  [ -f "$OUT/$m.json.partial.jsonl" ] && resume=(--resume)
  "$S" eval "${model[@]}" --tasks all --json "$OUT/$m.json" "${resume[@]}" | tee "$OUT/$m.md"
done
"$S" compare "$OUT/teacher.json" "$OUT/converted.json" | tee "$OUT/compare.md"
