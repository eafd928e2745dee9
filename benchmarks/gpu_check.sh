#!/usr/bin/env bash
# The checks a GPU machine runs once: install, the gpu tests, and the speed of a bf16 SAR run of
# ViT-B/16 on a folder of JPEGs (images/s and the share of time the GPU sat idle, from run.json).
#   bash benchmarks/gpu_check.sh [WORK_DIR]      (N_IMAGES=2048 BATCH=64 MODEL=vit_base_patch16_224)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-${OUT:-/tmp}/tta-gpu-check}
N_IMAGES=${N_IMAGES:-2048}
BATCH=${BATCH:-64}
MODEL=${MODEL:-vit_base_patch16_224}
DEVICE=${DEVICE:-cuda}
export HF_HUB_OFFLINE=1  # --no-pretrained: the architecture only, nothing to download
mkdir -p "$WORK"

echo "== install"
python -m pip install -q -e ".[test]"

echo "== pytest -m gpu"
python -m pytest -q -m gpu tests/

echo "== $N_IMAGES random 256 px JPEGs in $WORK/jpegs"
python - "$WORK/jpegs" "$N_IMAGES" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

folder, n = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(n):
    path = folder / f"{i:05d}.jpg"
    if not path.exists():
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path, quality=90)
PY

echo "== tta adapt: $MODEL, sar, bf16, batch $BATCH on $DEVICE"
OUT_DIR="$WORK/run"
python -m tta_cli adapt "$WORK/jpegs" --model "$MODEL" --no-pretrained --method sar --device "$DEVICE" \
    --precision bf16 --batch-size "$BATCH" --out "$OUT_DIR" --overwrite --quiet
python - "$OUT_DIR/run.json" <<'PY'
import json
import sys

record = json.load(open(sys.argv[1]))
timing = record["timing"]
idle = timing["device_idle_share"]
print(f"images/s {timing['images_per_second']:.1f}  device idle share "
      f"{'n/a' if idle is None else f'{idle:.3f}'}  ({record['counts']['images']} images, {record['device']}, "
      f"torch {record['versions']['torch']})")
PY
