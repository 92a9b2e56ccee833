#!/usr/bin/env bash
# The second GPU call of 2026-12-04 (18:1x UTC): the rest of the ViT 8 -> 2 curve at 6,400 steps that the
# first call's deadline stopped (benchmarks/device/call2.sh). Carried: .data (Fashion-MNIST, the
# predecessor, and call 2's finished parts in .data/curve6400/parts, put back at their /tmp/curve path).
#   - fine-tune-only and KD: seeds 1-4 at their choices (call 2 made them: 4e-3 and 2e-3 at 2:0.5);
#   - Theseus: its choice needed a second extension (best dev at 8e-3, the edge), so seed 0 at 1.6e-2
#     runs, and seeds 1-4 run at both 8e-3 and 1.6e-2 side by side (the choice is still made on seed
#     0's dev alone, by quality.py; the seeds of the lr it does not choose are not used);
#   - then quality.py's own choice and per-seed parts for Theseus (every run taken over with --reuse,
#     nothing trains), and the merge.
set -u
cp -r adapters theseus_general/adapters && cp -r integrations theseus_general/integrations || exit 1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD" OMP_NUM_THREADS=1
log="$OUT/log.txt"
P=/tmp/curve/parts L=/tmp/curve/logs
mkdir -p $P $L && cp .data/curve6400/parts/*.json $P/
{ date; nvidia-smi --query-gpu=name --format=csv,noheader; } >>"$log" 2>&1
Q=(python3 benchmarks/quality.py --task vision --arch vit --ratio 0.25 --predecessor .data/preds/vit_2700s.safetensors
   --data-dir .data/fashion-mnist --device cuda --steps 6400 --threads 1)
S1="up to 15 quality.py processes of benchmarks/budget_curve_parallel.py at once"  # call 2's parts say so
S2="17 quality.py processes of benchmarks/device/call3.sh at once"
G=(--lr-grid 0.001 0.002 0.004 --extend-grid 2)
echo "== runs $(date +%T)" >>"$log"
timeout 250 "${Q[@]}" --sharing "$S2" --seeds 0 --methods theseus --lr-grid 0.016 --output $P/point_theseus_lr0.016.json >$L/t016.log 2>&1 &
for k in 1 2 3 4; do
  for lr in 0.008 0.016; do
    timeout 250 "${Q[@]}" --sharing "$S2" --seeds $k --methods theseus --lr $lr --output $P/fixed_theseus_lr${lr}_s$k.json >$L/t${lr}_s$k.log 2>&1 &
  done
  timeout 250 "${Q[@]}" --sharing "$S2" --seeds 0 $k --methods finetune_trained "${G[@]}" --reuse $P/finetune_trained_choice.json \
    --output $P/finetune_trained_s$k.json >$L/f_s$k.log 2>&1 &
  timeout 250 "${Q[@]}" --sharing "$S2" --seeds 0 $k --methods kd "${G[@]}" --kd-grid 2:0.5 --reuse $P/kd_choice.json \
    --output $P/kd_s$k.json >$L/k_s$k.log 2>&1 &
done
wait
echo "== theseus choice $(date +%T)" >>"$log"
timeout 60 "${Q[@]}" --sharing "$S1" --seeds 0 --methods theseus "${G[@]}" --reuse $P/point_theseus_lr*.json \
  --output $P/theseus_choice.json >$L/t_choice.log 2>&1
for k in 1 2 3 4; do
  timeout 60 "${Q[@]}" --sharing "$S1" --seeds 0 $k --methods theseus "${G[@]}" --reuse $P/theseus_choice.json \
    $P/fixed_theseus_lr*_s$k.json --output $P/theseus_s$k.json >$L/t_s$k.log 2>&1 &
done
wait
echo "== merge $(date +%T)" >>"$log"
python3 benchmarks/quality.py --merge $P/theseus_s[1-4].json $P/finetune_trained_s[1-4].json $P/kd_s[1-4].json \
  --output /tmp/curve/vit_r0.25_s6400.json >>"$log" 2>&1
cat $L/*.log | tr '\r' '\n' | grep "seed .* dev\|Error" | cut -c1-300 >>"$log"  # fit's progress bars: \r lines
tar czf "$OUT/curve6400b.tgz" -C /tmp curve 2>>"$log"
echo "== done $(date +%T)" >>"$log"
