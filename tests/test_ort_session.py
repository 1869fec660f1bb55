"""`deleaker.export.ort_session`: plain ONNX Runtime sessions refuse graphs with the custom node."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from deleaker.errors import DeLeakerError
from deleaker.export.ort_session import make_session

from hostile_use import node_graph


def test_onnx_runtime_sessions_refuse_the_custom_node(tmp_path):
    with pytest.raises(DeLeakerError, match="has deleaker::DeLeakerAttention nodes"):
        make_session(node_graph(tmp_path))


def _tiny_io():
    from deleaker.export.contract import FluxTransformerIO

    return FluxTransformerIO(
        in_channels=16, out_channels=16, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        num_blocks=4, height=64, width=64, vae_scale_factor=4, text_len=16, max_entities=4, batch_min=1,
        batch_opt=1, batch_max=2,
    )


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_inputs_of_any_width_are_fed_exactly(dtype):
    from deleaker.export.ort_session import session_feeds

    io = _tiny_io()
    inputs = io.sample_inputs(step=7)
    feeds = session_feeds(io, {**inputs, "step": torch.tensor(100, dtype=dtype),
                               "entity_mask": inputs["entity_mask"].to(torch.bool)})
    assert feeds["step"].dtype == np.int32 and int(feeds["step"]) == 100
    assert np.array_equal(feeds["entity_mask"], inputs["entity_mask"].numpy())


@pytest.mark.parametrize("step, message", [
    (torch.tensor(2**31 + 5), "must fit int32"),  # astype wrapped it to a negative step
    (torch.tensor(2.7), "must be an integer"),  # astype cut it to step 2
    (torch.tensor(True), "must be an integer, got a bool"),
])
def test_integer_inputs_the_cast_would_change_are_refused(step, message):
    from deleaker.errors import ShapeError
    from deleaker.export.ort_session import session_feeds

    io = _tiny_io()
    with pytest.raises(ShapeError, match=f"input step {message}"):
        session_feeds(io, {**io.sample_inputs(), "step": step})
    with pytest.raises(ShapeError, match="input entity_mask must be an integer"):
        session_feeds(io, {**io.sample_inputs(), "entity_mask": torch.ones(4, 16) * 0.5})
