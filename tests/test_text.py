"""Prompt encoding (runtime/text.py): the encoders run once per prompt (a ``--compare`` pair shares them), text
encoder offloading is refused where it means nothing, and a job reports peak GPU memory (null off a GPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from deleaker.errors import ConfigError
from deleaker.runtime.runtime import DeLeakerRuntime
from deleaker.runtime.text import TextEncoders

PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_prompt_is_encoded_once_and_others_are_not_confused(tiny_components):
    parts = {name: copy.deepcopy(tiny_components[name]) for name in ("text_encoder", "text_encoder_2")}
    text = TextEncoders(tiny_components["tokenizer"], parts["text_encoder"], tiny_components["tokenizer_2"],
                        parts["text_encoder_2"])
    clip_calls, t5_calls = _count_calls(parts["text_encoder"]), _count_calls(parts["text_encoder_2"])
    first = text.encode(PROMPT, text_len=32, dtype=torch.float32)
    again = text.encode(PROMPT, text_len=32, dtype=torch.float32)
    assert len(clip_calls) == len(t5_calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = text.encode("A cow and a horse in a farm", text_len=32, dtype=torch.float32)
    longer = text.encode(PROMPT, text_len=48, dtype=torch.float32)  # another T: another padding, encoded anew
    assert len(t5_calls) == 3 and not torch.equal(other[0], first[0]) and longer[0].shape[1] == 48
    # Only the last KEPT_EMBEDDINGS prompts are kept: the first one is encoded again after that many others.
    for i in range(TextEncoders.KEPT_EMBEDDINGS):
        text.encode(f"A cat number {i}", text_len=32, dtype=torch.float32)
    calls = len(t5_calls)
    assert all(torch.equal(a, b) for a, b in zip(text.encode(PROMPT, text_len=32, dtype=torch.float32), first))
    assert len(t5_calls) == calls + 1


def test_a_compare_pair_shares_the_encoders_and_reports_no_gpu_peak_on_the_cpu(tiny_components, tmp_path):
    from deleaker.runtime import jobs
    from deleaker.runtime.request import GenerationRequest

    components = {name: copy.deepcopy(c) for name, c in tiny_components.items()}
    rt = DeLeakerRuntime.from_components(components, model_id="tiny", backend="torch", device="cpu", text_len=32,
                                         default_size=(64, 64))
    t5_calls = _count_calls(rt.text.text_encoder_2)
    spec = jobs.RuntimeSpec(model="tiny", backend="torch", device="cpu", text_len=32)
    job = jobs.single_job(spec, GenerationRequest(PROMPT, ("cat", "cheetah"), steps=1), tmp_path / "x.png",
                          compare=True)
    report = jobs.run_job(job, runtime=rt)
    assert len(t5_calls) == 1  # DeLeaker's image and plain FLUX's: one encoding
    item = json.loads(json.dumps(report.to_dict()))["images"][0]
    assert item["peak_gpu_gib"] is None and "plain_total" in item["timings"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backend": "torch", "device": "cpu"}, "keeps the text encoders in CPU memory"),
        ({"backend": "onnxruntime"}, "offload_encoders applies to the torch backend"),
    ],
    ids=["cpu", "onnxruntime"],
)
def test_offloading_the_encoders_off_a_gpu_is_refused_before_loading(kwargs, message, monkeypatch):
    from deleaker.runtime import jobs
    from deleaker.runtime import runtime as runtime_mod

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(runtime_mod, "load_components", no_loading)
    with pytest.raises(ConfigError, match=message):
        DeLeakerRuntime.from_model("tiny", offload_encoders=True, **kwargs)
    with pytest.raises(ConfigError, match="--offload-encoders"):
        jobs.RuntimeSpec(model="tiny", offload_encoders=True, **kwargs)
