#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one go: bench_train.py for the
# BN-paper MLP (eager, compiled) and the small CNN (eager, compiled), then the
# CUDA tests of tests/test_speed_switches.py. Stages run in order of
# importance, each under a share of a overall deadline, and write their
# output under $OUT as they finish, so a cut-off run still returns the first.
#
#   bash benchmarks/gpu_run.sh                      # on a CUDA machine, from a checkout
#   DEVICE=cpu STEPS=30 ROUNDS=1 bash benchmarks/gpu_run.sh   # dry run of the script itself
#
# Environment: OUT (output folder, default ./gpu-out), DEVICE (cuda), STEPS
# (MLP steps per run; default bench_train's), CNN_STEPS (300), ROUNDS (5), BUDGET_S (seconds for all
# stages, 400), BNEXP_SITE (extra folder for PYTHONPATH, e.g. carried
# hydra/omegaconf), BNEXP_MNIST (folder with MNIST's IDX files).
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)  # holds bnexp/, configs/, benchmarks/, tests/
OUT=$(mkdir -p "${OUT:-gpu-out}" && cd "${OUT:-gpu-out}" && pwd)
BNEXP_SITE=${BNEXP_SITE:+$(cd "$BNEXP_SITE" && pwd)}
[[ -n ${BNEXP_MNIST:-} ]] && export BNEXP_MNIST=$(cd "$BNEXP_MNIST" && pwd)
cd "$HERE"  # so that `python -c`/`-m pytest` import this bnexp, not one in the caller's folder
DEVICE=${DEVICE:-cuda}
ROUNDS=${ROUNDS:-5}
BUDGET_S=${BUDGET_S:-400}
STEPS_ARG=${STEPS:+--steps $STEPS}
export PYTHONPATH="$HERE${BNEXP_SITE:+:$BNEXP_SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"

left() { echo $((BUDGET_S - SECONDS)); }

# stage NAME MAX_S CMD...: run CMD under min(MAX_S, time left - 5 s), output to the log.
stage() {
    local name=$1 max=$2; shift 2
    local t=$(( $(left) - 5 < max ? $(left) - 5 : max ))
    if (( t < 20 )); then echo "== $name: skipped, ${t}s left" | tee -a "$LOG"; return; fi
    echo "== $name (limit ${t}s, at ${SECONDS}s)" | tee -a "$LOG"
    timeout "$t" "$@" 2>&1 | tee -a "$LOG"
    echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    grep -m1 "model name" /proc/cpuinfo; nproc
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    $PY -c "import bnexp, hydra, omegaconf; print('bnexp from', bnexp.__file__, 'hydra', hydra.__version__, 'omegaconf', omegaconf.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

BENCH="$PY $HERE/benchmarks/bench_train.py --device $DEVICE $STEPS_ARG"
CNN="--which cnn --rounds $ROUNDS --cnn-n-train 20000 --steps ${CNN_STEPS:-300}"
stage mlp_eager 70 $BENCH --which mlp --rounds "$ROUNDS" --json "$OUT/mlp_eager.json"
stage mlp_compiled 100 $BENCH --which mlp --rounds "$ROUNDS" --compile --json "$OUT/mlp_compiled.json"
stage cnn_eager 70 $BENCH $CNN --json "$OUT/cnn_eager.json"
if [[ $DEVICE == cuda* ]]; then
    stage cuda_tests 90 $PY -m pytest -q -p no:cacheprovider tests/test_speed_switches.py -k cuda
fi
stage cnn_compiled 150 $BENCH $CNN --compile --json "$OUT/cnn_compiled.json"
echo "== done at ${SECONDS}s" | tee -a "$LOG"
