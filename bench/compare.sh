#!/usr/bin/env bash
# Run `ganscope bench` and the PyTorch reference (bench/torch_bench.py) in turn on this
# machine with the same settings, then print ganscope/PyTorch throughput per model
# (images/s ratio: above 1 means ganscope is faster).
#
# Usage: bench/compare.sh [--rounds R] [--model M] [--batch B] [--iters N] [--warmup W]
#        [--threads T] [--device cpu|cuda]
# With --device cuda both sides run on the GPU; GANSCOPE must then be a binary built with
# `cargo build --release --features cuda`, and PYTHON a PyTorch that sees the GPU.
# Environment: PYTHON (default ~/torchvenv/bin/python), GANSCOPE (default
# target/release/ganscope, built with `cargo build --release` if missing). PyTorch runs at
# its defaults, as its users run it: OMP_WAIT_POLICY and the other OpenMP variables are left
# to the caller (on this 2-core machine PASSIVE made PyTorch 1.2-1.4x slower: issue 20).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$HOME/torchvenv/bin/python}
GANSCOPE=${GANSCOPE:-target/release/ganscope}
# --rounds R (this script's own flag): run both sides R times, alternating which goes first,
# and report each round's ratio and their median. On a machine shared with other work a
# single run can be off by 15% either way; the median over rounds is steadier.
rounds=3
args=()
while (($#)); do
    if [[ $1 == --rounds ]]; then
        rounds=${2:?--rounds needs a number}
        shift 2
    else
        args+=("$1")
        shift
    fi
done
# Same thread count on both sides: the machine's cores unless --threads is given.
if [[ " ${args[*]-} " != *" --threads "* ]]; then
    args+=(--threads "$(nproc)")
fi
if [[ ! -x $GANSCOPE ]]; then
    cargo build --release
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run_ganscope() {
    echo "== ganscope: $GANSCOPE bench ${args[*]} (load $(cut -d' ' -f1-3 /proc/loadavg))"
    "$GANSCOPE" bench "${args[@]}" | tee "$out/ganscope.$1.txt"
}
run_torch() {
    echo "== pytorch: OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset (the default)} $PYTHON bench/torch_bench.py ${args[*]} (load $(cut -d' ' -f1-3 /proc/loadavg))"
    "$PYTHON" bench/torch_bench.py "${args[@]}" | tee "$out/torch.$1.txt"
}
echo "== $(date -u +%FT%TZ) $(uname -n), nproc $(nproc), $rounds round(s), load $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= rounds; r++)); do
    if ((r % 2)); then
        run_ganscope "$r"
        run_torch "$r"
    else
        run_torch "$r"
        run_ganscope "$r"
    fi
done
echo "== load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-16s %14s %14s %18s %12s %12s  %s\n' model ganscope_ms pytorch_ms "ganscope/pytorch" ganscope_mib pytorch_mib "(per round)"
awk '
    /^bench model=/ {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        split(FILENAME, parts, ".")
        r = parts[length(parts) - 1]
        m = v["model"]
        if (FILENAME ~ /ganscope/) {
            gm[m, r] = v["ms_per_iter"]; gi[m, r] = v["images_per_s"]; gr[m, r] = v["peak_rss_mib"]
            if (!(m in seen)) { seen[m] = 1; order[++n] = m }
            if (r > nr) nr = r
        } else { tm[m, r] = v["ms_per_iter"]; ti[m, r] = v["images_per_s"]; tr[m, r] = v["peak_rss_mib"] }
        delete v
    }
    function median(a, k,    i, j, t) {
        for (i = 2; i <= k; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
    }
    END {
        for (q = 1; q <= n; q++) {
            m = order[q]; k = 0; kg = 0; kt = 0; list = ""
            delete rs; delete gs; delete ts; delete gms; delete tms; kgm = 0; ktm = 0
            for (r = 1; r <= nr; r++) {
                if ((m, r) in gm) gs[++kg] = gm[m, r]
                if ((m, r) in tm) ts[++kt] = tm[m, r]
                if ((m, r) in gr && gr[m, r] != "") gms[++kgm] = gr[m, r]
                if ((m, r) in tr && tr[m, r] != "") tms[++ktm] = tr[m, r]
                if ((m, r) in gm && (m, r) in ti) {
                    rs[++k] = gi[m, r] / ti[m, r]
                    list = list sprintf(" %.2f", rs[k])
                }
            }
            gmib = kgm ? sprintf("%.0f", median(gms, kgm)) : "-"
            tmib = ktm ? sprintf("%.0f", median(tms, ktm)) : "-"
            if (k > 0) printf "%-16s %14.1f %14.1f %17.2fx %12s %12s  (%s)\n", m, median(gs, kg), median(ts, kt), median(rs, k), gmib, tmib, substr(list, 2)
            else printf "%-16s %14.1f %14s %18s %12s\n", m, median(gs, kg), "-", "(no PyTorch run)", gmib
        }
    }' "$out"/ganscope.*.txt "$out"/torch.*.txt
