"""`deleaker.runtime.memory`: the attention memory estimate and the size check made with it before any work."""

from __future__ import annotations

import copy

import pytest

from deleaker.runtime.memory import AttentionMemory, MemoryBudgetError, available_bytes
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest

from hostile_use import ENTITIES, PROMPT, TEXT_LEN


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_size_that_cannot_fit_memory_is_refused_before_work(backend, tiny_components, tmp_path):
    components = {k: copy.deepcopy(v) for k, v in tiny_components.items()}
    rt = DeLeakerRuntime.from_components(
        components, model_id="tiny", backend=backend, text_len=TEXT_LEN, cache_dir=tmp_path, default_size=(64, 64)
    )
    memory = AttentionMemory.of(rt.transformer_config, text_len=TEXT_LEN, max_entities=4, patch=8)
    if available_bytes() is None or memory.estimate_bytes(2048, 2048) < available_bytes():
        pytest.skip("this machine has the memory (or does not say how much it has)")
    with pytest.raises(MemoryBudgetError, match=r"2048x2048 needs an estimated .* GiB .* available"):
        rt.resolve(GenerationRequest(PROMPT, ENTITIES, height=2048, width=2048))
    assert not (tmp_path / "onnx").exists()  # no export started
    rt.resolve(GenerationRequest(PROMPT, ENTITIES, height=128, width=128))  # a size that fits passes


def test_memory_estimate_grows_with_the_fourth_power_of_the_side():
    memory = AttentionMemory(heads=24, text_len=512, max_entities=4, patch=16)  # FLUX.1 at T = 512
    small, large = memory.estimate_bytes(512, 512), memory.estimate_bytes(1024, 1024)
    tokens = 512 + 1024
    assert small >= 4 * 24 * tokens**2  # at least the (H, N, N) float32 scores
    assert 5 < large / small < 16


def test_memory_estimate_grows_with_the_entity_pairs():
    """ONNX Runtime's peak on the decomposition (one set of image-image maps per entity pair) measured 1.63 GiB at
    E_max 8 and 512x512 on the tiny model; the estimate ignored E_max and said 1.45 GiB."""
    small, large = (AttentionMemory(heads=2, text_len=32, max_entities=e, patch=8) for e in (4, 8))
    assert large.estimate_bytes(512, 512) > 1.63 * 2**30 > small.estimate_bytes(512, 512)
