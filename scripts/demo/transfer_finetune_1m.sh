#!/usr/bin/env bash
# The 1M-token linearization of docs/results/train.md: SmolLM2-135M-Instruct, attention transfer
# for 786,432 tokens (192 updates of 4,096), then rank-16 LoRA + φ fine-tuning for 262,144 tokens
# (64 updates), then held-out perplexity on text/test of the teacher, the converted untrained
# model, the transfer-only model and the final model.
#
# Restartable: run it again after an interruption and it continues from the last checkpoint
# (checkpoints every 16 updates; resume is exact). About 2 hours on 2 cores.
#
# Usage: scripts/demo/transfer_finetune_1m.sh [OUT=runs/demo]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/demo}
DATA=${SUPRA_DATA_DIR:-../shared/data}
SWITCH=192 # the update at which transfer ends and fine-tuning starts
cargo build --release --bin supra
S=target/release/supra
RUN=$OUT/run
ARGS=(--recipe transfer+finetune --data "$DATA/text/train" --valid "$DATA/text/valid"
      --tokens 1048576 --transfer-tokens 786432 --lora-rank 16 --seq-len 512 --batch-tokens 4096
      --eval-every 16 --eval-windows 4 --checkpoint-every 16 --out "$RUN")

[ -d "$OUT/converted" ] || $S convert --out "$OUT/converted"
last_step() { ls "$RUN/checkpoints" 2>/dev/null | sed -n 's/^step-0*\([0-9]\)/\1/p' | sort -n | tail -1; }
step=$(last_step); step=${step:-0}
if [ "$step" -lt "$SWITCH" ]; then
  if [ "$step" -eq 0 ]; then $S train "$OUT/converted" "${ARGS[@]}" --stop-after "$SWITCH"
  else $S train "$OUT/converted" "${ARGS[@]}" --resume --stop-after $((SWITCH - step)); fi
fi
# Keep the transfer-only model before fine-tuning moves on (older checkpoints are pruned).
[ -d "$OUT/transfer-only" ] || cp -r "$RUN/checkpoints/step-$(printf %08d $SWITCH)/model" "$OUT/transfer-only"
[ -d "$RUN/final" ] || $S train "$OUT/converted" "${ARGS[@]}" --resume

# Held-out perplexity: the first 8,192 tokens of each book in text/test, windows of 512.
score() { $S score $1 --text "$DATA/text/test" --window 512 --max-tokens 8192 --json; }
{
  printf 'model\ttokens\tnll\tppl\n'
  for m in teacher converted transfer-only final; do
    case $m in
      teacher) json=$(score "") ;;
      final) json=$(score "$RUN/final") ;;
      *) json=$(score "$OUT/$m") ;;
    esac
    python3 -c 'import json,sys; r=json.loads(sys.argv[2]); print(f"{sys.argv[1]}\t{r[\"tokens\"]}\t{r[\"nll\"]:.4f}\t{r[\"ppl\"]:.2f}")' "$m" "$json"
  done
} | tee "$OUT/heldout.tsv"
