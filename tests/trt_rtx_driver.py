"""Child process of tests/test_trt_plugin_library.py: TensorRT-RTX (real library, CPU-only) with our C++ plugin
library loaded. A crash in C++ fails one test with this process's output instead of killing pytest.

    python trt_rtx_driver.py LIBRARY COMMAND JSON_ARGS

prints TensorRT's log lines as ``{"log": [severity, text]}`` and, last, one ``{"result": ...}`` line.
Commands: ``creator`` (what the registry holds), ``create`` (createPlugin with given fields), ``build`` (parse an
ONNX file, build a serialized engine, write it to a path; optional batch profile).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tensorrt_rtx as trt


class RecordingLogger(trt.ILogger):
    def __init__(self) -> None:
        trt.ILogger.__init__(self)

    def log(self, severity, msg) -> None:
        print(json.dumps({"log": [severity.name, msg]}), flush=True)


def _creator(registry):
    creator = registry.get_creator("DeLeakerAttention", "1", "deleaker")
    if creator is None:
        raise SystemExit("the registry has no deleaker::DeLeakerAttention v1 after load_library")
    return creator


def creator_info(registry, _args) -> dict:
    creator = _creator(registry)
    return {
        "name": creator.name,
        "version": creator.plugin_version,
        "namespace": creator.plugin_namespace,
        "interface": [creator.interface_info.kind, creator.interface_info.major, creator.interface_info.minor],
        "fields": [[f.name, f.type.name] for f in creator.field_names],
    }


#: Numeric PluginFieldType names the ``create`` command takes, with their numpy dtypes.
NUMERIC_KINDS = {"INT32": np.int32, "INT64": np.int64, "FLOAT32": np.float32, "FLOAT64": np.float64}


def create(registry, args) -> dict:
    """createPlugin with ``args["fields"]``: ``{name: [kind, value]}``, kind INT32, INT64, FLOAT32, FLOAT64 or CHAR
    (text); a list value gives a field of that many elements. ``args["extra"]``: ``[[name, kind, value], ...]``
    appended after them (a field given twice)."""
    arrays = []
    fields = []
    given = [(name, kind, value) for name, (kind, value) in args["fields"].items()] + args.get("extra", [])
    for name, kind, value in given:
        if kind == "CHAR":
            array = np.frombuffer(value.encode() + b"\0", dtype=np.int8).copy()
        else:
            array = np.array(value if isinstance(value, list) else [value], dtype=NUMERIC_KINDS[kind])
        arrays.append(array)
        fields.append(trt.PluginField(name, array, getattr(trt.PluginFieldType, kind)))
    plugin = _creator(registry).create_plugin("probe", trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD)
    return {"created": plugin is not None}


def build(registry, args) -> dict:
    builder = BUILDER
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, LOGGER)
    parsed = parser.parse_from_file(args["onnx"])
    result = {"parsed": bool(parsed), "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)]}
    if not parsed:
        return result
    result["layers"] = [network.get_layer(i).type.name for i in range(network.num_layers)]
    result["outputs"] = [
        [network.get_output(i).name, list(network.get_output(i).shape), network.get_output(i).dtype.name]
        for i in range(network.num_outputs)
    ]
    config = builder.create_builder_config()
    if args.get("batch"):
        low, opt, high = args["batch"]
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            if shape and shape[0] == -1:
                profile.set_shape(tensor.name, [low] + shape[1:], [opt] + shape[1:], [high] + shape[1:])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    result["engine_bytes"] = None if serialized is None else serialized.nbytes
    if serialized is not None:
        with open(args["engine"], "wb") as f:
            f.write(serialized)
    return result


COMMANDS = {"creator": creator_info, "create": create, "build": build}
LOGGER = RecordingLogger()

if __name__ == "__main__":
    library, command, arguments = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    registry = trt.get_plugin_registry()
    # TensorRT-RTX's logger finder finds the logger of a live builder: create it before loading the library.
    BUILDER = trt.Builder(LOGGER)
    if registry.load_library(library) is None:
        raise SystemExit(f"load_library({library}) failed")
    print(json.dumps({"result": COMMANDS[command](registry, arguments)}), flush=True)
