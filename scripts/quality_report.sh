#!/usr/bin/env bash
# The quality report (results/quality, results/niah; README "Quality"): the exact commands.
# Needs a finished `tqkv build`. Every result is cached per configuration (tqkv cache dir), so an
# interrupted run resumes. Times on 2 cores: about 40 min for the SmolLM2 table, 30 min for the
# Gemma one, 15-40 min per NIAH configuration and model.
set -euo pipefail

# paired PPL / KLD against f16 logits, ctx 2048 (SmolLM2: 4 chunks, every default configuration)
tqkv ppl smollm2 --ctx 2048 --chunks 4 --out results/quality
tqkv ppl gemma3 --ctx 2048 --chunks 2 --out results/quality --configs q8_0/q8_0 q4_0/q4_0 tq4_0/tq4_0 \
  tq4_0/tq4_0:nooff tq3_0/tq3_0 tq3_0/tq3_0:noscale tq3_0/tq2_0 tq2_0/tq2_0 q8_0/tq3_0 q8_0/tq2_0

# boundary layers in q8_0 (patches/0008, :bN = LLAMA_TQ_BOUNDARY_LAYERS=N): measured before the
# key channel scale (patches/0009) and reported in results/experiments.md, section 4; the reports
# no longer carry these rows. To measure them again (about 30 min for SmolLM2, 10 min for Gemma):
#   boundary="tq3_0/tq2_0:b1 tq3_0/tq2_0:b2 tq3_0/tq3_0:b1 tq3_0/tq3_0:b2 tq2_0/tq2_0:b1 tq2_0/tq2_0:b2
#     q8_0/tq2_0:b1 q8_0/tq2_0:b2 tq4_0/tq4_0:b1 tq4_0/tq4_0:b2"
#   tqkv ppl smollm2 --ctx 2048 --chunks 4 --out results/quality --configs tq3_0/tq2_0 $boundary
#   tqkv ppl gemma3 --ctx 2048 --chunks 2 --out results/quality --configs tq3_0/tq2_0 q8_0/tq2_0 $boundary

# needle in a haystack, paired with f16 (which every run includes first)
tqkv niah gemma3 --out results/niah --configs tq3_0/tq2_0
tqkv niah smollm2 --out results/niah --configs tq3_0/tq2_0 --lengths 1024 2048 4096 --depths 0 50 100 --seeds 2
