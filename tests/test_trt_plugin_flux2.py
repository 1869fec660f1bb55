"""The TensorRT plugin library on FLUX.2's exports: TensorRT-RTX (CPU-only, with the library built against the test
stand-in headers, as tests/test_trt_plugin_library.py) parses the tiny FLUX.2 [dev] and [klein] transformers'
DeLeakerAttention nodes (FLUX.2's head layout and 4-axis RoPE inputs around them), builds fp16 engines, and the plan
holds every block's fields. Execution needs a GPU and is not covered here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trt_plugin_library import read_every_plan_fields, run_rtx, stand_in_library  # noqa: F401 (a fixture)

from deleaker.config import DeLeakerConfig
from deleaker.export import onnx_node
from deleaker.export.contract import FluxTransformerIO
from deleaker.export.exporter import export_transformer_onnx
from deleaker.tiny_flux2 import build_tiny_flux2_components, build_tiny_flux2_klein_components

pytest.importorskip("onnxscript")

BUILDERS = {"dev": build_tiny_flux2_components, "klein": build_tiny_flux2_klein_components}


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_tensorrt_rtx_parses_and_builds_the_tiny_flux2_transformer(stand_in_library, tmp_path, kind):
    transformer = BUILDERS[kind]()["transformer"].to(torch.float16)
    io = FluxTransformerIO.from_transformer(
        transformer, height=64, width=64, text_len=16, max_entities=4, vae_scale_factor=4, batch=(1, 1, 2)
    )
    config = DeLeakerConfig.for_model(io.num_blocks)
    exported = export_transformer_onnx(transformer, io, tmp_path / "transformer.onnx", config=config)
    engine = tmp_path / "transformer.plan"
    got, log = run_rtx(stand_in_library, "build", {"onnx": str(exported.onnx_path), "engine": str(engine),
                                                   "batch": [1, 1, 2]}, tmp_path)
    assert got["parsed"], got["errors"]
    assert got["layers"].count("PLUGIN_V3") == 4  # one per joint attention: 2 double-stream + 2 single-stream
    assert got["engine_bytes"], log
    assert [name for name, _, _ in got["outputs"]] == ["noise_pred", "history_out"]
    layers = sorted(read_every_plan_fields(engine.read_bytes()), key=lambda fields: fields["block_offset"])
    expected = [
        {name: (np.float32(v).item() if name in onnx_node.FLOAT_ATTRIBUTES else v) for name, v in attrs.items()
         if name not in ("plugin_namespace", "plugin_version")}
        for attrs in (onnx_node.node_attributes(block_offset=b, num_blocks=4, grid=(8, 8), config=config)
                      for b in range(4))
    ]
    assert layers == expected
