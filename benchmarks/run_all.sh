#!/usr/bin/env bash
# Regenerate every benchmarks/results/*.json and the generated tables in benchmarks/README.md.
#   bash benchmarks/run_all.sh        (or: make -C benchmarks bench)
# About 20-30 minutes on 2 CPU cores. BENCH_QUICK=1 runs a smoke test of the pipeline in ~2 minutes
# (meaningless numbers; point BENCH_RESULTS at a scratch folder so results/ is not overwritten).
set -euo pipefail
cd "$(dirname "$0")"
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${BENCH_THREADS:-1}" BENCH_THREADS="${BENCH_THREADS:-1}" PYTHONWARNINGS=ignore
RESULTS="${BENCH_RESULTS:-$PWD/results}"
export BENCH_RESULTS="$RESULTS"
LOGS="$RESULTS/logs"
mkdir -p "$RESULTS" "$LOGS"
: > "$LOGS/stages.tsv"

# Real data: scikit-learn digits and the Debian Fashion-MNIST package (falls back to the
# Fashion-MNIST subset shipped with pgp_peft if the package cannot be installed).
python -c "import sklearn" 2>/dev/null || python -m pip install -q scikit-learn
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${BENCH_NO_INSTALL:-}" ] \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; using the shipped subset" >&2
fi

quiet() { grep --line-buffered -v '^USDT:' || true; }   # the torch profiler's start/stop chatter
stage() {  # stage NAME CMD... : run, log stderr, record seconds
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  echo "[$(date +%H:%M:%S)] $name ..." >&2
  "$@" 2> >(quiet > "$LOGS/$name.log")
  echo -e "$name\t$(python -c "print(round($(date +%s.%N) - $t0, 1))")" >> "$LOGS/stages.tsv"
}
parallel() {  # parallel NAME "CMD A" "CMD B": two single-threaded workers side by side
  local name=$1 a=$2 b=$3
  local t0; t0=$(date +%s.%N)
  echo "[$(date +%H:%M:%S)] $name (2 workers) ..." >&2
  bash -c "$a" 2> >(quiet > "$LOGS/$name.a.log") & local pa=$!
  bash -c "$b" 2> >(quiet > "$LOGS/$name.b.log") & local pb=$!
  local status=0
  wait "$pa" || status=$?
  wait "$pb" || status=$?
  [ "$status" = 0 ] || { echo "$name failed: see $LOGS/$name.*.log" >&2; exit "$status"; }
  echo -e "$name\t$(python -c "print(round($(date +%s.%N) - $t0, 1))")" >> "$LOGS/stages.tsv"
}

START=$(date +%s.%N)
# 1. anti-forgetting (48 continual runs), one data set per worker
parallel forgetting "python bench_forgetting.py --dataset fashion_mnist" "python bench_forgetting.py --dataset digits"
# 2. threshold sweep (reuses the eps=0.97 and no-PGP runs of step 1), one method per worker
parallel thresholds "python bench_thresholds.py --method l2p" "python bench_thresholds.py --method dualprompt"
# 3./4./5. cost, scaling and whole-run phases: alone, so our own workers do not disturb the timings
stage cost python bench_cost.py
stage scaling python bench_scaling.py
stage run python bench_run.py
# 6. LoRA-PGP vs sequential LoRA (reads the L2P / DualPrompt rows of step 1)
stage lora python bench_lora.py
TOTAL=$(python -c "print(round($(date +%s.%N) - $START, 1))")
times > "$LOGS/times.txt"   # line 2: user and system CPU time of all finished children
python make_report.py --total-seconds "$TOTAL" --stages "$LOGS/stages.tsv" --cpu-times "$LOGS/times.txt"
echo "done in ${TOTAL}s: $RESULTS/*.json, README.md tables regenerated" >&2
