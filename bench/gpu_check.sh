#!/usr/bin/env bash
# One command for a CUDA machine (its stages' time limits add up to 17 minutes): the captured step's tests, the
# population table (eager and captured, K trials per process, 64 and 128 px, batch 32),
# the train-step table at resize 128, batch 32 and 64, for fp32, bf16 autocast,
# channels_last and torch.compile, each against the reference computation, one raced
# configuration's seeds one after another against side by side, then the IoU sweep on the
# GPU. Run from anywhere:
#
#   bash bench/gpu_check.sh
#
# The first two stages and the race stage need the project installed (`pip install -e ".[test]"`);
# the train-step and IoU stages need only torch, torchvision, numpy, Pillow and tqdm.
# Each stage has its own time limit, so a slow stage cannot hide the other rows.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
echo "== captured step (CUDA graph) against eager: tests =="
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py
echo "== population: trial-iterations per second by K, eager and captured =="
timeout 300 $PY bench/population.py --device cuda --resize 128 64 --bs 32 --k 1 2 4 8 16 32 \
  --modes eager captured --iters 20 --warmup 5
echo "== eager variants =="
timeout 170 $PY bench/train_step.py --device cuda --resize 128 --bs 32 64 \
  --variants fp32 bf16 channels_last bf16+channels_last --iters 10 --rounds 3
echo "== torch.compile =="
timeout 220 $PY bench/train_step.py --device cuda --resize 128 --bs 32 64 --variants compile --iters 10 --rounds 2
echo "== one configuration's race seeds: one after another against side by side =="
timeout 150 $PY bench/race_lanes.py --device cuda --seeds 3 --iters 200 --rounds 1
echo "== IoU sweep on the GPU =="
timeout 60 $PY bench/iou_sweep.py --device cuda --masks 1000 --side 128
