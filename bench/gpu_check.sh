#!/usr/bin/env bash
# Does nanosweep work on this GPU machine, and how fast would the study run? One command for a bare machine that
# has PyTorch (and no network): it brings MLflow from wheels, then runs six stages, each with its own time limit,
# writing OUT/results.json after each stage and OUT/summary.md at the end (bench/README.md, "The GPU check").
#
#   bash bench/gpu_check.sh --out DIR --input PATH/input.txt [--nanogpt PATH/nanoGPT] [--wheels DIR]
#                           [--stages tests,probes,throughput,sweep,compile,nanogpt] [--smoke]
#
#   --wheels DIR   wheels to install first (bench/gpu_wheels.sh makes the set MLflow needs), into a temporary folder
#   --stages LIST  run only these stages (a rerun keeps the other stages' entries in results.json)
#   --smoke        every stage on the CPU at tiny sizes, in about two minutes (what CI runs)
# Stages: tests (pytest -m gpu, JUnit XML), probes (correctness on the device), throughput (the study's 32 fusion
# groups, full recipe, a few dozen iterations each: the study's time extrapolated), sweep (one real fused group
# through `nanosweep sweep` into a fresh SQLite store: checks the extrapolation), compile (a group eager and compiled:
# speed-up, compile time, losses), nanogpt (its train.py, the
# serial baseline; skipped without --nanogpt). Whole run: at most about 11 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."

out="" input="" nanogpt="" wheels="" stages="tests,probes,throughput,sweep,compile,nanogpt" smoke=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --input) input="$2"; shift 2 ;;
    --nanogpt) nanogpt="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --stages) stages="$2"; shift 2 ;;
    --smoke) smoke="--smoke"; shift ;;
    *) echo "gpu_check: unknown option '$1': see the header of $0" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "gpu_check: --out DIR is required" >&2; exit 2; }
[ -f "$input" ] || { echo "gpu_check: --input '$input' is not a file: pass tiny Shakespeare's input.txt" >&2; exit 2; }
[ -z "$nanogpt" ] || [ -f "$nanogpt/train.py" ] || { echo "gpu_check: --nanogpt '$nanogpt' has no train.py" >&2; exit 2; }
for stage in ${stages//,/ }; do
  case "$stage" in tests|probes|throughput|sweep|compile|nanogpt) ;;
    *) echo "gpu_check: stage '$stage' is not one of tests, probes, throughput, sweep, compile, nanogpt" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)" input="$(cd "$(dirname "$input")" && pwd)/$(basename "$input")"
[ -z "$nanogpt" ] || nanogpt="$(cd "$nanogpt" && pwd)"

scratch="$(mktemp -d /tmp/gpu-check.XXXXXX)"  # prepared ids, wheels' site: never under OUT, which comes back
trap 'rm -rf "$scratch"' EXIT
python="${PYTHON:-python3}"
if [ -n "$wheels" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$scratch/site" \
    "$wheels"/*.whl || { echo "gpu_check: installing the wheels of $wheels failed" >&2; exit 1; }
  export PYTHONPATH="$scratch/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
export NANOSWEEP_INPUT="$input" NANOSWEEP_DATA_DIR="$scratch/data"

# seconds per stage: the stage stops starting new work 10 s before its limit; `timeout` is the backstop
declare -A limit=([tests]=75 [probes]=75 [throughput]=150 [sweep]=110 [compile]=120 [nanogpt]=100)
if [ -n "$smoke" ]; then for stage in "${!limit[@]}"; do limit[$stage]=$((limit[$stage] * 2)); done; fi  # a CPU is slower
log="$out/log.txt"
"$python" bench/gpu_check.py env --out "$out" $smoke >>"$log" 2>&1 || { echo "gpu_check: no environment (see $log)" >&2; exit 1; }
failed=0
for stage in ${stages//,/ }; do
  echo "gpu_check: $stage (at most ${limit[$stage]} s)" | tee -a "$log" >&2
  timeout --kill-after=10 "${limit[$stage]}" "$python" bench/gpu_check.py stage "$stage" --out "$out" \
    --input "$input" ${nanogpt:+--nanogpt "$nanogpt"} --seconds "${limit[$stage]}" $smoke >>"$log" 2>&1
  status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    "$python" bench/gpu_check.py record "$stage" --out "$out" --message "killed at its ${limit[$stage]} s limit" >>"$log" 2>&1
  fi
  [ "$status" -eq 0 ] || failed=1
done
"$python" bench/gpu_check.py summary --out "$out" 2>>"$log"
exit "$failed"
