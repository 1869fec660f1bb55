#!/usr/bin/env bash
# The device check, on a lent GPU machine, from the repository root (prepare it here first with
# benchmarks/prepare_device_check.sh; carry .device and .whl):
#   bash benchmarks/device_check.sh [device_check.py options]
# Installs the carried wheels and the project (no network there), points the kernel cache at the prebuilt
# library, then runs benchmarks/device_check.py under a time limit; results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/device_check_out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || true
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/install.log" 2>&1 || { echo "installing the carried wheels failed:"; tail -20 "$OUT/install.log"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 \
  || { echo "installing the project failed:"; tail -20 "$OUT/install.log"; exit 2; }
# The library prebuilt here with nvcc (prepare_device_check.sh); if it does not match, the build falls back to nvcc.
export DELEAKER_KERNEL_CACHE=$PWD/.device/kernels
if [ -d .device/plugin ]; then export DELEAKER_TRT_PLUGIN_DIR=$PWD/.device/plugin; fi
# The script's own budget ends 20 s before the hard limit: stages that no longer fit are recorded as skipped.
limit=${DEVICE_CHECK_TIMEOUT:-450}  # one device call of at most 8 minutes (run timeout_s=480)
timeout "$limit" python3 benchmarks/device_check.py --out "$OUT" --budget-s $((limit - 20)) "$@"
status=$?
echo "device_check.py exit status: $status"
exit $status
