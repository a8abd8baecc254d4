#!/usr/bin/env bash
# Every GPU check of the PCDMs-training work in one run on a lent GPU machine (this workplace's
# `device` tool: one run of at most 10 minutes, 15 device-minutes per session in all), prepared and
# smoke-tested on CPU so that no device time goes on set-up or mistakes:
#
#   1. training speed of the paper-size stages 2 and 3 (benchmarks/bench_train_pcdms.py: batch 32,
#      128x64 Market images, bf16, random weights) and the projected GPU-hours of the paper's
#      Market schedule (App. B: 200k / 100k steps at batch 128) -> $OUT/bench.txt;
#   2. the shipped toy generator trained further on the GPU, in the recipe of its TRAINING.md
#      (inpaint with --prior-samples 2 and --cross-camera-background 0; coarse images of 60 % of
#      the big toy Market; refine on them), each stage for a wall-clock budget, its run ended at
#      its last checkpoint; then its quality on the 1,000 held-out pairs, B2 and full
#      -> $OUT/{inpaint,refine}.safetensors, $OUT/meta.tgz (configs, manifests, logs),
#      $OUT/quality.json, $OUT/grid.png, $OUT/log.txt.
#
# Prepare here (the device image has torch, transformers and most of the rest; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 lpips==0.1.4 \
#     torch_fidelity==0.4.0 huggingface_hub==1.33.0
# (the hub wheel is installed only if the image's own does not import diffusers: diffusers 0.42 needs
# hub >= 1.32, and 1.33 is the newest on httpx, which the image has; hub 2.x needs httpx2.)
# Run (device tool): command "bash benchmarks/gpu_session.sh", carry [".whl"], timeout_s 600.
# Bring the generator home: a copy of reid_aug/generators/toy with the two model.safetensors
# replaced and its training/ extended with meta.tgz's manifests and logs (the next run numbers);
# measure it here with toy_generator_quality.py (1,000 pairs, DDIM 5) before it replaces the shipped one.
#
# CPU smoke test of the same path (small data, seconds-long budgets, tiny benchmark):
#   GPU_SESSION_SMOKE=1 OUT=/tmp/gs-out PY=.venv/bin/python bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:?OUT must name the output folder}
SMOKE=${GPU_SESSION_SMOKE:-0}
REPO=$(pwd)
WORK=${WORK:-/tmp/gpu-session}
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
  PY=${PY:-python3}; DEVICE=cpu; IDS=60; SMALL_IDS=20; WORKERS=2
  T_BENCH=60; T_INPAINT=120; T_REFINE=90; BATCH=8; PAIRS=16; CKPT=5; MP=no  # emulated bf16 is slow on most CPUs
  BENCH=(--preset tiny --batch 4 --steps 2 --warmup 1)
else
  if [ -d .whl ]; then
    # huggingface_hub only if the image's own does not suit diffusers: a newer one can break its transformers.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $(ls .whl/*.whl | grep -v huggingface_hub) || exit 1
    export PYTHONPATH=/tmp/site
    if ! python3 -c "import diffusers.models, transformers" 2>/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/huggingface_hub-*.whl || exit 1
    fi
    python3 -c "import diffusers, open_clip, transformers, torch; print('diffusers', diffusers.__version__, \
      'transformers', transformers.__version__, 'torch', torch.__version__)" || exit 1
  fi
  PY=python3; DEVICE=cuda; IDS=1600; SMALL_IDS=300; WORKERS=16
  # Budgets in seconds, each including the stage's set-up (encoder cache, prior samples).
  T_BENCH=75; T_INPAINT=${T_INPAINT:-170}; T_REFINE=${T_REFINE:-70}; BATCH=64; PAIRS=1000; CKPT=250; MP=bf16
  BENCH=(--preset paper --batch 32 --mixed-precision bf16 --steps 20 --warmup 3)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
RA=("$PY" -m reid_aug.cli)
START=$(date +%s)
stamp() { echo "== $(( $(date +%s) - START )) s: $*"; }

# Each part is capped, and the weights are copied out before the quality run, so that an overrun
# of the 10-minute call loses the least.
stamp "1. paper-size training speed (at most ${T_BENCH}s each)"
timeout "$T_BENCH" "$PY" benchmarks/bench_train_pcdms.py "${BENCH[@]}" --stage inpaint --market-steps 200000 \
  --no-write | tee -a "$OUT/bench.txt"
timeout "$T_BENCH" "$PY" benchmarks/bench_train_pcdms.py "${BENCH[@]}" --stage refine --market-steps 100000 \
  --no-write | tee -a "$OUT/bench.txt"

stamp "2. toy generator: data"
"${RA[@]}" make-toy-market "$WORK/big" --seed 1 --ids $IDS --workers $WORKERS | tail -1
"${RA[@]}" make-toy-market "$WORK/small" --seed 1 --ids $SMALL_IDS --workers $WORKERS | tail -1
GEN=$WORK/gen
TOY=$REPO/reid_aug/generators/toy
mkdir -p "$GEN" && cp -r "$TOY"/{clip,dino,vae,prior,inpaint,refine,latent_scheduler,prior_scheduler} \
  "$TOY"/model_index.json "$TOY"/stand_in.json "$GEN"/

# Train one stage for a wall-clock budget, then end its run at the last checkpoint (resuming with
# --steps = that step finalises the manifest and exports that checkpoint's EMA weights).
train_for() {
  local budget=$1 stage=$2; shift 2
  timeout --signal=INT "$budget" "${RA[@]}" train-pcdms --stage "$stage" --out "$GEN" --preset toy \
    --device $DEVICE --checkpoint-every $CKPT --steps 1000000 "$@" --overwrite 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -5
  local last
  last=$(ls -d "$GEN/train/$stage/checkpoints"/step-* 2>/dev/null | sort | tail -1)
  if [ -z "$last" ]; then echo "$stage: no checkpoint within ${budget}s"; return 1; fi
  "${RA[@]}" train-pcdms --stage "$stage" --out "$GEN" --preset toy --device $DEVICE --checkpoint-every $CKPT \
    --steps $((10#${last##*step-})) "$@" --resume 2>&1 | tail -1
}

stamp "3. inpaint (budget ${T_INPAINT}s)"
train_for $T_INPAINT inpaint --data "$WORK/big" --init "$TOY/inpaint" --per-source 3 --prior-samples 2 \
  --prior-steps 5 --prior-guidance 2.0 --cross-camera-background 0 --batch-size $BATCH --lr 2e-4 \
  --warmup-steps 100 --ema 0.999 --seed 5 --mixed-precision $MP || exit 1

stamp "4. coarse images of the new inpaint"
"${RA[@]}" make-coarse --data "$WORK/big" --generator "$GEN" --subset 0.6 --per-source 1 --seed 0 --steps 5 \
  --guidance 2.0 --batch-size 256 --device $DEVICE 2>&1 | tr '\r' '\n' | tail -2

stamp "5. refine (budget ${T_REFINE}s)"
train_for $T_REFINE refine --data "$WORK/big" --init "$TOY/refine" --subset 0.6 --per-source 1 \
  --cross-camera-background 0 --batch-size $BATCH --lr 2e-4 --warmup-steps 100 --ema 0.999 --seed 0 \
  --mixed-precision $MP

stamp "6. results"
# float16 as shipped (a float32 inpaint stage is 25 MB, over the 16 MB a file may bring back)
"${RA[@]}" export-generator "$GEN" --out "$WORK/export" --dtype float16 --allow-incomplete | tail -1
cp "$WORK/export/inpaint/model.safetensors" "$OUT/inpaint.safetensors"
cp "$WORK/export/refine/model.safetensors" "$OUT/refine.safetensors"
tar czf "$OUT/meta.tgz" -C "$WORK/export" inpaint/config.json refine/config.json training export.json \
  -C "$GEN" coarse/manifest.json

stamp "7. quality on held-out pairs"
"$PY" benchmarks/toy_generator_quality.py --generator "$GEN" --data "$WORK/small" --pairs $PAIRS --steps 5 --guidance 2,2,1 \
  --variants B2,full --dtype float32 --device $DEVICE --threads 8 --out "$OUT/quality.json" --grid "$OUT/grid.png" \
  | grep -v "^{"
ls -la "$OUT"
stamp done
