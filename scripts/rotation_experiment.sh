#!/usr/bin/env bash
# Rotation choices for the TQ types, measured: upstream's Hadamard (what the types rely on),
# the same with random sign flips (R = D H D, patches/experiments/random-signs.patch), and no
# rotation (LLAMA_ATTN_ROT_DISABLE=1). SmolLM2-135M Q4_1, alice29, ctx 512, 6 chunks, V f16.
# Needs a finished `tqkv build`; builds the variant in the build folder's exp-signs (about 5 min on 2 cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(python -c "from tqkv import build; print(build.Layout().llama_cpp)")
exp=$(python -c "from tqkv import build; print(build.Layout().root)")/exp-signs
model=$(python -c "from tqkv import assets; print(assets.model('smollm2'))")
text=$(python -c "from tqkv import assets; print(assets.text('alice29'))")

if [ ! -x "$exp/bin/bin/llama-perplexity" ]; then
  rm -rf "$exp/src" && mkdir -p "$exp" && cp -r "$tree" "$exp/src"
  patch -d "$exp/src" -p1 --quiet < "$root/patches/experiments/random-signs.patch"
  cmake -S "$exp/src" -B "$exp/bin" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF > "$exp/configure.log"
  cmake --build "$exp/bin" --target llama-perplexity
fi

ppl() {  # ppl BINARY K [ENV...]
  local bin=$1 k=$2; shift 2
  env "$@" "$bin" -m "$model" -f "$text" -c 512 --chunks 6 -fa on -ctk "$k" -ctv f16 2>&1 \
    | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p'
}

echo "| K type | upstream Hadamard | random signs, seed 1 | random signs, seed 7 | no rotation |"
echo "|---|---|---|---|---|"
for k in q4_0 tq4_0 tq3_0 tq2_0; do
  echo "| $k | $(ppl "$root/build/cpu/bin/llama-perplexity" $k) | $(ppl "$exp/bin/bin/llama-perplexity" $k TQ_SIGNS=1)" \
       "| $(ppl "$exp/bin/bin/llama-perplexity" $k TQ_SIGNS=7) | $(ppl "$root/build/cpu/bin/llama-perplexity" $k LLAMA_ATTN_ROT_DISABLE=1) |"
done
