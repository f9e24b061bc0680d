#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool gives a session 15 minutes of one):
#   1. a smoke test of the `cuda` build (exits 3 at once if it fails, so a fix can be rerun);
#   2. issue 20 item 6: bench/compare.sh --device cuda for dcgan64 at batch 64 and 256 against
#      PyTorch eager on the same GPU, 3 alternating rounds each; then ganscope with candle's
#      own CUDA convolutions (GANSCOPE_CONV=candle) beside its default, and an nsys kernel
#      summary where nsys is installed;
#   3. issue 17 item 5: the 64-px i-CLEVR ablation, all seven variants trained at once on the
#      GPU until 160 s before DEADLINE_S (seconds after the start) at batch 32 with `--keep-every 250`, then each scored by
#      `ganscope eval` at the largest step that every variant kept (equal steps, batch and
#      device), on test.json and new_test.json with 5 seeds, with its training sample sheet;
#      beside them, issue 17 item 3: the 64-px generator (checkpoints/iclevr-sequential-64-wip,
#      weights only, so fresh Adam moments as at every session's resume) trains on on the GPU
#      for the same minutes; its weights, config and last sample sheets come back as s64.tgz
#      (ship them with `ganscope ship --run <unpacked> --out checkpoints/iclevr-sequential-64-wip`
#      if it got further than the CPU run of the session, and score it with the card's command).
#
# Usage (repo root of the device machine): bench/gpu_check.sh BIN LABELS OUT DEADLINE_S
#   BIN: a binary built with `cargo build --release --features cuda` (docs: README, "GPU");
#   LABELS: a folder with the course's test.json and new_test.json; OUT: where results go.
# Getting it there (session 23): build here with the platform notes' CUDA 13.0 nvcc and link
# stubs, `strip` the binary and `xz` it (111 MB -> 29 MB) into an ignored folder (`.dev/`, in
# .git/info/exclude) with test.json and new_test.json; the device tool sends at most 64 MiB and
# the tracked tree is larger (67 MB in session 25), so move every checkpoint folder but
# evaluator-iclevr and iclevr-sequential-64-wip, tests/ and assets/readme out of the checkout
# for the call (and back after): about 28 MB of tree plus the 29 MB binary. Then, with carry [".dev"]:
#   python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/ganscope-cuda.xz'),
#     open('/tmp/ganscope','wb'))" && chmod +x /tmp/ganscope &&
#   bash bench/gpu_check.sh /tmp/ganscope .dev/labels $OUT 540 2>&1 | tee $OUT/gpu_check.log
# (523 s of a 585 s limit on an H200, plus about a minute to start the machine).
# The CUDA libraries candle links (cublas, cublasLt, curand, cudart, nvrtc) are taken from the
# machine's PyTorch wheels (python3's site-packages/nvidia/...).
set -uo pipefail
BIN=$1 LABELS=$2 OUT=$3 DEADLINE_S=$4
# DEVICE=cpu SKIP_COMPARE=1 KEEP=1 SEEDS=1 EVAL_EXTRA='--n-real 100' for a dry run of the script's logic on a machine without a GPU.
DEVICE=${DEVICE:-cuda}
KEEP=${KEEP:-250}
SEEDS=${SEEDS:-5}
# Runs and the fine-tuned evaluator go outside the repository.
WORK=${WORK:-/tmp/gpu_check}
EVAL_EXTRA=${EVAL_EXTRA:-}
mkdir -p "$OUT" "$WORK"
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s]"; }
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for n in ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13"]:
    for sp in site.getsitepackages():
        for f in glob.glob(os.path.join(sp, "nvidia", "**", n), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "$(el) nproc $(nproc); LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc|not found"

echo "== $(el) 1. smoke"
if ! timeout 120 "$BIN" bench --model dcgan64 --device "$DEVICE" --iters 3 --warmup 1; then
    echo "SMOKE-FAILED"
    exit 3
fi

echo "== $(el) 2. compare.sh --device cuda"
for b in 64 256; do
    [[ -n ${SKIP_COMPARE:-} ]] && break
    GANSCOPE=$BIN PYTHON=python3 timeout 100 bench/compare.sh --device cuda --model dcgan64 \
        --batch "$b" --iters 20 --warmup 3 --rounds 3 2>&1 | tee "$OUT/compare_cuda_b$b.txt"
done

# PyTorch with cuDNN's autotuner on (not its default): the best setting we know for it.
for b in 64 256; do
    [[ -n ${SKIP_COMPARE:-} ]] && break
    TORCH_CUDNN_BENCHMARK=1 timeout 60 python3 bench/torch_bench.py --device cuda --model dcgan64 \
        --batch "$b" --iters 20 --warmup 3 --threads "$(nproc)" 2>&1 | tee -a "$OUT/compare_cuda_b$b.txt"
done

# ganscope with candle's own CUDA convolutions (GANSCOPE_CONV=candle: the path before session
# 24, whose conv_transpose2d and conv input gradients run candle's direct kernel) beside the
# default (conv_gemm: every convolution one cuBLAS gemm around copies), same binary; and the
# default with TF32 products (GANSCOPE_TF32=1: PyTorch's default for its cuDNN convolutions).
for b in 64 256; do
    [[ -n ${SKIP_COMPARE:-} ]] && break
    for conv in candle auto auto-tf32; do
        echo "GANSCOPE_CONV=$conv batch $b" | tee -a "$OUT/compare_cuda_b$b.txt"
        tf32=0; [[ $conv == auto-tf32 ]] && tf32=1
        GANSCOPE_CONV=${conv%-tf32} GANSCOPE_TF32=$tf32 timeout 60 "$BIN" bench --model dcgan64 \
            --device "$DEVICE" --batch "$b" --iters 20 --warmup 3 2>&1 | tail -2 |
            tee -a "$OUT/compare_cuda_b$b.txt"
    done
done
# Where the time goes, if a profiler is there (kernel summary of 5 dcgan64 iterations).
if [[ -z ${SKIP_COMPARE:-} ]] && command -v nsys >/dev/null; then
    timeout 90 nsys profile -o "$WORK/dcgan64" --force-overwrite true --stats=true \
        "$BIN" bench --model dcgan64 --device "$DEVICE" --iters 5 --warmup 2 \
        > "$OUT/nsys_dcgan64.txt" 2>&1
    grep -A25 "cuda_gpu_kern_sum" "$OUT/nsys_dcgan64.txt" | head -30
fi

TRAIN_MIN=$(python3 -c "print(round(($DEADLINE_S - $(date +%s) + $t0 - 160) / 60, 2))")
echo "== $(el) 3. ablation, $TRAIN_MIN min each, all at once"
# shellcheck source=bench/ablation_recipes.sh
source "$(dirname "$0")/ablation_recipes.sh"
runs=$WORK/abl
pids=()
for v in "${!ARGS[@]}"; do
    # shellcheck disable=SC2086 # ARGS holds words
    RAYON_NUM_THREADS=2 "$BIN" train ${ARGS[$v]} --device "$DEVICE" --batch 32 --steps 1000000 \
        --minutes "$TRAIN_MIN" --keep-every "$KEEP" --sample-every "$KEEP" --checkpoint-every 0 \
        --out "$runs/$v" >"$OUT/train_$v.log" 2>&1 &
    pids+=($!)
done
# Beside them, issue 17 item 3: the 64-px generator trains on from its shipped weights.
S64_FROM=${S64_FROM:-checkpoints/iclevr-sequential-64-wip}
(
    [[ -f $S64_FROM/generator.safetensors ]] &&
        RAYON_NUM_THREADS=2 "$BIN" train --resume "$S64_FROM" --out "$WORK/S64" --device "$DEVICE" \
            --minutes "$TRAIN_MIN" --steps 1000000 --checkpoint-every 250 --sample-every 500 \
            --keep-every 1000 --on-d-wins rollback
) >"$OUT/train_s64.log" 2>&1 &
evpid=$!
for p in "${pids[@]}"; do wait "$p"; done
echo "$(el) trained"
common=""
for v in "${!ARGS[@]}"; do
    last=$(ls "$runs/$v/kept" 2>/dev/null | sort | tail -1)
    echo "$v: last kept ${last:-none}; $(tail -1 "$OUT/train_$v.log")"
    n=${last#step_}
    n=$((10#${n:-0}))
    if [[ -z $common ]] || ((n < common)); then common=$n; fi
done
echo "== $(el) common kept step: $common"
if ((common > 0)); then
    k=$(printf 'step_%06d' "$common")
    epids=()
    for v in "${!ARGS[@]}"; do
        seq=()
        [[ $v == sequential ]] && seq=(--sequential)
        RAYON_NUM_THREADS=2 timeout 140 "$BIN" eval --run "$runs/$v/kept/$k" "${seq[@]}" \
            --conditions "$LABELS/test.json" --conditions "$LABELS/new_test.json" --seeds "$SEEDS" \
            --evaluator checkpoints/evaluator-iclevr --device "$DEVICE" $EVAL_EXTRA >"$OUT/eval_$v.txt" 2>&1 &
        epids+=($!)
    done
    for p in "${epids[@]}"; do wait "$p"; done
    echo "$(el) evaluated"
    for v in "${!ARGS[@]}"; do
        echo "-- $v"
        cat "$OUT/eval_$v.txt"
        cp "$runs/$v/samples/$k.png" "$OUT/sheet_$v.png" 2>/dev/null
    done
fi
wait "$evpid"
echo "$(el) 64-px generator: $(tail -2 "$OUT/train_s64.log")"
if [[ -f $WORK/S64/generator.safetensors ]]; then
    # Weights, config, the last two sample sheets and the log (the optimizer state, 27 MB,
    # is over the 16 MiB a returned file may have).
    sheets=$(cd "$WORK/S64" && ls samples/*.png 2>/dev/null | sort | tail -2)
    # shellcheck disable=SC2086 # two file names
    tar czf "$OUT/s64.tgz" -C "$WORK/S64" config.json generator.safetensors \
        discriminator.safetensors metrics.jsonl $sheets
fi
# At most 8 files come back: pack the logs, evaluations and sheets into one archive.
(cd "$OUT" && tar czf ablation.tgz train_*.log eval_*.txt sheet_*.png 2>/dev/null && rm -f train_*.log eval_*.txt sheet_*.png)
echo "== $(el) done"
