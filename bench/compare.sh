#!/usr/bin/env bash
# Run `ganscope bench` and the PyTorch reference (bench/torch_bench.py) in turn on this
# machine with the same settings, then print ganscope/PyTorch throughput per model
# (images/s ratio: above 1 means ganscope is faster).
#
# Usage: bench/compare.sh [--model M] [--batch B] [--iters N] [--warmup W] [--threads T]
# Environment: PYTHON (default ~/torchvenv/bin/python), GANSCOPE (default
# target/release/ganscope, built with `cargo build --release` if missing), OMP_WAIT_POLICY
# for PyTorch (default PASSIVE: with the default active spin-waiting, PyTorch's OpenMP threads
# lose up to 4.5x on a machine whose cores are shared with other work; see bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$HOME/torchvenv/bin/python}
GANSCOPE=${GANSCOPE:-target/release/ganscope}
args=("$@")
# Same thread count on both sides: the machine's cores unless --threads is given.
if [[ " ${args[*]-} " != *" --threads "* ]]; then
    args+=(--threads "$(nproc)")
fi
if [[ ! -x $GANSCOPE ]]; then
    cargo build --release
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "== $(date -u +%FT%TZ) $(uname -n), load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== ganscope: $GANSCOPE bench ${args[*]}"
"$GANSCOPE" bench "${args[@]}" | tee "$out/ganscope.txt"
echo "== load: $(cut -d' ' -f1-3 /proc/loadavg)"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
echo "== pytorch: OMP_WAIT_POLICY=$OMP_WAIT_POLICY $PYTHON bench/torch_bench.py ${args[*]}"
"$PYTHON" bench/torch_bench.py "${args[@]}" | tee "$out/torch.txt"
echo "== load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-16s %14s %14s %18s\n' model ganscope_ms pytorch_ms "ganscope/pytorch"
awk '
    /^bench model=/ {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        if (FILENAME ~ /ganscope/) { gm[v["model"]] = v["ms_per_iter"]; gi[v["model"]] = v["images_per_s"]; order[++n] = v["model"] }
        else { tm[v["model"]] = v["ms_per_iter"]; ti[v["model"]] = v["images_per_s"] }
    }
    END {
        for (k = 1; k <= n; k++) {
            m = order[k]
            if (m in ti) printf "%-16s %14.1f %14.1f %17.2fx\n", m, gm[m], tm[m], gi[m] / ti[m]
            else printf "%-16s %14.1f %14s %18s\n", m, gm[m], "-", "(no PyTorch run)"
        }
    }' "$out/ganscope.txt" "$out/torch.txt"
