#!/usr/bin/env bash
# One GPU, ViT-B/16 CLIP, bfloat16 compute with float32 parameters: jclip's train step and OpenCLIP's (AMP bf16,
# in its own interpreter) at the largest batch that fits, with examples/s, MFU and memory, as JSON files.
#
# usage: launch/bench_accelerator.sh --out DIR [--openclip-python PYTHON] [--batches "1024 768 512 384 256"]
#                                    [--steps 5] [--warmup 2] [--budget 450] [--shape B/16]
#
#   --out DIR               folder for the JSON reports (jclip_b<B>.json, openclip_b<B>.json), logs, summary.json
#   --openclip-python PATH  a Python with torch and open_clip (default: $OPENCLIP_PYTHON; none: jclip only)
#   --batches "B ..."       global batches to try, largest first; the first that runs is kept
#   --steps N, --warmup N   timed and untimed steps of each run
#   --budget SECONDS        stop trying further batches once this much time has gone (default 450: under 8 minutes)
#   --shape NAME            another shape of jclip.tools.bench_step (a dry run on a CPU: cpu-tiny)
#
# Environment: JCLIP_PYTHON (default python3; run from the repository, or with jclip installed), JCLIP_ENV (a file
# sourced first, e.g. launch/env/h100.sh), CUDA_VISIBLE_DEVICES (default 0: one GPU), XLA_PYTHON_CLIENT_MEM_FRACTION
# (default 0.9 for jclip's runs). jclip searches its batch first (python -m jclip.tools.bench_step --shape=B/16
# --dtype=bfloat16); OpenCLIP then starts at jclip's batch and descends, in a run of its own (--openclip-only) so
# that the two never share the GPU's memory. A run that fails for any reason but memory stops the search.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

out=""
openclip_python=${OPENCLIP_PYTHON:-}
batches="1024 768 512 384 256"
steps=5
warmup=2
budget=450
shape=B/16
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --openclip-python) openclip_python=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --shape) shape=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -z "$out" ]; then
  echo "--out DIR is required" >&2
  usage >&2
  exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${JCLIP_ENV:-}" ]; then
  # shellcheck source=/dev/null
  . "$JCLIP_ENV"
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
jclip_python=${JCLIP_PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
started=$SECONDS

# Exit status 0 when the log says the device ran out of memory.
out_of_memory() {
  grep -q -i -E 'RESOURCE_EXHAUSTED|out of memory|OutOfMemoryError' "$1"
}

# bench NAME BATCH ARGS...: one bench_step run within the time left; its status.
bench() {
  local name=$1 batch=$2 left
  shift 2
  left=$((budget - (SECONDS - started)))
  if [ "$left" -lt 60 ]; then
    echo "$name batch $batch: skipped, under 60 s of the ${budget} s budget left"
    return 124
  fi
  echo "$name batch $batch: running (${left} s of the budget left)"
  (cd "$repo" && timeout "$left" "$jclip_python" -m jclip.tools.bench_step --shape="$shape" --dtype=bfloat16 \
    --batch="$batch" --steps="$steps" --warmup="$warmup" --json="$out/${name}_b${batch}.json" "$@") \
    >"$out/${name}_b${batch}.log" 2>&1
}

# search NAME BATCHES ARGS...: tries the batches in order; prints the first that ran, or nothing.
search() {
  local name=$1 candidates=$2 batch status
  shift 2
  for batch in $candidates; do
    status=0
    bench "$name" "$batch" "$@" >&2 || status=$?
    if [ "$status" -eq 0 ]; then
      echo "$batch"
      return 0
    fi
    if [ "$status" -eq 124 ]; then
      return 0
    fi
    if ! out_of_memory "$out/${name}_b${batch}.log"; then
      echo "$name batch $batch: failed, not for memory (exit $status): see $out/${name}_b${batch}.log" >&2
      tail -n 5 "$out/${name}_b${batch}.log" >&2
      return 0
    fi
    echo "$name batch $batch: out of memory" >&2
  done
}

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/device.csv" 2>&1 || true
fi

jclip_batch=$(XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9} search jclip "$batches")
openclip_batch=""
if [ -n "$openclip_python" ]; then
  # From jclip's batch down (all of them when jclip found none).
  smaller=""
  for batch in $batches; do
    if [ -z "$jclip_batch" ] || [ "$batch" -le "$jclip_batch" ]; then
      smaller="$smaller $batch"
    fi
  done
  openclip_batch=$(search openclip "$smaller" --against-openclip="$openclip_python" --openclip-only)
fi

summary_args=("$out/summary.json" "${jclip_batch:+$out/jclip_b$jclip_batch.json}"
              "${openclip_batch:+$out/openclip_b$openclip_batch.json}")
"$jclip_python" - "${summary_args[@]}" <<'PY'
import json, sys

summary = {}
for name, path in zip(("jclip", "openclip"), sys.argv[2:]):
    if not path:
        summary[name] = None
        continue
    report = json.load(open(path))
    side = report[name]
    summary[name] = {"batch": report["batch"], "examples_per_second": side["examples_per_second"],
                     "median_step_seconds": side["median_step_seconds"], "mfu": side["mfu"],
                     "memory": side["memory"], "params": side["params"], "report": path,
                     "device_kind": report["device_kind"]}
json.dump(summary, open(sys.argv[1], "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
echo "done in $((SECONDS - started)) s; reports in $out"
[ -n "$jclip_batch" ]
