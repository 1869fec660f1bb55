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
