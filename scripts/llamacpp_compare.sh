#!/usr/bin/env bash
# Decode speed side by side with llama.cpp on the same quantization (Q8_0) and context (2k):
# llama.cpp runs SmolLM2-135M-Instruct (softmax), supra runs the same model and its SUPRA
# conversion. llama.cpp is built from the source inside the PyPI sdist of llama-cpp-python
# (no other registry is reachable here); cmake comes from PyPI too. Several minutes the first
# time (the build), then about one. The build includes llama-server, which
# scripts/bench/llama_server_batch.sh runs under load.
#
#   scripts/llamacpp_compare.sh [WORK=/tmp/supra-llamacpp] [CONTEXT=2048]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/supra-llamacpp}
CONTEXT=${2:-2048}
THREADS=$(nproc)
LLAMA_CPP_PYTHON=0.3.36
mkdir -p "$WORK"

if [ ! -x "$WORK/build/bin/llama-bench" ] || [ ! -x "$WORK/build/bin/llama-server" ]; then
  command -v cmake >/dev/null || pip install --quiet cmake
  if [ ! -d "$WORK/src" ]; then
    # The source distribution, by name through pip (the version pinned for repeatable figures).
    pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$WORK/dist"
    mkdir -p "$WORK/sdist"
    tar -xzf "$WORK"/dist/llama_cpp_python-*.tar.gz -C "$WORK/sdist"
    mv "$WORK"/sdist/*/vendor/llama.cpp "$WORK/src"
  fi
  cmake -S "$WORK/src" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$WORK/build" -j "$THREADS" --target llama-bench llama-quantize llama-server
fi

cargo build --release --quiet
S=target/release/supra
TEACHER=$("$S" fetch 2>/dev/null | tail -1 | awk '{print $NF}')
Q8="$WORK/smollm2-135m-q8_0.gguf"
# The default GGUF holds Q4_1 blocks: both sides start from those values and make Q8_0 of them.
[ -f "$Q8" ] || "$WORK/build/bin/llama-quantize" --allow-requantize "$TEACHER" "$Q8" Q8_0 >/dev/null 2>&1

echo "## llama.cpp (softmax, Q8_0, $THREADS threads): decode 64 tokens after $CONTEXT of context"
"$WORK/build/bin/llama-bench" -m "$Q8" -t "$THREADS" -p 0 -n 64 -d "$CONTEXT" -r 3 -o md
echo
echo "## supra (Q8_0): the teacher and its SUPRA conversion, $CONTEXT of context"
"$S" bench infer --weights q8_0 --contexts "$CONTEXT" --gen 64
