"""The runtime on FLUX.2 folders (`deleaker.runtime.flux2_runtime`): tiny [klein] and [dev] folders written in-process
(random weights, tokenizers trained in-process), loaded by `DeLeakerRuntime.from_model` and `run --model`.

Without entities the runtime's image is the stock diffusers pipeline's, bit for bit, from the same seed; with entities
it is `DeLeakerFlux2*Pipeline`'s. What the runtime does not run on FLUX.2 is refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from deleaker.errors import ConfigError, EntityError, NonFiniteError, ShapeError
from deleaker.pipeline_flux2 import DeLeakerFlux2KleinPipeline, DeLeakerFlux2Pipeline
from deleaker.runtime.cli import main as cli_main
from deleaker.runtime.flux2_runtime import Flux2Runtime
from deleaker.runtime.images import read_png_record
from deleaker.runtime.request import GenerationRequest, PromptError
from deleaker.runtime.runtime import DeLeakerRuntime
from deleaker.tiny_flux2 import save_tiny_flux2, save_tiny_flux2_klein

TEXT_LEN = 64
PROMPT = "A cat and a dog in a garden"
ENTITIES = ["cat", "dog"]
SIZE = 32  # the tiny VAE's scale factor is 4: a multiple of 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {"klein": save_tiny_flux2_klein(root / "klein"), "dev": save_tiny_flux2(root / "dev")}


STOCK = {"klein": (Flux2KleinPipeline, DeLeakerFlux2KleinPipeline), "dev": (Flux2Pipeline, DeLeakerFlux2Pipeline)}


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_runtime_equals_the_stock_and_deleaker_pipelines(folders, variant):
    """[klein] runs true CFG at guidance 3.5 (not step-distilled), [dev] embeds the guidance: both through the
    runtime's request, seed and step count, equal to the pipelines called directly."""
    rt = DeLeakerRuntime.from_model(folders[variant], backend="torch", text_len=TEXT_LEN)
    assert isinstance(rt, Flux2Runtime) and rt.backend_name == "torch"
    steps, seed, guidance = 2, 5, 3.5
    done = []
    plain = rt.generate(
        rt.resolve(_request(seed, steps, guidance, deleaker=False)), record_latents=True,
        progress=lambda i, n: done.append((i, n)),
    )
    assert done == [(1, steps), (2, steps)] and len(plain.latents) == steps
    assert all(bool(torch.isfinite(latents).all()) for latents in plain.latents)
    assert set(plain.timings) >= {"encode", "denoise", "decode", "total"}

    stock_class, deleaker_class = STOCK[variant]
    common = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
                  max_sequence_length=TEXT_LEN)
    stock = stock_class.from_pretrained(folders[variant], local_files_only=True)
    expected = stock(**common, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    assert np.array_equal(_pixels(plain.image), _pixels(expected))

    ours = rt.generate(_request(seed, steps, guidance), record_latents=True)
    deleaker = deleaker_class.from_pretrained(folders[variant], local_files_only=True)
    expected_ours = deleaker(
        **common, generator=torch.Generator("cpu").manual_seed(seed), entities=ENTITIES
    ).images[0]
    assert np.array_equal(_pixels(ours.image), _pixels(expected_ours))
    assert not torch.equal(ours.latents[-1], plain.latents[-1])  # DeLeaker acted

    batch = rt.generate_batch([_request(seed, steps, guidance), _request(seed, steps, guidance, deleaker=False)])
    assert np.array_equal(_pixels(batch[0].image), _pixels(ours.image))
    assert np.array_equal(_pixels(batch[1].image), _pixels(plain.image))


def _request(seed, steps, guidance, deleaker=True):
    from deleaker.runtime.request import GenerationRequest

    return GenerationRequest(PROMPT, ENTITIES, seed, steps, guidance, SIZE, SIZE, deleaker)


def test_requests_are_checked_before_any_work(folders):
    rt = DeLeakerRuntime.from_model(folders["klein"], backend="torch", text_len=TEXT_LEN)
    with pytest.raises(PromptError, match="tokens in the chat-templated text"):
        rt("cat dog " * TEXT_LEN, ENTITIES, steps=1, height=SIZE, width=SIZE)
    with pytest.raises(EntityError, match="horse"):
        rt(PROMPT, ["cat", "horse"], steps=1, height=SIZE, width=SIZE)
    with pytest.raises(ShapeError):
        rt(PROMPT, ENTITIES, steps=1, height=SIZE + 4, width=SIZE)
    with pytest.raises(PromptError, match="non-empty"):
        rt("   ", ENTITIES, steps=1, height=SIZE, width=SIZE)


def test_non_finite_latents_are_an_error_not_an_image(folders):
    """A transformer that overflows (here: a NaN weight) gives `NonFiniteError` naming FLUX.2, with the steps
    recorded before it (none: the first step fails), never a black image."""
    rt = DeLeakerRuntime.from_model(folders["klein"], backend="torch", text_len=TEXT_LEN)
    with torch.no_grad():
        rt.pipeline.transformer.proj_out.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="after step 1 of 2.*FLUX.2") as caught:
        rt.generate(_request(0, 2, 3.5), record_latents=True)
    assert caught.value.latents == []


def test_what_the_runtime_does_not_run_on_flux2_is_refused_before_the_load(folders):
    model = folders["dev"]
    with pytest.raises(ConfigError, match="torch backend only.*backend='torch'"):
        DeLeakerRuntime.from_model(model)  # the default backend, onnxruntime
    with pytest.raises(ConfigError, match="compile .*not available for a FLUX.2 model"):
        DeLeakerRuntime.from_model(model, backend="torch", compile=True)
    with pytest.raises(ConfigError, match="fp8 .*not available for a FLUX.2 model"):
        DeLeakerRuntime.from_model(model, backend="torch", fp8="row")


def test_cli_run_writes_a_png_with_our_record_and_refuses_what_flux2_lacks(folders, tmp_path):
    runner = CliRunner()
    model = str(folders["klein"])
    request = ["--prompt", PROMPT, "--entities", "cat,dog", "--steps", "1", "--height", str(SIZE), "--width",
               str(SIZE), "--text-len", str(TEXT_LEN), "--no-progress"]
    out = tmp_path / "cat.png"
    ran = runner.invoke(cli_main, ["run", "--model", model, *request, "--out", str(out)])  # torch by default
    assert ran.exit_code == 0, ran.output
    ours, record = read_png_record(out)
    assert ours and record["backend"] == "torch" and record["model"] == str(folders["klein"].resolve())
    assert record["entities"] == ENTITIES and record["text_len"] == TEXT_LEN and record["steps"] == 1

    refusals = {
        "onnxruntime backend": ["run", "--model", model, "--backend", "onnxruntime"],
        "--compile": ["run", "--model", model, "--compile"],
        "--fp8": ["run", "--model", model, "--backend", "torch", "--fp8", "row"],
        "verify: ": ["verify", "--model", model],
        "--save-masks": ["run", "--model", model, "--save-masks"],  # the overlay would say DeLeaker did not act
    }
    for expected, args in refusals.items():
        no = tmp_path / "no.png"
        result = runner.invoke(cli_main, [*args, *request, *(["--out", str(no)] if args[0] == "run" else [])])
        assert result.exit_code == 1 and not no.exists(), (args, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0] and "FLUX.2" in lines[0], (args, result.output)


def test_cli_run_takes_guidance_for_klein_which_runs_cfg_with_it(folders, tmp_path):
    """[klein] has no guidance embedding but runs classifier-free guidance with it: ``--guidance`` is used, not
    refused as for FLUX.1-schnell, and its record says the value."""
    out = tmp_path / "cfg.png"
    ran = CliRunner().invoke(cli_main, [
        "run", "--model", str(folders["klein"]), "--prompt", PROMPT, "--entities", "cat,dog", "--steps", "1",
        "--guidance", "2.5", "--height", str(SIZE), "--width", str(SIZE), "--text-len", str(TEXT_LEN),
        "--no-progress", "--out", str(out),
    ])
    assert ran.exit_code == 0, ran.output
    ours, record = read_png_record(out)
    assert ours and record["guidance"] == 2.5 and record["steps"] == 1


def test_a_request_without_steps_or_guidance_takes_the_stock_pipelines_defaults(folders):
    """Steps and guidance left out are the stock FLUX.2 pipeline's own ``__call__`` defaults, not FLUX.1's."""
    import inspect

    for variant, stock in (("klein", Flux2KleinPipeline), ("dev", Flux2Pipeline)):
        rt = DeLeakerRuntime.from_model(folders[variant], backend="torch")
        defaults = inspect.signature(stock.__call__).parameters
        resolved = rt.resolve(GenerationRequest(PROMPT, ENTITIES, seed=0, height=SIZE, width=SIZE))
        assert resolved.steps == rt.default_steps == defaults["num_inference_steps"].default
        assert resolved.guidance == rt.default_guidance == defaults["guidance_scale"].default
        given = GenerationRequest(PROMPT, ENTITIES, seed=0, steps=2, guidance=2.5, height=SIZE, width=SIZE)
        assert (rt.resolve(given).steps, rt.resolve(given).guidance) == (2, 2.5)
