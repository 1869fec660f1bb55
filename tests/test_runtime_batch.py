"""`DeLeakerRuntime.generate_batch`: several requests of one resolution in one denoising loop give each the image it
gets alone (torch and ONNX Runtime backends), and a batch that cannot share a loop is refused before any work."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from deleaker.errors import ConfigError, ShapeError
from deleaker.runtime.runtime import DeLeakerRuntime, GenerationRequest
from deleaker.runtime.sources import TransformerSource
# tests/test_runtime.py's windows and thresholds give masks on the tiny model's random weights, so DeLeaker changes
# the image and the history each request carries matters.
from test_runtime import CONFIG, TEXT_LEN

CAT = "A cat and a cheetah are splashing each other with water in a shallow river"
DOG = "A red dog chases a small bird across a snowy field"
# Five requests share an entity mask, one has its own, one is plain FLUX (an all-zero mask): three groups, and the
# group of five is more than the ONNX export's batch profile (4), so ONNX Runtime also splits it into two calls.
REQUESTS = (
    GenerationRequest(CAT, ("cat", "cheetah"), seed=1, steps=3, guidance=3.5),
    GenerationRequest(CAT, ("cat", "cheetah"), seed=2, steps=3, guidance=5.0),
    GenerationRequest(DOG, ("dog", "bird"), seed=3, steps=3, guidance=3.5),
    GenerationRequest(CAT, ("cat", "cheetah"), seed=4, steps=3, guidance=3.5, deleaker=False),
    GenerationRequest(CAT, ("cat", "cheetah"), seed=5, steps=3, guidance=2.0),
    GenerationRequest(CAT, ("cat", "cheetah"), seed=6, steps=3, guidance=3.5),
    GenerationRequest(CAT, ("cat", "cheetah"), seed=7, steps=3, guidance=3.5),
)
#: Transformer calls per step and their batch sizes, per backend (see REQUESTS).
CALLS_PER_STEP = {"torch": [5, 1, 1], "onnxruntime": [4, 1, 1, 1]}


class CountingSource(TransformerSource):
    """Test infrastructure: the runtime's own source, whose backends record the batch size of every call."""

    def __init__(self, inner: TransformerSource) -> None:
        self.inner, self.name, self.batches = inner, inner.name, []

    def check_resolution(self, height: int, width: int) -> None:
        self.inner.check_resolution(height, width)

    def backend(self, height: int, width: int):
        return CountingBackend(self.inner.backend(height, width), self.batches)


class CountingBackend:
    def __init__(self, inner, batches: list[int]) -> None:
        self.inner, self.batches = inner, batches
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.io = getattr(inner, "io", None)

    def __call__(self, inputs):
        self.batches.append(int(inputs["hidden_states"].shape[0]))
        return self.inner(inputs)


def _runtime(tiny_components, backend: str, cache_dir) -> DeLeakerRuntime:
    return DeLeakerRuntime.from_components(
        {k: copy.deepcopy(v) for k, v in tiny_components.items()},
        model_id="tiny",
        backend=backend,
        text_len=TEXT_LEN,
        deleaker_config=CONFIG,
        default_size=(64, 64),
        cache_dir=cache_dir,
    )


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    # Shared with tests/test_runtime.py and tests/test_cli.py (same key): one export per session.
    return tmp_path_factory.getbasetemp() / "deleaker-onnx-cache"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_batch_gives_each_request_its_image_alone(tiny_components, onnx_cache, backend):
    rt = _runtime(tiny_components, backend, onnx_cache)
    rt.source = counting = CountingSource(rt.source)
    batch = rt.generate_batch(REQUESTS)
    # One loop: each step calls the transformer once per group of rows that share an entity mask (and chunk).
    assert sorted(counting.batches) == sorted(CALLS_PER_STEP[backend] * REQUESTS[0].steps)
    alone = [rt.generate(request) for request in REQUESTS]

    assert [r.request for r in batch] == [r.request for r in alone]
    for got, want in zip(batch, alone):
        got_pixels = np.asarray(got.image).astype(int)
        want_pixels = np.asarray(want.image).astype(int)
        # Batched matrix products may round differently from one row: at most one 8-bit level apart.
        assert np.abs(got_pixels - want_pixels).max() <= 1
        assert set(got.timings) == {"backend_load", "encode", "denoise", "decode", "total"}
        # The masks DeLeaker found are each request's own (none for the plain-FLUX row).
        if want.entity_masks is None:
            assert got.entity_masks is None
        else:
            assert got.entity_masks is not None and got.entity_masks.shape == want.entity_masks.shape
    # The rows are not copies of one another: the seeds, prompts and the plain-FLUX row all show.
    images = [np.asarray(r.image).tobytes() for r in batch]
    assert len(set(images)) == len(images)


def test_a_batch_of_one_is_generate(tiny_components):
    rt = _runtime(tiny_components, "torch", None)
    request = REQUESTS[0]
    assert np.array_equal(np.asarray(rt.generate_batch([request])[0].image), np.asarray(rt.generate(request).image))


@pytest.mark.parametrize(
    "requests,error,message",
    [
        ([], ConfigError, "non-empty list"),
        ("a cat and a dog", ConfigError, "non-empty list"),
        ([REQUESTS[0], GenerationRequest(CAT, ("cat", "cheetah"), steps=3, height=32)], ShapeError, "one resolution"),
        ([REQUESTS[0], GenerationRequest(CAT, ("cat", "cheetah"), steps=4)], ConfigError, "one step count"),
        ([REQUESTS[0], "a cat"], ConfigError, "expected a GenerationRequest"),
        # A request the model refuses (more T5 tokens than T) fails the batch before any work.
        ([REQUESTS[0], GenerationRequest("a cat and a cheetah" + " very" * 40, ("cat", "cheetah"), steps=3)],
         Exception, "T5 tokens"),
    ],
)
def test_a_batch_that_cannot_share_a_loop_is_refused(tiny_components, requests, error, message):
    rt = _runtime(tiny_components, "torch", None)
    with pytest.raises(error, match=message):
        rt.generate_batch(requests)
