#!/usr/bin/env bash
# The fixed-budget ablation of docs/results/quality.md: recipe {supra, transfer+finetune,
# transfer+distill} × cell {SUPRA relu, Hedgehog} × window {none, 64 + 4 sinks}, the paper's
# own preset, the window-only control and the teacher, every trained row on the same data
# (text/train, seed 0) and the same 262,144 tokens, every figure on held-out text/test or on the
# tasks' own sets.
#
# Days of work on two cores, so it runs in phases and is restartable at any point: every
# training run checkpoints every 8 updates and continues with --resume, every figure is one
# file under OUT/ROW/ that is skipped once it exists, and the long evaluations journal their
# answers. Run it again (in the next session) to go on.
#   phase train     convert and train every row; held-out perplexity (40,880 tokens) as each
#                   finishes, with the window-only and linear-only branches of window rows,
#                   and perplexity on text/valid (where defaults are chosen)
#   phase probes    perplexity by position with the whole history (5 books × 8k tokens),
#                   passkey at 1k and 2k
#   phase validpos  perplexity by position on text/valid (3 books × 8k), where choices are made
#   phase stateoff  a trained window row's perplexity by position with its linear branch off
#   phase tasks     lambada_openai, piqa, arc_easy (full sets), hellaswag (first 1,000), a
#                   control with its window only; the long runs: phase all, whose full sets
#                   hold these four
#   phase all       every task on its full set (`supra eval --tasks all`; for the long runs)
#   phase samples   greedy continuations and chat answers of fixed prompts
#   phase longprobes  the teacher's own long-context probes (docs/results/eval.md: passkey and
#                   needle at 1k-32k, one trial per cell; perplexity by position in 4 windows
#                   of 32k tokens of text/longctx), the same prompts, for the long runs' models
#
#   scripts/results/quality.sh PHASE [ROW...]   (OUT=runs/quality, from $QUALITY_OUT)
#
# Each training run's wall time (summed over invocations) goes to OUT/ROW/wall_s; its median
# tokens/s is in OUT/ROW/run/metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${QUALITY_OUT:-runs/quality}
DATA=${SUPRA_DATA_DIR:-../shared/data}
PHASE=${1:?usage: scripts/results/quality.sh train|probes|validpos|stateoff|tasks|all|samples|longprobes [ROW...]}
shift
TOKENS=262144
mkdir -p "$OUT"
cargo build --release --quiet
# A copy, so that rebuilding while this runs does not touch the running binary; renamed into
# place, so that a second invocation does not write over the one a first is running.
cp target/release/supra "$OUT/supra-bin.tmp$$"
mv "$OUT/supra-bin.tmp$$" "$OUT/supra-bin"
S="$OUT/supra-bin"
TEACHER=$("$S" fetch)

# name: recipe (preset), then the conversion's flags. "teacher" and "control" are not trained.
declare -A ROWS=(
  [teacher]="-"
  [control-w64]="- --window 64"
  [control-w256]="- --window 256"
  [control-w128]="- --window 128"
  [supra-paper-relu]="supra-paper --feature-map relu"
  [supra-relu]="supra --feature-map relu"
  [supra-hedgehog]="supra --feature-map hedgehog"
  [supra-relu-w64]="supra --feature-map relu --window 64"
  [supra-hedgehog-w64]="supra --feature-map hedgehog --window 64"
  [tce-relu]="transfer+finetune --feature-map relu"
  [tce-hedgehog]="transfer+finetune --feature-map hedgehog"
  [tce-relu-w64]="transfer+finetune --feature-map relu --window 64"
  [tce-hedgehog-w64]="transfer+finetune --feature-map hedgehog --window 64"
  [td-relu]="transfer+distill --feature-map relu"
  [td-hedgehog]="transfer+distill --feature-map hedgehog"
  [td-relu-w64]="transfer+distill --feature-map relu --window 64"
  [td-hedgehog-w64]="transfer+distill --feature-map hedgehog --window 64"
  [td-relu-all]="transfer+distill --feature-map relu"
  [td-relu-raw]="transfer+distill --feature-map relu"
  [td-relu-all-raw]="transfer+distill --feature-map relu"
  # The pure linear cell's state, one change each against td-relu-all: twice the feature
  # dimension (a state of 128 × 64 per head), or a decay learned with φ.
  [td-relu-all-fd128]="transfer+distill --feature-map relu --feature-dim 128"
  [td-relu-all-learn]="transfer+distill --feature-map relu --decay learnable"
  # Transfer as LoLCATs runs it, the options never measured: relu φ starting at the identity,
  # the transfer phase's learning rate at LoLCATs' 1e-2, a quarter of the budget in transfer.
  [td-relu-all-ident]="transfer+distill --feature-map relu --phi-init identity"
  [td-relu-all-tlr1e2]="transfer+distill --feature-map relu"
  [td-relu-all-tt65k]="transfer+distill --feature-map relu"
  [long-td-relu-w64]="transfer+distill --feature-map relu --window 64"
  [long-td-relu]="transfer+distill --feature-map relu"
  # The pure linear long run with every parameter trained (td-relu-all: 2.79× against LoRA's).
  [long-td-relu-all]="transfer+distill --feature-map relu"
  # The bounded-state long run after the window and decay rows: window 256, lightning decay,
  # 2,048-token training windows throughout.
  [long-td-relu-w256-s2048]="transfer+distill --feature-map relu --window 256"
  # The bounded-state long run's second candidate: the window-128 recipe whose state carried
  # the most at 131,072 tokens (d131-relu-w128-delta-beta300-nodecay-mixlr300-s2048).
  [long-td-relu-w128-delta-nodecay-s2048]="transfer+distill --feature-map relu --window 128 --decay none --mix gated --linear-rule delta"
  # The pure linear long run's 1,048,576 tokens continued by as many again (2.79× at 262,144
  # tokens, 1.92× at 1,048,576, its validation KL still falling at the end).
  [long-td-relu-all-more1M]="distill --feature-map relu"
  [long-td-relu-w64-more512]="distill --feature-map relu --window 64"
  [long-td-relu-w64-more2048]="distill --feature-map relu --window 64"
  # The linear state's decay (half-lives lightning 1.3-177 tokens, retnet 22-5,678, none ∞),
  # in 512- and 2,048-token training windows, 131,072 tokens each; chosen on text/valid by
  # position (phase validpos). control-w256: how much a 4× wider window alone buys.
  [d131-relu-w64-lightning]="transfer+distill --feature-map relu --window 64 --decay lightning"
  [d131-relu-w64-retnet]="transfer+distill --feature-map relu --window 64 --decay retnet"
  [d131-relu-w64-none]="transfer+distill --feature-map relu --window 64 --decay none"
  [d131-relu-w64-lightning-s2048]="transfer+distill --feature-map relu --window 64 --decay lightning"
  [d131-relu-w64-retnet-s2048]="transfer+distill --feature-map relu --window 64 --decay retnet"
  # A 4× wider window, trained: beside control-w256, what the linear state adds to it.
  [d131-relu-w256-lightning-s2048]="transfer+distill --feature-map relu --window 256 --decay lightning"
  [d131-relu-w256-retnet-s2048]="transfer+distill --feature-map relu --window 256 --decay retnet"
  # Between the two: at w64 the state carries part of the long context but the window misses
  # 1.15x at 1k-2k by far; at w256 the window alone is inside it and the state adds 0.7 %.
  [d131-relu-w128-lightning-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning"
  # Why the state stays quiet past the window (1.1 % of the w128 row's 1k-2k gain): one change
  # each against d131-relu-w128-lightning-s2048. No decay (LoLCATs' hybrid has none: lightning
  # keeps at most 2 % of a token 1,000 back); each branch normalised on its own (the shared
  # normaliser sets φ(q)·φ(k) beside exp-scores); twice the state (feature dim 128).
  [d131-relu-w128-none-s2048]="transfer+distill --feature-map relu --window 128 --decay none"
  [d131-relu-w128-gated-s2048]="transfer+distill --feature-map relu --window 128 --mix gated"
  [d131-relu-w128-fd128-s2048]="transfer+distill --feature-map relu --window 128 --feature-dim 128"
  # The gated row's gate never opened from 0.001: the same, started open.
  [d131-relu-w128-gated-open-s2048]="transfer+distill --feature-map relu --window 128 --mix gated --mix-share 0.5"
  # The training signal: each update at a window drawn from 32..128 (--min-window), so that
  # the state must carry what a shorter window drops; evaluated at 128 as the others.
  [d131-relu-w128-minw32-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning"
  # The shared α's θ moves about one learning rate per update (every row's α ended within 1 %
  # of its start, 0.001): the branch ten times louder from the start.
  [d131-relu-w128-share01-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning --mix-share 0.01"
  # Distillation weighted toward the tokens the window misses (--gap-weight 0.5: half of each
  # token's weight even, half following KL(teacher ‖ teacher within its window) there).
  [d131-relu-w128-gap05-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning"
  # A state built for recall: Based's second-order Taylor features (a 16-dim projection per
  # head, 153 features: φ(q)·φ(k) = 1 + u + u²/2) in place of relu's 64.
  [d131-taylor-w128-s2048]="transfer+distill --feature-map taylor --window 128 --decay lightning"
  # Based itself: a sliding window beside Taylor features with no decay (the relu state without
  # decay kept 0.9 % at 1k-2k and broke past the training windows).
  [d131-taylor-w128-none-s2048]="transfer+distill --feature-map taylor --window 128 --decay none"
  # The mix θ moves about one learning rate per update, so every row's α ended where it
  # started: θ learning 300 times the rate (up to 0.3 per transfer update, 0.09 distilling).
  [d131-relu-w128-mixlr300-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning"
  # A state that overwrites: the delta rule (DeltaNet; β = sigmoid(w·k̂ + b) read from the unit
  # key) in the gated mix, whose gate learns at 300 times the rate so that it can open; beside it
  # the same with the additive state, its control.
  [d131-relu-w128-delta-mixlr300-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning --mix gated --linear-rule delta"
  [d131-relu-w128-gated-mixlr300-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning --mix gated"
  [d131-relu-w128-value-mixlr300-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning --mix value --linear-rule delta"
  [d131-relu-w128-delta-beta300-mixlr300-s2048]="transfer+distill --feature-map relu --window 128 --decay lightning --mix gated --linear-rule delta"
  [d131-relu-w128-delta-beta300-nodecay-mixlr300-s2048]="transfer+distill --feature-map relu --window 128 --decay none --mix gated --linear-rule delta"
  # The no-decay delta row's recipe at window 256 (one change: the window), and at window 128
  # with its gate started ten times wider (one change: --mix-share 0.01).
  [d131-relu-w256-delta-beta300-nodecay-mixlr300-s2048]="transfer+distill --feature-map relu --window 256 --decay none --mix gated --linear-rule delta"
  [d131-relu-w128-delta-beta300-nodecay-share01-mixlr300-s2048]="transfer+distill --feature-map relu --window 128 --decay none --mix gated --linear-rule delta --mix-share 0.01"
  # The freed mix at window 256 (one change against d131-relu-w256-lightning-s2048), before
  # the long run with it: does its gain at w128 carry over?
  [d131-relu-w256-mixlr300-s2048]="transfer+distill --feature-map relu --window 256 --decay lightning"
)
# Flags beyond the recipe's. The pure linear cell's ablation (one change each against
# td-relu): every parameter trained instead of LoRA 16 + φ; the transfer target raw instead of
# GroupNorm'd. The two long runs (issue 20): 1,048,576 tokens, of which the transfer keeps the
# 131,072 of the fixed-budget rows and distillation takes the rest (LoLCATs: more transfer
# stops paying).
declare -A TRAIN_FLAGS=(
  [td-relu-all]="--tokens 262144 --train all"
  [td-relu-raw]="--tokens 262144 --transfer-target raw"
  [td-relu-all-raw]="--tokens 262144 --train all --transfer-target raw"
  [td-relu-all-fd128]="--tokens 262144 --train all"
  [td-relu-all-learn]="--tokens 262144 --train all"
  [td-relu-all-ident]="--tokens 262144 --train all"
  [td-relu-all-tlr1e2]="--tokens 262144 --train all --transfer-lr 1e-2"
  [td-relu-all-tt65k]="--tokens 262144 --train all --transfer-tokens 65536"
  [long-td-relu-w64]="--tokens 1048576 --transfer-tokens 131072"
  [long-td-relu]="--tokens 1048576 --transfer-tokens 131072"
  [long-td-relu-all]="--tokens 1048576 --transfer-tokens 131072 --train all"
  [long-td-relu-w256-s2048]="--tokens 1048576 --transfer-tokens 131072 --seq-len 2048"
  [long-td-relu-w128-delta-nodecay-s2048]="--tokens 1048576 --transfer-tokens 131072 --seq-len 2048 --mix-lr-scale 300 --beta-lr-scale 300"
  [long-td-relu-all-more1M]="--tokens 1048576 --train all"
  [long-td-relu-w64-more512]="--tokens 131072 --seq-len 512"
  [long-td-relu-w64-more2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w64-lightning]="--tokens 131072"
  [d131-relu-w64-retnet]="--tokens 131072"
  [d131-relu-w64-none]="--tokens 131072"
  [d131-relu-w64-lightning-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w64-retnet-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w256-lightning-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w256-retnet-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w128-lightning-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w128-none-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w128-gated-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w128-fd128-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w128-gated-open-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w128-minw32-s2048]="--tokens 131072 --seq-len 2048 --min-window 32"
  [d131-relu-w128-share01-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w128-gap05-s2048]="--tokens 131072 --seq-len 2048 --gap-weight 0.5"
  [d131-taylor-w128-s2048]="--tokens 131072 --seq-len 2048"
  [d131-taylor-w128-none-s2048]="--tokens 131072 --seq-len 2048"
  [d131-relu-w128-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300"
  [d131-relu-w128-delta-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300"
  [d131-relu-w128-gated-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300"
  [d131-relu-w128-value-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300"
  [d131-relu-w128-delta-beta300-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300 --beta-lr-scale 300"
  [d131-relu-w128-delta-beta300-nodecay-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300 --beta-lr-scale 300"
  [d131-relu-w256-delta-beta300-nodecay-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300 --beta-lr-scale 300"
  [d131-relu-w128-delta-beta300-nodecay-share01-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300 --beta-lr-scale 300"
  [d131-relu-w256-mixlr300-s2048]="--tokens 131072 --seq-len 2048 --mix-lr-scale 300"
)
# Continuations: a trained row's final model trained further (distillation from the original
# teacher, given with --teacher), to separate what longer training windows do for the long
# context from what more tokens do: the same 131,072 tokens in 512- or 2,048-token windows.
# And the pure linear long run trained twice as long.
declare -A BASE=(
  [long-td-relu-all-more1M]=long-td-relu-all
  [long-td-relu-w64-more512]=long-td-relu-w64
  [long-td-relu-w64-more2048]=long-td-relu-w64
)
ORDER=(teacher control-w64 td-relu-w64 td-hedgehog-w64 td-relu tce-relu-w64 tce-hedgehog-w64
  td-hedgehog tce-relu tce-hedgehog supra-relu supra-hedgehog supra-relu-w64 supra-hedgehog-w64
  supra-paper-relu)
[ $# -gt 0 ] && ORDER=("$@")

# The model a row's figures are measured on.
model() {
  case $1 in
    teacher) echo "$TEACHER" ;;
    control-*) echo "$OUT/$1/converted" ;;
    *) echo "$OUT/$1/run/final" ;;
  esac
}
is_window() { [[ ${ROWS[$1]} == *--window* ]]; }
# The branches a row's probes run: a control has only its window.
probe_branches() { if [[ $1 == control-* ]]; then echo window; else echo both; fi; }

# once FILE COMMAND...: runs COMMAND with stdout into FILE unless FILE exists (written whole).
once() {
  local file=$1; shift
  [ -f "$file" ] && return
  local t0=$SECONDS
  "$@" > "$file.tmp"
  mv "$file.tmp" "$file"
  echo "$file ($((SECONDS - t0)) s)"
}

train_row() {
  local row=$1 spec=(${ROWS[$1]})
  local recipe=${spec[0]} flags=("${spec[@]:1}")
  [ "$row" = teacher ] && return
  mkdir -p "$OUT/$row"
  local start="$OUT/$row/converted" teacher=()
  if [ -n "${BASE[$row]+x}" ]; then
    start=$(model "${BASE[$row]}") teacher=(--teacher "$TEACHER")
    [ -f "$start/config.json" ] || { echo "$row continues ${BASE[$row]}: train it first" >&2; exit 2; }
  fi
  [ -f "$start/config.json" ] || "$S" convert --out "$start" "${flags[@]}" >/dev/null
  [ "$recipe" = - ] && return
  [ -f "$OUT/$row/run/final/config.json" ] && return
  local resume=()
  [ -d "$OUT/$row/run/checkpoints" ] && resume=(--resume)
  local t0=$SECONDS budget=(${TRAIN_FLAGS[$row]:---tokens $TOKENS})
  "$S" train "$start" --recipe "$recipe" --data "$DATA/text/train" "${teacher[@]}" \
    "${budget[@]}" --checkpoint-every 8 --out "$OUT/$row/run" "${resume[@]}"
  echo $(( $(cat "$OUT/$row/wall_s" 2>/dev/null || echo 0) + SECONDS - t0 )) > "$OUT/$row/wall_s"
  # A finished run needs no resume point; every-parameter checkpoints are ~1.1 GB each and the
  # ablation's rows together would fill the disk.
  [ -f "$OUT/$row/run/final/config.json" ] && rm -rf "$OUT/$row/run/checkpoints"
}

heldout() { # row, branches
  local m branches=$2
  m=$(model "$1")
  once "$OUT/$1/heldout-$branches.json" "$S" score "$m" --text "$DATA/text/test" --window 512 \
    --max-tokens 8192 --branches "$branches" --json
}

# The same on text/valid (24,528 tokens): the figure choices (defaults) are made on.
valid() { # row, branches
  local m branches=$2
  m=$(model "$1")
  once "$OUT/$1/valid-$branches.json" "$S" score "$m" --text "$DATA/text/valid" --window 512 \
    --max-tokens 8192 --branches "$branches" --json
}

# probe NAME ROW ARGS...: a probe journaled beside its JSON, continued when interrupted.
probe() {
  local name=$1 row=$2; shift 2
  local json="$OUT/$row/$name.json" resume=()
  [ -f "$json" ] && return
  [ -f "$json.partial.jsonl" ] && resume=(--resume)
  "$S" probe "$@" "$(model "$row")" --names "$row" --json "$json" --png "$OUT/$row/$name.png" \
    "${resume[@]}" > "$OUT/$row/$name.md"
}

task() { # row, name, eval flags...
  local row=$1 name=$2; shift 2
  local json="$OUT/$row/$name.json" resume=()
  [ -f "$json" ] && return
  [ -f "$json.partial.jsonl" ] && resume=(--resume)
  local m=(); [ "$row" = teacher ] || m=("$(model "$row")")
  "$S" eval "${m[@]}" "$@" --json "$json" "${resume[@]}" > "$OUT/$row/$name.md"
}

# The whole table (the paper's Table 1; hours per model). Answers journaled by an earlier
# `tasks` pass of the same model (the same requests, keyed by task and item, each checked
# against its request's hash) start its journal, so they are not computed twice.
all_tasks() { # row
  local row=$1 json="$OUT/$1/all.json"
  if [ ! -f "$json" ] && [ ! -f "$json.partial.jsonl" ] && [ -f "$OUT/$row/tasks.json.partial.jsonl" ]; then
    cp "$OUT/$row/tasks.json.partial.jsonl" "$json.partial.jsonl"
  fi
  task "$row" all --tasks all
  # The paper's Table 1 for the row: each task beside the teacher's full report (issue 20's
  # reference, docs/results/eval.md), with retention and retention above chance.
  once "$OUT/$row/compare.md" "$S" compare docs/results/eval/full_teacher.json "$json"
}

# Greedy samples (temperature 0, 96 new tokens) of fixed prompts, the same for every row: plain
# continuations (where the early models looped) and chat turns (the teacher is an instruct
# model). Markdown, one section per prompt.
PLAIN_PROMPTS=("The old house at the end of the lane" "Once upon a time, in a small village by the sea,"
  "The three most important inventions of the nineteenth century were")
CHAT_PROMPTS=("What are three good ways to save energy at home?"
  "Explain in two sentences why the sky is blue.")
samples() { # row
  local m p
  m=$(model "$1")
  for p in "${PLAIN_PROMPTS[@]}"; do
    printf '### "%s"\n\n' "$p"
    "$S" generate "$m" --prompt "$p" --temperature 0 --max-tokens 96 | sed 's/^/> /'
    echo
  done
  for p in "${CHAT_PROMPTS[@]}"; do
    printf '### chat: "%s"\n\n' "$p"
    "$S" generate "$m" --chat --prompt "$p" --temperature 0 --max-tokens 96 | sed 's/^/> /'
    echo
  done
}

for row in "${ORDER[@]}"; do
  [ -n "${ROWS[$row]+x}" ] || { echo "unknown row $row (rows: ${!ROWS[*]})" >&2; exit 2; }
  mkdir -p "$OUT/$row"
  # The branches a row is measured with: a control (the converted model with its untrained
  # linear branch off) has only its window.
  b=$(probe_branches "$row")
  case $PHASE in
    train)
      train_row "$row"
      branches=("$b")
      [[ $row != control-* ]] && is_window "$row" && branches=(both window linear)
      for br in "${branches[@]}"; do heldout "$row" "$br"; done
      valid "$row" "${branches[0]}"
      ;;
    probes)
      probe position "$row" position --branches "$b" --text "$DATA/text/test" --length 8k \
        --sequences 5 --edges 1k,2k
      probe passkey "$row" passkey --branches "$b" --lengths 1k,2k
      ;;
    stateoff) # A trained hybrid's long positions with its linear branch off (the same 5
      # books as probes): beside `probes`, the linear state's own share of the gain over the
      # untrained window control, apart from what the adapters did to the window path.
      is_window "$row" && [[ $row != control-* ]] || { echo "$row: stateoff needs a trained window row" >&2; exit 2; }
      probe position-window "$row" position --branches window --text "$DATA/text/test" \
        --length 8k --sequences 5 --edges 1k,2k
      ;;
    validpos) # Perplexity by position on text/valid (3 books × 8k), where choices are made.
      probe valid-position "$row" position --branches "$b" --text "$DATA/text/valid" \
        --length 8k --sequences 3 --edges 1k,2k
      ;;
    tasks)
      # The long runs are judged on full sets, which `all` holds: their four tasks come from
      # its report, not from a second pass over the same requests.
      [[ $row == long-* ]] && { all_tasks "$row"; continue; }
      task "$row" tasks --tasks piqa,arc_easy,lambada_openai --branches "$b"
      task "$row" hellaswag --tasks hellaswag --limit 1000 --branches "$b"
      ;;
    all) all_tasks "$row" ;;
    samples) once "$OUT/$row/samples.md" samples "$row" ;;
    longprobes) # scripts/results/probes.sh's settings, so that the grids match the teacher's.
      probe long-position "$row" position --branches "$b"
      probe long-passkey "$row" passkey --branches "$b" --trials 1
      probe long-needle "$row" needle --branches "$b" --trials 1
      ;;
    *) echo "unknown phase $PHASE (train, probes, validpos, stateoff, tasks, all, samples or longprobes)" >&2; exit 2 ;;
  esac
done
