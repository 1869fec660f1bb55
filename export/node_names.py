"""The ``DeLeakerAttention`` node's names, with no import of onnx or torch: an engine folder's manifest is checked
against them on machines that have neither onnx nor onnxscript (a TensorRT-only deployment)."""

#: The node's ONNX domain, also the TensorRT plugin namespace.
DOMAIN = "deleaker"
#: The node's op type, also the TensorRT plugin name.
OP_TYPE = "DeLeakerAttention"
#: Values of the node's ``plugin_namespace`` and ``plugin_version`` attributes (the TensorRT plugin's).
PLUGIN_NAMESPACE = "deleaker"
PLUGIN_VERSION = "1"
