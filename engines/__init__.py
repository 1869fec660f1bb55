"""Namespaced as `deleaker.engines`: building TensorRT engines of the DeLeaker FLUX transformer.

- `deleaker.engines.build`: `build_engines(BuildRequest) -> BuildResult` (ONNX export, FP8 Q/DQ, TensorRT engine,
  manifests);
- `deleaker.engines.loaders`: the TensorRT loaders, Polygraphy's (``network_from_onnx -> build_serialized_engine``);
- `deleaker.engines.folder`: the engine folder's names, what may share it, and writes that leave nothing partial;
- `deleaker.engines.fp8`: FP8 (E4M3) calibration, PyTorch fake quantization and the ONNX Q/DQ pass;
- `deleaker.engines.manifest`: `EngineManifest` (JSON beside every artifact) and its compatibility checks.

The ``deleaker-trt build`` command is `deleaker.runtime.cli.build_command`.

Importing this package needs neither TensorRT nor a GPU.
"""
