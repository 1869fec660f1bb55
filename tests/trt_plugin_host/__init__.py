"""The C++ TensorRT plugin's host path without TensorRT (test infrastructure, not shipped).

``plugin_driver.cpp`` plays TensorRT's part for one call through the library's C++ entry points (build phase, field
serialization, runtime phase, enqueue). Two builds use it:

- `emulated_plugin_library`: the plugin's own sources (``plugins/trt``) with the kernels' real source on the CUDA
  emulator (``tests/cuda_emulator``), ``host_attention.cpp`` standing in for cuDNN, and the driver, in one library
  on host memory (CPU CI);
- `build_gpu_driver`: the driver alone, for a GPU machine, where it drives ``libdeleaker_trt_plugin.so`` (the real
  build, cuDNN included) on device buffers (``benchmarks/plugin_check.py``).

`drive` is the Python side of both: torch tensors in, the plugin's own error message out as `PluginDriveError`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PLUGIN_SOURCES = REPO / "plugins" / "trt"
STAND_IN_HEADERS = REPO / "tests" / "tensorrt_stand_in"

#: nvinfer1::DataType of each torch dtype the plugin sees.
TRT_DATA_TYPES = {torch.float32: 0, torch.float16: 1, torch.bool: 4, torch.bfloat16: 7, torch.int64: 8}
#: nvinfer1::PluginFieldType of the node's attribute kinds.
FIELD_INT32, FIELD_FLOAT32 = 5, 1


class PluginDriveError(RuntimeError):
    """A plugin method refused the call; the message is the plugin's own (from TensorRT's logger)."""


class DriverTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("type", ctypes.c_int32), ("rank", ctypes.c_int32),
                ("dims", ctypes.c_int64 * 8)]


class DriverField(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("type", ctypes.c_int32), ("data", ctypes.c_void_p)]


def emulated_plugin_library() -> ctypes.CDLL:
    """The plugin's host path on the CUDA emulator: plugins/trt + emulated kernels + host attention + driver."""
    import cuda_emulator

    units = [
        PLUGIN_SOURCES / "plugin.cpp",
        PLUGIN_SOURCES / "deleaker_call.cpp",
        PLUGIN_SOURCES / "plugin_fields.cpp",
        HERE / "host_attention.cpp",
        HERE / "plugin_driver.cpp",
    ]
    path = cuda_emulator.build_emulated_library(extra_units=units, include_dirs=[PLUGIN_SOURCES, STAND_IN_HEADERS])
    return ctypes.CDLL(str(path))


def cuda_include_dir() -> Path:
    """CUDA's include folder (for ``cuda_runtime.h``): $CUDA_HOME's, nvcc's, or /usr/local/cuda's."""
    from deleaker.plugins import kernels_build as kernel_build

    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    try:
        candidates.append(kernel_build.find_nvcc().resolve().parent.parent / "include")
    except kernel_build.NvccNotFoundError:
        pass
    candidates.append(Path("/usr/local/cuda/include"))
    for candidate in candidates:
        if (candidate / "cuda_runtime.h").is_file():
            return candidate
    raise FileNotFoundError(f"no cuda_runtime.h in {[str(c) for c in candidates]}")


def build_gpu_driver(out_dir: Path, cuda_include: Path) -> Path:
    """``plugin_driver.cpp`` alone as a shared library (g++, the stand-in TensorRT header, CUDA's headers)."""
    source = HERE / "plugin_driver.cpp"
    key = hashlib.sha256(source.read_bytes() + (STAND_IN_HEADERS / "NvInferRuntime.h").read_bytes()).hexdigest()[:16]
    path = Path(out_dir) / f"libdeleaker_plugin_driver-{key}.so"
    if not path.is_file():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        command = [os.environ.get("CXX", "g++"), "-std=c++17", "-O2", "-fPIC", "-shared", f"-I{STAND_IN_HEADERS}",
                   f"-I{cuda_include}", str(source), "-o", str(path)]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building the plugin driver failed: {' '.join(command)}\n{built.stderr[-4000:]}")
    return path


def _tensor(tensor: torch.Tensor) -> DriverTensor:
    if tensor.dtype not in TRT_DATA_TYPES:
        raise ValueError(f"no TensorRT data type for {tensor.dtype}")
    desc = DriverTensor(tensor.data_ptr(), TRT_DATA_TYPES[tensor.dtype], tensor.dim())
    for axis, size in enumerate(tensor.shape):
        desc.dims[axis] = size
    return desc


def drive(
    plugin: ctypes.CDLL,
    driver: ctypes.CDLL,
    attributes: Mapping[str, object],
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    workspace: Optional[int] = None,
    workspace_capacity: int = 0,
    stream: int = 0,
) -> int:
    """One call through the plugin (``plugin`` exports getCreators and setLoggerFinder; ``driver`` exports
    deleaker_plugin_drive: the same library on the emulator). ``attributes`` are the node's (onnx_node's
    `node_attributes`; the lookup ones are dropped). With ``workspace`` None only the build phase runs. Returns the
    plugin's workspace size in bytes; raises `PluginDriveError` with the plugin's message."""
    values, fields = [], []
    for name, value in attributes.items():
        if name in ("plugin_namespace", "plugin_version"):
            continue
        is_float = isinstance(value, float)
        holder = ctypes.c_float(value) if is_float else ctypes.c_int32(int(value))
        values.append(holder)
        fields.append(DriverField(name.encode(), FIELD_FLOAT32 if is_float else FIELD_INT32,
                                  ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p)))
    field_array = (DriverField * len(fields))(*fields)
    input_array = (DriverTensor * len(inputs))(*(_tensor(t) for t in inputs))
    output_array = (DriverTensor * len(outputs))(*(_tensor(t) for t in outputs))
    message = ctypes.create_string_buffer(4096)
    size = ctypes.c_uint64(0)
    entry = driver.deleaker_plugin_drive
    entry.restype = ctypes.c_int
    entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(DriverField), ctypes.c_int32,
                      ctypes.POINTER(DriverTensor), ctypes.POINTER(DriverTensor), ctypes.c_void_p, ctypes.c_uint64,
                      ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64), ctypes.c_char_p, ctypes.c_uint64]
    code = entry(
        ctypes.cast(plugin.getCreators, ctypes.c_void_p), ctypes.cast(plugin.setLoggerFinder, ctypes.c_void_p),
        field_array, len(fields), input_array, output_array, workspace, workspace_capacity, stream,
        ctypes.byref(size), message, len(message),
    )
    if code != 0:
        raise PluginDriveError(message.value.decode(errors="replace"))
    return int(size.value)
