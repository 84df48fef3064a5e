# Shared by the serving benchmarks: `load URL NAME` runs scripts/serve_load.py against the
# server at URL for every prompt length in $PROMPTS (default 100 and 4000 tokens) and every
# client count in $CLIENTS (default 1 2 4 8): N streaming clients, 2 requests each of
# max_tokens $MAX_TOKENS (default 64). Keeps each run's JSON under $OUT as NAME-pP-nN.json and
# prints one line per run.
load() {
  local url=$1 name=$2 p n json
  for p in ${PROMPTS:-100 4000}; do
    for n in ${CLIENTS:-1 2 4 8}; do
      json="$OUT/$name-p$p-n$n.json"
      python3 scripts/serve_load.py --url "$url" --stream --clients "$n" \
        --requests $((2 * n)) --max-tokens "${MAX_TOKENS:-64}" --prompt-tokens "$p" \
        --json "$json" > "$json.txt"
      python3 - "$json" "$p" "$n" "$name" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"{sys.argv[4]}: prompt ~{sys.argv[2]} (mean {f.get('prompt_tokens_mean') or 0:.0f}), "
      f"{sys.argv[3]} clients: {f['generated_tokens_per_s']:.1f} generated tokens/s, "
      f"TTFT p50 {f['ttft_p50_s']:.2f} s, "
      f"ITL p50 {1000 * f['itl_p50_s']:.0f} ms p99 {1000 * f['itl_p99_s']:.0f} ms")
PY
    done
  done
}

# wait_for LOG PID PATTERN: until the server's log shows PATTERN (it is up), or it died.
wait_for() {
  until grep -q "$3" "$1"; do
    kill -0 "$2" 2>/dev/null || { cat "$1" >&2; exit 1; }
    sleep 0.5
  done
}
