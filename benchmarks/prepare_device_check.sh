#!/usr/bin/env bash
# Prepare the device check on this (CPU) machine, from the repository root: the kernel library prebuilt with nvcc
# into .device/kernels, the C++ plugin and its driver into .device/plugin, and the pure-Python wheels the GPU
# machine lacks (diffusers, ...) into .whl. Both folders are git-ignored; carry both (64 MiB in all):
#   run(command="bash benchmarks/device_check.sh", carry=[".device", ".whl"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
DELEAKER_KERNEL_CACHE=$PWD/.device/kernels python -m deleaker.plugins.build
# The C++ TensorRT plugin (stand-in TensorRT headers, cuDNN's attention) and its driver into .device/plugin.
python benchmarks/plugin_check.py --prepare
if [ -x ../shared/tools/device-wheels.sh ] || [ -f ../shared/tools/device-wheels.sh ]; then
  bash ../shared/tools/device-wheels.sh
else
  mkdir -p .whl
  python -m pip download -q --no-deps -d .whl diffusers importlib_metadata
fi
du -sh .device .whl
