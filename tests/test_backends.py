"""Devices: a device the backend cannot use is refused before the model loads."""

from __future__ import annotations


import pytest
import torch

from deleaker.errors import ConfigError
from deleaker.runtime.runtime import DeLeakerRuntime

from hostile_use import PROMPT, invoke_cli


@pytest.mark.parametrize(
    "backend,device,message",
    [
        ("torch", "meta", "device 'meta' cannot run a model here"),
        ("torch", "nonsense", "device 'nonsense' is not a torch device"),
        ("torch", "cuda:99", "cuda:99"),
        ("onnxruntime", "cuda", "the onnxruntime backend runs on the CPU"),
    ],
)
def test_a_device_the_backend_cannot_use_is_refused_before_loading(backend, device, message, monkeypatch):
    from deleaker.runtime import runtime as runtime_mod

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(runtime_mod, "load_components", no_loading)
    with pytest.raises(ConfigError, match=message):
        DeLeakerRuntime.from_model("tiny", backend=backend, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without a GPU")
def test_cuda_on_a_machine_without_a_gpu_is_a_clean_cli_error(tmp_path):
    result = invoke_cli(
        "run", "--model", "tiny", "--backend", "torch", "--device", "cuda", "--prompt", PROMPT, "--entities",
        "cat,cheetah", "--out", tmp_path / "x.png",
    )
    assert result.exit_code == 1 and "device 'cuda' is not available" in result.stderr
    assert not (tmp_path / "x.png").exists()


# --- the compiled torch backend (torch.compile of the transformer step) -----------------------------------------

from deleaker.config import DeLeakerConfig  # noqa: E402
from deleaker.runtime.jobs import RuntimeSpec, output_record  # noqa: E402
from deleaker.runtime.request import GenerationRequest  # noqa: E402

# Knobs that make DeLeaker act on the tiny model's random weights (tests/test_runtime.py's CONFIG, test_cli.py's
# KNOBS): the same knobs, T and size give the same compiled graph, so inductor's cache serves the CLI's test.
ACTING = DeLeakerConfig(
    start_aggregating_from=1, stop_aggregating_at=9, start_intervention_from=2, stop_intervention_at=40,
    std_mul_text=0.5, std_mul_image_image=0.5,
)
#: Compiled vs eager on the CPU in float32: inductor fuses and reorders float32 arithmetic, nothing more (measured
#: about 4e-7 per step on the tiny model); the images are 8-bit and may differ by one level where a value rounds
#: the other way.
COMPILED_MAX_REL_ERR = 1e-5
COMPILED_MAX_PIXEL_DIFF = 1


def test_compiled_torch_backend_equals_eager_per_step_and_image(tiny_components):
    import copy

    import numpy as np

    def runtime(compile: bool) -> DeLeakerRuntime:
        components = {name: copy.deepcopy(c) for name, c in tiny_components.items()}
        return DeLeakerRuntime.from_components(
            components, model_id="tiny", backend="torch", device="cpu", text_len=32, deleaker_config=ACTING,
            default_size=(64, 64), compile=compile,
        )

    eager, compiled = runtime(False), runtime(True)
    request = GenerationRequest(PROMPT, ("cat", "cheetah"), seed=3, steps=3)
    want = eager.generate(request, record_latents=True)
    got = compiled.generate(request, record_latents=True)
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(got.latents, want.latents)]
    assert len(errors) == 3 and max(errors) < COMPILED_MAX_REL_ERR, errors
    diff = np.abs(np.asarray(got.image, dtype=int) - np.asarray(want.image, dtype=int))
    assert diff.max() <= COMPILED_MAX_PIXEL_DIFF
    # DeLeaker acted (the comparison covered the op's edits): plain FLUX gives another image.
    plain = eager.generate(GenerationRequest(PROMPT, ("cat", "cheetah"), seed=3, steps=3, deleaker=False))
    assert not np.array_equal(np.asarray(plain.image), np.asarray(want.image))

    # The first call at this shape compiled (reported, inside denoise); the second reuses it.
    assert 0 < got.timings["compile"] <= got.timings["denoise"]
    assert "compile" not in want.timings
    again = compiled.generate(request)
    assert again.timings["compile"] == 0.0
    assert np.array_equal(np.asarray(again.image), np.asarray(got.image))
    # Provenance: compiled images say so; eager records are unchanged.
    assert output_record(compiled, got.request)["compiled"] == {"compiler": "inductor", "cuda_graphs": False}
    assert "compiled" not in output_record(eager, want.request)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backend": "onnxruntime", "compile": True}, "compile applies to the torch backend only"),
        ({"backend": "torch", "compile": "yes"}, "compile must be True or False"),
    ],
    ids=["onnxruntime", "not-a-bool"],
)
def test_bad_compile_options_are_refused_before_loading(kwargs, message, monkeypatch):
    from deleaker.runtime import runtime as runtime_mod

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(runtime_mod, "load_components", no_loading)
    with pytest.raises(ConfigError, match=message):
        DeLeakerRuntime.from_model("tiny", device="cpu", **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"model": "tiny", "compile": True}, "not to the onnxruntime backend"),
        ({"model": "tiny", "backend": "onnxruntime", "compile": True}, "not to the onnxruntime backend"),
        ({"model": "tiny", "backend": "torch", "compile": 1}, "compile must be True or False"),
    ],
    ids=["default-backend", "onnxruntime", "not-a-bool"],
)
def test_runtime_spec_refuses_compile_off_the_torch_backend(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RuntimeSpec(**kwargs)
