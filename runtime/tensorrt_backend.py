"""The TensorRT backend: a built engine of the transformer (DeLeaker plugin layers inside) behind the
`deleaker.runtime.backends.TransformerBackend` interface, its inputs and outputs as that module lists them.

Needs TensorRT (``tensorrt`` or ``tensorrt_rtx``, imported when an instance is made) and a CUDA GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from .backends import BackendError

if TYPE_CHECKING:  # pragma: no cover
    from deleaker.plugins.trt_library import PluginLibrary

Tensor = torch.Tensor


class TensorRTBackend:
    """A built TensorRT engine of the transformer (DeLeaker plugin layers inside), run with ``execute_async_v3``.

    ``plugin`` is the plugin library the engine was built with (`deleaker.plugins.trt_library.PluginLibrary`; an
    engine directory's copy), loaded into TensorRT's registry before the engine is deserialized; ``built_with`` the
    TensorRT release that built it (``tensorrt==10.13.0.35``, ``tensorrt_rtx==1.7.1.116``), which must be the one
    importable here.

    Device buffers for every input and output are allocated once, at the contract's largest batch, and bound
    with ``set_tensor_address``; a call copies the inputs in, enqueues the engine on a private stream and returns
    copies of the outputs. With ``cuda_graph=True`` the first call of each batch size is captured into a CUDA
    graph and later calls replay it (the buffers never move, so the graph stays valid).

    Not validated on this project's CPU-only CI: written against TensorRT 10's Python API and tested where a GPU
    and TensorRT are present. ``tensorrt`` is imported when an instance is created, never at module import.
    """

    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        io: Any,
        plugin: "PluginLibrary",
        built_with: str,
        *,
        cuda_graph: bool = True,
        device: str | torch.device = "cuda",
    ) -> None:
        from deleaker.plugins.trt_library import (
            import_tensorrt,
            load_plugin_library,
            release_module,
            tensorrt_logger,
            tensorrt_release,
        )

        trt = import_tensorrt(prefer=release_module(built_with))  # TensorRTUnavailableError, with install hints
        if tensorrt_release(trt) != built_with:
            here = tensorrt_release(trt)
            raise BackendError(f"{engine_path} was built with {built_with}, this is {here}; rebuild it")
        if not torch.cuda.is_available():
            raise BackendError("the TensorRT backend needs a CUDA GPU; none is visible to torch")
        plugin.check_can_run()
        self._trt = trt
        self.io = io
        self.device = torch.device(device)
        self.dtype = io.spec("noise_pred").torch_dtype
        self._logger = tensorrt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        load_plugin_library(trt, plugin)  # with the runtime alive: TensorRT-RTX hands the library its logger
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {engine_path} (see its log above)")
        self.context = self.engine.create_execution_context()
        engine_names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        wanted = set(io.input_names) | set(io.output_names)
        if engine_names != wanted:
            raise BackendError(f"{engine_path} has tensors {sorted(engine_names)}, the contract {sorted(wanted)}")
        self._stream = torch.cuda.Stream(self.device)
        self._buffers = {
            spec.name: torch.empty(spec.concrete(io.batch_max), dtype=spec.torch_dtype, device=self.device)
            for spec in io.inputs + io.outputs
        }
        for name, buffer in self._buffers.items():
            self.context.set_tensor_address(name, buffer.data_ptr())
        self._use_graphs = cuda_graph
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._batch: Optional[int] = None

    def _view(self, name: str, batch: int) -> Tensor:
        # Batch-major buffers: the first ``batch`` rows are contiguous, at the same address.
        return self._buffers[name][:batch] if self.io.spec(name).dynamic_axes else self._buffers[name]

    def _set_batch(self, batch: int) -> None:
        if batch == self._batch:
            return
        self.io.check_batch(batch)
        for spec in self.io.inputs:
            self.context.set_input_shape(spec.name, spec.concrete(batch))
        self._batch = batch

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed (see its log above)")

    def __call__(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        batch = int(inputs["hidden_states"].shape[0])
        self._set_batch(batch)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for spec in self.io.inputs:
                self._view(spec.name, batch).copy_(inputs[spec.name].reshape(spec.concrete(batch)), non_blocking=True)
            if not self._use_graphs:
                self._enqueue()
            elif batch in self._graphs:
                self._graphs[batch].replay()
            else:
                self._enqueue()  # warm-up outside capture: TensorRT allocates lazily on the first run
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self._stream):
                    self._enqueue()
                self._graphs[batch] = graph
                graph.replay()
            noise_pred = self._view("noise_pred", batch).clone()
            history = self._view("history_out", batch).clone()
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self._stream)
        # Allocated on the private stream, used on the caller's: keep the allocator from reusing them early.
        noise_pred.record_stream(consumer)
        history.record_stream(consumer)
        return noise_pred, history
