#!/usr/bin/env bash
# One command for a CUDA machine, under 5 minutes: the train-step table at resize 128,
# batch 32 and 64, for fp32, bf16 autocast, channels_last and torch.compile, against the
# reference computation. Run from the repository root after `pip install -e .`:
#
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
timeout 290 python bench/train_step.py --device cuda --resize 128 --bs 32 64 --variants fp32 bf16 channels_last bf16+channels_last compile --iters 10 --rounds 2
