#!/usr/bin/env bash
# A long fuzzing campaign over every reader of user files (see src/fuzz.rs): the corpus from the
# tiny models, then ITERATIONS mutated inputs under an address-space cap. Inputs that panicked
# are kept under WORK/scratch/failures; an abort (an allocation over the cap) ends the run and
# the input it read is the one each target file in WORK/scratch/work holds.
#
#   scripts/fuzz.sh [ITERATIONS=1000000] [SEED=1] [WORK=/tmp/supra-fuzz] [CAP_MIB=4096]
set -euo pipefail
cd "$(dirname "$0")/.."
ITERATIONS=${1:-1000000}
SEED=${2:-1}
WORK=${3:-/tmp/supra-fuzz}
CAP_MIB=${4:-4096}
cargo build --release --quiet --bin supra --example fuzz_corpus
[ -d "$WORK/corpus" ] || target/release/examples/fuzz_corpus "$WORK/corpus"
ulimit -v $((CAP_MIB * 1024))
exec target/release/supra fuzz "$WORK/corpus" --iterations "$ITERATIONS" --seed "$SEED" \
  --scratch "$WORK/scratch" --json "$WORK/report-$SEED.json"
