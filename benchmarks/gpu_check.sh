#!/usr/bin/env bash
# The whole GPU verification in one prepared run (issue 18), everything written under one folder:
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--out DIR]     (default DIR: $OUT)
#
# On the GPU machine (H100/H200, torch 2.11 + CUDA 13, nvcc and ninja present), after the
# device prelude:  bash .gpu/prelude.sh && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_check.sh
#
# Steps, each under its own time limit so that a slow step cannot take the whole run and one failure
# does not lose the others (steps.tsv: step, exit code, seconds, log file):
#   1. environment: GPU, driver, torch, CUDA (environment.json, nvidia-smi.txt)
#   2. build the csrc extension in place for sm_90 (TORCH_CUDA_ARCH_LIST=9.0), build.log
#   3. the CUDA- and nvdiffrast-marked tests (nvdiffrast compiles its plugin into DIR/torch_extensions)
#   4. the budget sweep at 3072x2048 (252 hypotheses, 5 iterations, 5 tracked frames; budgets
#      none, 8, 4, 2, 1, 0.5 GiB, plus a quarter of the unbounded peak, one below the full-resolution
#      minimum, downscale 0.5 and 0.3, and the naive upstream pattern measured where it fits):
#      geometric pair, then learned (random upstream-layout weights); peaks from the allocator
#      (max_memory_reserved / allocated) and NVML, num_alloc_retries, per-stage CUDA-event times
#   5. plan accuracy (predicted vs measured per stage), both pairs
#   6. several objects: three objects in one call per frame vs one estimator per object
# --device cpu --quick is the dry run the test suite makes (tests/test_gpu_check.py): the same
# steps on small inputs, no build (the extension of the checkout is used).
set -uo pipefail

device=cuda
quick=0
out="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$out" ]; then
    echo "gpu_check.sh: give --out DIR (or set OUT)" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mkdir -p "$out/results" "$out/logs"
out="$(cd "$out" && pwd)"
export TORCH_EXTENSIONS_DIR="$out/torch_extensions"   # nvdiffrast's compiled plugin, kept with the run
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$root"
PY="${PYTHON:-python3}"
printf 'step\trc\tseconds\tlog\n' > "$out/steps.tsv"
started=$(date +%s)

# step NAME LIMIT_SECONDS COMMAND...: run one step with its log and time limit, record it, go on
step() {
    local name="$1" limit="$2"
    shift 2
    local log="$out/logs/$name.log" t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit}s, $(( t0 - started ))s into the run)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "logs/$name.log" >> "$out/steps.tsv"
    [ "$rc" -eq 0 ] || { echo "   $name: exit code $rc (last lines of $log):" >&2; tail -n 5 "$log" >&2; }
    return 0
}

if [ "$quick" -eq 1 ]; then
    sweep=(--quick --device "$device")
    plan=(--quick --device "$device")
    limit_sweep=240
else
    sweep=(--device "$device" --budgets none,8,4,2,1,0.5 --frames 6)
    plan=(--device "$device")
    limit_sweep=150
fi

step environment 60 "$PY" - "$out" <<'EOF'
import json, platform, shutil, subprocess, sys
import torch
env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_bytes=props.total_memory,
               device_count=torch.cuda.device_count())
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    open(f"{sys.argv[1]}/nvidia-smi.txt", "w").write(smi)
    query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True).stdout.strip()
    env["nvidia_smi"] = query
json.dump(env, open(f"{sys.argv[1]}/environment.json", "w"), indent=1)
print(json.dumps(env, indent=1))
EOF

if [ "$device" != "cpu" ]; then
    # in place, so that the checkout's chunkpose/_C is the CUDA build; sm_90 machine code explicitly
    step build 240 env TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 "$PY" setup.py build_ext --inplace
fi

step ext_backend 60 "$PY" -c "
import torch, chunkpose.ops as ops
from chunkpose.ops import _ext
dev = '$device'
print('backend', ops.backend(dev), 'ext loaded', _ext.use_ext(dev), 'error', _ext.load_error())
"

step tests_cuda 240 "$PY" -m pytest -q -p no:cacheprovider -m "cuda or nvdiffrast" \
    --junitxml="$out/tests_cuda.xml" tests/

step sweep_geometric "$limit_sweep" "$PY" benchmarks/vram_vs_speed.py "${sweep[@]}" --out "$out/results"
step sweep_learned "$limit_sweep" "$PY" benchmarks/vram_vs_speed.py "${sweep[@]}" --path learned --out "$out/results"
step plan_accuracy 120 "$PY" benchmarks/plan_accuracy.py "${plan[@]}" --out "$out/results"
step several_objects 180 "$PY" benchmarks/several_objects.py "${plan[@]}" --out "$out/results"

echo "== done in $(( $(date +%s) - started ))s; steps:" >&2
column -t -s $'\t' "$out/steps.tsv" >&2 || cat "$out/steps.tsv" >&2
# the exit code says whether every step passed; the files are there either way
awk -F'\t' 'NR > 1 && $2 != 0 { bad = 1 } END { exit bad }' "$out/steps.tsv"
