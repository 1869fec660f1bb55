"""Bad inputs to `deleaker.deleaker_attention` raise `ShapeError` (TypeError for the config) saying what is wrong."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from deleaker import (
    DeLeakerConfig,
    ShapeError,
    deleaker_attention,
    deleaker_attention_decomposed,
    deleaker_attention_reference,
)

B, H, T, GH, GW, D, E = 2, 2, 5, 3, 4, 8, 4
N = T + GH * GW


def good_inputs() -> Dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    entity_mask = torch.zeros(E, T, dtype=torch.bool)
    entity_mask[0, 1] = entity_mask[1, 3] = True
    return dict(
        q=torch.randn(B, H, N, D, generator=g),
        k=torch.randn(B, H, N, D, generator=g),
        v=torch.randn(B, H, N, D, generator=g),
        entity_mask=entity_mask,
        grid=(GH, GW),
        block_step=20,
        history=torch.zeros(B, E, GH * GW),
        config=DeLeakerConfig(),
    )


def call(fn=deleaker_attention, **changes: Any):
    inputs = {**good_inputs(), **changes}
    q, k, v, entity_mask = (inputs.pop(n) for n in ("q", "k", "v", "entity_mask"))
    return fn(q, k, v, entity_mask, **inputs)


def test_good_inputs_run() -> None:
    out, history = call()
    assert out.shape == (B, H, N, D) and history.shape == (B, E, GH * GW)


CASES = {
    "q rank 3": (dict(q=torch.randn(H, N, D)), ["q", "(B, H, N, D)", "(2, 17, 8)"]),
    "k rank 5": (dict(k=torch.randn(1, B, H, N, D)), ["k", "(B, H, N, D)"]),
    "v not a tensor": (dict(v=[[1.0]]), ["v", "tensor", "list"]),
    "k shorter": (dict(k=torch.randn(B, H, N - 1, D)), ["same shape", "(2, 2, 17, 8)", "(2, 2, 16, 8)"]),
    "v other head dim": (dict(v=torch.randn(B, H, N, D + 1)), ["same shape", "(2, 2, 17, 9)"]),
    "q int": (dict(q=torch.ones(B, H, N, D, dtype=torch.int32)), ["q", "float", "torch.int32"]),
    "v bool": (dict(v=torch.ones(B, H, N, D, dtype=torch.bool)), ["v", "float", "torch.bool"]),
    "dtypes differ": (dict(k=torch.randn(B, H, N, D, dtype=torch.float16)), ["same dtype", "torch.float16"]),
    "entity_mask 1-D": (dict(entity_mask=torch.ones(T, dtype=torch.bool)), ["entity_mask", "(E_max, T)", "(5,)"]),
    "entity_mask 3-D": (dict(entity_mask=torch.ones(1, E, T, dtype=torch.bool)), ["entity_mask", "(E_max, T)"]),
    "entity_mask float": (dict(entity_mask=torch.ones(E, T)), ["entity_mask", "bool", "torch.float32"]),
    "entity_mask int": (dict(entity_mask=torch.ones(E, T, dtype=torch.int64)), ["entity_mask", "bool", "int64"]),
    "entity_mask not a tensor": (dict(entity_mask=[[True]]), ["entity_mask", "list"]),
    "T == N": (dict(entity_mask=torch.zeros(E, N, dtype=torch.bool)), ["T = 17", "N = 17"]),
    "T > N": (dict(entity_mask=torch.zeros(E, N + 3, dtype=torch.bool)), ["T = 20", "N = 17"]),
    "grid too small": (dict(grid=(3, 3)), ["grid", "9 cells", "12 image tokens"]),
    "grid too big": (dict(grid=(4, 4)), ["grid", "16 cells", "12 image tokens"]),
    "grid one int": (dict(grid=12), ["grid", "pair of positive ints", "12"]),
    "grid three ints": (dict(grid=(1, 3, 4)), ["grid", "pair of positive ints"]),
    "grid floats": (dict(grid=(3.0, 4.0)), ["grid", "pair of positive ints", "3.0"]),
    "grid zero": (dict(grid=(0, 12)), ["grid", "pair of positive ints"]),
    "grid negative": (dict(grid=(-3, -4)), ["grid", "pair of positive ints"]),
    "grid bools": (dict(grid=(True, True)), ["grid", "pair of positive ints"]),
    "history wrong E": (dict(history=torch.zeros(B, E - 1, GH * GW)), ["history", "(2, 4, 12)", "(2, 3, 12)"]),
    "history wrong B": (dict(history=torch.zeros(1, E, GH * GW)), ["history", "(2, 4, 12)", "(1, 4, 12)"]),
    "history 2-D": (dict(history=torch.zeros(E, GH * GW)), ["history", "(B, E_max, gh * gw)"]),
    "history float16": (dict(history=torch.zeros(B, E, GH * GW, dtype=torch.float16)), ["history", "float32",
                                                                                         "float16"]),
    "history float64": (dict(history=torch.zeros(B, E, GH * GW, dtype=torch.float64)), ["history", "float32"]),
    "history not a tensor": (dict(history=[0.0]), ["history", "list"]),
    "block_step negative": (dict(block_step=-1), ["block_step", ">= 0", "-1"]),
    "block_step negative tensor": (dict(block_step=torch.tensor(-5)), ["block_step", ">= 0", "-5"]),
    "block_step past int64": (dict(block_step=2**63), ["block_step", "2**63 - 1", "9223372036854775808"]),
    "block_step huge": (dict(block_step=10**30), ["block_step", "2**63 - 1"]),
    "batch zero": (dict(q=torch.randn(0, H, N, D), k=torch.randn(0, H, N, D), v=torch.randn(0, H, N, D),
                        history=None), ["B, H and D >= 1", "(0, 2, 17, 8)"]),
    "no heads": (dict(q=torch.randn(B, 0, N, D), k=torch.randn(B, 0, N, D), v=torch.randn(B, 0, N, D)),
                 ["B, H and D >= 1", "(2, 0, 17, 8)"]),
    "head dim zero": (dict(q=torch.randn(B, H, N, 0), k=torch.randn(B, H, N, 0), v=torch.randn(B, H, N, 0)),
                      ["B, H and D >= 1", "(2, 2, 17, 0)"]),
    "block_step float": (dict(block_step=3.0), ["block_step", "3.0"]),
    "block_step bool": (dict(block_step=True), ["block_step", "True"]),
    "block_step str": (dict(block_step="3"), ["block_step"]),
    "block_step float tensor": (dict(block_step=torch.tensor(3.0)), ["block_step", "integer tensor"]),
    "block_step bool tensor": (dict(block_step=torch.tensor(True)), ["block_step", "integer tensor"]),
    "block_step 2 elements": (dict(block_step=torch.tensor([1, 2])), ["block_step", "one-element"]),
}


@pytest.mark.parametrize("fn", [deleaker_attention, deleaker_attention_reference, deleaker_attention_decomposed])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_shape_error(name: str, fn) -> None:
    changes, phrases = CASES[name]
    with pytest.raises(ShapeError) as info:
        call(fn, **changes)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} missing from {message!r}"


@pytest.mark.parametrize("config", [None, {"k_strength": 1.2}, "default", DeLeakerConfig])
def test_config_must_be_a_config(config) -> None:
    with pytest.raises(TypeError, match="DeLeakerConfig"):
        call(config=config)


def test_shape_error_is_a_value_error_and_deleaker_error() -> None:
    from deleaker import DeLeakerError

    with pytest.raises(ValueError):
        call(grid=(3, 3))
    with pytest.raises(DeLeakerError):
        call(grid=(3, 3))


@pytest.mark.parametrize("name", ["k", "v", "entity_mask", "history"])
def test_tensors_on_another_device(name: str) -> None:
    # The meta device stands in for a second device, so this runs without a GPU.
    inputs = good_inputs()
    inputs[name] = inputs[name].to("meta")
    with pytest.raises(ShapeError, match="device"):
        call(**inputs)


def test_valid_edge_inputs_are_accepted() -> None:
    """Things that must not be rejected: a history of None, a 0-d int tensor step, a one-element step, E_max 1."""
    call(history=None)
    call(block_step=torch.tensor(20))
    call(block_step=torch.tensor([20], dtype=torch.int32))
    call(block_step=0)
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, 2] = True
    call(entity_mask=mask, history=None)
    call(grid=[GH, GW])
