#!/usr/bin/env bash
# Issue 11's GPU figures in one device call (< 10 min on one H200): bench/gpu_caption.py, then bench/gpu_features.py,
# one JSON line per figure, also saved under $OUT (the device tool brings that folder back).
#
#   bash bench/device_run.sh prepare   here, once: ../shared's COCO photos and captions -> bench/.data, and the
#                                      diffusers wheel (the device has no diffusers and no index) -> bench/.wheels
#   bash bench/device_run.sh           on the device, with bench/.data and bench/.wheels carried (README: Performance)
#
# The device's python3 has torch, transformers and the rest; the repo runs from the checkout (PYTHONPATH=., no
# `pip install -e`), and nothing the benches import needs ray, webdataset or nltk.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    set -e
    mkdir -p bench/.data bench/.wheels
    cp -r ../shared/data/coco ../shared/data/captions bench/.data/
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d bench/.wheels diffusers==0.42.1
    du -sh bench/.data bench/.wheels
    exit 0
fi

out=${OUT:-bench/.out}
mkdir -p "$out"
if compgen -G "bench/.wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        bench/.wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# Budgets inside the tool's 600 s: the caption run is about 4 min, the features run about 4 (three VAE compiles).
timeout -k 10 300 python3 bench/gpu_caption.py 2>"$out/caption.err" | tee "$out/caption.jsonl"
timeout -k 10 270 python3 bench/gpu_features.py t5 vae decode 2>"$out/features.err" \
    | tee "$out/features.jsonl"
