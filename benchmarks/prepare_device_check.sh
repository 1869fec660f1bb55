#!/usr/bin/env bash
# Prepare the device check on this (CPU) machine, from the repository root: the kernel library prebuilt with nvcc
# into .device/kernels, the C++ plugin and its driver into .device/plugin, and the pure-Python wheels the GPU
# machine lacks (diffusers, ...) into .whl. Both folders are git-ignored; carry both (64 MiB in all):
#   run(command="bash benchmarks/device_check.sh", carry=[".device", ".whl"], timeout_s=480)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
built=$(DELEAKER_KERNEL_CACHE=$PWD/.device/kernels python -m deleaker.plugins.kernels_build | tail -1)
echo "kernel library: $built"
# Only this build travels: the builds of older sources stay in the folder otherwise (21 MB each).
keep=$(basename "$(dirname "$built")")
find .device/kernels -mindepth 1 -maxdepth 1 ! -name "$keep" -exec rm -rf {} +
# The gathered-tile L2 microbenchmark (device_check.py's gather stage) into .device/gather: sm_90a (H100, H200).
mkdir -p .device/gather
nvcc -std=c++17 -O3 -shared -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a \
  -gencode=arch=compute_90,code=compute_90 -o .device/gather/libgather_bench.so benchmarks/gather/gather_bench.cu
# The C++ TensorRT plugin (stand-in TensorRT headers, cuDNN's attention) and its driver into .device/plugin.
python benchmarks/plugin_check.py --prepare
if [ -x ../shared/tools/device-wheels.sh ] || [ -f ../shared/tools/device-wheels.sh ]; then
  bash ../shared/tools/device-wheels.sh
else
  mkdir -p .whl
  python -m pip download -q --no-deps -d .whl diffusers importlib_metadata
fi
du -sh .device .whl
# What one device call sends: the carried folders and the working tree (tracked and untracked-not-ignored files).
tree=$(git ls-files -co --exclude-standard -z | du --files0-from=- -cb | tail -1 | cut -f1)
carried=$(du -cb .device .whl | tail -1 | cut -f1)
total=$((tree + carried))
echo "one device call sends $((total / 1048576)) MiB of the 64 MiB it may"
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "too large to send: build the carried copies for fewer GPU architectures, or carry less" >&2
  exit 1
fi
