"""A block step given as a tensor of any integer dtype computes what the same Python int computes, in the op, the
decomposed op and the graph the ONNX export traces; bool and float steps are refused.

A narrow dtype compared in its own width: int8(100) against a window start of 684 (the scalar cast to int8 wraps)
skipped the history update (0.255 off); int16 counts wrap past 32,767 while FLUX.1-dev at 1,000 steps counts 57,000.
"""

from __future__ import annotations

import pytest
import torch

from deleaker import DeLeakerConfig, ShapeError, deleaker_attention, deleaker_attention_decomposed
from deleaker import deleaker_attention_reference

B, H, T, GH, GW, D, E = 1, 2, 5, 4, 4, 8, 2
N = T + GH * GW

OPS = {
    "op": deleaker_attention,
    "reference": deleaker_attention_reference,
    "decomposed": deleaker_attention_decomposed,
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) * 3 for _ in range(3))
    entity_mask = torch.zeros(E, T, dtype=torch.bool)
    entity_mask[0, 1] = entity_mask[1, 3] = True
    history = torch.rand(B, E, GH * GW, generator=g)
    return q, k, v, entity_mask, history


# Windows beyond every narrow dtype's range, so a comparison made in the step's own width goes wrong.
WIDE = DeLeakerConfig(start_aggregating_from=0, stop_aggregating_at=60_000, start_intervention_from=1,
                      stop_intervention_at=60_000, std_mul_text=0.0, std_mul_image_image=0.0, do_smoothing=False)
NARROW_CASES = [
    (torch.int8, 100, DeLeakerConfig()),  # the default window starts at 12 / 18, aggregation stops at 684
    (torch.uint8, 200, WIDE),
    (torch.int16, 30_000, WIDE),
    (torch.int32, 40_000, WIDE),
    (torch.int64, 57_000, WIDE),
]


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype, step, config", NARROW_CASES, ids=[str(c[0]) for c in NARROW_CASES])
def test_an_integer_tensor_step_equals_the_python_int(name, dtype, step, config):
    q, k, v, entity_mask, history = _inputs()
    run = OPS[name]
    want_out, want_history = run(q, k, v, entity_mask, grid=(GH, GW), block_step=step, history=history,
                                 config=config)
    got_out, got_history = run(q, k, v, entity_mask, grid=(GH, GW), block_step=torch.tensor(step, dtype=dtype),
                               history=history, config=config)
    torch.testing.assert_close(got_history, want_history, rtol=0, atol=0)
    torch.testing.assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
    assert not torch.equal(want_history, history), "the step must update the history for this check to mean much"


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("bad", [torch.tensor(True), torch.tensor(3.0), torch.tensor([1, 2])])
def test_bool_float_and_many_element_steps_are_refused(name, bad):
    q, k, v, entity_mask, history = _inputs()
    with pytest.raises(ShapeError, match="block_step must be"):
        OPS[name](q, k, v, entity_mask, grid=(GH, GW), block_step=bad, history=history, config=DeLeakerConfig())


def test_a_uint64_step_beyond_int64_is_refused():
    q, k, v, entity_mask, history = _inputs()
    with pytest.raises(ShapeError, match="2\\*\\*63 - 1"):
        deleaker_attention_reference(q, k, v, entity_mask, grid=(GH, GW),
                                     block_step=torch.tensor(2**63 + 5, dtype=torch.uint64), history=history,
                                     config=DeLeakerConfig())
