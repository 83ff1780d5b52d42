#!/usr/bin/env bash
# bench/h200/run.sh - issue 9's GPU benchmark as ONE command for a lent NVIDIA H200 (no internet, one shot):
# click -> first training step with fast_start off and on (bench.quick_start), then the automatic memory tier
# against kohya tuned by hand (bench/gpu_fit.sh sd15) with the time left. SD1.5, real sd-scripts, real daemon.
#
#   bash bench/h200/run.sh                        # from the repository root, on the device
#
# Needs, in the repository (the kit is git-excluded and travels with the run tool's `carry: [".devkit"]`):
#   .devkit/whl/*.whl      py3.12 wheels the device lacks or has in versions sd-scripts @48d368f breaks with:
#                          transformers 4.54.1, tokenizers 0.21.4, huggingface_hub 0.34.3, accelerate 1.6.0,
#                          diffusers 0.32.1 (+ importlib_metadata), toml, voluptuous, imagesize (sd-scripts);
#                          watchdog, platformdirs, tomli-w (the daemon). torch, numpy, opencv, safetensors,
#                          aiohttp, pillow, pyyaml, psutil, einops, rich, tensorboard stay the device's.
#                          No bitsandbytes: an H200 is on the >= 40 GB tier, whose optimizer is plain AdamW.
#   .devkit/sd-scripts/    kohya-ss/sd-scripts @48d368fa (train_network.py, sdxl_train_network.py, library/, networks/)
#   .devkit/tokenizers/    CLIP-L (openai_clip-vit-large-patch14/) and bigG tokenizer files (--tokenizer_cache_dir)
#   .devkit/make_random_sd15.py  the harness's random-weight SD1.5 builder (uses diffusers + sd-scripts' converter)
#   .devkit/data/*.png     20 training pictures (shared/harness/make_dataset.py, 512 px, mixed aspect ratios)
#   python3 with a CUDA torch (the device's: 3.12, torch 2.11+cu130), nvidia-smi, GNU timeout, tar.
#
# Stages (expected on an H200; each has its own time limit, all inside RUN_SH_BUDGET_S, default 500 s):
#   install  wheels -> /tmp/site (PYTHONPATH)                          ~10-20 s   (limit 90)
#   model    random SD1.5 fp16 single file -> /tmp/h200/sd15.safetensors ~20-40 s   (limit 180)
#   smoke    versions, CUDA matmul, daemon deps, `import train_network`   ~10-20 s   (limit 90)
#   quick    bench.quick_start --modes off,on (baseline first)             QS_BUDGET_S, default 200 s
#   fit      bench/gpu_fit.sh sd15 with what is left (skipped under 150 s) ~150-250 s
# A failing stage is recorded and the next one still runs.
#
# Writes to $OUT (default bench-out/h200), at most 6 files, refreshed after every stage so that a kill keeps them:
#   stages.tsv        stage, exit code (124 = its time limit), seconds
#   quick_start.json  bench.quick_start's report          gpu_fit.json  bench.gpu_fit's report
#   logs.tar.gz       every stage's log + the benches' own log folders   summary.txt  what is printed at the end
#
# Environment: RUN_SH_BUDGET_S (500), QS_BUDGET_S (200), QS_REPEATS (3), QS_MODES (off,on; quick_start also
# knows warm, prestart, latent_cache), QS_DATA (the kit's pictures; empty = quick_start's own), QS_IMAGES (20),
# GPU_FIT_PARAMS / GPU_FIT_SD15_BATCHES (passed on to gpu_fit.sh), RUN_SH_DROP_CACHES=1 (drop the whole page cache
# before quick_start; quick_start already evicts the checkpoint before each click), RUN_SH_KIT (.devkit),
# RUN_SH_WORK (/tmp/h200), RUN_SH_SITE (/tmp/site).
# CPU rehearsal (no GPU): RUN_SH_CPU=1 RUN_SH_PYTHON=<a python with torch> [RUN_SH_MODEL=<existing checkpoint>]
# [RUN_SH_EXTRA_PYTHONPATH=<dir with aiohttp>]: same stages, the CUDA checks only warn.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
T0=$(date +%s)
BUDGET=${RUN_SH_BUDGET_S:-500}
RESERVE=15  # packing and the summary
CPU=${RUN_SH_CPU:-0}
PY=$(command -v "${RUN_SH_PYTHON:-python3}") || { echo "run.sh: no ${RUN_SH_PYTHON:-python3}" >&2; exit 2; }
KIT=$(cd "${RUN_SH_KIT:-.devkit}" 2>/dev/null && pwd) || { echo "run.sh: no kit folder ${RUN_SH_KIT:-.devkit}" >&2; exit 2; }
WORK=${RUN_SH_WORK:-/tmp/h200}
SITE=${RUN_SH_SITE:-/tmp/site}
OUT=${OUT:-bench-out/h200}
LOGS=$WORK/logs
MODEL=${RUN_SH_MODEL:-$WORK/sd15.safetensors}
QS_DATA=${QS_DATA-$KIT/data}
rm -rf "$LOGS" "$WORK/qs" "$WORK/gpu_fit"  # a rerun on a warm machine reports only its own runs
mkdir -p "$OUT" "$LOGS" "$WORK/hf"
OUT=$(cd "$OUT" && pwd)
printf 'stage\trc\tseconds\n' > "$OUT/stages.tsv"

export PYTHONPATH=$SITE${RUN_SH_EXTRA_PYTHONPATH:+:$RUN_SH_EXTRA_PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HOME=$WORK/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export KOHYA_SD=$KIT/sd-scripts KOHYA_PYTHON=$PY KOHYA_MODEL=$MODEL KOHYA_TOKENIZER_CACHE=$KIT/tokenizers
export BENCH_PYTHON=$PY

left() { echo $(( BUDGET - RESERVE - ($(date +%s) - T0) )); }

pack() {  # the logs so far, as one file in $OUT (the run tool returns at most 8 files)
  # text only: the benches' work folders may hold pictures, latents and LoRAs (the run tool takes <= 16 MiB a file)
  tar -czf "$OUT/logs.tar.gz.part" -C "$WORK" --exclude='*.safetensors' --exclude='*.npz' --exclude='*.png' \
    --exclude='*.jpg' --exclude='*.webp' --exclude='*.ckpt' --exclude='*.pt' --exclude='*.bin' --exclude='*.upload' \
    logs $(cd "$WORK" && ls -d qs gpu_fit 2>/dev/null) 2>/dev/null
  mv -f "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
  for j in qs/quick_start.json gpu_fit/gpu_fit.json; do if [ -f "$WORK/$j" ]; then cp -f "$WORK/$j" "$OUT/"; fi; done
}

reap() {  # end what a stage left running (a daemon, a trainer in its own session), found by the stage's tag
  local pids
  pids=$(grep -lzx "RUN_SH_TAG=$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true)
  if [ -n "$pids" ]; then
    echo "run.sh: ending what stage $1 left running: $(echo $pids)"
    kill $pids 2>/dev/null; sleep 3; kill -9 $pids 2>/dev/null
  fi
  return 0
}

stage() {  # NAME LIMIT_S CMD... : runs CMD under min(LIMIT, time left), logs to $LOGS/NAME.log and stdout
  local name=$1 lim=$2 t rc l; shift 2
  l=$(left); [ "$lim" -gt "$l" ] && lim=$l
  if [ "$lim" -lt 5 ]; then
    echo "=== [$name] skipped: ${l}s left"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"; return 99
  fi
  l="$*"; echo "=== [$name] $(date -u +%T) limit ${lim}s: ${l:0:400}"
  t=$(date +%s)
  env RUN_SH_TAG="$name" timeout -k 5 "$lim" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  reap "$name"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$OUT/stages.tsv"
  echo "=== [$name] rc=$rc in $(( $(date +%s) - t ))s"
  pack
  return "$rc"
}

summary() {
  {
    echo "== bench/h200/run.sh summary ($(date -u +%FT%TZ), ${BUDGET}s budget, $(( $(date +%s) - T0 ))s used)"
    column -t "$OUT/stages.tsv" 2>/dev/null || cat "$OUT/stages.tsv"
    grep -h '^\[smoke\]' "$LOGS/smoke.log" 2>/dev/null
    for f in quick gpu_fit; do
      [ -f "$LOGS/$f.log" ] && { echo "-- last lines of $f.log"; tail -n 25 "$LOGS/$f.log"; }
    done
  } > "$OUT/summary.txt"
  echo; cat "$OUT/summary.txt"
  pack
}
trap 'summary; exit 130' INT TERM

# --- 0. what machine is this --------------------------------------------------------------------------
{ date -u; uname -a; nvidia-smi 2>&1 || echo "no nvidia-smi"; "$PY" -VV; df -h /tmp; free -g; nproc; } > "$LOGS/machine.log" 2>&1
head -n 20 "$LOGS/machine.log"

# --- 1. wheels ----------------------------------------------------------------------------------------
stage install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$KIT"/whl/*.whl

# --- 2. the model: random weights, SD1.5 layout (speed does not depend on the weights) -------------------
if [ -n "${RUN_SH_MODEL:-}" ]; then
  echo "=== [model] using RUN_SH_MODEL=$MODEL"
else
  stage model 180 "$PY" "$KIT/make_random_sd15.py" --tokenizer "$KIT/tokenizers/openai_clip-vit-large-patch14" \
    --sd-scripts "$KIT/sd-scripts" --single "$MODEL" --dtype fp16
fi

# --- 3. smoke: versions, the GPU, the daemon's and sd-scripts' imports --------------------------------
SMOKE=$(cat <<'EOF'
import importlib, os, sys, time
def say(*a): print("[smoke]", *a, flush=True)
t = time.time()
import torch
say("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())
if torch.cuda.is_available():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize(); say("gpu", torch.cuda.get_device_name(0), "matmul", float((x @ x).float().norm()) > 0)
elif os.environ.get("RUN_SH_CPU") != "1":
    say("no CUDA device: this bench is for a GPU machine (RUN_SH_CPU=1 rehearses it on a CPU)"); sys.exit(3)
for m in ("transformers", "tokenizers", "huggingface_hub", "accelerate", "diffusers", "safetensors", "numpy", "cv2",
          "einops", "toml", "voluptuous", "imagesize", "aiohttp", "yaml", "PIL", "psutil", "watchdog",
          "platformdirs", "tomli_w"):
    mod = importlib.import_module(m)
    say(f"{m:16} {getattr(mod, '__version__', '?'):12} {os.path.dirname(mod.__file__)}")
sys.path.insert(0, os.environ["KOHYA_SD"]); os.chdir(os.environ["KOHYA_SD"])
sys.argv = ["train_network.py"]
import train_network, networks.lora, library.train_util  # noqa: E401,F401
say("sd-scripts import ok", train_network.__file__)
import daemon.web.app  # noqa: F401
say(f"daemon import ok; smoke {time.time() - t:.1f}s")
EOF
)
RUN_SH_CPU=$CPU stage smoke 90 "$PY" -c "import sys; sys.path.insert(0, '$PWD'); exec(sys.argv[1])" "$SMOKE"
if [ $? -eq 3 ]; then summary; exit 3; fi  # no GPU: the benches would time a CPU

# --- 4. click -> first step, fast_start off and on ------------------------------------------------------
if [ "${RUN_SH_DROP_CACHES:-0}" = 1 ]; then
  sync; { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null && echo "page cache dropped" || echo "could not drop the page cache"
fi
if [ -f bench/quick_start.py ]; then
  qs_budget=${QS_BUDGET_S:-200}
  fit_min=150; l=$(left)
  [ $(( l - qs_budget )) -lt $(( fit_min + 60 )) ] && qs_budget=$(( l - fit_min - 60 ))
  [ "$qs_budget" -lt 90 ] && qs_budget=$(( l > 120 ? 90 : l - 30 ))
  qs_args=(-m bench.quick_start --kohya-sd "$KOHYA_SD" --kohya-python "$PY" --model "$MODEL"
           --tokenizer-cache "$KOHYA_TOKENIZER_CACHE" --repeats "${QS_REPEATS:-3}" --modes "${QS_MODES:-off,on}"
           --out "$WORK/qs/quick_start.json" --budget-s "$qs_budget")
  [ -n "$QS_DATA" ] && qs_args+=(--data "$QS_DATA")
  # Options beyond the contracted CLI, used only where this checkout's quick_start has them: 20 pictures like
  # gpu_fit's job (the 41.5 s H100 reference), and each job's trainer.log kept for logs.tar.gz.
  qs_help=$("$PY" -m bench.quick_start --help 2>/dev/null || true)
  grep -q -- '--images' <<<"$qs_help" && qs_args+=(--images "${QS_IMAGES:-20}")
  grep -q -- '--keep' <<<"$qs_help" && grep -q -- '--work' <<<"$qs_help" && qs_args+=(--work "$WORK/qs/work" --keep)
  mkdir -p "$WORK/qs"
  stage quick $(( qs_budget + 60 )) "$PY" "${qs_args[@]}"  # the margin: a started run may outlast the budget
else
  echo "=== [quick] skipped: bench/quick_start.py is not in this checkout"; printf 'quick\tmissing\t0\n' >> "$OUT/stages.tsv"
fi
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >> "$LOGS/machine.log" 2>&1

# --- 5. the automatic tier against kohya by hand, with what is left -------------------------------------
l=$(left)
if [ "$l" -ge 150 ]; then  # gpu_fit starts its daemon job only with >= 90 s of its own budget left
  # gpu_fit.sh kills its python 45 s after GPU_FIT_BUDGET_S; keep both inside what is left
  stage gpu_fit "$l" env GPU_FIT_BUDGET_S=$(( l - 55 )) OUT="$WORK/gpu_fit" bash bench/gpu_fit.sh sd15
else
  echo "=== [gpu_fit] skipped: ${l}s left (needs 150)"; printf 'gpu_fit\tskipped\t0\n' >> "$OUT/stages.tsv"
fi

summary
# 0 when the headline number (click -> first step) was measured; the stages' own codes are in stages.tsv
[ -f "$OUT/quick_start.json" ]
