#!/usr/bin/env bash
# Per-layer sensitivity of tq3_0/tq2_0 (results/experiments.md, section 4): mean KLD against f16
# logits when the TurboQuant K or V cache of some layers is stored as q8_0 instead
# (patches/experiments/tq-q8-layers.patch: LLAMA_TQ_Q8_K_LAYERS / LLAMA_TQ_Q8_V_LAYERS).
# SmolLM2-135M Q4_1 (30 layers), alice29, ctx 2048, 2 chunks. Needs a finished `tqkv build`;
# builds the variant in the build folder's exp-q8layers (about 5 min on 2 cores), then about 1 min per row.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(python -c "from tqkv import build; print(build.Layout().llama_cpp)")
exp=$(python -c "from tqkv import build; print(build.Layout().root)")/exp-q8layers
bin=$exp/bin/bin/llama-perplexity
model=$(python -c "from tqkv import assets; print(assets.model('smollm2'))")
text=$(python -c "from tqkv import assets; print(assets.text('alice29'))")

if [ ! -x "$bin" ]; then
  rm -rf "$exp/src" && mkdir -p "$exp" && cp -r "$tree" "$exp/src"
  patch -d "$exp/src" -p1 --quiet < "$root/patches/experiments/tq-q8-layers.patch"
  cmake -S "$exp/src" -B "$exp/bin" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF > "$exp/configure.log"
  cmake --build "$exp/bin" --target llama-perplexity
fi

base=$exp/base-c2048-n2.kld
[ -f "$base" ] || "$bin" -m "$model" -f "$text" -c 2048 --chunks 2 --kl-divergence-base "$base" \
  -fa on -ctk f16 -ctv f16 > /dev/null 2>&1

kld() {  # kld [ENV...]: mean KLD of tq3_0/tq2_0 under the given variables
  env "$@" "$bin" -m "$model" -c 2048 --kl-divergence-base "$base" --kl-divergence -fa on -ctk tq3_0 -ctv tq2_0 2>&1 \
    | sed -n 's/^Mean *KLD: *\([0-9.]*\).*/\1/p'
}

echo "| q8_0 instead of TurboQuant | mean KLD |"
echo "|---|---|"
echo "| none | $(kld) |"
for layers in 0,1,2,3,4 5,6,7,8,9 10,11,12,13,14 15,16,17,18,19 20,21,22,23,24 25,26,27,28,29; do
  echo "| V of layers $layers | $(kld LLAMA_TQ_Q8_V_LAYERS=$layers) |"
done
for layers in 0,1,2,3,4 5,6,7,8,9 10,11,12,13,14 15,16,17,18,19 20,21,22,23,24 25,26,27,28,29; do
  echo "| K of layers $layers | $(kld LLAMA_TQ_Q8_K_LAYERS=$layers) |"
done
for l in 0 1 2 3 4 29; do echo "| V of layer $l | $(kld LLAMA_TQ_Q8_V_LAYERS=$l) |"; done
echo "| K of layer 0 | $(kld LLAMA_TQ_Q8_K_LAYERS=0) |"
