#!/usr/bin/env bash
# The first GPU call of 2026-12-04 (one H200, the lent machine's own torch): sets up DeepSpeed from
# carried wheels, then (1) trains the ViT predecessor to convergence, (2) times quality.py's methods
# alone and 8 processes at once (to size the budget-curve call), (3) the GPU check, (4) DeepSpeed.
# Each part has its own time limit; everything lands in $OUT.
# Never ran (refused), and would have failed: PYTHONPATH alone does not give theseus_general.adapters /
# .integrations from a source checkout. Superseded by call2.sh, which copies them into place first.
set -u
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD:/tmp/site" OMP_NUM_THREADS=1
log="$OUT/log.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$log" 2>&1
{ date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, transformers, timm; print(torch.__version__, transformers.__version__, timm.__version__, torch.cuda.get_device_name())"; } >>"$log" 2>&1
DATA=.data/fashion-mnist
echo "== converge vit" >>"$log"
timeout 95 python3 benchmarks/converge_predecessor.py --arch vit --device cuda --data-dir $DATA --max-seconds 70 \
  --save-to "$OUT/vit.safetensors" >>"$log" 2>&1
P="python3 benchmarks/quality.py --task vision --arch vit --ratio 0.25 --predecessor $OUT/vit.safetensors --steps 300 --methods theseus finetune_trained kd --device cuda --data-dir $DATA"
echo "== probe 1 process" >>"$log"
timeout 45 $P --seeds 0 --output "$OUT/probe1.json" >>"$log" 2>&1
echo "== probe 8 processes" >>"$log"
start=$(date +%s.%N)
for s in 1 2 3 4 5 6 7 8; do timeout 75 $P --seeds $s --output /tmp/p8_$s.json >/tmp/p8_$s.log 2>&1 & done; wait
end=$(date +%s.%N)
python3 - "$start" "$end" >>"$log" 2>&1 <<'PY'
import json, os, sys
runs = {}
for s in range(1, 9):
    p = f"/tmp/p8_{s}.json"
    if os.path.exists(p):
        runs[s] = {m: r[str(s)]["train_s"] for m, r in json.load(open(p))["runs"].items()}
out = {"wall_s": float(sys.argv[2]) - float(sys.argv[1]), "train_s": runs}
json.dump(out, open(os.environ["OUT"] + "/probe8.json", "w"), indent=1); print(out)
PY
tail -5 /tmp/p8_1.log >>"$log"
echo "== gpu_check" >>"$log"
timeout 200 python3 benchmarks/gpu_check.py --no-deepspeed --warmup 3 --steps 15 --compile-budget 40 \
  --output "$OUT/gpu_check.json" >>"$log" 2>&1
echo "== deepspeed" >>"$log"
timeout 90 python3 benchmarks/deepspeed_check.py --warmup 3 --steps 10 --output "$OUT/deepspeed.json" >>"$log" 2>&1
echo "== done $(date)" >>"$log"
