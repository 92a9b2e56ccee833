#!/usr/bin/env bash
# The ViT 8 -> 2 budget curve under the quality protocol (issue 23; docs/results.md, "First runs under
# the protocol"): Theseus (default), fine-tune-only (trained blocks) and KD at each step budget, seeds
# 0-4, each method's lr chosen on dev with seed 0 (grid extended off its edges), KD also its T:alpha.
# Two queues, one core each: Theseus + fine-tune-only, and KD; each runs the budgets in the order given,
# then every budget's two parts are merged into benchmarks/results/budget_curve/vit_r0.25_s<STEPS>.json.
#
#   benchmarks/budget_curve.sh PREDECESSOR.safetensors DATA_DIR [STEPS ...]   # default 100 400 1600
#
# PREDECESSOR: benchmarks/converge_predecessor.py --arch vit's output. Then:
#   python benchmarks/report_budget_curve.py benchmarks/results/budget_curve/vit_r0.25_s*.json ...
set -eu
pred=$1 data=$2
shift 2
budgets=("$@")
[ ${#budgets[@]} -gt 0 ] || budgets=(100 400 1600)
python=${PYTHON:-python}
out=${OUT_DIR:-benchmarks/results/budget_curve}
logs=${LOG_DIR:-/tmp}
mkdir -p "$out/parts"
export OMP_NUM_THREADS=1  # fit() draws its own progress bars: the logs are long

grid() { case $1 in 100|400) echo "2e-3 4e-3 8e-3" ;; *) echo "1e-3 2e-3 4e-3" ;; esac; }
queue() {  # queue NAME METHODS...: every budget in turn
    local name=$1
    shift
    for steps in "${budgets[@]}"; do
        $python benchmarks/quality.py --task vision --arch vit --ratio 0.25 --predecessor "$pred" --data-dir "$data" \
            --steps "$steps" --seeds 0 1 2 3 4 --lr-grid $(grid "$steps") --extend-grid 2 --kd-grid 2:0.5 4:0.5 4:0.9 \
            --threads 1 --sharing "the other queue of benchmarks/budget_curve.sh" --methods "$@" \
            --output "$out/parts/vit_r0.25_s${steps}_$name.json" > "$logs/vit_r0.25_s${steps}_$name.log" 2>&1
    done
}
queue a theseus finetune_trained &
queue b kd &
wait
for steps in "${budgets[@]}"; do
    $python benchmarks/quality.py --merge "$out/parts/vit_r0.25_s${steps}_a.json" "$out/parts/vit_r0.25_s${steps}_b.json" \
        --output "$out/vit_r0.25_s${steps}.json"
done
