"""Exporting the tiny FLUX.2 [dev] and [klein] with DeLeaker to ONNX: the contract's FLUX.2 family, one
DeLeakerAttention node per joint attention, and ONNX Runtime == PyTorch over steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from deleaker.config import DeLeakerConfig, model_family
from deleaker.errors import ConfigError, ShapeError
from deleaker.export.contract import FluxTransformerIO
from deleaker.export.exporter import export_transformer_onnx, read_export_metadata
from deleaker.export.ort_reference import make_reference_session
from deleaker.export.ort_session import make_session, session_feeds
from deleaker.export.wrapper import make_wrapper
from deleaker.tiny_flux2 import build_tiny_flux2_components, build_tiny_flux2_klein_components

TEXT_LEN = 16
NUM_BLOCKS = 4
STEPS = 3
# As tests/test_export_onnx.py: windows inside the first steps, masks large enough to survive the opening.
CONFIG = DeLeakerConfig.for_model(
    NUM_BLOCKS, std_mul_text=-0.5, start_aggregating_from=1, stop_aggregating_at=10, start_intervention_from=3,
    stop_intervention_at=9,
)
OFF = dataclasses.replace(CONFIG, start_intervention_from=10**6, stop_intervention_at=10**6)
BUILDERS = {"dev": build_tiny_flux2_components, "klein": build_tiny_flux2_klein_components}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _io(transformer, batch=(1, 2, 2)):
    return FluxTransformerIO.from_transformer(
        transformer, height=64, width=64, text_len=TEXT_LEN, max_entities=4, vae_scale_factor=4, batch=batch
    )


@pytest.fixture(scope="module", params=["dev", "klein"])
def exported(request, tmp_path_factory):
    transformer = BUILDERS[request.param]()["transformer"]
    io = _io(transformer)
    out = tmp_path_factory.mktemp(f"flux2-{request.param}")
    result = export_transformer_onnx(transformer, io, out / "transformer.onnx", config=CONFIG)
    return request.param, transformer, io, result


def test_contract_of_flux2(exported):
    kind, transformer, io, _ = exported
    assert model_family(transformer.config) == io.family == "flux2"
    expected = ["hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids"]
    expected += ["guidance"] if kind == "dev" else []
    assert list(io.input_names) == expected + ["entity_mask", "history", "step"]
    assert io.spec("img_ids").shape == (64, 4) and io.spec("txt_ids").shape == (TEXT_LEN, 4)
    assert io.pooled_projection_dim == 0 and io.joint_attention_dim == transformer.config.joint_attention_dim
    sample = io.sample_inputs(1)
    assert torch.equal(sample["txt_ids"][:, 3], torch.arange(TEXT_LEN, dtype=torch.float32))  # as Flux2Pipeline
    assert FluxTransformerIO.from_dict(io.to_dict()) == io
    with pytest.raises(ConfigError, match="pooled_projection_dim must be 0 for FLUX.2"):
        dataclasses.replace(io, pooled_projection_dim=8)
    with pytest.raises(ConfigError, match="family must be one of"):
        dataclasses.replace(io, family="flux3")


def test_flux1_contracts_are_stored_as_before(tiny_components):
    io = _io(tiny_components["transformer"])
    assert io.family == "flux1" and "family" not in io.to_dict()
    assert FluxTransformerIO.from_dict(io.to_dict()) == io
    with pytest.raises(ShapeError, match="family 'flux1' but the transformer is 'flux2'"):
        make_wrapper(build_tiny_flux2_components()["transformer"], dataclasses.replace(io, guidance_embeds=True),
                     CONFIG)


def test_export_has_one_node_per_joint_attention_and_its_metadata(exported):
    _, _, io, result = exported
    assert result.num_deleaker_nodes == NUM_BLOCKS
    stored_io, stored_config, decomposed = read_export_metadata(result.onnx_path)
    assert stored_io == io and stored_config == CONFIG and not decomposed


def test_onnxruntime_matches_pytorch_over_steps(exported):
    _, transformer, io, result = exported
    wrapper, wrapper_off = make_wrapper(transformer, io, CONFIG).eval(), make_wrapper(transformer, io, OFF).eval()
    session = make_reference_session(result.onnx_path)  # the DeLeakerAttention node's Python reference, by name
    history = torch.zeros(io.spec("history").concrete(2))
    history_ort = history.numpy()
    for step in range(STEPS):
        x = io.sample_inputs(2, seed=10 + step, step=step)
        x["history"] = history
        with torch.no_grad():
            noise_ref, history = wrapper(*x.values())
            noise_off = wrapper_off(*x.values())[0]
        noise, history_ort = session.run(None, session_feeds(io, {**x, "history": history_ort}))
        assert rel_l2(noise, noise_ref) < 1e-5, f"step {step}"
        assert rel_l2(history_ort, history) < 1e-5, f"step {step}"
        if step > 0:  # steps 1 and 2 edit 4 and 2 blocks (step 0 only its last): the match is not the trivial one
            assert rel_l2(noise_ref, noise_off) > 1e-4, f"step {step}: DeLeaker changed nothing"  # 10x the tolerance


def test_decomposed_export_runs_in_stock_onnxruntime(tmp_path):
    transformer = build_tiny_flux2_klein_components()["transformer"]
    io = _io(transformer, batch=(1, 1, 1))
    result = export_transformer_onnx(transformer, io, tmp_path / "decomposed.onnx", config=CONFIG, decompose=True)
    assert result.num_deleaker_nodes == 0
    session = make_session(result.onnx_path)
    x = io.sample_inputs(1, seed=3, step=1)
    with torch.no_grad():
        noise_ref, history_ref = make_wrapper(transformer, io, CONFIG).eval()(*x.values())
    noise, history = session.run(None, session_feeds(io, x))
    assert rel_l2(noise, noise_ref) < 1e-4 and rel_l2(history, history_ref) < 1e-4
