#!/usr/bin/env bash
# The GPU call of 2026-12-04, 18:xx UTC (one H200, the lent machine's own torch, no DeepSpeed), in the
# order of docs/results.md's plan "GPU call 2":
#   (1) the GPU check alone on the machine (benchmarks/gpu_check.py, compile budgets cut to fit);
#   (2) then side by side: the ViT 8 -> 2 budget curve at 6,400 steps from the CPU curve's predecessor
#       (benchmarks/budget_curve_parallel.py, 15 processes), and the ViT and ResNet predecessors trained
#       to convergence (benchmarks/converge_predecessor.py, one process each).
# Each part has its own time limit; everything lands in $OUT (at most 8 files come back).
# Carried: .data (fashion-mnist idx files; preds/vit_2700s.safetensors).
set -u
# the installed package's layout (pyproject's package-dir) in this throw-away copy: PYTHONPATH alone
# does not give theseus_general.adapters / .integrations (benchmarks/device/call1.sh missed this)
cp -r adapters theseus_general/adapters && cp -r integrations theseus_general/integrations || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD" OMP_NUM_THREADS=1
log="$OUT/log.txt"
DATA=.data/fashion-mnist
{ date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc;
  python3 -c "import torch, transformers, timm; print(torch.__version__, transformers.__version__, timm.__version__, torch.cuda.get_device_name())"; } >>"$log" 2>&1

echo "== gpu_check $(date +%T)" >>"$log"
timeout 150 python3 benchmarks/gpu_check.py --no-deepspeed --warmup 3 --steps 15 --compile-budget 30 \
  --output "$OUT/gpu_check.json" >>"$log" 2>&1
echo "== gpu_check rc $? $(date +%T)" >>"$log"

echo "== curve + converge $(date +%T)" >>"$log"
mkdir -p /tmp/conv
timeout 290 python3 benchmarks/converge_predecessor.py --arch vit --device cuda --data-dir $DATA --max-seconds 250 \
  --save-to /tmp/conv/vit_converged.safetensors >/tmp/conv/vit.log 2>&1 &
timeout 290 python3 benchmarks/converge_predecessor.py --arch resnet --device cuda --data-dir $DATA --max-seconds 250 \
  --save-to /tmp/conv/resnet_converged.safetensors >/tmp/conv/resnet.log 2>&1 &
timeout 310 python3 benchmarks/budget_curve_parallel.py --steps 6400 --lr-grid 1e-3 2e-3 4e-3 --extend-grid 2 \
  --prerun-extensions 1 --kd-grid 2:0.5 --workers 15 --deadline 295 --out-dir /tmp/curve --name vit_r0.25_s6400.json -- \
  --task vision --arch vit --ratio 0.25 --predecessor .data/preds/vit_2700s.safetensors --data-dir $DATA --device cuda \
  >>"$log" 2>&1
echo "== curve rc $? $(date +%T)" >>"$log"
wait
echo "== converge done $(date +%T)" >>"$log"
tail -n 3 /tmp/conv/vit.log /tmp/conv/resnet.log >>"$log" 2>&1
cp /tmp/conv/*.safetensors /tmp/conv/*.json "$OUT/" 2>>"$log"
tar czf "$OUT/curve6400.tgz" -C /tmp curve conv/vit.log conv/resnet.log 2>>"$log"
echo "== done $(date +%T)" >>"$log"
