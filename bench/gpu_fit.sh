#!/usr/bin/env bash
# bench/gpu_fit.sh - the issue 8 GPU benchmark (bench/gpu_fit) as ONE command for a lent GPU machine:
# the automatic memory tier through the daemon against kohya tuned by hand, in the same run, within a
# time budget that keeps the whole command under 10 minutes.
#
#   bash bench/gpu_fit.sh [sd15|sdxl|both]        # default sd15; run from the repository root
#
# What must already be on the GPU machine (it has no internet, so nothing is installed here):
#   - this repository, and a Python 3.10+ that has the daemon's runtime dependencies (`pip install -e .`:
#     aiohttp, pillow, pyyaml, watchdog, safetensors, psutil, platformdirs, tomli-w). BENCH_PYTHON, default
#     the checkout's .venv/bin/python, else python3. (A venv with only these is ~69 MB, ~43 MB without its pip
#     and setuptools; the sd-scripts venv lacks aiohttp, watchdog, platformdirs and tomli-w.);
#   - kohya-ss sd-scripts (KOHYA_SD, or the harness's KH_SD) and its venv's python (KOHYA_PYTHON or KH_PY) with
#     a CUDA build of torch and sd-scripts' requirements.txt installed, bitsandbytes included (the daemon's
#     presets use AdamW8bit; without it pass GPU_FIT_PARAMS='{"optimizer": "AdamW"}');
#   - an SD1.5 checkpoint (KOHYA_MODEL or KH_MODEL; random weights are fine, speed does not depend on them) and,
#     for sdxl/both, an SDXL one (KOHYA_SDXL_MODEL or KH_SDXL_MODEL, e.g. the harness's setup-sdxl output);
#   - the tokenizer cache (KOHYA_TOKENIZER_CACHE or KH_TOK_CACHE) holding openai_clip-vit-large-patch14/ and, for
#     SDXL, laion_CLIP-ViT-bigG-14-laion2B-39B-b160k/ (shared/harness/make_clip_tokenizer.py builds both);
#   - nvidia-smi on PATH (peak memory; without it that column stays empty).
#
# Environment: OUT (report folder, default bench-out: gpu_fit.json + gpu_fit-logs/), GPU_FIT_BUDGET_S (default
# 540: the script skips runs that would not fit, and the command is killed 45 s after it), GPU_FIT_PARAMS (JSON
# overrides for the daemon job, default none = the standard job), GPU_FIT_SD15_BATCHES, GPU_FIT_SDXL_BATCHES.
#
# Time on an H100 (shared/reference/kohya.md §9: 31-49 s from start to the first step of every kohya run):
# SD1.5 daemon job ~1.5-2 min, each hand run ~45-70 s; the default SD1.5 sweep starts at batch 8 because
# batches 1-4 are known to be 3-15x slower (images/s grows almost linearly with the batch up to 32 there).
# SDXL loads 3x the weights and caches two text encoders: give it its own command (`sdxl`) when time allows.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
which=${1:-sd15}
case "$which" in sd15|sdxl|both) ;; *) echo "usage: bash bench/gpu_fit.sh [sd15|sdxl|both]" >&2; exit 2 ;; esac

pick() { for v in "$@"; do if [ -n "${!v:-}" ]; then echo "${!v}"; return; fi; done; echo ""; }
KSD=$(pick KOHYA_SD KH_SD)
KPY=$(pick KOHYA_PYTHON KH_PY)
SD15=$(pick KOHYA_MODEL KH_MODEL)
SDXL=$(pick KOHYA_SDXL_MODEL KH_SDXL_MODEL)
TOK=$(pick KOHYA_TOKENIZER_CACHE KH_TOK_CACHE)
OUT=${OUT:-bench-out}
BUDGET=${GPU_FIT_BUDGET_S:-540}
if [ -n "${BENCH_PYTHON:-}" ]; then PY=$BENCH_PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

if ! "$PY" -c 'import aiohttp, yaml, PIL, safetensors, psutil, watchdog, platformdirs, tomli_w' 2>/dev/null; then
  echo "gpu_fit.sh: $PY lacks the daemon's dependencies: set BENCH_PYTHON to a python where \`pip install -e .\`" \
       "of this repository was done (or carry its .venv)" >&2
  exit 2
fi

args=(-m bench.gpu_fit --kohya-sd "$KSD" --kohya-python "$KPY" --tokenizer-cache "$TOK"
      --out "$OUT/gpu_fit.json" --budget-s "$BUDGET"
      --sd15-batches "${GPU_FIT_SD15_BATCHES:-8,16,32,48,64}" --sdxl-batches "${GPU_FIT_SDXL_BATCHES:-2,4,8,16}")
case "$which" in
  sd15) args+=(--only sd15 --sd15-model "$SD15") ;;
  sdxl) args+=(--only sdxl --sdxl-model "$SDXL") ;;
  both) args+=(--sd15-model "$SD15" --sdxl-model "$SDXL") ;;
esac
if [ -n "${GPU_FIT_PARAMS:-}" ]; then args+=(--params "$GPU_FIT_PARAMS"); fi

mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "gpu_fit.sh: no nvidia-smi (peak memory will not be measured)" >&2; fi
# The budget is the script's own; this is the backstop. The JSON is rewritten after every run, so what was
# measured before a kill is kept.
exec timeout -k 10 "$((BUDGET + 45))" "$PY" "${args[@]}"
