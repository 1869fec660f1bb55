"""A FLUX.2 diffusers folder through ``deleaker-trt build`` (its pipeline class read from model_index.json, the
transformer exported with FLUX.2's contract) and the runtime, which runs a FLUX.2 folder with the torch backend
(tests/test_runtime_flux2.py) but not its engines, nor triton-repo, refused before any work; FP8 builds, whose
calibration is FLUX.1's, are refused for FLUX.2."""

from __future__ import annotations

import json

from click.testing import CliRunner

from deleaker.models import is_flux2_model, pipeline_class_name
from deleaker.runtime.cli import main as cli_main
from deleaker.tiny import save_tiny_flux
from deleaker.tiny_flux2 import save_tiny_flux2, save_tiny_flux2_klein

TEXT_LEN = 16


def test_flux2_folders_are_told_apart_by_their_model_index(tmp_path):
    assert pipeline_class_name(save_tiny_flux2(tmp_path / "dev")) == "Flux2Pipeline"
    assert is_flux2_model(tmp_path / "dev")
    assert not is_flux2_model(save_tiny_flux(tmp_path / "flux1")) and not is_flux2_model("tiny")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("[1, 2")
    assert pipeline_class_name(tmp_path / "broken") is None  # left to the load, which names the problem


def test_build_exports_a_flux2_folder_and_the_runtime_refuses_its_engines(tmp_path):
    """``build --model`` takes a FLUX.2 [klein] folder (its pipeline class from model_index.json); the runtime runs
    FLUX.1's engines only so far (``run --engines``) and says so before any work; FP8's calibration is FLUX.1's and
    is refused for FLUX.2 before the model loads."""
    model = save_tiny_flux2_klein(tmp_path / "klein")
    runner = CliRunner()
    out = tmp_path / "engines"
    size = ["--height", "64", "--width", "64", "--text-len", str(TEXT_LEN)]
    built = runner.invoke(cli_main, ["build", "--model", str(model), *size, "--onnx-only", "--out", str(out)])
    assert built.exit_code == 0, built.output
    (manifest,) = [json.loads(p.read_text()) for p in out.glob("*.manifest.json")]
    assert manifest["io"]["family"] == "flux2" and manifest["io"]["guidance_embeds"] is False
    assert [spec["name"] for spec in manifest["io"]["inputs"]][:5] == [
        "hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids"
    ]

    request = ["--prompt", "A cat and a dog", "--entities", "cat,dog", "--steps", "1", "--no-progress"]
    ran = runner.invoke(cli_main, ["run", "--engines", str(out), *request, "--out", str(tmp_path / "no.png")])
    assert ran.exit_code == 1 and not (tmp_path / "no.png").exists()
    assert "is a FLUX.2 model; the runtime runs FLUX.2 from its diffusers folder with the torch backend only" in ran.output

    # triton-repo writes a repository without loading the model: refused when it is made, not on the server.
    repo = runner.invoke(cli_main, ["triton-repo", "--model", str(model), "--out", str(tmp_path / "repo")])
    assert repo.exit_code == 1 and not (tmp_path / "repo").exists()
    assert "triton-repo: " in repo.output and "is a FLUX.2 model; the runtime" in repo.output

    fp8 = runner.invoke(cli_main, ["build", "--model", str(model), *size, "--precision", "fp8", "--onnx-only",
                                   "--out", str(tmp_path / "fp8")])
    assert fp8.exit_code == 1 and "is a FLUX.2 model: build it in fp16 or bf16" in fp8.output
