"""Namespaced as `deleaker.export`: the DeLeaker FLUX transformer as ONNX.

- `deleaker.export.contract`: `FluxTransformerIO`, the one I/O contract (names, dtypes, shapes, profiles).
- `deleaker.export.wrapper`: `make_wrapper` / `FluxDeLeakerWrapper`, the fixed-signature module that is exported.
- `deleaker.export.onnx_node`: the ``deleaker::DeLeakerAttention`` node (schema, attributes) and the two
  translations of ``torch.ops.deleaker.attention`` (custom node, standard-ONNX decomposition).
- `deleaker.export.exporter`: `export_transformer_onnx`, `export_attention_onnx`, `check_onnx_model`,
  `read_export_metadata`; `deleaker.export.model_export`: `load_transformer`, `export_model_onnx` (a model on disk).
- `deleaker.export.ort_session`: ONNX Runtime sessions for standard ONNX (`make_session`, `check_session_contract`,
  `session_feeds`); `deleaker.export.ort_interrupt`: `run_interruptible` (Ctrl-C stops a run between two nodes);
  `deleaker.export.ort_reference`: asked for by name, the node's Python reference (`make_reference_session`).
- `deleaker.export.portable`: `make_portable`, any exported graph as float32 standard ONNX (what ONNX Runtime runs).

Submodules are imported on use (onnx/onnxscript are optional dependencies of the package).
"""
