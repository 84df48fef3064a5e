#!/usr/bin/env bash
# One process (2 threads) against torchrun's 2 processes (1 thread each, gloo) on this CPU:
# python -m supra_torch.train, same model, data, global batch (4 × 512 tokens), 4 updates; the
# median over updates 2-4 of each update's wall time. Nothing else may run meanwhile.
#   scripts/bench/scale_out.sh CONVERTED_MODEL TEXT_FILE [PYTHON]
set -euo pipefail
model=$1 text=$2 py=${3:-${SUPRA_PYENV:-$HOME/.cache/supra/pyenv}/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for recipe in supra transfer; do
  for procs in 1 2; do
    if [[ $procs == 1 ]]; then launch=("$py"); th=2; else launch=("$py" -m torch.distributed.run --nproc-per-node 2); th=1; fi
    OMP_NUM_THREADS=$th "${launch[@]}" -m supra_torch.train "$model" --data "$text" --out "$out/$recipe-$procs" \
      --recipe "$recipe" --updates 4 --seq-len 512 --batch 4 --threads $th --json 2>/dev/null | grep '^{' > "$out/$recipe-$procs.jsonl"
    "$py" - "$out/$recipe-$procs.jsonl" "$recipe" "$procs" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
s = [r["update_s"] for r in rows[1:]]
print(f"{sys.argv[2]} processes={sys.argv[3]} update_s {[round(x, 2) for x in s]} median tokens/s {2048 / statistics.median(s):.1f}")
PY
  done
done
