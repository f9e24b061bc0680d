#!/usr/bin/env bash
# Issue 17 item 5 on a CPU: the 64-px i-CLEVR ablation, seven recipes at one equal budget
# (same steps, batch 32, device, seed, synthetic data), each trained from scratch.
#
#   bench/ablation64.sh train STEPS   # all seven at once, one thread each; resumes the runs
#                                     # that exist, so the budget can grow across sessions
#   bench/ablation64.sh eval STEP     # score every run's kept step STEP on test.json and
#                                     # new_test.json (5 seeds, the 64-px evaluator) and print
#                                     # one markdown table row per recipe
#
# Runs go to $RUNS (default runs/abl64), logs beside them; the binary is $GANSCOPE (default
# target/release/ganscope; copy it elsewhere first if you rebuild while a run trains).
# The GPU twin of this script is step 3 of bench/gpu_check.sh.
set -uo pipefail
MODE=${1:?train STEPS or eval STEP}
N=${2:?a step count}
RUNS=${RUNS:-runs/abl64}
BIN=${GANSCOPE:-target/release/ganscope}
LABELS=${LABELS:-../shared/data/iclevr}
SEEDS=${SEEDS:-5}
# ORDER and ARGS: the seven recipes' train flags (shared with bench/gpu_check.sh).
# shellcheck source=bench/ablation_recipes.sh
source "$(dirname "$0")/ablation_recipes.sh"
mkdir -p "$RUNS"
case $MODE in
train)
    pids=()
    for v in "${ORDER[@]}"; do
        d=$RUNS/$v
        if [[ -f $d/config.json ]]; then
            RAYON_NUM_THREADS=1 nice -n 5 "$BIN" train --resume "$d" --steps "$N" >>"$RUNS/$v.log" 2>&1 &
        else
            # shellcheck disable=SC2086 # ARGS holds words
            RAYON_NUM_THREADS=1 nice -n 5 "$BIN" train ${ARGS[$v]} --batch 32 --steps "$N" \
                --keep-every 250 --sample-every 250 --checkpoint-every 250 --out "$d" \
                >"$RUNS/$v.log" 2>&1 &
        fi
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for v in "${ORDER[@]}"; do echo "$v: $(grep '^step' "$RUNS/$v.log" | tail -1)"; done
    ;;
eval)
    k=$(printf 'step_%06d' "$N")
    for v in "${ORDER[@]}"; do
        seq=()
        [[ $v == sequential ]] && seq=(--sequential)
        out=$RUNS/eval_${v}_$k.txt
        [[ -s $out ]] || RAYON_NUM_THREADS=2 "$BIN" eval --run "$RUNS/$v/kept/$k" "${seq[@]}" \
            --conditions "$LABELS/test.json" --conditions "$LABELS/new_test.json" \
            --seeds "$SEEDS" >"$out" 2>&1 || { echo "$v: eval failed: $(tail -1 "$out")"; rm -f "$out"; }
    done
    echo "| recipe (step $N, batch 32) | test.json | new_test.json | domain FD | coverage (real-vs-real) |"
    echo "|---|---|---|---|---|"
    for v in "${ORDER[@]}"; do
        out=$RUNS/eval_${v}_$k.txt
        [[ -s $out ]] || continue
        acc() { grep -E "(^|/)$1: top-k accuracy" "$out" | sed -E 's/.*accuracy ([0-9.]+) \+- ([0-9.]+).*/\1 +- \2/'; }
        fd=$(grep -m1 'domain-feature FD' "$out" | sed -E 's/.*\): ([0-9.]+).*/\1/')
        cov=$(grep -m1 'coverage' "$out" | sed -E 's/.*coverage ([0-9.]+) \(([0-9.]+)\).*/\1 (\2)/')
        echo "| $v | $(acc test.json) | $(acc new_test.json) | $fd | $cov |"
    done
    ;;
*)
    echo "usage: $0 train STEPS | eval STEP" >&2
    exit 2
    ;;
esac
